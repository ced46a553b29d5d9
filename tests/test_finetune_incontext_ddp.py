"""The in-context head under DDP: no trainable parameter may go unused in the forward pass (nnU-Net's DDP
fails on the second iteration otherwise)."""
from __future__ import annotations

import torch
from test_pretrain_model import tiny_plans


def test_incontext_head_has_no_unused_trainable_parameters(one_torch_thread):
    from mass_nnu.finetuning.incontext_head import InContextHeadNetwork
    from mass_nnu.model.mass_model import build_mass_model

    torch.manual_seed(0)
    network = InContextHeadNetwork(build_mass_model(tiny_plans("res"), "3d_fullres", 1), num_classes=3)
    network.decoder.deep_supervision = True  # as nnU-Net trains
    outputs = network(torch.randn(1, 1, 32, 32, 32))
    assert tuple(outputs[0].shape) == (1, 3, 32, 32, 32)
    sum(o.float().square().mean() for o in outputs).backward()
    unused = [n for n, p in network.named_parameters() if p.requires_grad and p.grad is None]
    assert not unused, f"trainable but unused in forward: {unused[:5]}"
    assert not any(p.requires_grad for p in network.mass.task_encoder.parameters())
    assert all(p.requires_grad and p.grad is not None for p in network.task_tokens)  # the tokens still learn
