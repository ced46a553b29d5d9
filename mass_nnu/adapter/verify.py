"""nnU-Net's dataset integrity check, with its failures turned into one clear error."""
from __future__ import annotations

from pathlib import Path

from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

from mass_nnu.errors import MassError


def verify_raw_dataset(folder: Path, num_processes: int = 1) -> None:
    try:
        verify_dataset_integrity(str(folder), num_processes=num_processes)
    except (AssertionError, RuntimeError, FileNotFoundError) as e:
        raise MassError(f"{folder}: nnU-Net's integrity check failed: {str(e).strip().splitlines()[0]}") from None
