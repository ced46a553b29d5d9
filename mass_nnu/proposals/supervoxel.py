"""Weight-free CPU proposals: 3D SLIC supervoxels at several scales, intensity classes split into connected
components, and the dark / bright sides of each class threshold split into halves along the foreground's principal
axes (e.g. one hemisphere's grey or white matter)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import cc3d
import numpy as np
from scipy import ndimage
from scipy.ndimage import gaussian_filter
from skimage.segmentation import slic
from sklearn.cluster import KMeans
from threadpoolctl import threadpool_limits

from mass_nnu.grids import resample_nearest
from mass_nnu.proposals.filtering import FilterSettings, finalize, foreground_mask
from mass_nnu.proposals.resample import to_working_grid
from mass_nnu.proposals.store import COLUMNS, RawGridTables


@dataclass
class SupervoxelSettings:
    slic_segments: tuple[int, ...] = (12, 48, 120)   # supervoxels per foreground, one layer per scale
    slic_compactness: float = 0.03
    slic_edge_voxels: float = 8.0                    # a scale's SLIC runs on a grid coarse enough for this mean
    slic_max_spacing_mm: float = 4.0                 # supervoxel edge, never coarser than this
    slic_min_factor: float = 1.25                    # a coarser grid only when it is this much coarser per axis
    intensity_classes: tuple[int, ...] = (2, 3, 4, 6)  # k-means classes; each class split into components
    bias_sigma_mm: float = 15.0                      # homomorphic bias correction before clustering (0: off)
    half_splits: bool = True                         # class thresholds × halves along each principal axis
    core_depth_mm: float = 10.0                      # classes inside the foreground's core (0: off)
    seed: int = 0
    working_spacing_mm: float | None = 2.0           # run on this coarser grid (never upsampled); None / 0: raw grid
    filters: FilterSettings = field(default_factory=FilterSettings)

    def as_dict(self) -> dict:
        return asdict(self)


def bias_corrected(image: np.ndarray, foreground: np.ndarray, spacing, sigma_mm: float) -> np.ndarray:
    """Divide by the smooth local mean inside the foreground (removes slow intensity drifts, e.g. MRI bias)."""
    if sigma_mm <= 0 or image[foreground].min() <= 0:  # CT-like (negative HU): intensities are absolute
        return image
    sigma = [sigma_mm / s for s in spacing]
    weight = gaussian_filter(foreground.astype(np.float32), sigma)
    local = gaussian_filter(np.where(foreground, image, 0).astype(np.float32), sigma) / np.maximum(weight, 1e-3)
    return np.where(foreground, image / np.maximum(local, 1e-6), 0).astype(np.float32)


def normalise(image: np.ndarray, foreground: np.ndarray) -> np.ndarray:
    values = image[foreground] if foreground.any() else image.ravel()
    lo, hi = np.percentile(values, [0.5, 99.5])
    return np.clip((image - lo) / max(hi - lo, 1e-6), 0, 1).astype(np.float32)


def slic_spacing(foreground: np.ndarray, spacing, segments: int, s: SupervoxelSettings) -> float | None:
    """The grid (mm) one SLIC scale runs on: coarser than the working grid by the factor that leaves a mean
    supervoxel edge of ``slic_edge_voxels``, capped at ``slic_max_spacing_mm``; None (the working grid) when that
    saves less than ``slic_min_factor`` per axis. A 12-supervoxel scale needs no 2 mm grid to place its boundaries."""
    edge = (np.count_nonzero(foreground) / segments) ** (1 / 3)
    finest = min(spacing)
    factor = min(edge / s.slic_edge_voxels, s.slic_max_spacing_mm / finest)
    return finest * factor if factor >= s.slic_min_factor else None


def slic_layers(image01, foreground, spacing, s: SupervoxelSettings) -> list[np.ndarray]:
    layers, grids = [], {}
    for n in s.slic_segments:
        grid_mm = slic_spacing(foreground, spacing, n, s)
        if grid_mm not in grids:  # scales on the same grid share its image and mask
            image, grid = (image01, spacing) if grid_mm is None else to_working_grid(image01, spacing, grid_mm)
            mask = foreground if grid_mm is None else resample_nearest(foreground.view(np.uint8), image.shape) > 0
            grids[grid_mm] = image, grid, mask
        image, grid, mask = grids[grid_mm]
        labels = slic(image, n_segments=n, compactness=s.slic_compactness, channel_axis=None, spacing=grid,
                      mask=mask, start_label=1, enforce_connectivity=True).astype(np.uint16)
        if grid_mm is not None:  # back onto the working grid, inside its own foreground only
            labels = resample_nearest(labels, foreground.shape)
            labels[~foreground] = 0
        layers.append(labels)
    return layers


def smoothed_values(image01, foreground) -> np.ndarray:
    """The intensities that ``intensity_classes`` clusters: smoothed, inside the foreground, as one column."""
    return gaussian_filter(image01, 0.7)[foreground].reshape(-1, 1)


def intensity_classes(values, foreground, k: int, seed: int) -> np.ndarray:
    """k-means of the foreground's smoothed intensities (``smoothed_values``); class map 1..k (0 outside), of the
    smallest unsigned type that holds k. One thread, so that the same image gives the same classes on any machine."""
    sample = values[np.random.default_rng(seed).choice(len(values), min(len(values), 20000), replace=False)]
    with threadpool_limits(limits=1):  # OpenMP's reduction order made the classes depend on the core count
        km = KMeans(n_clusters=k, n_init=3, random_state=seed).fit(sample)
    centres = np.sort(km.cluster_centers_.ravel())
    # nearest centre in 1-D = the interval between midpoints (k-means' predict without its (N, k) distances)
    classes = np.zeros(foreground.shape, np.min_scalar_type(k))
    classes[foreground] = np.searchsorted((centres[:-1] + centres[1:]) / 2, values.ravel()) + 1
    return classes


def components(classes: np.ndarray) -> np.ndarray:
    """Connected components of every class (6-connectivity, as ``ndimage.label``'s default), as one instance map,
    in one pass: neighbours join only when their class is equal, numbered in raster order (cc3d; the same map as
    skimage's ``label(connectivity=1)``, 3-10× faster). Beyond 65535 components the smallest are dropped (uint16;
    they are far below the filters' minimum volume)."""
    labels, n = cc3d.connected_components(classes, connectivity=6, return_N=True)
    if n <= np.iinfo(np.uint16).max:
        return labels.astype(np.uint16, copy=False)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    lut = np.zeros(n + 1, np.uint16)
    lut[np.argsort(-sizes, kind="stable")[: np.iinfo(np.uint16).max]] = np.arange(1, np.iinfo(np.uint16).max + 1)
    lut[0] = 0
    return lut[labels]


def principal_halves(foreground: np.ndarray, spacing) -> list[np.ndarray]:
    """For each principal axis of the foreground, a uint8 map with 1/2 for the two halves through its centroid (0
    outside the foreground). The moments come from the foreground's 2D projections (no (N, 3) coordinate array)."""
    count = int(np.count_nonzero(foreground))
    if count < 4:
        return []
    c_zy, c_zx, c_yx = (foreground.sum(axis=a, dtype=np.float64) for a in (2, 1, 0))
    z, y, x = (np.arange(n, dtype=np.float64) * sp for n, sp in zip(foreground.shape, spacing))
    mean = np.array([z @ c_zy.sum(1), y @ c_zy.sum(0), x @ c_zx.sum(0)]) / count
    second = np.empty((3, 3))
    second[0, 0], second[1, 1], second[2, 2] = (z * z) @ c_zy.sum(1), (y * y) @ c_zy.sum(0), (x * x) @ c_zx.sum(0)
    second[0, 1] = second[1, 0] = z @ c_zy @ y
    second[0, 2] = second[2, 0] = z @ c_zx @ x
    second[1, 2] = second[2, 1] = y @ c_yx @ x
    covariance = second / count - np.outer(mean, mean)
    _, vectors = np.linalg.eigh(covariance)
    halves = []
    for axis in vectors.T[::-1]:  # largest variance first
        proj = sum(((g - m) * a).astype(np.float32).reshape([-1 if i == d else 1 for i in range(3)])
                   for d, (g, m, a) in enumerate(zip((z, y, x), mean, axis)))
        side = np.where(proj > 0, 2, 1).astype(np.uint8)
        side[~foreground] = 0
        halves.append(side)
    return halves


def _layers(image, image01, foreground, inner: tuple[slice, ...], spacing, s: SupervoxelSettings):
    """The candidate layers one at a time (SLIC scales, then intensity classes, core classes and halves), made on
    the crop but yielded on its box ``inner`` (which holds the foreground: every layer is 0 outside it)."""
    for labels in slic_layers(image01, foreground, spacing, s):
        yield np.ascontiguousarray(labels[inner])
    image01 = normalise(bias_corrected(image, foreground, spacing, s.bias_sigma_mm), foreground)
    halves = [side[inner] for side in principal_halves(foreground, spacing)] if s.half_splits else []
    core = None
    if s.core_depth_mm > 0:
        core = (ndimage.distance_transform_edt(foreground, sampling=spacing) > s.core_depth_mm)[inner]
    values = smoothed_values(image01, foreground)
    foreground = np.ascontiguousarray(foreground[inner])  # the same voxels in the same (raster) order
    for k in s.intensity_classes:
        classes = intensity_classes(values, foreground, k, s.seed)
        yield components(classes)
        if core is not None:
            yield components(classes * core)
        # each threshold between classes (dark / bright part) × the two halves; side is 0 outside the foreground
        brighter = [np.left_shift(classes >= level, 1, dtype=np.uint8) for level in range(2, k + 1)]
        for side in halves:
            for bright in brighter:
                yield components(bright + side)


def supervoxel_proposals(image: np.ndarray, spacing, settings: SupervoxelSettings | None = None,
                         with_table: bool = False):
    """Proposals for one (Z, Y, X) image with spacing in the same order -> uint16 (L, *S_w) on the working grid
    (``settings.working_spacing_mm``, see ``proposals/resample.py``; the raw grid when it is None / 0). Every mm
    setting (SLIC spacing, bias sigma, core depth, filters' mm³) is applied with the working spacing. With
    ``with_table``: (layers, their table on the image's grid), which ``store.write_proposals`` takes instead of
    counting the mapped layers (the filters know every box already; the voxels are counted once, on the working
    grid's foreground, each as the raw voxels mapped onto it)."""
    s = settings or SupervoxelSettings()
    image = np.asarray(image, np.float32)
    raw_shape = image.shape
    image = image if np.isfinite(image).all() else np.nan_to_num(image)  # the input itself is never written
    image, spacing = to_working_grid(image, spacing, s.working_spacing_mm)
    foreground = foreground_mask(image)
    if foreground.sum() < 10:
        layers = np.zeros((0, *image.shape), np.uint16)
        return (layers, np.zeros((0, len(COLUMNS)), np.int64)) if with_table else layers
    box = foreground_box(foreground, CROP_MARGIN)  # everything below runs on the foreground's bounding box
    crop, fg = np.ascontiguousarray(image[box]), np.ascontiguousarray(foreground[box])
    del image
    inner = foreground_box(fg, 0)  # the layers are made on the crop (its margin for smoothing) and kept on this box
    placed = tuple(slice(b.start + i.start, b.start + i.stop) for b, i in zip(box, inner))
    layers = _layers(crop, normalise(crop, fg), fg, inner, spacing, s)
    inside = np.ascontiguousarray(fg[inner])
    if not with_table:
        return finalize(layers, inside, spacing, s.filters, placed, foreground.shape, inside_foreground=True)
    tables = RawGridTables(foreground.shape, raw_shape, placed)  # exact: the working grid is never the finer one
    layers, table = finalize(layers, inside, spacing, s.filters, placed, foreground.shape, inside_foreground=True,
                             table_weights=tables.weights.reshape(inside.shape))
    return layers, tables.mapped(table)


CROP_MARGIN = 4  # voxels of background kept around the foreground (the 0.7-voxel smoothing reaches 3)


def foreground_box(foreground: np.ndarray, margin: int) -> tuple[slice, ...]:
    """The foreground's bounding box grown by ``margin`` voxels (clipped to the volume)."""
    box = ndimage.find_objects(foreground.astype(np.uint8))[0]
    return tuple(slice(max(sl.start - margin, 0), min(sl.stop + margin, n)) for sl, n in zip(box, foreground.shape))
