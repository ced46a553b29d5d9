"""MRI demo cohorts from the real MNI152 2009c template and its GM/WM maps, which nilearn's wheel ships.

Each subject is the template under a random smooth deformation (affine plus B-spline, applied as one SimpleITK
displacement field), with a bias field, contrast and gamma changes, Rician noise and a random resolution.
Images and labels come from the same warped template channels, so they line up exactly.
"""
from __future__ import annotations

from functools import lru_cache
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
# template channels warped together for every subject
CHANNELS = ("t1", "wm", "gm", "ventricles", "brain", "x_world")
FULL_SPACING = (1.0, 1.5)   # mm, isotropic-ish range of the default cohort
SMALL_SPACING = (3.6, 4.2)  # mm, gives volumes of about 48³
MARGIN_MM = 10.0            # room around the brain for the deformation
VENTRICLE_DEPTH_MM = 12.0   # CSF deeper than this below the brain surface is ventricular


def template_path(key: str) -> Path:
    import nilearn

    path = Path(nilearn.__file__).parent / "datasets" / "data" / TEMPLATE_FILES[key]
    if not path.is_file():
        raise MassError(f"{path}: MNI152 template file missing from the nilearn installation (nilearn>=0.10 needed)")
    return path


def load_template() -> dict:
    """Template channels as float32 SimpleITK images on the 1 mm grid, cropped to the brain plus a margin:
    t1 (0-1), wm and gm probabilities, ventricles (CSF probability inside the ventricular system), brain mask
    and x_world (the world x coordinate; > 0 is the subject's left in LPS), used to split hemispheres at the
    template's mid-sagittal plane after warping."""
    import SimpleITK as sitk
    from scipy import ndimage

    raw = {k: sitk.ReadImage(str(template_path(k))) for k in TEMPLATE_FILES}
    nonzero = np.argwhere(sitk.GetArrayViewFromImage(raw["t1"]) > 0.05 * 255)
    margin = int(np.ceil(MARGIN_MM / min(raw["t1"].GetSpacing())))
    lo = np.maximum(nonzero.min(0) - margin, 0)
    hi = np.minimum(nonzero.max(0) + margin + 1, np.array(sitk.GetArrayViewFromImage(raw["t1"]).shape))
    index, size = [int(v) for v in lo[::-1]], [int(v) for v in (hi - lo)[::-1]]
    cropped = {k: sitk.RegionOfInterest(im, size, index) for k, im in raw.items()}
    arrays = {k: sitk.GetArrayFromImage(im).astype(np.float32) / 255.0 for k, im in cropped.items()}
    reference = cropped["t1"]

    brain_image = sitk.BinaryFillhole(sitk.Cast(cropped["t1"] > int(0.05 * 255), sitk.sitkUInt8))
    brain = sitk.GetArrayFromImage(brain_image).astype(bool)
    csf = np.clip(1.0 - arrays["gm"] - arrays["wm"], 0, 1) * brain
    depth_mm = sitk.GetArrayViewFromImage(sitk.SignedMaurerDistanceMap(
        brain_image, insideIsPositive=True, squaredDistance=False, useImageSpacing=True))
    deep_csf, _ = ndimage.label((csf > 0.5) & (depth_mm > VENTRICLE_DEPTH_MM))
    sizes = np.bincount(deep_csf.ravel())[1:]
    ventricle_region = np.isin(deep_csf, np.flatnonzero(sizes >= 0.1 * sizes.max()) + 1)
    ventricle_region = ndimage.binary_dilation(ventricle_region, iterations=2)  # keep their partial-volume rim

    x_world = [reference.TransformIndexToPhysicalPoint((i, 0, 0))[0] for i in range(brain.shape[2])]
    channels = {"t1": arrays["t1"], "wm": arrays["wm"], "gm": arrays["gm"],
                "ventricles": csf * ventricle_region, "brain": brain,
                "x_world": np.broadcast_to(np.array(x_world, np.float32), brain.shape)}
    images = {}
    for key in CHANNELS:
        images[key] = sitk.GetImageFromArray(np.ascontiguousarray(channels[key], dtype=np.float32))
        images[key].CopyInformation(reference)
    return images


def _random_displacement(reference, rng: np.random.Generator, strength_mm: float):
    """A random affine (rotation ±8°, scale ±8 %, shift ±4 mm) composed with a smooth B-spline deformation,
    sampled once on a 4 mm grid as a displacement field (evaluating the B-spline per voxel is 3-6x slower)."""
    import SimpleITK as sitk

    center = reference.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in reference.GetSize()])
    affine = sitk.Similarity3DTransform()
    affine.SetCenter(center)
    axis = rng.normal(size=3)
    affine.SetRotation(tuple(axis / np.linalg.norm(axis)), float(np.deg2rad(rng.uniform(-8, 8))))
    affine.SetScale(float(rng.uniform(0.92, 1.08)))
    affine.SetTranslation(tuple(rng.uniform(-4, 4, 3)))
    bspline = sitk.BSplineTransformInitializer(reference, [4, 4, 4])
    bspline.SetParameters(tuple(rng.normal(0, strength_mm, len(bspline.GetParameters()))))
    composite = sitk.CompositeTransform([affine, bspline])

    step = 4.0
    pad = 2  # field voxels beyond the image on every side, so no output voxel falls off the field
    size = [int(np.ceil(n * s / step)) + 2 * pad for n, s in zip(reference.GetSize(), reference.GetSpacing())]
    origin = reference.TransformContinuousIndexToPhysicalPoint(
        [-pad * step / s for s in reference.GetSpacing()])
    field = sitk.TransformToDisplacementField(composite, sitk.sitkVectorFloat64, size, origin, (step,) * 3,
                                              reference.GetDirection())
    return sitk.DisplacementFieldTransform(field)


def _output_grid(reference, spacing_xyz):
    """An empty image covering the reference's extent at the given spacing, same origin and direction."""
    import SimpleITK as sitk

    size = [int(round(n * s / t)) for n, s, t in zip(reference.GetSize(), reference.GetSpacing(), spacing_xyz)]
    grid = sitk.Image(size, sitk.sitkFloat32)
    grid.SetSpacing(tuple(float(s) for s in spacing_xyz))
    grid.SetOrigin(reference.GetOrigin())
    grid.SetDirection(reference.GetDirection())
    return grid


def _bias_field(shape, rng: np.random.Generator, strength: float) -> np.ndarray:
    """Smooth multiplicative field: exp of a random second-order polynomial."""
    coords = np.meshgrid(*[np.linspace(-1, 1, s, dtype=np.float32) for s in shape], indexing="ij")
    field = sum(rng.normal(0, strength) * c for c in coords)
    field += sum(rng.normal(0, strength / 2) * c * d for i, c in enumerate(coords) for d in coords[i:])
    return np.exp(field).astype(np.float32)


@lru_cache(maxsize=2)
def _template_stack(small: bool):
    """All template channels as one vector image, blurred for the small mode's ~3.9 mm grid (anti-aliasing, like
    the partial-volume of a real low-resolution scan); cached, since the blur costs more than a subject."""
    import SimpleITK as sitk

    template = load_template()
    stack = sitk.Compose([template[k] for k in CHANNELS])
    if small:
        stack = sitk.BinShrink(stack, [2, 2, 2])  # 2 mm block averages: cheaper to blur and to sample
        target = float(np.mean(SMALL_SPACING))
        sigma = [0.5 * float(np.sqrt(target ** 2 - s ** 2)) for s in stack.GetSpacing()]
        stack = sitk.SmoothingRecursiveGaussian(stack, sigma)
    return stack


def make_subject(seed: int, small: bool):
    """One subject: (image float32, label uint8, brain mask uint8, SimpleITK grid). Arrays are (z, y, x)."""
    import SimpleITK as sitk

    rng = np.random.default_rng(seed)
    spacing_xyz = rng.uniform(*(SMALL_SPACING if small else FULL_SPACING)) * rng.uniform(0.95, 1.05, 3)
    stack = _template_stack(small)
    grid = _output_grid(stack, spacing_xyz)
    transform = _random_displacement(stack, rng, strength_mm=3.0)
    warped = sitk.GetArrayFromImage(sitk.Resample(stack, grid, transform, sitk.sitkLinear, 0.0))
    # voxels mapped from outside the template get zeros: no tissue, x_world 0
    channels = {k: warped[..., i] for i, k in enumerate(CHANNELS)}
    label = _labels(channels)
    brain = (channels["brain"] > 0.5).astype(np.uint8)

    image = np.clip(channels["t1"], 0, None) ** rng.uniform(0.7, 1.4)
    image *= _bias_field(image.shape, rng, strength=0.15)
    image = image * rng.uniform(0.8, 1.25) * 1000 + rng.uniform(-20, 20)
    noise_sd = rng.uniform(0.01, 0.03) * 1000
    # Rician noise (magnitude of complex Gaussian), like a real magnitude MR image
    image = np.sqrt((image + rng.normal(0, noise_sd, image.shape)) ** 2 + rng.normal(0, noise_sd, image.shape) ** 2)
    return image.astype(np.float32), label, brain, grid


def _labels(channels: dict) -> np.ndarray:
    """Argmax of warped WM / GM / ventricle probabilities against the rest (sulcal CSF, outside), WM and GM split
    left-right at the template's mid-sagittal plane (warped x_world > 0 is the left hemisphere)."""
    wm, gm, vent = channels["wm"], channels["gm"], channels["ventricles"]
    rest = np.clip(1.0 - wm - gm - vent, 0, None)
    tissue = np.argmax(np.stack([rest, wm, gm, vent]), axis=0)
    left = channels["x_world"] > 0
    label = np.zeros(wm.shape, np.uint8)
    label[(tissue == 1) & left] = LABELS["white_matter_left"]
    label[(tissue == 1) & ~left] = LABELS["white_matter_right"]
    label[(tissue == 2) & left] = LABELS["grey_matter_left"]
    label[(tissue == 2) & ~left] = LABELS["grey_matter_right"]
    label[tissue == 3] = LABELS["ventricles"]
    return label


def write_mni_datasets(pretrain_id: int = 501, downstream_id: int = 502, num_pretrain: int = 20,
                       num_train: int = 10, num_test: int = 5, small: bool = False, seed: int = 0,
                       force: bool = False) -> tuple[Path, Path]:
    """Write Dataset<pretrain_id>_MNIPretrain (unlabelled: labelsTr holds only the brain mask) and
    Dataset<downstream_id>_MNISeg (labelled, with held-out imagesTs/labelsTs, from a different seed).
    Both target folders are checked before anything is written; each one appears only when complete."""
    from tqdm import tqdm

    from mass_nnu.demo_data.writer import check_new_dataset, new_dataset, write_dataset_json, write_image

    if pretrain_id == downstream_id:
        raise MassError(f"dataset IDs: the pretraining and downstream IDs must differ (both {pretrain_id})")
    plan = [(pretrain_id, "MNIPretrain", [("Tr", num_pretrain)], seed, False),
            (downstream_id, "MNISeg", [("Tr", num_train), ("Ts", num_test)], seed + 7919, True)]
    folders = tuple(check_new_dataset(dataset_id, name, force) for dataset_id, name, *_ in plan)
    with tqdm(total=num_pretrain + num_train + num_test, desc="MNI demo subjects", unit="case", disable=None) as bar:
        for dataset_id, name, splits, base_seed, labelled in plan:
            with new_dataset(dataset_id, name, force) as folder:
                k = 0
                for split, count in splits:
                    for i in range(count):
                        image, label, brain, grid = make_subject(seed=base_seed * 1_000_003 + k, small=small)
                        k += 1
                        geometry = dict(spacing_zyx=grid.GetSpacing()[::-1], origin_xyz=grid.GetOrigin(),
                                        direction=grid.GetDirection())
                        case = f"{name.lower()}_{split.lower()}{i:03d}"
                        write_image(image, path=folder / f"images{split}" / f"{case}_0000.nii.gz", **geometry)
                        write_image(label if labelled else brain, dtype=np.uint8,
                                    path=folder / f"labels{split}" / f"{case}.nii.gz", **geometry)
                        bar.update()
                labels = LABELS if labelled else {"background": 0, "foreground": 1}
                description = ("MNI152 2009c T1 template (nilearn) under random deformations, bias field, contrast, "
                               "gamma, Rician noise and resolution"
                               + ("" if labelled else "; unlabelled pretraining cohort: labelsTr holds only the "
                                                      "brain mask, because nnU-Net's fingerprinting needs labels"))
                write_dataset_json(folder, "T1", labels, splits[0][1], name=name, description=description)
    return folders
