"""Case-by-case checks of a raw nnU-Net dataset, run before planning reads it.

Each problem is one MassError naming the file: unreadable or truncated images, 2D images, the wrong number of
channel files, vector (multi-component) images, NaN or infinite intensities, constant images, labels whose
shape, spacing, origin or direction differ from their image, and label values not declared in dataset.json.
nnU-Net's own integrity check (``--verify_dataset_integrity``) prints such problems but raises without the file.
"""
from __future__ import annotations

from pathlib import Path

import nibabel
import numpy as np
import SimpleITK as sitk

from mass_nnu.adapter.datasets import Dataset
from mass_nnu.errors import MassError
from mass_nnu.io import read_image

GEOMETRY_TOLERANCE = 1e-3  # relative for spacing, absolute (mm) for origin, absolute for direction cosines


def check_dataset_json(dataset: Dataset) -> dict:
    """The raw dataset.json, with the entries planning needs."""
    meta = dataset.dataset_json(raw_only=True)
    path = dataset.raw / "dataset.json"
    for key in ("labels", "file_ending"):
        if key not in meta:
            raise MassError(f"{path}: no '{key}' entry")
    if "channel_names" not in meta and "modality" not in meta:
        raise MassError(f"{path}: no 'channel_names' entry")
    return meta


def check_image(path: Path, image) -> None:
    """``image`` (read from ``path``) is 3D, scalar, finite and not constant."""
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise MassError(f"{path}: has {image.GetNumberOfComponentsPerPixel()} components per voxel; nnU-Net needs one "
                        f"file per channel (_0000, _0001, ...)")
    if image.GetDimension() != 3 or min(image.GetSize()) < 2:
        raise MassError(f"{path}: image is 2D (size {list(image.GetSize())}); mass-nnu needs 3D volumes")
    array = sitk.GetArrayViewFromImage(image)
    stored = array
    if path.name.endswith((".nii", ".nii.gz")):  # ITK's NIfTI reader turns NaN into 0; read the stored values
        stored = np.asanyarray(nibabel.load(str(path)).dataobj)
    finite = np.isfinite(stored)
    if not finite.all():
        bad = int(stored.size - finite.sum())
        raise MassError(f"{path}: {bad} voxel(s) are NaN or infinite; fix or replace them before planning")
    if array.min() == array.max():
        raise MassError(f"{path}: constant image (every voxel is {array.flat[0]}); nothing to learn from")


def check_geometry(label_path: Path, label, image) -> None:
    if label.GetSize() != image.GetSize():
        raise MassError(f"{label_path}: shape {list(label.GetSize())} differs from its image's {list(image.GetSize())}")
    spacing_l, spacing_i = np.array(label.GetSpacing()), np.array(image.GetSpacing())
    if not np.allclose(spacing_l, spacing_i, rtol=GEOMETRY_TOLERANCE, atol=0):
        raise MassError(f"{label_path}: spacing {np.round(spacing_l, 4).tolist()} differs from its image's "
                        f"{np.round(spacing_i, 4).tolist()}")
    origin_l, origin_i = np.array(label.GetOrigin()), np.array(image.GetOrigin())
    if not np.allclose(origin_l, origin_i, rtol=0, atol=GEOMETRY_TOLERANCE * max(1.0, spacing_i.max())):
        raise MassError(f"{label_path}: origin {np.round(origin_l, 3).tolist()} differs from its image's "
                        f"{np.round(origin_i, 3).tolist()}")
    if not np.allclose(label.GetDirection(), image.GetDirection(), rtol=0, atol=GEOMETRY_TOLERANCE):
        raise MassError(f"{label_path}: direction differs from its image's")


def declared_labels(meta: dict) -> set[int]:
    values = set()
    for value in meta["labels"].values():
        values.update(int(v) for v in (value if isinstance(value, list) else [value]))
    return values


def check_raw_dataset(dataset: Dataset) -> int:
    """Check every training case of a raw dataset; returns the number of cases. Labels are optional (unlabelled
    pretraining cohorts), but a label that exists must fit its image and dataset.json."""
    meta = check_dataset_json(dataset)
    num_channels = len(meta.get("channel_names", meta.get("modality", {})))
    images_dir = dataset.raw / "imagesTr"
    if not images_dir.is_dir():
        raise MassError(f"{images_dir}: missing; nnU-Net raw datasets keep their training images here")
    cases = dataset.cases()
    if not cases:
        raise MassError(f"{images_dir}: no images ending in {meta['file_ending']}")
    allowed = declared_labels(meta)
    for case, files in cases.items():
        if set(files) != set(range(num_channels)):
            raise MassError(f"{dataset.image_file(case)}: case has channel files "
                            f"{sorted(f'{c:04d}' for c in files)}, dataset.json declares {num_channels} channel(s)")
        first = None
        for channel in sorted(files):
            path = files[channel]
            image = read_image(path)
            check_image(path, image)
            if first is None:
                first = image
            else:
                check_geometry(path, image, first)
        label_path = dataset.label_file(case)
        if not label_path.exists():
            continue
        label = read_image(label_path)
        check_geometry(label_path, label, first)
        values = np.unique(sitk.GetArrayViewFromImage(label))
        if not np.all(np.isfinite(values)) or not np.all(values == np.round(values)):
            raise MassError(f"{label_path}: label values must be integers")
        unknown = sorted(int(v) for v in values if int(v) not in allowed)
        if unknown:
            raise MassError(f"{label_path}: label value(s) {unknown} are not in dataset.json's labels "
                            f"{sorted(allowed)}")
    expected = meta.get("numTraining")
    if expected is not None and int(expected) != len(cases):
        raise MassError(f"{dataset.raw / 'dataset.json'}: numTraining is {expected} but imagesTr holds {len(cases)} "
                        f"case(s)")
    return len(cases)
