"""nnU-Net's preprocessed data: the data folder of a plans/configuration pair, its case list, blosc2 cases, and
label layers mapped from the raw grid onto the preprocessed one."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

from mass_nnu.adapter.datasets import Dataset
from mass_nnu.adapter.networks import configuration_manager
from mass_nnu.errors import MassError
from mass_nnu.grids import resample_nearest


def data_folder(dataset: Dataset, plans: dict, configuration: str) -> Path:
    """$nnUNet_preprocessed/<Dataset>/<data_identifier> of a plans/configuration pair."""
    return dataset.preprocessed / configuration_manager(plans, configuration).data_identifier


def preprocessed_case_ids(folder: Path) -> list[str]:
    """Case identifiers of a preprocessed data folder (blosc2 or npz); [] when it is not preprocessed."""
    if not folder.is_dir() or not any(folder.iterdir()):
        return []
    try:
        return sorted(infer_dataset_class(str(folder)).get_identifiers(str(folder)))
    except (RuntimeError, AssertionError):
        return []


def require_case_ids(folder: Path) -> list[str]:
    """``preprocessed_case_ids``, or a clear error when there are none."""
    ids = preprocessed_case_ids(folder)
    if not ids:
        raise MassError(f"{folder}: not preprocessed; run 'mass plan -d {folder.parent.name}' first")
    return ids


def load_case(folder: Path, case_id: str) -> tuple[np.ndarray, dict]:
    """(image (C, *S) float32, properties) of one preprocessed case, read by nnU-Net's own dataset class."""
    data, _, _, properties = infer_dataset_class(str(folder))(str(folder), [case_id]).load_case(case_id)
    return np.asarray(data[:], dtype=np.float32), properties


def open_case(folder: Path, case_id: str):
    """The preprocessed image (C, *S) of one case, lazy: nnU-Net's blosc2 (or memory-mapped) array, so a crop
    reads only its chunks."""
    return infer_dataset_class(str(folder))(str(folder), [case_id]).load_case(case_id)[0]


def case_shape_and_properties(folder: Path, case_id: str) -> tuple[tuple[int, ...], dict]:
    """(image shape (C, *S), properties) of one preprocessed case, without reading its voxels."""
    data, _, _, properties = infer_dataset_class(str(folder))(str(folder), [case_id]).load_case(case_id)
    return tuple(int(s) for s in data.shape), properties


def to_preprocessed_grid(layers: np.ndarray, properties: dict, transpose_forward: tuple[int, ...],
                         target_shape: tuple[int, ...]) -> np.ndarray:
    """Label layers (L, *raw) -> (L, *target): nnU-Net's transpose, its crop to the non-zero bounding box, then
    nearest-neighbour resampling to the preprocessed shape (``grids.resample_nearest``: voxel-centre index
    mapping)."""
    layers = layers.transpose([0, *[t + 1 for t in transpose_forward]])
    bbox = properties["bbox_used_for_cropping"]
    layers = layers[(slice(None), *[slice(int(lo), int(hi)) for lo, hi in bbox])]
    return np.ascontiguousarray(resample_nearest(layers, target_shape))


def raw_to_preprocessed(layers: np.ndarray, properties: dict, plans: dict, target_shape) -> np.ndarray:
    """``to_preprocessed_grid`` with the plans' transpose."""
    transpose = tuple(int(t) for t in plans.get("transpose_forward", range(layers.ndim - 1)))
    return to_preprocessed_grid(layers, properties, transpose, tuple(int(s) for s in target_shape))
