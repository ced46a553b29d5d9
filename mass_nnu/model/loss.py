"""In-context loss: Dice + BCE (1:1) per (sample, mask), deep supervision weighted as nnU-Net does it.

Each of the K masks of a sample is its own binary task with a sigmoid output. Empty targets (a mask that
fell outside the query crop) count: BCE pushes every voxel down and the smoothed Dice rewards an empty
prediction. ``valid`` (B, K) drops padded task slots. See docs/method.md for every choice.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def deep_supervision_weights(num_outputs: int) -> list[float]:
    """nnU-Net's weights 1/2^i, normalised. MASSModel already omits the lowest output (weight 0 in nnU-Net),
    so these equal nnU-Net's weights for the outputs that nnU-Net trains."""
    weights = [1 / 2 ** i for i in range(num_outputs)]
    return [w / sum(weights) for w in weights]


def downsample_target(target: torch.Tensor, shape) -> torch.Tensor:
    """Target at a lower-resolution output, nearest-exact like batchgeneratorsv2's DownsampleSegForDSTransform."""
    if tuple(target.shape[2:]) == tuple(shape):
        return target
    return F.interpolate(target.float(), size=tuple(shape), mode="nearest-exact")


class InContextLoss(nn.Module):
    """``loss(logits_list, target, valid=None)``: logits (B, K, *S_j) per output, target (B, K, *P) in {0, 1}.

    Dice is soft and per (sample, mask). With ``adaptive_fp_fn`` it is the paper's Tversky form, whose FP/FN
    weights follow each channel's current error balance: alpha = FP / (FP + FN) clipped to [0.2, 0.8], beta = 1 -
    alpha (detached, so they act as weights, not as a second objective). Without it: the plain soft Dice.
    """

    def __init__(self, weight_dice: float = 1.0, weight_bce: float = 1.0, adaptive_fp_fn: bool = True,
                 smooth: float = 1.0, alpha_range: tuple[float, float] = (0.2, 0.8)):
        super().__init__()
        self.weight_dice, self.weight_bce = weight_dice, weight_bce
        self.adaptive_fp_fn, self.smooth, self.alpha_range = adaptive_fp_fn, smooth, alpha_range

    def per_task(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """(B, K) loss of one output."""
        x = logits.float().flatten(2)
        t = target.float().flatten(2)
        probs = torch.sigmoid(x)
        tp = (probs * t).sum(-1)
        fp = (probs.sum(-1) - tp).clamp_min(0)  # from sums: fewer full-size temporaries than FP/FN maps
        fn = (t.sum(-1) - tp).clamp_min(0)
        if self.adaptive_fp_fn:
            with torch.no_grad():
                alpha = (fp / (fp + fn).clamp_min(1e-6)).clamp(*self.alpha_range)
            dice = (tp + self.smooth) / (tp + alpha * fp + (1 - alpha) * fn + self.smooth)
        else:
            dice = (2 * tp + self.smooth) / (2 * tp + fp + fn + self.smooth)
        bce = F.binary_cross_entropy_with_logits(x, t, reduction="none").mean(-1)
        return self.weight_dice * (1 - dice) + self.weight_bce * bce

    def forward(self, logits: list[torch.Tensor] | torch.Tensor, target: torch.Tensor,
                valid: torch.Tensor | None = None) -> torch.Tensor:
        if isinstance(logits, torch.Tensor):
            logits = [logits]
        if logits[0].shape != target.shape:
            raise ValueError(f"logits {tuple(logits[0].shape)} and target {tuple(target.shape)} differ")
        total = 0.0
        for w, out in zip(deep_supervision_weights(len(logits)), logits):
            total = total + w * self.per_task(out, downsample_target(target, out.shape[2:]))
        if valid is None:
            return total.mean()
        valid = valid.to(total.dtype)
        return (total * valid).sum() / valid.sum().clamp_min(1.0)


@torch.no_grad()
def dice_per_task(logits: torch.Tensor, target: torch.Tensor, threshold: float = 0.0) -> torch.Tensor:
    """Hard Dice (B, K) of logits > threshold against target; NaN where both are empty (nothing to score: an
    empty target predicted empty says nothing about segmentation, so averages skip it, e.g. ``nanmean``)."""
    pred = (logits > threshold).flatten(2)
    t = target.bool().flatten(2)
    inter = (pred & t).sum(-1).float()
    total = pred.sum(-1).float() + t.sum(-1).float()
    return torch.where(total > 0, 2 * inter / total.clamp_min(1), torch.full_like(total, float("nan")))
