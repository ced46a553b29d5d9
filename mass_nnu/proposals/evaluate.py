"""Proposal quality: for each ground-truth structure, the best IoU of any proposal (recall at IoU ≥ 0.5)."""
from __future__ import annotations

import numpy as np


def best_iou_per_structure(layers: np.ndarray, label: np.ndarray) -> dict[int, float]:
    """Best IoU of any proposal against each label value > 0, from one joint histogram per layer."""
    values = [int(v) for v in np.unique(label) if v > 0]
    best = {v: 0.0 for v in values}
    if not values:
        return best
    label = label.astype(np.int64)
    n_label = int(label.max()) + 1
    label_size = np.bincount(label.ravel(), minlength=n_label)
    for layer in layers:
        layer = layer.astype(np.int64)
        n_prop = int(layer.max()) + 1
        joint = np.bincount((layer * n_label + label).ravel(), minlength=n_prop * n_label).reshape(n_prop, n_label)
        prop_size = joint.sum(1)
        inter = joint[1:, :]
        union = prop_size[1:, None] + label_size[None, :] - inter
        iou = np.where(union > 0, inter / np.maximum(union, 1), 0.0)
        for v in values:
            if len(iou):
                best[v] = max(best[v], float(iou[:, v].max()))
    return best
