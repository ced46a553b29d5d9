"""Exports of a pretrained MASS model: the nnU-Net backbone for stock ``-pretrained_weights`` plus an
nnssl adaptation plan for nnU-Net master's ``nnUNetv2_preprocess_like_nnssl`` / ``nnUNetv2_train_pretrained``."""
from __future__ import annotations

from pathlib import Path

from mass_nnu.io import architecture_fingerprint, save_checkpoint

CITATIONS = [
    "Gao et al., MASS: MAsk-guided Self-Supervised learning for 3D medical image segmentation, CVPR 2026, "
    "arXiv:2603.13660",
    "Isensee et al., nnU-Net: a self-configuring method for deep learning-based biomedical image segmentation, "
    "Nature Methods 2021",
]
RESENC_KEYS = {"key_to_encoder": "encoder.stages", "key_to_stem": "encoder.stem",
               "keys_to_in_proj": ["encoder.stem.convs.0.conv", "encoder.stem.convs.0.all_modules.0"]}


def backbone_weights(model) -> dict:
    """The backbone's state dict on the CPU, with nnU-Net's own keys."""
    return {k: v.detach().cpu().clone() for k, v in model.backbone.state_dict().items()}


def adaptation_plan(plans: dict, configuration: str, num_input_channels: int) -> dict:
    config = plans["configurations"][configuration]
    arch = config["architecture"]
    return {
        "pretrain_plan": plans,
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
