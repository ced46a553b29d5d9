"""Atomic file writes and safe checkpoint loading (``weights_only=True``, version and architecture checks)."""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from mass_nnu import __version__
from mass_nnu.errors import MassError


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success fsync it and rename it onto ``path``, else delete it."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + "".join(path.suffixes), dir=path.parent)
        os.close(fd)
    except OSError as e:
        raise MassError(f"{path.parent}: cannot write here ({e.strerror})") from None
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; outputs are shared like any other file
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise MassError(f"{path}: could not be written ({e.strerror or e})") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_json_atomic(obj: Any, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False))


def architecture_fingerprint(state_dict: dict) -> str:
    """Hash of every (key, shape) except the segmentation heads (their class count is the task's, not the
    architecture's): equal fingerprints mean the weights load into the same network."""
    h = hashlib.sha1()
    for key in sorted(k for k in state_dict if ".seg_layers." not in k):
        h.update(f"{key}:{tuple(state_dict[key].shape)};".encode())
    return h.hexdigest()[:16]


def save_checkpoint(checkpoint: dict, path: str | os.PathLike) -> None:
    """Save with ``torch.save`` atomically. The dict must hold only tensors and plain Python values."""
    import torch

    checkpoint = {**checkpoint, "mass_nnu_version": __version__}
    with atomic_path(path) as tmp:
        torch.save(checkpoint, tmp)


def load_checkpoint(path: str | os.PathLike, expected_fingerprint: str | None = None,
                    weights_key: str = "network_weights") -> dict:
    """Load with ``weights_only=True`` on the CPU. Refuses pickled objects, truncated files and other architectures."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise MassError(f"{path}: checkpoint not found")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "unsupported object"
        raise MassError(f"{path}: refused, the checkpoint needs pickle code execution ({first[:160]})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise MassError(f"{path}: not a readable checkpoint, truncated or corrupt ({str(e).splitlines()[0][:120]})") from None
    if not isinstance(checkpoint, dict) or weights_key not in checkpoint:
        raise MassError(f"{path}: not a mass-nnu checkpoint (no '{weights_key}' entry)")
    if expected_fingerprint is not None:
        found = checkpoint.get("architecture_fingerprint") or architecture_fingerprint(checkpoint[weights_key])
        if found != expected_fingerprint:
            raise MassError(f"{path}: weights are for another architecture (fingerprint {found}, this network "
                            f"needs {expected_fingerprint}); plan both datasets together with "
                            f"'mass plan -d <pretrain IDs> --target-dataset <downstream ID>' and pretrain again")
    return checkpoint
