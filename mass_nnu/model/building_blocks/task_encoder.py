"""Task encoding at one scale: reference features fused with the mask become task tokens."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mass_nnu.model.building_blocks.attention import FourierPositions, TokenBlock, flatten_spatial


class TaskEncoderScale(nn.Module):
    """Task tokens at one scale: [foreground token, learned tokens] cross-attend to mask-fused reference features."""

    def __init__(self, channels: int, dim: int, conv_dim: int, num_learned_tokens: int, num_blocks: int,
                 mask_subgrid: tuple[int, ...]):
        super().__init__()
        self.mask_subgrid = mask_subgrid
        self.in_proj = nn.Linear(channels, dim) if channels != dim else nn.Identity()
        self.mask_proj = nn.Linear(math.prod(mask_subgrid), dim)  # sub-voxel mask coverage -> feature offset
        self.positions = FourierPositions(conv_dim, dim)
        self.learned_tokens = nn.Parameter(torch.randn(num_learned_tokens, dim) * 0.02)
        self.norm_fg, self.norm_learned, self.norm_kv = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.blocks = nn.ModuleList(TokenBlock(dim) for _ in range(num_blocks))
        self.norm_out = nn.LayerNorm(dim)

    def mask_coverage(self, masks: torch.Tensor, spatial: tuple[int, ...]) -> torch.Tensor:
        """(B, K, *P) -> (B, K, N, prod(subgrid)): fraction of each sub-voxel of every feature voxel inside the mask."""
        b, k = masks.shape[:2]
        fine = [n * s for n, s in zip(spatial, self.mask_subgrid)]
        pool = F.adaptive_avg_pool3d if len(spatial) == 3 else F.adaptive_avg_pool2d
        cov = pool(masks.float(), fine)
        # space-to-depth: every feature voxel gets its subgrid of coverages as channels
        shape = [b, k]
        for n, s in zip(spatial, self.mask_subgrid):
            shape += [n, s]
        cov = cov.reshape(shape)
        d = len(spatial)
        order = [0, 1] + [2 + 2 * i for i in range(d)] + [3 + 2 * i for i in range(d)]
        return cov.permute(order).reshape(b, k, math.prod(spatial), math.prod(self.mask_subgrid))

    def forward(self, features: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        b, k = masks.shape[:2]
        spatial = tuple(features.shape[2:])
        feats = self.in_proj(flatten_spatial(features))  # (B, N, D)
        coverage = self.mask_coverage(masks, spatial).to(feats.dtype)  # (B, K, N, S)
        fraction = coverage.mean(-1)  # (B, K, N)
        foreground = torch.einsum("bkn,bnd->bkd", fraction, feats) / fraction.sum(-1, keepdim=True).clamp_min(1e-6)
        kv = feats[:, None] + self.mask_proj(coverage) + self.positions(spatial, feats.device, feats.dtype)
        kv = self.norm_kv(kv.flatten(0, 1))  # (B*K, N, D)
        tokens = torch.cat([self.norm_fg(foreground).reshape(b * k, 1, -1),
                            self.norm_learned(self.learned_tokens).expand(b * k, -1, -1)], 1)
        for block in self.blocks:
            tokens = block(tokens, kv)
        return self.norm_out(tokens).view(b, k, tokens.shape[1], -1)
