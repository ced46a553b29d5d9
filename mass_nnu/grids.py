"""Nearest-neighbour mapping between two voxel grids over the same field of view (voxel-centre index mapping).

Output voxel ``i`` of ``n_out`` takes input voxel ``floor((i + 0.5) · n_in / n_out)``: the input voxel that holds
the output voxel's centre. Used for label maps only (no interpolation): a backend's working grid → the raw grid
(``proposals/store.py``) and the cropped raw grid → nnU-Net's preprocessed grid (``adapter/preprocessed.py``).
"""
from __future__ import annotations

import numpy as np


def nearest_indices(n_in: int, n_out: int) -> np.ndarray:
    """For each of ``n_out`` output voxels, the index of the input voxel (of ``n_in``) holding its centre."""
    return np.minimum(((np.arange(n_out) + 0.5) * n_in / n_out).astype(np.int64), n_in - 1)


def resample_nearest(array: np.ndarray, shape) -> np.ndarray:
    """``array`` with its last ``len(shape)`` axes mapped to ``shape`` (leading axes kept): one ``np.take`` of
    elements along the last axis, then one ``np.take`` of whole rows for all other changed axes at once (the rows'
    flat indices; 3× faster than a take per axis, 5× faster than one ``np.ix_`` index). An equal shape returns
    ``array`` itself."""
    shape = tuple(int(s) for s in shape)
    lead = array.ndim - len(shape)
    if lead < 0:
        raise ValueError(f"array of {array.ndim} dimensions cannot be mapped to {len(shape)} axes")
    if tuple(array.shape[lead:]) == shape:
        return array
    out = array
    if array.shape[-1] != shape[-1]:
        out = np.take(out, nearest_indices(array.shape[-1], shape[-1]), axis=-1)
    grid = array.shape[lead:-1]
    if grid != shape[:-1]:
        rows = np.ravel_multi_index(np.ix_(*[nearest_indices(n_in, n_out) for n_in, n_out in zip(grid, shape)]), grid)
        out = np.take(out.reshape(*array.shape[:lead], -1, shape[-1]), rows.ravel(), axis=lead)
        out = out.reshape(*array.shape[:lead], *shape)
    return out
