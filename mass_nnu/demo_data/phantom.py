"""Synthetic CT-like multi-organ phantom: a body, organs of distinct HU and shape, vessels and lesions."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter

from mass_nnu.demo_data.writer import dataset_folder, new_dataset, write_dataset_json, write_image

# label, name, HU mean
ORGANS = [
    (1, "liver", 60.0),
    (2, "kidney_left", 150.0),
    (3, "kidney_right", 150.0),
    (4, "spleen", 45.0),
    (5, "aorta", 200.0),
    (6, "lesion", -10.0),
]
BODY_HU, AIR_HU, FAT_HU = 20.0, -1000.0, -90.0


def _ellipsoid(grid, center, radii):
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, center, radii)) <= 1.0


def make_phantom_case(shape=(32, 40, 40), seed: int = 0, noise_hu: float = 15.0) -> tuple[np.ndarray, np.ndarray]:
    """One (image HU float32, label uint8) pair on a (z, y, x) grid; geometry jitters with the seed."""
    rng = np.random.default_rng(seed)
    shape = tuple(int(s) for s in shape)
    grid = np.meshgrid(*[np.linspace(-1, 1, s, dtype=np.float32) for s in shape], indexing="ij")
    z, y, x = grid
    j = lambda scale=0.08: rng.uniform(-scale, scale)  # noqa: E731

    body = _ellipsoid((y, x), (j(0.05), j(0.05)), (0.78 + j(0.05), 0.9 + j(0.05))) & (np.abs(z) < 0.95)
    fat_rim = body & ~_ellipsoid((y, x), (0, 0), (0.70, 0.82))
    image = np.full(shape, AIR_HU, np.float32)
    image[body] = BODY_HU
    image[fat_rim] = FAT_HU
    label = np.zeros(shape, np.uint8)

    liver = _ellipsoid(grid, (0.1 + j(), -0.15 + j(), -0.35 + j()), (0.55 + j(), 0.35 + j(), 0.35 + j()))
    kid_l = _ellipsoid(grid, (-0.2 + j(), 0.3 + j(), 0.45 + j()), (0.3 + j(0.04), 0.14, 0.12))
    kid_r = _ellipsoid(grid, (-0.2 + j(), 0.3 + j(), -0.45 + j()), (0.3 + j(0.04), 0.14, 0.12))
    spleen = _ellipsoid(grid, (0.15 + j(), 0.05 + j(), 0.5 + j()), (0.3, 0.18 + j(0.04), 0.14))
    aorta = _ellipsoid((y, x), (0.2 + j(0.03), 0.05 + j(0.03)), (0.08, 0.08)) & (np.abs(z) < 0.85)
    for mask, (value, _, hu) in zip((liver, kid_l, kid_r, spleen, aorta), ORGANS[:5]):
        mask &= body
        label[mask] = value
        image[mask] = hu + rng.normal(0, 5)
    # a vessel tree inside the liver: thin tubes, bright like contrast, labelled as liver
    for _ in range(3):
        cy, cx = rng.uniform(-0.3, 0.0), rng.uniform(-0.55, -0.15)
        tube = _ellipsoid((y, x), (cy, cx), (0.035, 0.035)) & liver
        image[tube] = 170.0
    # lesions: 1-2 small hypodense spheres inside the liver
    liver_idx = np.argwhere(label == 1)
    for _ in range(int(rng.integers(1, 3))):
        if len(liver_idx) == 0:
            break
        c = liver_idx[rng.integers(len(liver_idx))] / (np.array(shape) - 1) * 2 - 1
        lesion = _ellipsoid(grid, c, (0.09,) * 3) & (label == 1)
        label[lesion] = 6
        image[lesion] = ORGANS[5][2]
    image = gaussian_filter(image, 0.6) + rng.normal(0, noise_hu, shape).astype(np.float32)
    return image.astype(np.float32), label


def write_phantom_dataset(dataset_id: int, name: str, num_train: int, num_test: int = 0,
                          shape=(32, 40, 40), spacing=(1.5, 1.5, 1.5), seed: int = 0, labelled: bool = True,
                          force: bool = False) -> Path:
    """An nnU-Net raw dataset of CT-like phantoms. Unlabelled cohorts still get a body mask as their only label,
    because nnU-Net's fingerprinting needs a label file per case."""
    final = dataset_folder(dataset_id, name)
    labels = ({"background": 0, **{n: v for v, n, _ in ORGANS}} if labelled
              else {"background": 0, "foreground": 1})
    with new_dataset(dataset_id, name, force) as folder:
        splits = [("Tr", i) for i in range(num_train)] + [("Ts", i) for i in range(num_test)]
        for k, (split, i) in enumerate(splits):
            image, label = make_phantom_case(shape, seed=seed * 100_003 + k)
            if not labelled:
                label = (image > -500).astype(np.uint8)
            case = f"{name.lower()}_{split.lower()}{i:03d}"
            write_image(image, spacing, path=folder / f"images{split}" / f"{case}_0000.nii.gz")
            write_image(label, spacing, path=folder / f"labels{split}" / f"{case}.nii.gz", dtype=np.uint8)
        description = "CT-like multi-organ phantom (mass-nnu)" + (
            "" if labelled else "; unlabelled pretraining cohort: labelsTr holds only the body mask, because "
                                "nnU-Net's fingerprinting needs labels")
        write_dataset_json(folder, "CT", labels, num_train, name=name, description=description)
    return final
