"""MRI demo cohorts from the real MNI152 2009c template and its GM/WM maps, which nilearn's wheel ships.

Each subject is the template under a random smooth deformation (affine plus B-spline, applied as one SimpleITK
displacement field), with a bias field, contrast and gamma changes, Rician noise and a random resolution.
Images and labels come from the same warped template channels, so they line up exactly.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage
from tqdm import tqdm

from mass_nnu.demo_data.writer import check_new_dataset, new_dataset, write_dataset_json, write_image
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
VENTRICLE_GROWTH_SIGMA_MM = 20.0  # falloff of the radial expansion about the ventricles' centroid
T2_LIKE = {"csf": 1.0, "gm": 0.55, "wm": 0.3}  # T2-like contrast from tissue maps: CSF bright, WM dark


PRETRAIN_NAME, DOWNSTREAM_NAME = "MNIPretrain", "MNISeg"  # Dataset501_MNIPretrain, Dataset502_MNISeg
DOWNSTREAM_SEED_OFFSET = 7919  # Dataset502's base seed is seed + this; Dataset501's is seed itself


def subject_seed(base_seed: int, k: int) -> int:
    """The seed of subject k of a dataset whose base seed is base_seed."""
    return base_seed * 1_000_003 + k


@dataclass(frozen=True)
class Warp:
    """Ranges of a cohort's random deformation: a similarity (or, with per_axis_scale, scale-versor) transform,
    a B-spline of mesh_cells³ cells with N(0, bspline_mm) control-point displacements, an optional radial
    expansion about the ventricles' centroid (strength uniform in [0, ventricle_growth]; 0.4 enlarges the
    ventricles' core 1/(1-0.4) = 1.7x linearly), and grid_pad_mm of extra room on every side of the output grid."""
    rotation_deg: float = 8.0
    scale: tuple[float, float] = (0.92, 1.08)
    per_axis_scale: bool = False
    shift_mm: float = 4.0
    mesh_cells: int = 4
    bspline_mm: float = 3.0
    ventricle_growth: float = 0.0
    grid_pad_mm: float = 0.0


DOWNSTREAM_WARP = Warp()  # Dataset502_MNISeg, unchanged since the first release
PRETRAIN_WARP = Warp(rotation_deg=12.0, scale=(0.88, 1.12), shift_mm=6.0, bspline_mm=4.5, grid_pad_mm=15.0)


def template_path(key: str) -> Path:
    spec = importlib.util.find_spec("nilearn")  # its location only: importing nilearn is not needed
    if spec is None or spec.origin is None:
        raise MassError("nilearn: not installed (nilearn>=0.10 is needed for the MNI152 template)")
    path = Path(spec.origin).parent / "datasets" / "data" / TEMPLATE_FILES[key]
    if not path.is_file():
        raise MassError(f"{path}: MNI152 template file missing from the nilearn installation (nilearn>=0.10 needed)")
    return path


@lru_cache(maxsize=1)
def load_template() -> dict:
    """Template channels as float32 SimpleITK images on the 1 mm grid, cropped to the brain plus a margin:
    t1 (0-1), wm and gm probabilities, ventricles (CSF probability inside the ventricular system), brain mask
    and x_world (the world x coordinate; > 0 is the subject's left in LPS), used to split hemispheres at the
    template's mid-sagittal plane after warping."""
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


def _random_displacement(reference, rng: np.random.Generator, warp: Warp):
    """A random affine composed with a smooth B-spline deformation (ranges in ``warp``), sampled once on a 4 mm
    grid as a displacement field (evaluating the B-spline per voxel is 3-6x slower), then optionally the
    ventricle expansion."""
    center = reference.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in reference.GetSize()])
    affine = sitk.ScaleVersor3DTransform() if warp.per_axis_scale else sitk.Similarity3DTransform()
    affine.SetCenter(center)
    axis = rng.normal(size=3)
    affine.SetRotation(tuple(axis / np.linalg.norm(axis)),
                       float(np.deg2rad(rng.uniform(-warp.rotation_deg, warp.rotation_deg))))
    scale = rng.uniform(*warp.scale, 3 if warp.per_axis_scale else None)
    affine.SetScale(tuple(float(s) for s in scale) if warp.per_axis_scale else float(scale))
    affine.SetTranslation(tuple(rng.uniform(-warp.shift_mm, warp.shift_mm, 3)))
    # the B-spline's domain must hold the whole output grid: outside it, the displacement drops to zero
    domain = _output_grid(reference, reference.GetSpacing(), warp.grid_pad_mm)
    bspline = sitk.BSplineTransformInitializer(domain, [warp.mesh_cells] * 3)
    bspline.SetParameters(tuple(rng.normal(0, warp.bspline_mm, len(bspline.GetParameters()))))
    composite = sitk.CompositeTransform([affine, bspline])

    step = 4.0
    pad = 2 + int(np.ceil(warp.grid_pad_mm / step))  # field voxels beyond the output grid on every side
    size = [int(np.ceil(n * s / step)) + 2 * pad for n, s in zip(reference.GetSize(), reference.GetSpacing())]
    origin = reference.TransformContinuousIndexToPhysicalPoint(
        [-pad * step / s for s in reference.GetSpacing()])
    field = sitk.TransformToDisplacementField(composite, sitk.sitkVectorFloat64, size, origin, (step,) * 3,
                                              reference.GetDirection())
    if warp.ventricle_growth:
        field = _grow_ventricles(field, rng.uniform(0, warp.ventricle_growth))
    return sitk.DisplacementFieldTransform(field)


def _grow_ventricles(field, strength: float):
    """Compose a displacement field with a radial expansion about the template ventricles' centroid c: a point q
    (template space) samples c + (q - c)·(1 - strength·g), g a Gaussian of σ VENTRICLE_GROWTH_SIGMA_MM. It enlarges
    the ventricles and compresses the tissue around them (like atrophy ex vacuo) and never folds for strength < 1."""
    displacement = sitk.GetArrayFromImage(field)  # (z, y, x, 3)
    index = np.stack(np.meshgrid(*[np.arange(n) for n in field.GetSize()[::-1]], indexing="ij")[::-1], axis=-1)
    points = (np.asarray(field.GetOrigin()) + (index * np.asarray(field.GetSpacing()))
              @ np.asarray(field.GetDirection()).reshape(3, 3).T)
    offset = points + displacement - ventricle_center()
    gain = strength * np.exp(-np.sum(offset ** 2, -1, keepdims=True) / (2 * VENTRICLE_GROWTH_SIGMA_MM ** 2))
    grown = sitk.GetImageFromArray(displacement - gain * offset, isVector=True)
    grown.CopyInformation(field)
    return grown


@lru_cache(maxsize=1)
def ventricle_center() -> np.ndarray:
    """The template ventricles' centroid (world mm, LPS), weighted by their CSF probability."""
    image = load_template()["ventricles"]
    weights = sitk.GetArrayViewFromImage(image)
    index_xyz = (np.argwhere(weights > 0) * weights[weights > 0][:, None]).sum(0)[::-1] / weights.sum()
    return np.asarray(image.TransformContinuousIndexToPhysicalPoint(index_xyz.tolist()))


def _output_grid(reference, spacing_xyz, pad_mm: float = 0.0):
    """An empty image covering the reference's extent plus pad_mm on every side at the given spacing, with the
    same direction."""
    size = [int(round((n * s + 2 * pad_mm) / t))
            for n, s, t in zip(reference.GetSize(), reference.GetSpacing(), spacing_xyz)]
    grid = sitk.Image(size, sitk.sitkFloat32)
    grid.SetSpacing(tuple(float(s) for s in spacing_xyz))
    grid.SetOrigin(reference.TransformContinuousIndexToPhysicalPoint([-pad_mm / s for s in reference.GetSpacing()])
                   if pad_mm else reference.GetOrigin())
    grid.SetDirection(reference.GetDirection())
    return grid


def _bias_field(shape, rng: np.random.Generator, strength: float) -> np.ndarray:
    """Smooth multiplicative field: exp of a random second-order polynomial."""
    coords = np.meshgrid(*[np.linspace(-1, 1, s, dtype=np.float32) for s in shape], indexing="ij")
    field = sum(rng.normal(0, strength) * c for c in coords)
    field += sum(rng.normal(0, strength / 2) * c * d for i, c in enumerate(coords) for d in coords[i:])
    return np.exp(field).astype(np.float32)


def channel_stack(channels: dict, small: bool):
    """Template channels (SimpleITK images on one grid) as one vector image, in the dict's order; blurred for the
    small mode's ~3.9 mm grid (anti-aliasing, like the partial volume of a real low-resolution scan)."""
    stack = sitk.Compose(list(channels.values()))
    if small:
        stack = sitk.BinShrink(stack, [2, 2, 2])  # 2 mm block averages: cheaper to blur and to sample
        target = float(np.mean(SMALL_SPACING))
        sigma = [0.5 * float(np.sqrt(target ** 2 - s ** 2)) for s in stack.GetSpacing()]
        stack = sitk.SmoothingRecursiveGaussian(stack, sigma)
    return stack


@lru_cache(maxsize=2)
def _template_stack(small: bool):
    """The CHANNELS stack; cached, since the blur costs more than a subject."""
    template = load_template()
    return channel_stack({k: template[k] for k in CHANNELS}, small)


def warp_template(stack, names, rng: np.random.Generator, small: bool, warp: Warp) -> tuple[dict, object]:
    """Draw a resolution and a deformation, and resample every channel of ``stack`` (named ``names``) through it
    (linear) onto the subject's grid: ({name: (z, y, x) float32 array}, SimpleITK grid). Voxels mapped from
    outside the template get zeros: no tissue, x_world 0."""
    spacing_xyz = rng.uniform(*(SMALL_SPACING if small else FULL_SPACING)) * rng.uniform(0.95, 1.05, 3)
    grid = _output_grid(stack, spacing_xyz, warp.grid_pad_mm)
    transform = _random_displacement(stack, rng, warp)
    warped = sitk.GetArrayFromImage(sitk.Resample(stack, grid, transform, sitk.sitkLinear, 0.0))
    return {k: warped[..., i] for i, k in enumerate(names)}, grid


def mr_image(contrast: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A 0-1 contrast map as an MR magnitude image: gamma, bias field, scale and offset, Rician noise."""
    image = np.clip(contrast, 0, None) ** rng.uniform(0.7, 1.4)
    image *= _bias_field(image.shape, rng, strength=0.15)
    image = image * rng.uniform(0.8, 1.25) * 1000 + rng.uniform(-20, 20)
    noise_sd = rng.uniform(0.01, 0.03) * 1000
    # Rician noise (magnitude of complex Gaussian), like a real magnitude MR image
    image = np.sqrt((image + rng.normal(0, noise_sd, image.shape)) ** 2 + rng.normal(0, noise_sd, image.shape) ** 2)
    return image.astype(np.float32)


def t2_like(channels: dict) -> np.ndarray:
    """A T2-like 0-1 contrast from warped tissue maps (T2_LIKE weights): CSF (brain minus WM and GM) bright,
    GM middle, WM dark, outside the brain 0."""
    csf = np.clip(channels["brain"] - channels["wm"] - channels["gm"], 0, 1)
    return T2_LIKE["csf"] * csf + T2_LIKE["gm"] * channels["gm"] + T2_LIKE["wm"] * channels["wm"]


def make_subject(seed: int, small: bool, warp: Warp = DOWNSTREAM_WARP, t2: bool = False):
    """One subject: (image float32, label uint8, brain mask uint8, SimpleITK grid). Arrays are (z, y, x).
    The image is T1 (the warped template), or T2-like from the warped tissue maps with ``t2``."""
    rng = np.random.default_rng(seed)
    channels, grid = warp_template(_template_stack(small), CHANNELS, rng, small, warp)
    brain = (channels["brain"] > 0.5).astype(np.uint8)
    image = mr_image(t2_like(channels) if t2 else channels["t1"], rng)
    return image, _labels(channels), brain, grid


def tissue_classes(channels: dict) -> np.ndarray:
    """Argmax of (rest, WM, GM, ventricles) over warped probabilities, rest = 1 - WM - GM - ventricles (sulcal
    CSF, outside): 0 rest, 1 WM, 2 GM, 3 ventricles."""
    wm, gm, vent = channels["wm"], channels["gm"], channels["ventricles"]
    rest = np.clip(1.0 - wm - gm - vent, 0, None)
    return np.argmax(np.stack([rest, wm, gm, vent]), axis=0)


def _labels(channels: dict) -> np.ndarray:
    """Tissue classes, WM and GM split left-right at the template's mid-sagittal plane (warped x_world > 0 is the
    left hemisphere)."""
    tissue = tissue_classes(channels)
    left = channels["x_world"] > 0
    label = np.zeros(tissue.shape, np.uint8)
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
    if pretrain_id == downstream_id:
        raise MassError(f"dataset IDs: the pretraining and downstream IDs must differ (both {pretrain_id})")
    plan = [(pretrain_id, PRETRAIN_NAME, [("Tr", num_pretrain)], seed, False, PRETRAIN_WARP),
            (downstream_id, DOWNSTREAM_NAME, [("Tr", num_train), ("Ts", num_test)], seed + DOWNSTREAM_SEED_OFFSET, True,
             DOWNSTREAM_WARP)]
    folders = tuple(check_new_dataset(dataset_id, name, force) for dataset_id, name, *_ in plan)
    with tqdm(total=num_pretrain + num_train + num_test, desc="MNI demo subjects", unit="case", disable=None) as bar:
        for dataset_id, name, splits, base_seed, labelled, warp in plan:
            with new_dataset(dataset_id, name, force) as folder:
                k = 0
                for split, count in splits:
                    for i in range(count):
                        image, label, brain, grid = make_subject(seed=subject_seed(base_seed, k), small=small,
                                                                  warp=warp)
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
