"""Weight-free CPU proposals: 3D SLIC supervoxels at several scales, intensity classes split into connected
components, and the dark / bright sides of each class threshold split into halves along the foreground's principal
axes (e.g. one hemisphere's grey or white matter)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
from scipy import ndimage
from scipy.ndimage import gaussian_filter
from skimage.segmentation import slic
from sklearn.cluster import KMeans

from mass_nnu.proposals.filtering import FilterSettings, finalize, foreground_mask


@dataclass
class SupervoxelSettings:
    slic_segments: tuple[int, ...] = (12, 48, 120)   # supervoxels per foreground, one layer per scale
    slic_compactness: float = 0.03
    intensity_classes: tuple[int, ...] = (2, 3, 4, 6)  # k-means classes; each class split into components
    bias_sigma_mm: float = 15.0                      # homomorphic bias correction before clustering (0: off)
    half_splits: bool = True                         # class thresholds × halves along each principal axis
    core_depth_mm: float = 10.0                      # classes inside the foreground's core (0: off)
    seed: int = 0
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


def slic_layers(image01, foreground, spacing, s: SupervoxelSettings) -> list[np.ndarray]:
    layers = []
    for n in s.slic_segments:
        labels = slic(image01, n_segments=n, compactness=s.slic_compactness, channel_axis=None, spacing=spacing,
                      mask=foreground, start_label=1, enforce_connectivity=True)
        layers.append(labels.astype(np.uint16))
    return layers


def intensity_classes(image01, foreground, k: int, seed: int) -> np.ndarray:
    """k-means of smoothed intensities inside the foreground; class map 1..k (0 outside)."""
    smooth = gaussian_filter(image01, 0.7)
    values = smooth[foreground].reshape(-1, 1)
    sample = values[np.random.default_rng(seed).choice(len(values), min(len(values), 20000), replace=False)]
    km = KMeans(n_clusters=k, n_init=3, random_state=seed).fit(sample)
    order = np.argsort(km.cluster_centers_.ravel())
    rank = np.empty(k, int)
    rank[order] = np.arange(k)
    classes = np.zeros(image01.shape, np.uint16)
    classes[foreground] = rank[km.predict(values)] + 1
    return classes


def components(classes: np.ndarray) -> np.ndarray:
    """Connected components of every class, as one instance map."""
    out = np.zeros(classes.shape, np.uint16)
    offset = 0
    for c in np.unique(classes[classes > 0]):
        labels, n = ndimage.label(classes == c)
        out[labels > 0] = labels[labels > 0] + offset
        offset += n
    return out


def principal_halves(foreground: np.ndarray, spacing) -> list[np.ndarray]:
    """For each principal axis of the foreground, a map with 1/2 for the two halves through its centroid."""
    coords = np.argwhere(foreground) * np.asarray(spacing)
    if len(coords) < 4:
        return []
    centred = coords - coords.mean(0)
    _, _, axes = np.linalg.svd(centred, full_matrices=False)
    halves = []
    for axis in axes:
        side = np.zeros(foreground.shape, np.uint16)
        side[foreground] = np.where(centred @ axis > 0, 2, 1)
        halves.append(side)
    return halves


def supervoxel_proposals(image: np.ndarray, spacing, settings: SupervoxelSettings | None = None) -> np.ndarray:
    """Proposals for one (Z, Y, X) image with spacing in the same order -> uint16 (L, Z, Y, X)."""
    s = settings or SupervoxelSettings()
    image = np.nan_to_num(image.astype(np.float32))
    foreground = foreground_mask(image)
    if foreground.sum() < 10:
        return np.zeros((0, *image.shape), np.uint16)
    image01 = normalise(image, foreground)
    layers = slic_layers(image01, foreground, spacing, s)
    image01 = normalise(bias_corrected(image, foreground, spacing, s.bias_sigma_mm), foreground)
    halves = principal_halves(foreground, spacing) if s.half_splits else []
    core = ndimage.distance_transform_edt(foreground, sampling=spacing) > s.core_depth_mm
    for k in s.intensity_classes:
        classes = intensity_classes(image01, foreground, k, s.seed)
        layers.append(components(classes))
        if s.core_depth_mm > 0:
            layers.append(components(np.where(core, classes, 0).astype(np.uint16)))
        for side in halves:  # each threshold between classes (dark / bright part) × the two halves
            for level in range(2, k + 1):
                split = (classes >= level).astype(np.uint16) * 2 + side
                layers.append(components(np.where(classes > 0, split, 0).astype(np.uint16)))
    return finalize(layers, foreground, spacing, s.filters)
