"""The pretrained-artifact contract: what `mass pretrain` writes and every later stage reads.

``$nnUNet_results/<first pretraining Dataset>/MASSPretrainer__<plans>__<config>/`` holds
- ``checkpoint_final.pth`` / ``checkpoint_latest.pth``: the full MASS model (EMA weights under ``network_weights``)
  with its plans, configuration, dataset.json and ``mass_config``, all plain data (``weights_only=True``);
- ``nnunet_pretrained_weights.pth``: the nnU-Net backbone for stock ``nnUNetv2_train -pretrained_weights``, plus an
  nnssl adaptation plan for nnU-Net master's ``nnUNetv2_preprocess_like_nnssl`` / ``nnUNetv2_train_pretrained``.

This module owns the folder and file names, the export, and finding, resolving and loading those files.
"""
from __future__ import annotations

import copy
from pathlib import Path

from mass_nnu.adapter.datasets import Dataset, results_root, trainer_folder_name
from mass_nnu.errors import MassError
from mass_nnu.io import architecture_fingerprint, load_checkpoint, save_checkpoint
from mass_nnu.model.mass_model import MASSModel, build_mass_model

PRETRAINER_NAME = "MASSPretrainer"
CHECKPOINT_FINAL = "checkpoint_final.pth"
CHECKPOINT_LATEST = "checkpoint_latest.pth"
WEIGHTS_FILE = "nnunet_pretrained_weights.pth"

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


def pretrained_folder(dataset: Dataset, plans_identifier: str, configuration: str) -> Path:
    """Where `mass pretrain` writes: nnU-Net's results layout under the first pretraining dataset."""
    return dataset.model_folder(PRETRAINER_NAME, plans_identifier, configuration)


def find_pretrained_weights(configuration: str, plans_identifier: str | None) -> Path:
    """The one pretrained weights file under nnUNet_results (MassError when none or several)."""
    pattern = f"Dataset*/{trainer_folder_name(PRETRAINER_NAME, plans_identifier or '*', configuration)}/{WEIGHTS_FILE}"
    found = sorted(results_root().glob(pattern))
    if not found:
        raise MassError(f"{results_root()}: no pretrained weights ({pattern}); run 'mass pretrain', pass -w, or "
                        f"train from scratch with --scratch")
    if len(found) > 1:
        raise MassError(f"{results_root()}: several pretrained models, choose one with -w: "
                        + ", ".join(str(p.parent) for p in found))
    return found[0]


def resolve_weights_path(path) -> Path:
    """A weights file, or a pretrained folder holding ``nnunet_pretrained_weights.pth``."""
    path = Path(path)
    if path.is_dir():
        if not (path / WEIGHTS_FILE).is_file():
            raise MassError(f"{path}: no {WEIGHTS_FILE} in this folder (is it a 'mass pretrain' output folder?)")
        return path / WEIGHTS_FILE
    if not path.is_file():
        raise MassError(f"{path}: pretrained weights not found")
    return path


def load_weights_file(path) -> tuple[Path, dict]:
    """(absolute path, checkpoint) of an exported weights file; it must carry the plans it was trained on."""
    path = resolve_weights_path(path).resolve()  # absolute: recorded in the plans and compared on reruns
    checkpoint = load_checkpoint(path)
    plan = checkpoint.get("nnssl_adaptation_plan")
    if not isinstance(plan, dict) or not isinstance(plan.get("pretrain_plan"), dict):
        raise MassError(f"{path}: no 'nnssl_adaptation_plan.pretrain_plan' (not written by 'mass pretrain')")
    return path, checkpoint


def find_mass_checkpoint(weights: Path) -> tuple[Path, dict] | None:
    """The full MASS checkpoint (task encoder, conditioning, head) of a pretrained weights file, read: the file
    itself when it is one, else ``checkpoint_final.pth`` beside it; None when there is none."""
    for candidate in (weights, weights.parent / CHECKPOINT_FINAL):
        if candidate.is_file():
            checkpoint = load_checkpoint(candidate)
            if "mass_config" in checkpoint:
                return candidate, checkpoint
    return None


def resolve_mass_checkpoint(weights: Path) -> tuple[Path, dict]:
    found = find_mass_checkpoint(weights)
    if found is not None:
        return found
    raise MassError(f"{weights}: the in-context head needs the full MASS checkpoint ({CHECKPOINT_FINAL} of "
                    f"'mass pretrain') beside the weights; use --head new to transfer the backbone only")


def load_mass_model(folder_or_checkpoint, device="cpu") -> tuple[MASSModel, dict]:
    """A MASS model from a pretrained folder (its checkpoint_final.pth) or a checkpoint file; info holds
    plans, configuration, dataset_json, mass_config, architecture_fingerprint and the other plain entries."""
    path = Path(folder_or_checkpoint)
    if path.is_dir():
        path = path / CHECKPOINT_FINAL
    checkpoint = load_checkpoint(path)
    missing = [key for key in ("plans", "configuration", "mass_config") if key not in checkpoint]
    if missing:
        raise MassError(f"{path}: not a MASS checkpoint (missing {', '.join(missing)})")
    weights = checkpoint["network_weights"]
    num_input_channels = int(weights[_first_conv_key(weights)].shape[1])
    model = build_mass_model(checkpoint["plans"], checkpoint["configuration"], num_input_channels,
                             **checkpoint["mass_config"])
    expected = checkpoint.get("architecture_fingerprint")
    found = architecture_fingerprint(model.backbone.state_dict())
    if expected is not None and expected != found:
        raise MassError(f"{path}: backbone fingerprint {expected} does not match the network its plans build ({found})")
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise MassError(f"{path}: weights do not fit the model ({str(e).splitlines()[0][:200]})") from None
    info = {key: value for key, value in checkpoint.items() if key != "network_weights"}
    return model.to(device), info


def _first_conv_key(weights: dict) -> str:
    """The first conv weight of the backbone (stem or first stage): its dim 1 is the input channel count."""
    for key, value in weights.items():
        if key.startswith("backbone.encoder.") and key.endswith(".weight") and value.ndim >= 4:
            return key
    raise MassError("checkpoint: no backbone encoder convolution in network_weights")
