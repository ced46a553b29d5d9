"""Shared proposal post-processing: foreground, size / compactness / background filters, IoU de-duplication."""
from __future__ import annotations

from dataclasses import dataclass

import cc3d
import numpy as np
from scipy import ndimage
from skimage.filters import threshold_otsu

from mass_nnu.proposals.store import COLUMNS


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
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    keep = np.zeros(n + 1, bool)  # components of at least a tenth of the largest one
    keep[1:] = sizes >= 0.1 * sizes.max()
    mask = np.take(keep, labels)
    return fill_holes(ndimage.binary_closing(mask, iterations=2)) | mask


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """``ndimage.binary_fill_holes(mask)`` of a 2D / 3D mask (the background that no face-connected path joins to
    the border is filled) by one labelling of the background (cc3d) instead of an iterated dilation: 3.5× faster."""
    background = cc3d.connected_components(~mask, connectivity=6 if mask.ndim == 3 else 4)
    outer = np.zeros(int(background.max()) + 1, bool)
    for axis in range(mask.ndim):
        for end in (0, -1):
            outer[np.take(background, end, axis=axis)] = True
    outer[0] = False
    return ~np.take(outer, background)


def filter_layer(layer: np.ndarray, foreground: np.ndarray, voxel_mm3: float, s: FilterSettings,
                 inside_foreground: bool = False) -> tuple[np.ndarray, list, np.ndarray]:
    """The instances of one label map that pass the size, compactness and background filters: (their label values,
    bounding boxes, voxel counts), in label order; the map itself is not relabelled (``deduplicate`` does that once,
    for the proposals it keeps). Counts and boxes of all labels come from one pass (``cc3d.statistics``), and the
    rules run on all labels at once. ``inside_foreground``: every label lies inside ``foreground`` (the supervoxel
    backend's layers), so the inside-the-foreground counts are the voxel counts and are not counted again."""
    n = int(layer.max()) + 1
    if n == 1:
        return np.zeros(0, np.int64), [], np.zeros(0, np.int64)
    sizes, low, high = label_statistics(layer, n)
    box_volume = np.prod(np.clip(high - low, 0, None), axis=1)
    inside = sizes if inside_foreground else np.bincount(layer[foreground], minlength=n)
    fg_volume = max(int(np.count_nonzero(foreground)), 1)
    keep = np.flatnonzero(passes(sizes, inside, box_volume, fg_volume, voxel_mm3, s))
    keep = keep[keep > 0]
    boxes = [tuple(slice(int(a), int(b)) for a, b in zip(low[i], high[i])) for i in keep]
    return keep, boxes, sizes[keep]


def label_statistics(layer: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Voxel count (n,) and bounding box low, high (n, 3) [low, high) of labels 0..n-1 of a 3D map, in one pass
    (``cc3d.statistics``); an absent label has count 0 and an empty box."""
    if n <= layer.size:  # cc3d's limit: label values below the number of voxels
        stats = cc3d.statistics(layer, no_slice_conversion=True)
        bounds = stats["bounding_boxes"].astype(np.int64)  # per label: low, high (inclusive) of each axis
        return stats["voxel_counts"].astype(np.int64), bounds[:, 0::2], bounds[:, 1::2] + 1
    low, high = np.zeros((n, 3), np.int64), np.zeros((n, 3), np.int64)
    for value, box in enumerate(ndimage.find_objects(layer), start=1):
        if box is not None:
            low[value], high[value] = [b.start for b in box], [b.stop for b in box]
    return np.bincount(layer.ravel(), minlength=n), low, high


def passes(size, inside, box_volume, fg_volume: int, voxel_mm3: float, s: FilterSettings):
    """The size / fraction-of-foreground / compactness (fill of the box) / inside-the-foreground rules, for one
    mask or elementwise for arrays of masks (counts as integers)."""
    size, inside, box_volume = (np.asarray(v, np.int64) for v in (size, inside, box_volume))
    with np.errstate(divide="ignore", invalid="ignore"):
        fraction = size / fg_volume
        return ((size > 0) & (size * voxel_mm3 >= s.min_volume_mm3) & (fraction >= s.min_fraction)
                & (fraction <= s.max_fraction) & (size / box_volume >= s.min_fill) & (inside / size >= s.min_inside))


class Proposal:
    """One mask by its bounding box [lo, hi) and size; its voxels are either ``source[box] == label`` for an instance
    map ``source`` (label > 0: nothing copied) or a bool crop ``source`` of the box itself (label = 0)."""

    __slots__ = ("hi", "label", "lo", "size", "source")

    def __init__(self, box, size: int, source: np.ndarray, label: int = 0):
        self.lo = np.array([sl.start for sl in box], np.int64)
        self.hi = np.array([sl.stop for sl in box], np.int64)
        self.size, self.source, self.label = int(size), source, int(label)

    @property
    def box(self) -> tuple[slice, ...]:
        return tuple(slice(int(a), int(b)) for a, b in zip(self.lo, self.hi))

    def window(self, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        """The mask over the sub-box [lo, hi) of its own box."""
        if self.label:
            return self.source[tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))] == self.label
        return self.source[tuple(slice(int(a - o), int(b - o)) for a, b, o in zip(lo, hi, self.lo))]


def crop_proposal(mask: np.ndarray) -> Proposal | None:
    """A bool volume as a Proposal holding only its bounding-box crop (None when empty)."""
    boxes = ndimage.find_objects(mask.astype(np.uint8))
    if not boxes or boxes[0] is None:
        return None
    crop = np.ascontiguousarray(mask[boxes[0]])
    return Proposal(boxes[0], int(np.count_nonzero(crop)), crop)


class Deduplicator:
    """Incremental IoU de-duplication: a proposal is dropped when an earlier kept one has IoU ≥ ``iou``. Only pairs
    whose sizes and bounding boxes allow that IoU are compared voxel-wise (IoU ≤ min(|A|, |B|, |box A ∩ box B|) /
    max(|A|, |B|)), and only inside the intersection of their boxes."""

    def __init__(self, iou: float):
        self.iou = float(iou)
        self.kept: list[Proposal] = []
        self._lo = np.zeros((64, 3), np.int64)
        self._hi = np.zeros((64, 3), np.int64)
        self._size = np.zeros(64, np.int64)
        self.compared = 0  # voxel-wise comparisons made (for tests and benchmarks)

    def add(self, p: Proposal) -> bool:
        n = len(self.kept)
        if n and self.iou <= 1:
            size = self._size[:n]
            lo, hi = np.maximum(self._lo[:n], p.lo), np.minimum(self._hi[:n], p.hi)
            inter_box = np.prod(np.clip(hi - lo, 0, None), axis=1)
            bound = np.minimum(np.minimum(size, p.size), inter_box) / np.maximum(size, p.size)
            for j in np.flatnonzero(bound >= self.iou):
                self.compared += 1
                inter = int(np.count_nonzero(self.kept[j].window(lo[j], hi[j]) & p.window(lo[j], hi[j])))
                if inter / (size[j] + p.size - inter) >= self.iou:
                    return False
        if n == len(self._size):
            self._lo, self._hi = np.resize(self._lo, (2 * n, 3)), np.resize(self._hi, (2 * n, 3))
            self._size = np.resize(self._size, 2 * n)
        self._lo[n], self._hi[n], self._size[n] = p.lo, p.hi, p.size
        self.kept.append(p)
        return True


def deduplicate(layers, iou: float) -> list[tuple[np.ndarray, list[Proposal]]]:
    """Drop a proposal when an earlier layer already holds one with IoU ≥ ``iou`` (within a layer none overlap).
    ``layers`` yields (map, label values, boxes, sizes) as ``filter_layer`` returns them (with the map first); it may
    be a generator (only maps with a kept proposal stay in memory). Returns, per such map, (map, its kept proposals
    in label order). Bounding-box pre-filter, no full-volume pairwise passes."""
    dedup = Deduplicator(iou)
    kept = []
    for layer, labels, boxes, sizes in layers:
        added = [p for p in (Proposal(box, size, layer, label) for label, box, size in zip(labels, boxes, sizes))
                 if dedup.add(p)]
        if added:
            kept.append((layer, added))
    return kept


def finalize(layers, foreground: np.ndarray, spacing, s: FilterSettings, box: tuple[slice, ...] | None = None,
             shape=None, inside_foreground: bool = False, table_weights: np.ndarray | None = None):
    """Filter every layer, de-duplicate across layers, and stack to (L, Z, Y, X) uint16 (L may be 0), each layer
    relabelled 1..n in label order. ``layers`` may be a generator, so that a backend's layers are made, filtered
    and de-duplicated one at a time. With ``box`` and ``shape`` the layers (made on the crop ``box`` of a volume of
    ``shape``) are written into that volume; each kept layer is relabelled straight into it and freed, so the result
    is never held twice. ``inside_foreground``: see ``filter_layer``. With ``table_weights`` (per voxel of the
    crop, how many voxels it stands for, e.g. raw voxels mapped onto a working voxel) it returns (the stack, its
    table): ``store.layer_table`` rows in the volume, the voxels counted with those weights."""
    voxel_mm3 = float(np.prod(spacing))
    kept = deduplicate(((layer, *filter_layer(layer, foreground, voxel_mm3, s, inside_foreground))
                        for layer in layers), s.dedupe_iou)
    out = np.zeros((len(kept), *(foreground.shape if shape is None else shape)), np.uint16)
    region = box or tuple(slice(0, n) for n in foreground.shape)
    offset = np.array([sl.start for sl in region], np.int64)
    if table_weights is not None:  # float64 sums of integers: exact below 2**53
        weights = table_weights[foreground] if inside_foreground else table_weights.ravel()
    rows = []
    for i in range(len(kept)):
        layer, proposals = kept[i]
        labels = [p.label for p in proposals]
        lut = np.zeros(int(layer.max()) + 1, np.uint16)
        lut[labels] = np.arange(1, len(labels) + 1)
        out[i][region] = np.take(lut, layer, mode="clip")  # no label exceeds len(lut) - 1: nothing is clipped
        if table_weights is not None:
            voxels = layer[foreground] if inside_foreground else layer.ravel()
            counts = np.bincount(voxels, weights=weights, minlength=len(lut))[labels]
            rows += [[i, new, int(round(n)), *(p.lo + offset), *(p.hi + offset)]
                     for new, (p, n) in enumerate(zip(proposals, counts), start=1)]
        kept[i] = None
    if table_weights is None:
        return out
    return out, np.asarray(rows, np.int64).reshape(-1, len(COLUMNS))
