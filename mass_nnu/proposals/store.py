"""Proposal storage: one ``proposalsTr/<case>.npz`` per case, beside nnU-Net's ``imagesTr``.

``layers`` is uint16 (L, Z, Y, X) on the raw image grid: each layer an instance label map (0 = none). Masks in
one layer never overlap; masks of different layers (scales, methods) may. A proposal is (layer, label value).
Geometry (shape, spacing, origin, direction) is stored to refuse proposals made for another image.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mass_nnu.adapter.datasets import Dataset
from mass_nnu.errors import MassError
from mass_nnu.io import atomic_path

FOLDER = "proposalsTr"


def proposal_dir(dataset: Dataset) -> Path:
    return dataset.raw / FOLDER


def proposal_path(dataset: Dataset, case_id: str) -> Path:
    return proposal_dir(dataset) / f"{case_id}.npz"


def image_geometry(image) -> dict:
    """Geometry of a SimpleITK image, with spacing in array (z, y, x) order."""
    return {"shape": list(image.GetSize())[::-1], "spacing": list(image.GetSpacing())[::-1],
            "origin": list(image.GetOrigin()), "direction": list(image.GetDirection())}


def write_proposals(path: Path, layers: np.ndarray, geometry: dict, backend: str, params: dict) -> None:
    if layers.ndim != 4 or tuple(layers.shape[1:]) != tuple(geometry["shape"]):
        raise ValueError(f"layers {layers.shape} do not match image shape {geometry['shape']}")
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, layers=layers.astype(np.uint16), shape=np.asarray(geometry["shape"]),
                                spacing=np.asarray(geometry["spacing"], float), origin=np.asarray(geometry["origin"], float),
                                direction=np.asarray(geometry["direction"], float), backend=np.asarray(backend),
                                params_json=np.asarray(json.dumps(params)))


def read_proposals(path: Path) -> tuple[np.ndarray, dict]:
    """(layers, geometry) of one case; a clear error for missing or damaged files."""
    path = Path(path)
    if not path.is_file():
        raise MassError(f"{path}: no proposals for this case; run 'mass propose' first")
    try:
        with np.load(path, allow_pickle=False) as f:
            layers = f["layers"]
            geometry = {"shape": f["shape"].tolist(), "spacing": f["spacing"].tolist(),
                        "origin": f["origin"].tolist(), "direction": f["direction"].tolist(),
                        "backend": str(f["backend"])}
    except (OSError, ValueError, KeyError) as e:
        raise MassError(f"{path}: not a readable proposals file ({e})") from None
    return layers, geometry


def check_geometry(geometry: dict, image_geometry_: dict, path: Path) -> None:
    """Refuse proposals whose grid differs from the image's (made for another image or resampled)."""
    if list(geometry["shape"]) != list(image_geometry_["shape"]):
        raise MassError(f"{path}: proposals have shape {tuple(geometry['shape'])} but the image has "
                        f"{tuple(image_geometry_['shape'])}; they were made for another image")
    for key in ("spacing", "origin", "direction"):
        if not np.allclose(geometry[key], image_geometry_[key], atol=1e-3):
            raise MassError(f"{path}: proposals' {key} {np.round(geometry[key], 3).tolist()} differs from the "
                            f"image's {np.round(image_geometry_[key], 3).tolist()}; they were made for another image")


def nearest_indices(raw_size: int, working_size: int) -> np.ndarray:
    """For each raw voxel along one axis, the working-grid voxel whose centre is nearest (same field of view)."""
    return np.minimum(((np.arange(raw_size) + 0.5) * working_size / raw_size).astype(np.intp), working_size - 1)


def working_to_raw_grid(layers: np.ndarray, raw_shape) -> np.ndarray:
    """(L, *S_w) layers on a backend's working grid -> (L, *raw_shape) on the raw grid, by voxel-centre nearest
    neighbour (both grids span the same field of view; see ``proposals/resample.py``), one layer at a time."""
    raw_shape = tuple(int(n) for n in raw_shape)
    if tuple(layers.shape[1:]) == raw_shape:
        return layers
    index = np.ix_(*(nearest_indices(n, m) for n, m in zip(raw_shape, layers.shape[1:])))
    out = np.empty((len(layers), *raw_shape), np.uint16)
    for i, layer in enumerate(layers):
        out[i] = layer[index]
    return out


def count_proposals(layers: np.ndarray) -> int:
    return int(sum(len(np.unique(layer)) - (1 if (layer == 0).any() else 0) for layer in layers))
