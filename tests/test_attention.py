"""Attention masks: no mask when every key is valid, an additive mask that ignores padded keys otherwise."""
from __future__ import annotations

import torch

from mass_nnu.model.building_blocks.attention import Attention, all_valid, key_bias


def test_mask_forms_agree_and_padded_keys_are_ignored():
    torch.manual_seed(0)
    attention = Attention(64).eval()
    q, k, v = torch.randn(2, 5, 64), torch.randn(2, 7, 64), torch.randn(2, 7, 64)
    with torch.no_grad():
        unmasked = attention(q, k, v)
        all_keys = attention(q, k, v, torch.ones(2, 7, dtype=torch.bool))
        assert torch.allclose(unmasked, all_keys, atol=1e-6)
        valid = torch.tensor([[True] * 4 + [False] * 3, [True] * 7])
        masked = attention(q, k, v, valid)
        k2, v2 = k.clone(), v.clone()
        k2[0, 4:], v2[0, 4:] = 1e3, -1e3  # whatever the padded keys hold
        assert torch.allclose(masked, attention(q, k2, v2, valid), atol=1e-5)
        # the same as attending to the valid keys only
        assert torch.allclose(masked[0], attention(q[:1], k[:1, :4], v[:1, :4])[0], atol=1e-5)
        assert torch.allclose(masked[1], unmasked[1], atol=1e-6)
        # a row without valid keys attends to all (finite)
        assert torch.isfinite(attention(q, k, v, torch.zeros(2, 7, dtype=torch.bool))).all()
    assert all_valid(torch.ones(2, 3, dtype=torch.bool)) is None and all_valid(None) is None
    assert all_valid(valid) is valid
    assert key_bias(None, torch.float32) is None
    bias = key_bias(valid, torch.bfloat16)
    assert bias.dtype == torch.bfloat16 and bias.shape == (2, 1, 1, 7) and torch.isinf(bias[0, 0, 0, 4:]).all()
