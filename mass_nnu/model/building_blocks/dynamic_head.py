"""The dynamic classifier: task tokens -> per-task weight vectors applied to the decoder features."""
from __future__ import annotations

import torch
from torch import nn

from mass_nnu.model.building_blocks.attention import MLP


class DynamicHead(nn.Module):
    """MLP from the concatenated first tokens of all scales to per-output classifier weights and bias."""

    def __init__(self, token_dims: list[int], output_channels: list[int], hidden: int):
        super().__init__()
        self.output_channels = output_channels
        self.norm = nn.LayerNorm(sum(token_dims))
        self.trunk = MLP(sum(token_dims), hidden, hidden)
        self.act = nn.GELU()
        self.outputs = nn.ModuleList(nn.Linear(hidden, c + 1) for c in output_channels)

    def forward(self, first_tokens: list[torch.Tensor], features: list[torch.Tensor], num_tasks: int):
        """first_tokens: (B, K, D_s) per scale; features: (B or B*K, C_j, *S_j) per output -> (B, K, *S_j)."""
        h = self.act(self.trunk(self.norm(torch.cat(first_tokens, -1))))  # (B, K, H)
        b = h.shape[0]
        logits = []
        for feats, linear in zip(features, self.outputs):
            wb = linear(h)  # (B, K, C+1)
            w, bias = wb[..., :-1], wb[..., -1]
            if feats.shape[0] == b:  # shared decoder path: every task reads the same features
                out = torch.einsum("bkc,bc...->bk...", w, feats)
            else:  # per-task decoder paths
                out = torch.einsum("bkc,bkc...->bk...", w, feats.view(b, num_tasks, *feats.shape[1:]))
            logits.append(out + bias.view(*bias.shape, *([1] * (feats.ndim - 2))))
        return logits
