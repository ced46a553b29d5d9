"""Atomic file writes, complete-image reading, safe checkpoint loading (``weights_only=True``, version and
architecture checks) and nnU-Net's console output sent to a log file."""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import pickle
import re
import sys
import tempfile
import warnings
import zlib
from contextlib import contextmanager, redirect_stdout
from pathlib import Path
from typing import IO, Any, Iterator

import numpy as np
import SimpleITK as sitk
import torch

from mass_nnu import __version__
from mass_nnu.errors import MassError


@contextmanager
def nnunet_output(log_file: Path, verbose: bool) -> Iterator[IO[str]]:
    """nnU-Net's prints (its own and those of its worker processes: file descriptor 1) go to ``log_file`` unless
    ``verbose``; progress bars (stderr) stay on screen. Yields the screen's stdout, for mass-nnu's own messages."""
    if verbose:
        yield sys.stdout
        return
    log_file.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    try:  # the screen is fd 1 itself (a terminal, a pipe), or a stream of its own (e.g. a test runner's)
        on_fd1 = sys.stdout.fileno() == 1
    except (AttributeError, OSError, ValueError):
        on_fd1 = False
    with open(log_file, "a") as log:
        saved = os.dup(1)
        screen = os.fdopen(os.dup(saved), "w", buffering=1) if on_fd1 else sys.stdout
        os.dup2(log.fileno(), 1)
        try:
            with redirect_stdout(log):
                yield screen
        finally:
            log.flush()
            if on_fd1:
                screen.close()
            os.dup2(saved, 1)
            os.close(saved)


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


def ensure_writable(folder: str | os.PathLike) -> Path:
    """Create ``folder`` if needed and prove a file can be written there, before any long work starts."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".mass_write_test_"):
            pass
    except OSError as e:
        raise MassError(f"{folder}: cannot write output here ({e.strerror or e})") from None
    return folder


def save_json_atomic(obj: Any, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False))


def read_image(path: Path):
    """SimpleITK's image, after checking the file is complete (ITK fills a truncated .nii.gz with zeros)."""
    try:
        image = sitk.ReadImage(str(path))
        if path.name.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                while f.read(1 << 24):
                    pass
        elif path.name.endswith(".nii"):
            pixel_bytes = sitk.GetArrayViewFromImage(image).dtype.itemsize * image.GetNumberOfComponentsPerPixel()
            if path.stat().st_size < int(np.prod(image.GetSize())) * pixel_bytes:
                raise EOFError("file shorter than its header says")
    except (RuntimeError, EOFError, OSError, zlib.error) as e:
        detail = str(e).strip().splitlines()[-1][:120] if str(e).strip() else "unreadable"
        raise MassError(f"{path}: not a readable image, corrupt or truncated ({detail})") from None
    return image


def architecture_fingerprint(state_dict: dict) -> str:
    """Hash of every (key, shape) except the segmentation heads (their class count is the task's, not the
    architecture's): equal fingerprints mean the weights load into the same network."""
    h = hashlib.sha1()
    for key in sorted(k for k in state_dict if ".seg_layers." not in k):
        h.update(f"{key}:{tuple(state_dict[key].shape)};".encode())
    return h.hexdigest()[:16]


def backbone_weights(state_dict: dict) -> dict:
    """The nnU-Net network's part of a state dict (a full MASS model keeps it under ``backbone.``)."""
    backbone = {k[len("backbone."):]: v for k, v in state_dict.items() if k.startswith("backbone.")}
    return backbone or state_dict


def remove_stale_temporaries(path: str | os.PathLike) -> None:
    """Delete temporary files of ``path`` left by a writer killed mid-save (only for single-writer files)."""
    path = Path(path)
    for stale in path.parent.glob(f".{path.name}.*.tmp*"):
        stale.unlink(missing_ok=True)


def save_checkpoint(checkpoint: dict, path: str | os.PathLike) -> None:
    """Save with ``torch.save`` atomically. The dict must hold only tensors and plain Python values."""
    checkpoint = {**checkpoint, "mass_nnu_version": __version__}
    remove_stale_temporaries(path)
    with atomic_path(path) as tmp:
        torch.save(checkpoint, tmp)


def _safe_torch_load(path: Path, numpy_scalars: bool = False) -> Any:
    """``torch.load(weights_only=True)`` on the CPU with one clear error per failure. ``numpy_scalars`` allows the
    numpy scalars nnU-Net's own checkpoints log (rebuilt from dtype and bytes; no code runs)."""
    if not path.is_file():
        raise MassError(f"{path}: checkpoint not found")
    allowed = [np._core.multiarray.scalar, np.dtype, *{type(np.dtype(t)) for t in "?bhilqBHILQefdg"}] \
        if numpy_scalars else []
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        what = f"it references {found.group(1)}" if found else (str(e).strip().splitlines() or ["an object"])[0][:120]
        raise MassError(f"{path}: refused, the checkpoint needs pickle code execution ({what}; only tensors and "
                        f"plain values load with weights_only=True)") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        detail = str(e).strip().splitlines()[0].split(". ")[0][:120] if str(e).strip() else "unreadable"
        raise MassError(f"{path}: not a readable checkpoint, truncated or corrupt ({detail})") from None


def load_nnunet_checkpoint(path: str | os.PathLike) -> dict:
    """An nnU-Net trainer checkpoint (checkpoint_latest/final.pth), loaded with ``weights_only=True``."""
    path = Path(path)
    checkpoint = _safe_torch_load(path, numpy_scalars=True)
    if not isinstance(checkpoint, dict) or "network_weights" not in checkpoint:
        raise MassError(f"{path}: not an nnU-Net checkpoint (no 'network_weights' entry)")
    return checkpoint


def load_checkpoint(path: str | os.PathLike, expected_fingerprint: str | None = None,
                    weights_key: str = "network_weights") -> dict:
    """Load with ``weights_only=True`` on the CPU. Refuses pickled objects, truncated files and other
    architectures; warns when another mass-nnu version wrote the file."""
    path = Path(path)
    checkpoint = _safe_torch_load(path)
    if not isinstance(checkpoint, dict) or weights_key not in checkpoint:
        raise MassError(f"{path}: not a mass-nnu checkpoint (no '{weights_key}' entry)")
    written_by = checkpoint.get("mass_nnu_version")
    if written_by is not None and written_by != __version__:
        warnings.warn(f"{path}: written by mass-nnu {written_by}, this is {__version__}", stacklevel=2)
    found = checkpoint.get("architecture_fingerprint")
    if found is not None and isinstance(checkpoint[weights_key], dict) and \
            found != architecture_fingerprint(backbone_weights(checkpoint[weights_key])):
        raise MassError(f"{path}: its recorded architecture fingerprint {found} does not match its weights "
                        f"(edited or corrupt file)")
    if expected_fingerprint is not None:
        found = found or architecture_fingerprint(checkpoint[weights_key])
        if found != expected_fingerprint:
            raise MassError(f"{path}: weights are for another architecture (fingerprint {found}, this network "
                            f"needs {expected_fingerprint}); plan both datasets together with "
                            f"'mass plan -d <pretrain IDs> --target-dataset <downstream ID>' and pretrain again")
    return checkpoint
