"""Synthetic CT-like multi-organ phantom: a body, organs of distinct HU and shape, vessels and lesions."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter

from mass_nnu.demo_data.writer import dataset_folder, new_dataset, write_dataset_json, write_image
from mass_nnu.errors import MassError

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


# phantom sizes (array order z, y, x): --small, the default, and --phantom-full (a clinical abdomen CT grid:
# 512 × 512 in-plane at 0.8 mm, 200 slices of 2.5 mm, i.e. 410 × 410 × 500 mm)
PHANTOM_SIZES = {
    "small": ((32, 40, 40), (1.5, 1.5, 1.5)),
    "default": ((96, 128, 128), (1.5, 1.5, 1.5)),
    "full": ((200, 512, 512), (2.5, 0.8, 0.8)),
}
SLAB = 16  # slices rendered at a time at full size (plus the blur's halo)


def phantom_geometry(size: str = "default") -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    """(shape, spacing) in array order (z, y, x) of the phantom size 'small', 'default' or 'full'."""
    try:
        return PHANTOM_SIZES[size]
    except KeyError:
        raise MassError(f"phantom size '{size}': choose one of {', '.join(PHANTOM_SIZES)}") from None


def _draw_parameters(rng: np.random.Generator) -> dict:
    """The random geometry of one case (body, organs, their HU, vessels), drawn in a fixed order."""
    j = lambda scale=0.08: rng.uniform(-scale, scale)  # noqa: E731
    body = ((j(0.05), j(0.05)), (0.78 + j(0.05), 0.9 + j(0.05)))
    organs = [
        ((0.1 + j(), -0.15 + j(), -0.35 + j()), (0.55 + j(), 0.35 + j(), 0.35 + j())),  # liver
        ((-0.2 + j(), 0.3 + j(), 0.45 + j()), (0.3 + j(0.04), 0.14, 0.12)),  # kidney left
        ((-0.2 + j(), 0.3 + j(), -0.45 + j()), (0.3 + j(0.04), 0.14, 0.12)),  # kidney right
        ((0.15 + j(), 0.05 + j(), 0.5 + j()), (0.3, 0.18 + j(0.04), 0.14)),  # spleen
    ]
    aorta = ((0.2 + j(0.03), 0.05 + j(0.03)), (0.08, 0.08))
    hu = [organ_hu + rng.normal(0, 5) for _, _, organ_hu in ORGANS[:5]]
    tubes = [(rng.uniform(-0.3, 0.0), rng.uniform(-0.55, -0.15)) for _ in range(3)]
    return {"body": body, "organs": organs, "aorta": aorta, "hu": hu, "tubes": tubes}


def _render(params: dict, grid) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image HU, label, liver mask) of the body, organs and vessels on ``grid`` (z, y, x coordinates in [-1, 1],
    any block of the volume), before lesions, blur and noise."""
    z, y, x = grid
    shape = np.broadcast_shapes(*(g.shape for g in grid))
    body = _ellipsoid((y, x), *params["body"]) & (np.abs(z) < 0.95)
    fat_rim = body & ~_ellipsoid((y, x), (0, 0), (0.70, 0.82))
    image = np.full(shape, AIR_HU, np.float32)
    image[body] = BODY_HU
    image[fat_rim] = FAT_HU
    label = np.zeros(shape, np.uint8)
    masks = [_ellipsoid(grid, c, r) for c, r in params["organs"]]
    masks.append(_ellipsoid((y, x), *params["aorta"]) & (np.abs(z) < 0.85))
    for mask, (value, _, _), hu in zip(masks, ORGANS[:5], params["hu"]):
        mask &= body
        label[mask] = value
        image[mask] = hu
    liver = masks[0]
    for cy, cx in params["tubes"]:  # a vessel tree inside the liver: thin tubes, bright like contrast, labelled liver
        image[_ellipsoid((y, x), (cy, cx), (0.035, 0.035)) & liver] = 170.0
    return image, label, liver


def _add_lesion(image, label, grid, center) -> None:
    """A small hypodense sphere inside the liver."""
    lesion = _ellipsoid(grid, center, (0.09,) * 3) & (label == 1)
    label[lesion] = 6
    image[lesion] = ORGANS[5][2]


def make_phantom_case(shape=(32, 40, 40), seed: int = 0, noise_hu: float = 15.0) -> tuple[np.ndarray, np.ndarray]:
    """One (image HU float32, label uint8) pair on a (z, y, x) grid; geometry jitters with the seed."""
    rng = np.random.default_rng(seed)
    shape = tuple(int(s) for s in shape)
    grid = np.meshgrid(*[np.linspace(-1, 1, s, dtype=np.float32) for s in shape], indexing="ij")
    image, label, _ = _render(_draw_parameters(rng), grid)
    # lesions: 1-2 small hypodense spheres inside the liver
    liver_idx = np.argwhere(label == 1)
    for _ in range(int(rng.integers(1, 3))):
        if len(liver_idx) == 0:
            break
        _add_lesion(image, label, grid, liver_idx[rng.integers(len(liver_idx))] / (np.array(shape) - 1) * 2 - 1)
    image = gaussian_filter(image, 0.6) + rng.normal(0, noise_hu, shape).astype(np.float32)
    return image.astype(np.float32), label


def make_phantom_case_slabs(shape, seed: int = 0, noise_hu: float = 15.0,
                            slab: int = SLAB) -> tuple[np.ndarray, np.ndarray]:
    """The same phantom as ``make_phantom_case`` (lesion centres drawn inside the liver ellipsoid instead of from
    its rendered voxels), rendered ``slab`` slices at a time with the blur's halo, so that the temporaries scale
    with a slab, not the volume. Returns (image int16 HU, label uint8): at 512² × 200 that is 100 + 50 MiB."""
    rng = np.random.default_rng(seed)
    shape = tuple(int(s) for s in shape)
    params = _draw_parameters(rng)
    (liver_c, liver_r), (body_c, body_r) = params["organs"][0], params["body"]
    lesions = []
    for _ in range(int(rng.integers(1, 3))):
        for _ in range(1000):  # rejection sampling inside the liver (and the body)
            p = np.asarray(liver_c) + rng.uniform(-1, 1, 3) * np.asarray(liver_r)
            if (_ellipsoid(p, liver_c, liver_r) and _ellipsoid(p[1:], body_c, body_r) and abs(p[0]) < 0.95):
                lesions.append(p)
                break
    axes = [np.linspace(-1, 1, s, dtype=np.float32) for s in shape]
    image = np.empty(shape, np.int16)
    label = np.empty(shape, np.uint8)
    halo = int(4 * 0.6 + 0.5) + 1  # gaussian_filter's radius (truncate 4) at sigma 0.6, plus one
    for z0 in range(0, shape[0], slab):
        z1 = min(z0 + slab, shape[0])
        a, b = max(z0 - halo, 0), min(z1 + halo, shape[0])
        grid = np.meshgrid(axes[0][a:b], axes[1], axes[2], indexing="ij", sparse=True)
        block, block_label, _ = _render(params, grid)
        for center in lesions:
            _add_lesion(block, block_label, grid, center)
        block = gaussian_filter(block, 0.6)[z0 - a: z1 - a]
        block += rng.standard_normal(block.shape, dtype=np.float32) * np.float32(noise_hu)
        image[z0:z1] = np.clip(np.rint(block), -32768, 32767)
        label[z0:z1] = block_label[z0 - a: z1 - a]
    return image, label


def write_phantom_dataset(dataset_id: int, name: str, num_train: int, num_test: int = 0,
                          shape=(32, 40, 40), spacing=(1.5, 1.5, 1.5), seed: int = 0, labelled: bool = True,
                          force: bool = False, slabs: bool = False) -> Path:
    """An nnU-Net raw dataset of CT-like phantoms. Unlabelled cohorts still get a body mask as their only label,
    because nnU-Net's fingerprinting needs a label file per case. ``slabs``: render slab by slab and write int16 HU
    (``make_phantom_case_slabs``; the full size), else float32 from ``make_phantom_case``."""
    final = dataset_folder(dataset_id, name)
    labels = ({"background": 0, **{n: v for v, n, _ in ORGANS}} if labelled
              else {"background": 0, "foreground": 1})
    with new_dataset(dataset_id, name, force) as folder:
        splits = [("Tr", i) for i in range(num_train)] + [("Ts", i) for i in range(num_test)]
        for k, (split, i) in enumerate(splits):
            make = make_phantom_case_slabs if slabs else make_phantom_case
            image, label = make(shape, seed=seed * 100_003 + k)
            if not labelled:
                label = (image > -500).astype(np.uint8)
            case = f"{name.lower()}_{split.lower()}{i:03d}"
            write_image(image, spacing, path=folder / f"images{split}" / f"{case}_0000.nii.gz", dtype=image.dtype)
            write_image(label, spacing, path=folder / f"labels{split}" / f"{case}.nii.gz", dtype=np.uint8)
        description = "CT-like multi-organ phantom (mass-nnu)" + (
            "" if labelled else "; unlabelled pretraining cohort: labelsTr holds only the body mask, because "
                                "nnU-Net's fingerprinting needs labels")
        write_dataset_json(folder, "CT", labels, num_train, name=name, description=description)
    return final
