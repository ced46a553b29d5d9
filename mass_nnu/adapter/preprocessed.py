"""nnU-Net's preprocessed data as pretraining reads it: case lists, blosc2 images, properties and plans facts."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mass_nnu.adapter.datasets import dataset_name, load_dataset_json, load_plans, preprocessed_dir
from mass_nnu.errors import MassError


@dataclass(frozen=True)
class PreprocessedDataset:
    """One dataset preprocessed with one plans/configuration pair."""
    name: str
    plans_identifier: str
    configuration: str
    plans: dict
    dataset_json: dict
    data_folder: Path
    case_ids: tuple[str, ...]
    num_input_channels: int
    patch_size: tuple[int, ...]
    transpose_forward: tuple[int, ...]


def open_preprocessed(dataset, plans_identifier: str, configuration: str) -> PreprocessedDataset:
    """Plans and preprocessed case list of a dataset; clear errors for unknown plans and missing preprocessing."""
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    from mass_nnu.adapter.networks import configuration_manager
    from mass_nnu.adapter.training import num_input_channels

    name = dataset_name(dataset)
    plans = load_plans(name, plans_identifier)
    manager = configuration_manager(plans, configuration)
    dataset_json = load_dataset_json(name)
    folder = preprocessed_dir(name) / manager.data_identifier
    case_ids: list[str] = []
    if folder.is_dir() and any(folder.iterdir()):
        try:
            case_ids = sorted(infer_dataset_class(str(folder)).get_identifiers(str(folder)))
        except (RuntimeError, AssertionError):
            case_ids = []
    if not case_ids:
        raise MassError(f"{folder}: {name} is not preprocessed for '{plans_identifier}' {configuration}; run "
                        f"'mass plan -d {name}' (with --target-dataset for transferred plans) first")
    return PreprocessedDataset(
        name=name, plans_identifier=plans_identifier, configuration=configuration, plans=plans,
        dataset_json=dataset_json, data_folder=folder, case_ids=tuple(case_ids),
        num_input_channels=num_input_channels(plans, configuration, dataset_json),
        patch_size=tuple(int(p) for p in manager.patch_size),
        transpose_forward=tuple(int(t) for t in plans.get("transpose_forward", range(len(manager.patch_size)))))


def load_case(folder: Path, case_id: str) -> tuple[np.ndarray, dict]:
    """(image (C, *S) float32, properties) of one preprocessed case, read by nnU-Net's own dataset class."""
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    data, _, _, properties = infer_dataset_class(str(folder))(str(folder), [case_id]).load_case(case_id)
    return np.asarray(data[:], dtype=np.float32), properties


def load_properties(folder: Path, case_id: str) -> dict:
    """The properties nnU-Net's preprocessor saved for a case (bbox_used_for_cropping, shapes, spacing...)."""
    from batchgenerators.utilities.file_and_folder_operations import load_pickle

    path = folder / f"{case_id}.pkl"
    if not path.is_file():
        raise MassError(f"{path}: missing properties of preprocessed case '{case_id}'; run 'mass plan' again")
    return load_pickle(str(path))


def raw_geometry(properties: dict, transpose_forward: tuple[int, ...]) -> dict:
    """Geometry of the raw image (array order, before nnU-Net's transpose) from the preprocessing properties."""
    shape = [int(s) for s in properties["shape_before_cropping"]]
    backward = np.argsort(transpose_forward)
    geometry = {"shape": [shape[i] for i in backward]}
    sitk = properties.get("sitk_stuff")
    if sitk:
        geometry.update(spacing=list(sitk["spacing"])[::-1], origin=list(sitk["origin"]),
                        direction=list(sitk["direction"]))
    return geometry


def to_preprocessed_grid(layers: np.ndarray, properties: dict, transpose_forward: tuple[int, ...],
                         target_shape: tuple[int, ...]) -> np.ndarray:
    """Label layers (L, *raw) -> (L, *target): nnU-Net's transpose, its crop to the non-zero bounding box, then
    nearest-neighbour resampling to the preprocessed shape (index mapping at voxel centres)."""
    layers = layers.transpose([0, *[t + 1 for t in transpose_forward]])
    bbox = properties["bbox_used_for_cropping"]
    layers = layers[(slice(None), *[slice(int(lo), int(hi)) for lo, hi in bbox])]
    for axis, n_out in enumerate(target_shape):
        n_in = layers.shape[axis + 1]
        if n_in != n_out:
            index = np.minimum(((np.arange(n_out) + 0.5) * n_in / n_out).astype(np.int64), n_in - 1)
            layers = np.take(layers, index, axis=axis + 1)
    return np.ascontiguousarray(layers)


def data_folder(dataset, plans: dict, configuration: str) -> Path:
    """$nnUNet_preprocessed/<Dataset>/<data_identifier> of a plans/configuration pair."""
    from mass_nnu.adapter.networks import configuration_manager

    return preprocessed_dir(dataset) / configuration_manager(plans, configuration).data_identifier


def case_ids(folder: Path) -> list[str]:
    """Preprocessed case identifiers of a data folder; a clear error when it is not preprocessed."""
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    try:
        ids = sorted(infer_dataset_class(str(folder)).get_identifiers(str(folder))) if folder.is_dir() else []
    except (RuntimeError, AssertionError):
        ids = []
    if not ids:
        raise MassError(f"{folder}: not preprocessed; run 'mass plan -d {folder.parent.name}' first")
    return ids


def raw_to_preprocessed(layers: np.ndarray, properties: dict, plans: dict, target_shape) -> np.ndarray:
    """``to_preprocessed_grid`` with the plans' transpose."""
    transpose = tuple(int(t) for t in plans.get("transpose_forward", range(layers.ndim - 1)))
    return to_preprocessed_grid(layers, properties, transpose, tuple(int(s) for s in target_shape))
