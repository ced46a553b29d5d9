"""Attention blocks of the task encoder and the query conditioning (pre-norm, SAM-style two-way)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _heads(dim: int) -> int:
    return dim // 32 if dim % 32 == 0 else 1


def key_bias(key_valid: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """``key_valid`` (B, Lk) bool -> an additive mask (B, 1, 1, Lk) of 0 / -inf in ``dtype``, or None when no mask
    is given. A row without any valid key attends to all (rather than to none, which would give NaN).

    Why not the boolean mask itself: a boolean ``attn_mask`` rules out the flash kernels and, depending on the torch
    version and backend, the memory-efficient ones too; an additive float mask keeps the memory-efficient and cuDNN
    kernels. Callers pass None when every key is valid (``all_valid``), so that case runs the fastest kernel."""
    if key_valid is None:
        return None
    key_valid = key_valid | ~key_valid.any(1, keepdim=True)
    bias = torch.zeros(key_valid.shape, dtype=dtype, device=key_valid.device).masked_fill(~key_valid, float("-inf"))
    return bias[:, None, None, :]


def all_valid(valid: torch.Tensor | None) -> torch.Tensor | None:
    """``valid`` unless every entry is True, then None (no mask: the flash kernels stay eligible). One host sync;
    call it once per forward, not per attention. Under torch.compile ``valid`` is kept as it is: the sync would
    break the graph in two."""
    if valid is None or torch.compiler.is_compiling() or valid.device.type == "meta":  # meta: shapes only
        return valid
    return None if bool(valid.all()) else valid


class Attention(nn.Module):
    """Multi-head attention through ``F.scaled_dot_product_attention``; ``key_valid`` (B, Lk) masks keys (None:
    every key is valid, no mask is passed)."""

    def __init__(self, dim: int):
        super().__init__()
        self.heads = _heads(dim)
        self.q, self.k, self.v, self.out = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, q, k, v, key_valid: torch.Tensor | None = None):
        b, lq, d = q.shape
        split = lambda x: x.view(b, -1, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        queries = split(self.q(q))
        x = F.scaled_dot_product_attention(queries, split(self.k(k)), split(self.v(v)),
                                           attn_mask=key_bias(key_valid, queries.dtype))
        return self.out(x.transpose(1, 2).reshape(b, lq, d))


class MLP(nn.Sequential):
    def __init__(self, dim: int, hidden: int, out: int | None = None):
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, out or dim))


class FourierPositions(nn.Module):
    """Learned projection of sin/cos features of normalised voxel coordinates (patch-relative)."""

    def __init__(self, conv_dim: int, dim: int, bands: int = 6):
        super().__init__()
        self.bands = bands
        self.proj = nn.Linear(conv_dim * 2 * bands, dim)

    def forward(self, spatial: tuple[int, ...], device, dtype) -> torch.Tensor:
        axes = [torch.linspace(-1, 1, n, device=device, dtype=torch.float32) for n in spatial]
        coords = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, len(spatial))
        freqs = (2.0 ** torch.arange(self.bands, device=device, dtype=torch.float32)) * math.pi
        angles = (coords[..., None] * freqs).flatten(1)
        return self.proj(torch.cat([angles.sin(), angles.cos()], -1).to(dtype))  # (N, D)


def flatten_spatial(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(2).transpose(1, 2)  # (B, C, *S) -> (B, N, C)


class TokenBlock(nn.Module):
    """Pre-norm tokens -> features cross-attention, token self-attention, MLP."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm_cross, self.norm_self, self.norm_mlp = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.cross, self.self_attn, self.mlp = Attention(dim), Attention(dim), MLP(dim, 4 * dim)

    def forward(self, tokens, kv):
        tokens = tokens + self.cross(self.norm_cross(tokens), kv, kv)
        t = self.norm_self(tokens)
        tokens = tokens + self.self_attn(t, t, t)
        return tokens + self.mlp(self.norm_mlp(tokens))


class TwoWayBlock(nn.Module):
    """SAM-style two-way block: token self-attention (across all K tasks of a sample), tokens -> image,
    token MLP, image -> tokens. Tokens are (B, K*T, D); the image is (B, N, D) in ``shared`` mode or
    (B*K, N, D) in ``per_task`` mode, where each task's tokens attend only to their own image copy."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm_self, self.norm_t2i, self.norm_mlp, self.norm_i2t = (nn.LayerNorm(dim) for _ in range(4))
        self.norm_image = nn.LayerNorm(dim)
        self.self_attn, self.t2i, self.i2t = Attention(dim), Attention(dim), Attention(dim)
        self.mlp = MLP(dim, 4 * dim)

    def forward(self, tokens, image, positions, token_valid, num_tasks):
        b = tokens.shape[0]
        t = self.norm_self(tokens)
        tokens = tokens + self.self_attn(t, t, t, token_valid)
        per_task = image.shape[0] != b
        grouped = tokens.reshape(b * num_tasks, -1, tokens.shape[-1]) if per_task else tokens
        img = self.norm_image(image)
        grouped = grouped + self.t2i(self.norm_t2i(grouped), img + positions, img)
        grouped = grouped + self.mlp(self.norm_mlp(grouped))
        t = self.norm_i2t(grouped)
        image = image + self.i2t(img + positions, t, t, None if per_task else token_valid)
        return grouped.reshape(tokens.shape), image
