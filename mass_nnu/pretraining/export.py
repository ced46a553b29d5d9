"""Exports of a pretrained MASS model: the nnU-Net backbone for stock ``-pretrained_weights`` plus an
nnssl adaptation plan for nnU-Net master's ``nnUNetv2_preprocess_like_nnssl`` / ``nnUNetv2_train_pretrained``."""
from __future__ import annotations

import copy
from pathlib import Path

from mass_nnu.io import architecture_fingerprint, save_checkpoint

# one dict per work (a BibTeX-like type, authors, title, venue, year, and a doi or url)
CITATIONS = [
    {"type": "inproceedings", "authors": "Gao et al.",
     "title": "MASS: MAsk-guided Self-Supervised learning for 3D medical image segmentation",
     "venue": "CVPR", "year": 2026, "url": "https://arxiv.org/abs/2603.13660"},
    {"type": "article", "authors": "Isensee et al.",
     "title": "nnU-Net: a self-configuring method for deep learning-based biomedical image segmentation",
     "venue": "Nature Methods", "year": 2021, "doi": "10.1038/s41592-020-01008-z"},
]
RESENC_KEYS = {"key_to_encoder": "encoder.stages", "key_to_stem": "encoder.stem",
               "keys_to_in_proj": ["encoder.stem.convs.0.conv", "encoder.stem.convs.0.all_modules.0"]}


def backbone_weights(model) -> dict:
    """The backbone's state dict on the CPU, with nnU-Net's own keys."""
    return {k: v.detach().cpu().clone() for k, v in model.backbone.state_dict().items()}


def resolved_configuration(plans: dict, configuration: str) -> dict:
    """A configuration with its ``inherits_from`` chain applied (as nnU-Net's PlansManager does), self-contained."""
    config = copy.deepcopy(plans["configurations"][configuration])
    seen = {configuration}
    while "inherits_from" in config:
        parent = config.pop("inherits_from")
        if parent in seen:
            raise ValueError(f"plans configuration '{configuration}': circular inherits_from via '{parent}'")
        seen.add(parent)
        config = {**copy.deepcopy(plans["configurations"][parent]), **config}
    return config


def pretrain_plan(plans: dict, configuration: str) -> dict:
    """The plans with only the pretraining configuration, resolved: nnU-Net master reads the first (and nnssl the
    only) configuration of ``pretrain_plan``, which must be the one the weights were trained with."""
    plan = {k: copy.deepcopy(v) for k, v in plans.items() if k != "configurations"}
    plan["configurations"] = {configuration: resolved_configuration(plans, configuration)}
    return plan


def adaptation_plan(plans: dict, configuration: str, num_input_channels: int) -> dict:
    config = resolved_configuration(plans, configuration)
    arch = config["architecture"]
    return {
        "pretrain_plan": pretrain_plan(plans, configuration),
        "architecture_plans": {"arch_class_name": arch["network_class_name"], "arch_kwargs": arch["arch_kwargs"],
                               "arch_kwargs_requiring_import": arch["_kw_requires_import"]},
        **RESENC_KEYS,
        "key_to_lpe": None,
        "pretrain_num_input_channels": int(num_input_channels),
        "recommended_downstream_patchsize": list(config["patch_size"]),
    }


def export_backbone(model, plans: dict, configuration: str, num_input_channels: int, path: Path) -> Path:
    """Write ``nnunet_pretrained_weights.pth``: read by ``nnUNetv2_train -pretrained_weights`` (network_weights)
    and by nnssl-style readers (nnssl_adaptation_plan, citations)."""
    weights = backbone_weights(model)
    save_checkpoint({"network_weights": weights,
                     "nnssl_adaptation_plan": adaptation_plan(plans, configuration, num_input_channels),
                     "citations": CITATIONS, "architecture_fingerprint": architecture_fingerprint(weights),
                     "plans_identifier": plans["plans_name"], "configuration": configuration}, path)
    return path
