"""The proposal backends' working grid: a coarser grid over the same field of view as the raw image.

Per axis the working grid has ``n_w = round(n * s / target)`` voxels (at least 1) when the raw spacing ``s`` is finer
than ``target``, else the raw ``n`` (never upsampled); its spacing is ``n * s / n_w``, so both grids span exactly
the same extent and voxel centres map by ``(i + 0.5) * n_w / n - 0.5``. Backends return layers on this grid; the
storage layer maps them back to the raw grid (``store.write_proposals``, ``mass_nnu/grids.py``).
"""
from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter1d


def working_grid(shape, spacing, target_mm: float | None) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """(shape, spacing) of the working grid; the raw grid itself when ``target_mm`` is None or ≤ 0."""
    if not target_mm or target_mm <= 0:
        return tuple(int(n) for n in shape), tuple(float(s) for s in spacing)
    sizes = [int(n) if s >= target_mm else max(1, round(n * s / target_mm)) for n, s in zip(shape, spacing)]
    return tuple(sizes), tuple(float(n * s / m) for n, s, m in zip(shape, spacing, sizes))


def _linear_axis(array: np.ndarray, axis: int, size: int) -> np.ndarray:
    """Linear interpolation along one axis at the voxel centres of a grid of ``size`` over the same extent, slice by
    slice of the first axis (each output slice from its two input slices along it, else from its own input slice):
    the float32 products and sums of ``take(lo) * (1 - w) + take(hi) * w``, without full-size gathered copies of the
    raw image (2-3× faster)."""
    n = array.shape[axis]
    coords = np.clip((np.arange(size) + 0.5) * n / size - 0.5, 0, n - 1)
    lo = np.floor(coords).astype(np.intp)
    hi = np.minimum(lo + 1, n - 1)
    w = (coords - lo).astype(np.float32)
    shape = list(array.shape)
    shape[axis] = size
    out = np.empty(shape, np.float32)
    if axis == 0:
        for i in range(size):
            np.multiply(array[lo[i]], 1 - w[i], out=out[i])
            out[i] += array[hi[i]] * w[i]
        return out
    w = w.reshape([size if a == axis else 1 for a in range(1, array.ndim)])
    for i in range(array.shape[0]):
        np.multiply(np.take(array[i], lo, axis=axis - 1), 1 - w, out=out[i])
        out[i] += np.take(array[i], hi, axis=axis - 1) * w
    return out


def to_working_grid(image: np.ndarray, spacing, target_mm: float | None) -> tuple[np.ndarray, tuple[float, ...]]:
    """Anti-aliased (Gaussian, sigma = (factor - 1) / 2 voxels, as skimage's resize) linear downsampling of a
    float32 (Z, Y, X) image onto the working grid, one axis at a time (peak memory about twice the input)."""
    shape, working_spacing = working_grid(image.shape, spacing, target_mm)
    out = np.asarray(image, np.float32)
    for axis, size in enumerate(shape):
        if size == out.shape[axis]:
            continue
        factor = out.shape[axis] / size
        if factor > 1:
            out = gaussian_filter1d(out, (factor - 1) / 2, axis=axis, mode="nearest")
        out = _linear_axis(out, axis, size)
    return np.ascontiguousarray(out, np.float32), working_spacing
