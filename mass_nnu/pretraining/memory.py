"""Will a pretraining step fit? An estimate of its peak memory, made before the first step, against what is free.

The estimate runs the MASS model's forward once on PyTorch's ``meta`` device (shapes only: no memory, no compute)
at the run's batch size, patch and task count, and adds up every tensor that autograd saves for the backward pass
(the activations; parameters excluded), plus the training state: weights, gradients, AdamW's two moments and the
EMA copy (5 × the parameter bytes), plus the batch itself. On CUDA the run uses bf16 autocast, so the activations
count at half their float32 bytes. The backward pass frees activations while it makes gradients, so the sum of the
saved tensors is close to the peak. Counted by tensor, so a storage that several ops save counts more than once:
on CPU the measured growth of a real step (head CT plans, batch 1) was 0.83–0.92 of this estimate. But the whole
run peaks higher: at the head CT's plans (patch 80×192×160) batch 1 peaked at 1.11× the estimate (13.2 against
11.9 GiB RSS), and batch 2, estimated at 21.5 GiB with 21.8 GiB available, was killed by the OOM killer at 23.2
GiB. ``MARGIN`` (1.2) covers that: allocator slack, the data loader and the validation batches.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from mass_nnu.errors import MassError
from mass_nnu.model.mass_model import build_mass_model

MARGIN = 1.2
GIB = 2 ** 30


@dataclass
class MemoryEstimate:
    parameters: int   # bytes of the weights
    state: int        # weights, gradients, AdamW moments, EMA
    activations: int  # saved for backward at this batch, patch and task count
    batch: int        # the batch's tensors
    @property
    def total(self) -> int:
        return int(MARGIN * (self.state + self.activations + self.batch))


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _cgroup_available() -> int | None:
    """What the cgroup (v2, else v1) limit leaves, when there is one."""
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            with open(limit_file) as f:
                limit = f.read().strip()
            with open(usage_file) as f:
                usage = int(f.read().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 2 ** 60:
            return max(int(limit) - usage, 0)
    return None


def available_memory(device: torch.device) -> int:
    """Bytes free for this run: CUDA ``mem_get_info`` of the device; CPU ``MemAvailable`` (or, without
    /proc/meminfo, ``os.sysconf`` free pages), capped by the cgroup's limit."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    values = [v for v in (_meminfo_available(), _cgroup_available()) if v is not None]
    if not values:
        try:
            values = [os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")]
        except (ValueError, OSError):
            return 2 ** 62  # unknown: do not refuse
    return min(values)


def estimate_memory(plans: dict, configuration: str, num_channels: int, mass_config: dict, batch_size: int,
                    max_tasks: int, device_type: str = "cpu", patch_size=None,
                    checkpoint_reference: bool = False) -> MemoryEstimate:
    """The peak of one training step (see the module docstring); nothing is allocated. With
    ``checkpoint_reference`` the reference's encoder activations are not saved (recomputed in backward, when most
    of the decoder's are already freed), so they drop out of the sum."""
    patch = tuple(int(p) for p in (patch_size or plans["configurations"][configuration]["patch_size"]))
    with torch.device("meta"):
        model = build_mass_model(plans, configuration, num_channels, **mass_config).train()
        model.checkpoint_reference = checkpoint_reference
        images = torch.zeros((batch_size, num_channels, *patch))
        masks = torch.zeros((batch_size, max_tasks, *patch))
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor):
        if not (t.is_leaf and t.requires_grad):  # parameters are counted in the state
            saved[id(t)] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        outputs = model(images, masks, images)
    out_bytes = sum(o.numel() * o.element_size() for o in outputs)
    activations = sum(saved.values()) + out_bytes
    if device_type == "cuda":
        activations //= 2  # bf16 autocast
    batch = 2 * images.numel() * 4 + 2 * masks.numel() * 9 // 8  # two views: float32 images, bool masks + packed
    return MemoryEstimate(param_bytes, param_bytes * 2 + trainable * 3, activations, batch)


def check_memory(estimate: MemoryEstimate, available: int, device: torch.device, batch_size: int, patch,
                 checkpoint_reference: bool = False) -> None:
    """One MassError line when the estimate does not fit into ``available``."""
    if estimate.total <= available:
        return
    patch = "×".join(str(int(p)) for p in patch)
    ways = [f"--batch-size {max(batch_size // 2, 1)}" if batch_size > 1 else None,
            None if checkpoint_reference else "--activation-checkpointing",
            "a smaller patch (plans with a smaller patch_size)", "-device cuda" if device.type == "cpu" else None,
            "--no-memory-check to try anyway"]
    raise MassError(f"pretraining needs about {estimate.total / GIB:.1f} GiB on {device.type} (batch {batch_size}, "
                    f"patch {patch}: activations {estimate.activations / GIB:.1f} GiB, weights/optimiser/EMA "
                    f"{estimate.state / GIB:.1f} GiB, ×{MARGIN:g} headroom) but {available / GIB:.1f} GiB is available; use "
                    f"{', '.join(w for w in ways if w)}")
