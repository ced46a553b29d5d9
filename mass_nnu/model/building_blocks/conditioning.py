"""Query conditioning before one decoder up-sampling step: two-way attention between tokens and features."""
from __future__ import annotations

import torch
from torch import nn

from mass_nnu.model.building_blocks.attention import FourierPositions, TwoWayBlock, flatten_spatial


class ConditioningScale(nn.Module):
    """Conditions the query features before one decoder up-sampling step; returns features and updated tokens."""

    def __init__(self, channels: int, dim: int, conv_dim: int, num_blocks: int):
        super().__init__()
        self.in_proj = nn.Linear(channels, dim) if channels != dim else nn.Identity()
        self.out_proj = nn.Linear(dim, channels) if channels != dim else nn.Identity()
        self.positions = FourierPositions(conv_dim, dim)
        self.blocks = nn.ModuleList(TwoWayBlock(dim) for _ in range(num_blocks))
        self.norm_tokens = nn.LayerNorm(dim)

    def forward(self, features: torch.Tensor, tokens: torch.Tensor, valid: torch.Tensor | None):
        """``valid`` (B, K) marks real tasks; None when all are (then no attention mask is passed)."""
        b, k, t, d = tokens.shape
        spatial = features.shape[2:]
        image0 = self.in_proj(flatten_spatial(features))
        positions = self.positions(tuple(spatial), features.device, image0.dtype)
        token_valid = None if valid is None else valid[:, :, None].expand(b, k, t).reshape(b, k * t)
        flat_tokens, image = tokens.reshape(b, k * t, d), image0
        for block in self.blocks:
            flat_tokens, image = block(flat_tokens, image, positions, token_valid, k)
        delta = self.out_proj(image - image0).transpose(1, 2).reshape(features.shape)
        return features + delta, self.norm_tokens(flat_tokens).view(b, k, t, d)
