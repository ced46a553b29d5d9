"""Foreground labels (Otsu) for unlabelled cases: nnU-Net's fingerprint needs one label file per case."""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk
from skimage.filters import threshold_otsu

from mass_nnu.adapter.datasets import Dataset
from mass_nnu.io import atomic_path, save_json_atomic


def ensure_labels(dataset: Dataset) -> int:
    """Write foreground masks (Otsu) for the cases without a label. Returns how many were written. They serve
    nnU-Net's fingerprint only; pretraining never reads them."""
    written = 0
    for case, files in dataset.cases().items():
        label_path = dataset.label_file(case)
        if label_path.exists():
            continue
        image = sitk.ReadImage(str(files[0]))
        array = sitk.GetArrayFromImage(image).astype(np.float32)
        mask = (array > threshold_otsu(array)).astype(np.uint8) if np.ptp(array) > 0 else np.zeros_like(array, np.uint8)
        out = sitk.GetImageFromArray(mask)
        out.CopyInformation(image)
        with atomic_path(label_path) as tmp:
            sitk.WriteImage(out, str(tmp))
        written += 1
    if written:
        meta = dataset.dataset_json(raw_only=True)
        if "foreground" not in meta["labels"]:
            meta["labels"] = {"background": 0, "foreground": 1}
            save_json_atomic(meta, dataset.raw / "dataset.json")
        print(f"mass plan: {dataset} had {written} images without labels; wrote Otsu foreground masks to labelsTr "
              f"(nnU-Net's fingerprint needs them; they are not used for pretraining)")
    return written
