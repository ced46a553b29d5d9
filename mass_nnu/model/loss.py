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


CHUNK_VOXELS = 1 << 24  # float32 temporaries of the loss: at most this many values at a time (64 MiB each)


class _DiceBCE(torch.autograd.Function):
    """(B, K) Dice + BCE loss of logits (B, K, *S) in any float dtype against targets (B, K, *S) in {0, 1}, without
    full-size float32 copies (float64 logits: float64): the forward sums in chunks of task rows, the backward
    recomputes the sigmoid per chunk and writes the gradient in the logits' dtype. Saved for backward: the logits
    and targets (alive anyway) and a few values per task. Dice = (c·tp + s) / (a·Σp + b·Σt + s): the adaptive Tversky form has c = 1, a = alpha,
    b = 1 - alpha (alpha detached), the plain soft Dice c = 2, a = b = 1; so dDice/dp_i = (c·t_i·D - N·a) / D²."""

    @staticmethod
    def forward(ctx, logits, target, weight_dice, weight_bce, smooth, adaptive, alpha_range):
        rows, t_rows = logits.flatten(2).flatten(0, 1), target.flatten(2).flatten(0, 1)
        size, dtype = rows.shape[1], torch.promote_types(logits.dtype, torch.float32)
        step = max(1, CHUNK_VOXELS // max(size, 1))
        tp, psum, tsum, bce = (torch.empty(len(rows), dtype=dtype, device=rows.device) for _ in range(4))
        for r in range(0, len(rows), step):
            x, t = rows[r:r + step].to(dtype), t_rows[r:r + step].to(dtype)
            p = torch.sigmoid(x)
            tp[r:r + step], psum[r:r + step], tsum[r:r + step] = (p * t).sum(-1), p.sum(-1), t.sum(-1)
            bce[r:r + step] = F.binary_cross_entropy_with_logits(x, t, reduction="none").mean(-1)
        fp, fn = (psum - tp).clamp_min(0), (tsum - tp).clamp_min(0)
        if adaptive:
            alpha = (fp / (fp + fn).clamp_min(1e-6)).clamp(*alpha_range)
            numerator, denominator = tp + smooth, tp + alpha * fp + (1 - alpha) * fn + smooth
            a, c = alpha, 1.0
        else:
            numerator, denominator = 2 * tp + smooth, 2 * tp + fp + fn + smooth
            a, c = torch.ones_like(tp), 2.0
        ctx.save_for_backward(logits, target, numerator, denominator, a)
        ctx.settings = (weight_dice, weight_bce, c, step)
        loss = weight_dice * (1 - numerator / denominator) + weight_bce * bce
        return loss.view(logits.shape[:2])

    @staticmethod
    def backward(ctx, grad):
        logits, target, numerator, denominator, a = ctx.saved_tensors
        weight_dice, weight_bce, c, step = ctx.settings
        rows, t_rows = logits.flatten(2).flatten(0, 1), target.flatten(2).flatten(0, 1)
        out = torch.empty_like(rows)
        g = grad.reshape(-1).to(numerator.dtype)
        dice_g = (-weight_dice * g / denominator ** 2)[:, None]  # times (c·t·D - N·a) · p(1 - p)
        bce_g = (weight_bce * g / rows.shape[1])[:, None]          # times (p - t)
        d, n, a = denominator[:, None], numerator[:, None], a[:, None]
        for r in range(0, len(rows), step):
            x, t = rows[r:r + step].to(numerator.dtype), t_rows[r:r + step].to(numerator.dtype)
            p = torch.sigmoid(x)
            part = slice(r, r + step)
            out[part] = dice_g[part] * (c * t * d[part] - n[part] * a[part]) * p * (1 - p) + bce_g[part] * (p - t)
        return out.view_as(logits), None, None, None, None, None, None


class InContextLoss(nn.Module):
    """``loss(logits_list, target, valid=None)``: logits (B, K, *S_j) per output, target (B, K, *P) in {0, 1}.

    Dice is soft and per (sample, mask). With ``adaptive_fp_fn`` it is the paper's Tversky form, whose FP/FN
    weights follow each channel's current error balance: alpha = FP / (FP + FN) clipped to [0.2, 0.8], beta = 1 -
    alpha (detached, so they act as weights, not as a second objective). Without it: the plain soft Dice. Logits
    may be bf16: the loss works in float32 chunk by chunk (``_DiceBCE``).
    """

    def __init__(self, weight_dice: float = 1.0, weight_bce: float = 1.0, adaptive_fp_fn: bool = True,
                 smooth: float = 1.0, alpha_range: tuple[float, float] = (0.2, 0.8)):
        super().__init__()
        self.weight_dice, self.weight_bce = weight_dice, weight_bce
        self.adaptive_fp_fn, self.smooth, self.alpha_range = adaptive_fp_fn, smooth, alpha_range

    def per_task(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """(B, K) loss of one output."""
        return _DiceBCE.apply(logits, target, self.weight_dice, self.weight_bce, self.smooth, self.adaptive_fp_fn,
                              self.alpha_range)

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
