"""Proposal storage: reading one crop of the needed layers, old whole-stack ``.npz`` against the chunked ``.b2nd``.

    python benchmarks/proposal_storage.py [--shape 108 256 256] [--layers 40] [--crop 96 128 128] [--repeats 5]

Makes its own synthetic case (no dataset needed): ``--layers`` instance maps like supervoxels at several scales
(Voronoi cells of 12 to 600 seeds, made at half resolution and mapped to the full grid, a body-shaped mask, 30 %
of the labels dropped as by the filters), written both ways. Each read runs in a fresh process; it reports the
median time, the peak RSS growth (VmHWM after the reads minus VmRSS before them) and tracemalloc's peak of
reading one ``--crop`` of all layers and of 12 layers (the task layers of one sample), plus write times and file
sizes, and the traced peak memory of writing from a half-resolution working grid (mapped to the raw grid one
layer at a time).
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
from scipy.spatial import cKDTree

from mass_nnu.proposals.store import open_proposals, write_proposals


def synthetic_layers(shape, count: int, seed: int = 0) -> np.ndarray:
    """(count, *shape) uint16 supervoxel-like instance maps, 0 outside an elliptic 'body'."""
    rng = np.random.default_rng(seed)
    half = [max(1, s // 2) for s in shape]
    grid = np.stack(np.meshgrid(*[np.arange(n) + 0.5 for n in half], indexing="ij"), -1).reshape(-1, 3)
    _, y, x = np.ogrid[tuple(slice(0, n) for n in half)]
    body = ((y - half[1] / 2) / (0.45 * half[1])) ** 2 + ((x - half[2] / 2) / (0.4 * half[2])) ** 2 <= 1
    body = np.broadcast_to(body, half)
    out = np.zeros((count, *shape), np.uint16)
    index = [np.minimum(np.arange(s) // 2, n - 1) for s, n in zip(shape, half)]
    for layer in range(count):
        seeds = int(np.exp(rng.uniform(np.log(12), np.log(600))))
        centres = rng.uniform(0, half, size=(seeds, 3))
        labels = cKDTree(centres).query(grid, workers=1)[1].reshape(half).astype(np.uint16) + 1
        keep = np.concatenate(([0], rng.permutation(np.arange(1, seeds + 1))))
        keep[rng.random(seeds + 1) < 0.3] = 0  # filtered out
        labels = np.where(body, keep[labels], 0).astype(np.uint16)
        out[layer] = labels[np.ix_(*index)]
    return out


def _memory_kib(key: str) -> int:
    """VmRSS / VmHWM (peak) of this process in KiB (Linux); ru_maxrss elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def measure(kind: str, path: str, layers: list[int], low, high, repeats: int) -> dict:
    """One fresh process: read the crop ``repeats`` times; median seconds, peak RSS growth over the RSS before
    the reads (the peak is reset first through /proc/self/clear_refs) and tracemalloc's peak (numpy buffers),
    in MiB."""
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    except OSError:
        pass
    before = _memory_kib("VmRSS")
    tracemalloc.start()
    seconds, checksum = [], 0
    box = tuple(slice(a, b) for a, b in zip(low, high))
    for _ in range(repeats):
        start = time.perf_counter()
        if kind == "npz":
            with np.load(path) as f:
                crop = f["layers"][(layers, *box)]  # the whole stack is decompressed first
        else:
            crop = open_proposals(path).crop(layers, low, high)
        seconds.append(time.perf_counter() - start)
        checksum = int(crop.sum(dtype=np.int64))
        del crop
    traced = tracemalloc.get_traced_memory()[1] / 2 ** 20
    growth = (_memory_kib("VmHWM") - before) / 1024
    return {"seconds": float(np.median(seconds)), "peak_mib": growth, "traced_mib": traced, "checksum": checksum}


def run_measure(kind, path, layers, low, high, repeats) -> dict:
    args = [sys.executable, __file__, "--measure", kind, path, json.dumps([layers, list(low), list(high), repeats])]
    done = subprocess.run(args, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"measuring {kind} failed:\n{done.stderr}")
    return json.loads(done.stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=3, default=[108, 256, 256], help="Z Y X of the raw grid")
    parser.add_argument("--layers", type=int, default=40)
    parser.add_argument("--crop", type=int, nargs=3, default=[96, 128, 128], help="crop size (context crop)")
    parser.add_argument("--task-layers", type=int, default=12, help="layers one sample's tasks use")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", help="folder to keep the two files in (default: a temporary one)")
    parser.add_argument("--measure", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        kind, path, spec = args.measure
        layers, low, high, repeats = json.loads(spec)
        print(json.dumps(measure(kind, path, layers, low, high, repeats)))
        return

    folder = Path(args.keep or tempfile.mkdtemp(prefix="proposal_storage_"))
    folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    layers = synthetic_layers(args.shape, args.layers, args.seed)
    made = time.perf_counter() - start
    geometry = {"shape": list(args.shape), "spacing": [1.0, 1.0, 1.0], "origin": [0.0] * 3,
                "direction": [1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0]}
    npz, b2nd = folder / "old.npz", folder / "new.b2nd"  # distinct cases: writing new.b2nd removes a new.npz
    start = time.perf_counter()
    np.savez_compressed(npz, layers=layers)
    write_npz = time.perf_counter() - start
    start = time.perf_counter()
    table = write_proposals(b2nd, layers, geometry, "synthetic", {})
    write_b2nd = time.perf_counter() - start
    dense_mib = layers.nbytes / 2 ** 20
    working = np.ascontiguousarray(layers[:, ::2, ::2, ::2])  # a backend's half-resolution working grid
    del layers
    tracemalloc.start()
    start = time.perf_counter()
    write_proposals(folder / "working.b2nd", working, geometry, "synthetic", {})
    write_working = time.perf_counter() - start
    working_peak = tracemalloc.get_traced_memory()[1] / 2 ** 20
    tracemalloc.stop()
    layer_mib = dense_mib / args.layers

    rng = np.random.default_rng(args.seed)
    crop = [int(c) for c in np.minimum(args.crop, args.shape)]
    low = [int(rng.integers(0, s - c + 1)) for s, c in zip(args.shape, crop)]
    high = [a + c for a, c in zip(low, crop)]
    task_layers = sorted(rng.choice(args.layers, size=min(args.task_layers, args.layers), replace=False).tolist())
    rows = []
    for name, which in ((f"all {args.layers} layers", list(range(args.layers))),
                        (f"{len(task_layers)} task layers", task_layers)):
        old = run_measure("npz", str(npz), which, low, high, args.repeats)
        new = run_measure("b2nd", str(b2nd), which, low, high, args.repeats)
        assert old["checksum"] == new["checksum"], "the two formats disagree"
        rows.append((name, old, new))

    print(f"synthetic case {tuple(args.shape)}, {args.layers} layers ({dense_mib:.0f} MiB dense, "
          f"{len(table)} proposals, made in {made:.1f} s); crop {tuple(int(c) for c in crop)} at {tuple(low)}; "
          f"median of {args.repeats} reads, each format in a fresh process")
    print(f"{'':28s}{'old .npz':>12s}{'new .b2nd':>12s}{'old/new':>10s}")
    print(f"{'file size (MiB)':28s}{npz.stat().st_size / 2**20:12.1f}{b2nd.stat().st_size / 2**20:12.1f}"
          f"{npz.stat().st_size / b2nd.stat().st_size:10.2f}")
    print(f"{'write (s)':28s}{write_npz:12.2f}{write_b2nd:12.2f}{write_npz / write_b2nd:10.2f}")
    print(f"{'write from a ½-res grid':28s}{'':12s}{write_working:12.2f}   (traced peak {working_peak:.0f} MiB "
          f"= {working_peak / layer_mib:.1f} raw layers of {layer_mib:.1f} MiB)")
    for name, old, new in rows:
        print(f"{'read crop, ' + name + ' (s)':28s}{old['seconds']:12.3f}{new['seconds']:12.3f}"
              f"{old['seconds'] / new['seconds']:10.1f}")
        print(f"{'  peak RSS growth (MiB)':28s}{old['peak_mib']:12.1f}{new['peak_mib']:12.1f}"
              f"{old['peak_mib'] / max(new['peak_mib'], 0.1):10.1f}")
        print(f"{'  tracemalloc peak (MiB)':28s}{old['traced_mib']:12.1f}{new['traced_mib']:12.1f}"
              f"{old['traced_mib'] / max(new['traced_mib'], 0.1):10.1f}")
    if not args.keep:
        for path in folder.iterdir():
            path.unlink()
        folder.rmdir()


if __name__ == "__main__":
    main()
