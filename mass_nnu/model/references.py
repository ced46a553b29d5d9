"""Annotated references -> task tokens: each (reference, label) is cropped to the patch around the label and
encoded; several references of a label are averaged at the token level."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from mass_nnu.model.mass_model import TaskTokens


@dataclass
class Reference:
    name: str
    data: np.ndarray  # (C, *S) preprocessed
    seg: np.ndarray  # (*S) preprocessed label map
    labels: list[int] = field(default_factory=list)


def crop_padded(array: np.ndarray, start, size, value=0) -> np.ndarray:
    """array[:, start:start+size] along the spatial axes, padded with ``value`` where it leaves the array."""
    out = np.full((array.shape[0], *size), value, dtype=array.dtype)
    src, dst = [slice(None)], [slice(None)]
    for lo, n, extent in zip(start, size, array.shape[1:]):
        a, b = max(lo, 0), min(lo + n, extent)
        src.append(slice(a, b))
        dst.append(slice(a - lo, b - lo))
    out[tuple(dst)] = array[tuple(src)]
    return out


def as_tensor(array: np.ndarray, device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None].to(device)


def reference_crop(reference: Reference, label: int, patch_size) -> tuple[np.ndarray, np.ndarray]:
    """Patch-size crop of image and binary mask centred on the label's bounding box."""
    coords = np.argwhere(reference.seg == label)
    centre = (coords.min(0) + coords.max(0)) // 2
    start = [int(c) - p // 2 for c, p in zip(centre, patch_size)]
    image = crop_padded(reference.data, start, patch_size)
    mask = crop_padded((reference.seg == label)[None].astype(np.float32), start, patch_size)
    return image, mask


@torch.no_grad()
def encode_tasks(model, patch_size, references: list[Reference], labels: list[int]) -> TaskTokens:
    """Task tokens (1, K, ...) of a MASS model for ``labels``: per label, the average over the references that
    contain it (each cropped to ``patch_size`` around the label)."""
    device = next(model.parameters()).device
    per_label = []
    for label in labels:
        sets = []
        for reference in references:
            if label in reference.labels:
                image, mask = reference_crop(reference, label, patch_size)
                sets.append(model.encode_task(as_tensor(image, device), as_tensor(mask, device)))
        per_label.append(TaskTokens.average(sets))
    return TaskTokens([torch.cat([t.scales[s] for t in per_label], 1) for s in range(len(per_label[0].scales))],
                      torch.cat([t.valid for t in per_label], 1))
