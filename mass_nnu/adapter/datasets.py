"""Dataset IDs and folders, the nnU-Net way (``-d 17`` and ``-d 017`` and ``-d Dataset017_BTCV`` all work)."""
from __future__ import annotations

import json
import os
from pathlib import Path

from mass_nnu.errors import MassError


def raw_root() -> Path:
    return Path(os.environ["nnUNet_raw"])


def preprocessed_root() -> Path:
    return Path(os.environ["nnUNet_preprocessed"])


def results_root() -> Path:
    return Path(os.environ["nnUNet_results"])


def dataset_name(dataset: str | int) -> str:
    """Resolve an ID or name to ``DatasetXXX_Name``, or raise one clear error."""
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    try:
        return str(maybe_convert_to_dataset_name(str(dataset)))  # nnU-Net may return numpy.str_
    except (RuntimeError, ValueError, AssertionError):
        raise MassError(f"unknown dataset '{dataset}': no Dataset{str(dataset).zfill(3) if str(dataset).isdigit() else dataset}"
                        f"_* folder under nnUNet_raw ({raw_root()}), nnUNet_preprocessed or nnUNet_results") from None


def dataset_id(name: str) -> int:
    return int(name[len("Dataset"):len("Dataset") + 3])


def raw_dir(dataset: str | int) -> Path:
    return raw_root() / dataset_name(dataset)


def preprocessed_dir(dataset: str | int) -> Path:
    return preprocessed_root() / dataset_name(dataset)


def load_dataset_json(dataset: str | int) -> dict:
    """dataset.json from the raw folder, else the copy in the preprocessed folder."""
    for folder in (raw_dir(dataset), preprocessed_dir(dataset)):
        path = folder / "dataset.json"
        if path.is_file():
            try:
                return json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise MassError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None
    raise MassError(f"{raw_dir(dataset)}: no dataset.json (nor in {preprocessed_dir(dataset)})")


def load_plans(dataset: str | int, plans_identifier: str) -> dict:
    path = preprocessed_dir(dataset) / f"{plans_identifier}.json"
    if not path.is_file():
        raise MassError(f"{path}: unknown plans '{plans_identifier}'; run 'mass plan -d {dataset}' first")
    return json.loads(path.read_text())
