"""The one check of ``-device`` (cpu, cuda or mps), shared by every command that computes."""
from __future__ import annotations

import torch

from mass_nnu.errors import MassError

DEVICES = ("cpu", "cuda", "mps")


def check_device(name: str) -> str:
    """``name`` when it is a known device that is available here, else one clear error."""
    if name not in DEVICES:
        raise MassError(f"-device {name}: choose {', '.join(DEVICES[:-1])} or {DEVICES[-1]}")
    if name == "cuda" and not torch.cuda.is_available():
        raise MassError("-device cuda: no CUDA device is available here; use -device cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        raise MassError("-device mps: not available here; use -device cpu")
    return name
