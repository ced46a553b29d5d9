"""Write nnU-Net raw datasets atomically (a temporary folder renamed into place)."""
from __future__ import annotations

import json
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import SimpleITK as sitk

from mass_nnu.adapter.datasets import raw_root
from mass_nnu.errors import MassError


def dataset_folder(dataset_id: int, name: str) -> Path:
    return raw_root() / f"Dataset{dataset_id:03d}_{name}"


def check_new_dataset(dataset_id: int, name: str, force: bool = False) -> Path:
    """The folder ``DatasetXXX_Name`` to write, or a MassError if the ID is taken or the folder exists."""
    final = dataset_folder(dataset_id, name)
    clashes = [p for p in raw_root().glob(f"Dataset{dataset_id:03d}_*") if p.name != final.name]
    if clashes:
        raise MassError(f"{clashes[0]}: dataset ID {dataset_id} is taken by another dataset; choose another ID")
    if final.exists() and not force:
        raise MassError(f"{final}: already exists; pass --force to overwrite it")
    return final


@contextmanager
def new_dataset(dataset_id: int, name: str, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder to fill; it replaces ``DatasetXXX_Name`` only when filling succeeds."""
    final = check_new_dataset(dataset_id, name, force)
    tmp = final.with_name(f".{final.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)


def write_image(array: np.ndarray, spacing_zyx, path: Path, *, origin_xyz=(0.0, 0.0, 0.0), direction=None,
                dtype=np.float32) -> None:
    """Write a (z, y, x) array as NIfTI with SimpleITK (spacing given in array order)."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(array.astype(dtype, copy=False)))
    image.SetSpacing(tuple(float(s) for s in spacing_zyx[::-1]))
    image.SetOrigin(tuple(float(o) for o in origin_xyz))
    if direction is not None:
        image.SetDirection(tuple(float(d) for d in direction))
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), useCompression=True)


def write_dataset_json(folder: Path, channel: str, labels: dict[str, int], num_training: int,
                       description: str, name: str, extra: dict | None = None) -> None:
    """dataset.json with nnU-Net's keys, plus ``extra`` keys (nnU-Net ignores keys it does not know)."""
    meta = {"channel_names": {"0": channel}, "labels": labels, "numTraining": num_training,
            "file_ending": ".nii.gz", "name": name, "description": description,
            "reference": "mass-nnu demo data", "licence": "see docs/demo_data.md", **(extra or {})}
    (folder / "dataset.json").write_text(json.dumps(meta, indent=2))


def dataset_summary(folder: Path) -> str:
    """One line: case counts per split, label count, shape and spacing ranges (from the image headers)."""
    meta = json.loads((folder / "dataset.json").read_text())
    counts, shapes, spacings = [], [], []
    for split, word in (("Tr", "train"), ("Ts", "test")):
        images = sorted((folder / f"images{split}").glob(f"*{meta['file_ending']}"))
        if images:
            counts.append(f"{len(images)} {word}")
        for path in images:
            reader = sitk.ImageFileReader()
            reader.SetFileName(str(path))
            reader.ReadImageInformation()
            shapes.append(reader.GetSize()[::-1])
            spacings.append(reader.GetSpacing())
    shapes_lo, shapes_hi = np.min(shapes, 0), np.max(shapes, 0)
    shape = " x ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in zip(shapes_lo, shapes_hi))
    return (f"{folder}: {' + '.join(counts)} cases, {len(meta['labels']) - 1} foreground labels, "
            f"shape (z y x) {shape}, spacing {np.min(spacings):.2f}-{np.max(spacings):.2f} mm")
