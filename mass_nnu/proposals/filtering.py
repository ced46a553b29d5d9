"""Shared proposal post-processing: foreground, size / compactness / background filters, IoU de-duplication."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from skimage.filters import threshold_otsu


@dataclass
class FilterSettings:
    min_volume_mm3: float = 50.0
    min_fraction: float = 0.002      # of the foreground volume
    max_fraction: float = 0.7
    min_fill: float = 0.03           # volume / bounding-box volume (compactness)
    min_inside: float = 0.8          # fraction of the mask inside the foreground (not background / air)
    dedupe_iou: float = 0.95


def foreground_mask(image: np.ndarray) -> np.ndarray:
    """Body / head mask: Otsu threshold, largest components, holes filled. Empty for constant images."""
    finite = image[np.isfinite(image)]
    if finite.size == 0 or np.ptp(finite) == 0:
        return np.zeros(image.shape, bool)
    mask = image > threshold_otsu(finite)
    mask = ndimage.binary_opening(mask, iterations=1)
    labels, n = ndimage.label(mask)
    if n == 0:
        return mask
    sizes = ndimage.sum_labels(mask, labels, index=np.arange(1, n + 1))
    keep = np.flatnonzero(sizes >= 0.1 * sizes.max()) + 1
    mask = np.isin(labels, keep)
    return ndimage.binary_fill_holes(ndimage.binary_closing(mask, iterations=2)) | mask


def filter_layer(layer: np.ndarray, foreground: np.ndarray, voxel_mm3: float, s: FilterSettings) -> np.ndarray:
    """Keep the instances of one label map that pass the size, compactness and background filters; relabel 1..n."""
    ids = np.unique(layer)
    ids = ids[ids != 0]
    if len(ids) == 0:
        return np.zeros(layer.shape, np.uint16)
    fg_volume = max(int(foreground.sum()), 1)
    sizes = ndimage.sum_labels(np.ones(layer.shape), layer, ids)
    inside = ndimage.sum_labels(foreground, layer, ids)
    boxes = ndimage.find_objects(layer.astype(np.int64))
    keep = []
    for i, size, ins in zip(ids, sizes, inside):
        box = boxes[int(i) - 1]
        fill = size / np.prod([sl.stop - sl.start for sl in box])
        if (size * voxel_mm3 >= s.min_volume_mm3 and s.min_fraction <= size / fg_volume <= s.max_fraction
                and fill >= s.min_fill and ins / size >= s.min_inside):
            keep.append(i)
    lut = np.zeros(int(layer.max()) + 1, np.uint16)
    lut[np.asarray(keep, int)] = np.arange(1, len(keep) + 1)
    return lut[layer]


def _pairwise_iou(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """IoU of every overlapping (label in a, label in b) pair, from one joint histogram."""
    both = (a > 0) & (b > 0)
    na, nb = int(a.max()) + 1, int(b.max()) + 1
    joint = np.bincount(a[both].astype(np.int64) * nb + b[both], minlength=na * nb).reshape(na, nb)
    size_a, size_b = np.bincount(a.ravel(), minlength=na), np.bincount(b.ravel(), minlength=nb)
    ia, ib = np.nonzero(joint)
    inter = joint[ia, ib]
    return ia, ib, inter / (size_a[ia] + size_b[ib] - inter)


def deduplicate(layers: list[np.ndarray], iou: float) -> list[np.ndarray]:
    """Drop a proposal when an earlier layer already holds one with IoU ≥ ``iou`` (within a layer none overlap)."""
    kept: list[np.ndarray] = []
    for layer in layers:
        drop: set[int] = set()
        for earlier in kept:
            _, ib, ious = _pairwise_iou(earlier, layer)
            drop.update(int(i) for i in ib[ious >= iou])
        if drop:
            layer = np.where(np.isin(layer, list(drop)), 0, layer).astype(np.uint16)
        if layer.any():
            kept.append(layer)
    return kept


def finalize(layers: list[np.ndarray], foreground: np.ndarray, spacing, s: FilterSettings) -> np.ndarray:
    """Filter every layer, de-duplicate across layers, and stack to (L, Z, Y, X) uint16 (L may be 0)."""
    voxel_mm3 = float(np.prod(spacing))
    filtered = [filter_layer(layer, foreground, voxel_mm3, s) for layer in layers]
    kept = deduplicate([layer for layer in filtered if layer.any()], s.dedupe_iou)
    if not kept:
        return np.zeros((0, *foreground.shape), np.uint16)
    return np.stack(kept).astype(np.uint16)
