"""MRI demo cohorts from the real MNI152 2009c template and its GM/WM maps, which nilearn's wheel ships.

Each subject is the template under a random smooth deformation (B-spline plus affine, SimpleITK), with a bias
field, contrast and gamma changes, noise and a random resolution. Labels come from the same warped maps.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from mass_nnu.errors import MassError

TEMPLATE_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}
LABELS = {"background": 0, "white_matter_left": 1, "white_matter_right": 2, "grey_matter_left": 3,
          "grey_matter_right": 4, "ventricles": 5}
FULL_SPACING = (1.0, 1.5)   # mm, isotropic-ish range of the default cohort
SMALL_SPACING = (3.6, 4.2)  # mm, gives volumes of about 48³


def template_path(key: str) -> Path:
    import nilearn

    path = Path(nilearn.__file__).parent / "datasets" / "data" / TEMPLATE_FILES[key]
    if not path.is_file():
        raise MassError(f"{path}: MNI152 template file missing from the nilearn installation (nilearn>=0.10 needed)")
    return path


def load_template():
    """T1, GM and WM images (float32, GM/WM in [0, 1]) cropped to the head with a margin."""
    import SimpleITK as sitk

    images = {k: sitk.Cast(sitk.ReadImage(str(template_path(k))), sitk.sitkFloat32) for k in TEMPLATE_FILES}
    t1 = sitk.GetArrayViewFromImage(images["t1"])
    nonzero = np.argwhere(t1 > 0.05 * t1.max())
    lo = np.maximum(nonzero.min(0) - 4, 0)
    hi = np.minimum(nonzero.max(0) + 5, np.array(t1.shape))
    index, size = [int(v) for v in lo[::-1]], [int(v) for v in (hi - lo)[::-1]]
    cropped = {k: sitk.RegionOfInterest(im, size, index) for k, im in images.items()}
    cropped["gm"] = cropped["gm"] / 255.0
    cropped["wm"] = cropped["wm"] / 255.0
    return cropped


def _random_transform(reference, rng: np.random.Generator, strength_mm: float):
    """A random affine (rotation ±8°, scale ±8 %) composed with a smooth B-spline deformation."""
    import SimpleITK as sitk

    center = reference.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in reference.GetSize()])
    affine = sitk.Similarity3DTransform()
    affine.SetCenter(center)
    axis = rng.normal(size=3)
    affine.SetRotation(tuple(axis / np.linalg.norm(axis)), float(np.deg2rad(rng.uniform(-8, 8))))
    affine.SetScale(float(rng.uniform(0.92, 1.08)))
    affine.SetTranslation(tuple(rng.uniform(-4, 4, 3)))
    bspline = sitk.BSplineTransformInitializer(reference, [4, 4, 4])
    params = rng.normal(0, strength_mm, len(bspline.GetParameters()))
    bspline.SetParameters(tuple(params))
    return sitk.CompositeTransform([affine, bspline])


def _output_grid(reference, spacing: float):
    import SimpleITK as sitk

    size = [int(round(n * s / spacing)) for n, s in zip(reference.GetSize(), reference.GetSpacing())]
    grid = sitk.Image(size, sitk.sitkFloat32)
    grid.SetSpacing((spacing,) * 3)
    grid.SetOrigin(reference.GetOrigin())
    grid.SetDirection(reference.GetDirection())
    return grid


def _bias_field(shape, rng: np.random.Generator, strength: float) -> np.ndarray:
    """Smooth multiplicative field: exp of a random low-order polynomial."""
    coords = np.meshgrid(*[np.linspace(-1, 1, s, dtype=np.float32) for s in shape], indexing="ij")
    field = sum(rng.normal(0, strength) * c for c in coords)
    field += sum(rng.normal(0, strength / 2) * c * d for i, c in enumerate(coords) for d in coords[i:])
    return np.exp(field).astype(np.float32)


def make_subject(template: dict, seed: int, small: bool):
    """One subject: (image array, label array, SimpleITK reference grid). Arrays are (z, y, x)."""
    import SimpleITK as sitk

    rng = np.random.default_rng(seed)
    spacing = float(rng.uniform(*(SMALL_SPACING if small else FULL_SPACING)))
    grid = _output_grid(template["t1"], spacing)
    transform = _random_transform(template["t1"], rng, strength_mm=3.0)

    def warp(image):
        return sitk.GetArrayFromImage(sitk.Resample(image, grid, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32))

    t1, gm, wm = warp(template["t1"]), warp(template["gm"]), warp(template["wm"])
    label = _labels(gm, wm, grid)

    image = t1 / max(float(t1.max()), 1e-6)
    image = np.clip(image, 0, None) ** rng.uniform(0.7, 1.4)
    image *= _bias_field(image.shape, rng, strength=0.15)
    image = image * rng.uniform(0.8, 1.25) * 1000 + rng.uniform(-20, 20)
    noise_sd = rng.uniform(0.01, 0.03) * 1000
    image = np.sqrt((image + rng.normal(0, noise_sd, image.shape)) ** 2 + rng.normal(0, noise_sd, image.shape) ** 2)
    return image.astype(np.float32), label, grid


def _labels(gm: np.ndarray, wm: np.ndarray, grid) -> np.ndarray:
    """WM / GM split left-right at the mid-sagittal plane, and the ventricles (CSF deep inside the brain).
    Sulcal CSF near the brain surface stays unlabelled: at demo resolutions it is partial-volume noise."""
    from scipy import ndimage

    tissue = (gm + wm) > 0.5
    brain = ndimage.binary_fill_holes(ndimage.binary_closing(tissue, iterations=2))
    brain = ndimage.binary_erosion(ndimage.binary_dilation(brain, iterations=1), iterations=1) | tissue
    csf = np.clip(1.0 - gm - wm, 0, 1)
    tissue_class = np.argmax(np.stack([wm, gm, csf]), axis=0)  # 0 WM, 1 GM, 2 CSF
    # world x (LPS: +x is the subject's left) of every voxel column, from the grid's geometry
    n_x = gm.shape[2]
    x_world = np.array([grid.TransformIndexToPhysicalPoint((i, 0, 0))[0] for i in range(n_x)])
    left = np.broadcast_to(x_world > 0, gm.shape)
    label = np.zeros(gm.shape, np.uint8)
    label[brain & (tissue_class == 0) & left] = LABELS["white_matter_left"]
    label[brain & (tissue_class == 0) & ~left] = LABELS["white_matter_right"]
    label[brain & (tissue_class == 1) & left] = LABELS["grey_matter_left"]
    label[brain & (tissue_class == 1) & ~left] = LABELS["grey_matter_right"]
    spacing = grid.GetSpacing()[::-1]
    depth_mm = ndimage.distance_transform_edt(brain, sampling=spacing)
    deep_csf, n = ndimage.label(brain & (tissue_class == 2) & (depth_mm > 12.0))
    if n:
        sizes = ndimage.sum_labels(deep_csf > 0, deep_csf, np.arange(1, n + 1))
        label[np.isin(deep_csf, np.flatnonzero(sizes >= 0.1 * sizes.max()) + 1)] = LABELS["ventricles"]
    return label


def head_mask(image: np.ndarray) -> np.ndarray:
    """Foreground (head) mask used as the only label of the unlabelled cohort (nnU-Net needs a label file)."""
    from scipy import ndimage

    mask = image > 0.1 * np.percentile(image, 99)
    mask = ndimage.binary_opening(mask, iterations=1)
    return ndimage.binary_fill_holes(mask).astype(np.uint8)


def write_mni_datasets(pretrain_id: int = 501, downstream_id: int = 502, num_pretrain: int = 20,
                       num_train: int = 10, num_test: int = 5, small: bool = False, seed: int = 0,
                       force: bool = False) -> tuple[Path, Path]:
    """Write Dataset<pretrain_id>_MNIPretrain (unlabelled) and Dataset<downstream_id>_MNISeg (labelled, held-out Ts)."""
    from tqdm import tqdm

    from mass_nnu.demo_data.writer import dataset_folder, new_dataset, write_dataset_json, write_image

    template = load_template()
    plan = [(pretrain_id, "MNIPretrain", [("Tr", num_pretrain)], seed, False),
            (downstream_id, "MNISeg", [("Tr", num_train), ("Ts", num_test)], seed + 7919, True)]
    total = num_pretrain + num_train + num_test
    with tqdm(total=total, desc="demo subjects", unit="case", disable=None) as bar:
        for dataset_id, name, splits, base_seed, labelled in plan:
            with new_dataset(dataset_id, name, force) as folder:
                k = 0
                for split, count in splits:
                    for i in range(count):
                        image, label, grid = make_subject(template, seed=base_seed * 1_000_003 + k, small=small)
                        k += 1
                        if not labelled:
                            label = head_mask(image)
                        geometry = dict(spacing_zyx=grid.GetSpacing()[::-1], origin_xyz=grid.GetOrigin(),
                                        direction=grid.GetDirection())
                        case = f"{name.lower()}_{split.lower()}{i:03d}"
                        write_image(image, path=folder / f"images{split}" / f"{case}_0000.nii.gz", **geometry)
                        write_image(label, path=folder / f"labels{split}" / f"{case}.nii.gz", dtype=np.uint8,
                                    **geometry)
                        bar.update()
                labels = LABELS if labelled else {"background": 0, "foreground": 1}
                description = ("MNI152 2009c T1 template under random deformations, bias, contrast and noise"
                               + ("" if labelled else "; unlabelled cohort: labelsTr holds only the head mask"))
                write_dataset_json(folder, "T1", labels, splits[0][1], name=name, description=description)
    return dataset_folder(pretrain_id, "MNIPretrain"), dataset_folder(downstream_id, "MNISeg")
