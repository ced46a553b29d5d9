"""nnU-Net folder variables with TotalSegmentator-like defaults, and the trainer shim on nnUNet_extTrainer.

Must run before anything imports ``nnunetv2`` (``nnunetv2.paths`` reads the variables at import time).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

NNUNET_FOLDERS = {"nnUNet_raw": "raw", "nnUNet_preprocessed": "preprocessed", "nnUNet_results": "results"}
TRAINER_SHIM = Path(__file__).resolve().parent / "nnunet_trainers"
_announced = False


def configure_environment(workspace: Path | None = None, quiet: bool = False) -> dict[str, str]:
    """Fill unset nnU-Net folder variables with ``./mass_workspace/*`` (said once) and register the trainer shim."""
    global _announced
    base = Path(workspace or os.environ.get("MASS_WORKSPACE", "mass_workspace")).resolve()
    defaulted = []
    for var, sub in NNUNET_FOLDERS.items():
        if not os.environ.get(var):
            os.environ[var] = str(base / sub)
            defaulted.append(var)
        Path(os.environ[var]).mkdir(parents=True, exist_ok=True)
    if defaulted and not quiet and not _announced:
        print(f"mass: {', '.join(defaulted)} not set; using {base}/{{raw,preprocessed,results}}", file=sys.stderr)
        _announced = True
    register_trainer_shim()
    return {var: os.environ[var] for var in NNUNET_FOLDERS}


def register_trainer_shim() -> None:
    """Put the shim folder holding nnUNetTrainerMASS on nnUNet_extTrainer, so ``-tr nnUNetTrainerMASS`` resolves."""
    current = [p for p in os.environ.get("nnUNet_extTrainer", "").split(os.pathsep) if p]
    if str(TRAINER_SHIM) not in current:
        os.environ["nnUNet_extTrainer"] = os.pathsep.join(current + [str(TRAINER_SHIM)])


def export_lines() -> str:
    """Shell lines a plain nnU-Net user sources to use our trainers with the stock commands."""
    lines = [f'export nnUNet_extTrainer="{TRAINER_SHIM}${{nnUNet_extTrainer:+:$nnUNet_extTrainer}}"']
    lines += [f'export {var}="{os.environ[var]}"' for var in NNUNET_FOLDERS if os.environ.get(var)]
    return "\n".join(lines)
