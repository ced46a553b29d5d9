"""Per-sample CPU cost of pretraining data at real size: the old whole-volume path against the current sampler.

    python benchmarks/pretrain_data.py -d 720 [-p nnUNetResEncUNetMPlans] [-c 3d_fullres] [--patch 128 128 128]
           [--max-tasks 13] [--samples 12] [--warmup 1] [--seed 0] [--p4-cases 1] [--working-spacing 2.0]

The dataset must be planned (``mass plan -d ID``) and proposed (``mass propose -d ID``). ``--patch`` overrides the
plans' patch (default 128³, the paper's); ``--patch 0`` keeps the plans' one. 12 proposal tasks + the all-ones task
(``--max-tasks 13``). Each path runs in its own subprocess (peak memory is its own), on the same sample draws:

- **new** = ``TaskSampler.sample`` as pretraining runs it: the image and the task layers read by crop (lazy blosc2),
  masks made on the two context crops, then the two augmented views. *read* = opening the case and every image and
  proposal read (anchor region, in-crop counts, the crops of the task layers); *masks* = the rest of ``draw`` (task
  choice and the mask comparisons on the crops); *augmentation* = both views (batchgeneratorsv2).
- **old** = an emulation of the code before proposals were read by crop (kept here only): ``np.asarray`` of the whole
  preprocessed image and of the whole proposal stack per sample, in-crop counts from the full layers, masks of the
  chosen tasks on the full volume, then the two context crops and the same augmentation draws with every mask as its
  own segmentation channel (the new path packs 8 masks per channel as bits; nearest resampling makes that exact).

Then P4 on the first ``--p4-cases`` images: proposals per volume against nnU-Net's preprocessing of the same
volume, compute and end to end (``benchmarks/proposals_vs_preprocessing.py``, which documents both).

Peak memory = growth of the peak resident set over the resident set before the first timed sample (warm-up
included in neither). With ``--aug-split`` the new path also reports the spatial and the intensity parts of each view.
"""
from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time

from _common import build_sampler, plans_parser  # benchmarks/_common.py (the script's folder is on sys.path)

PHASES = ("read", "masks", "augmentation", "total")


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Timer:
    """``timer.wrap(func)`` returns a function (a method when set on a class) that adds its wall time to
    ``timer.seconds``."""

    def __init__(self):
        self.seconds = 0.0

    def wrap(self, func):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return func(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0
        return timed


def run_new(sampler, rngs, aug_split: bool) -> list[dict]:
    from mass_nnu.pretraining import sampling
    from mass_nnu.proposals.store import ProposalStore

    read_store, read_image, load, draw, spatial = Timer(), Timer(), Timer(), Timer(), Timer()
    ProposalStore.read = read_store.wrap(ProposalStore.read)  # every proposal read: anchor, counts, crops
    sampling.crop = read_image.wrap(sampling.crop)            # the image crops
    sampler._load = load.wrap(sampler._load)                  # opening the case and its table
    sampler.draw = draw.wrap(sampler.draw)
    if aug_split:
        for compose in (sampler.weak, sampler.strong):
            first = compose.transforms[0]  # SpatialTransform: parameters and the resampling
            first.get_parameters, first.apply = spatial.wrap(first.get_parameters), spatial.wrap(first.apply)
    rows = []
    for rng in rngs:
        for t in (read_store, read_image, load, draw, spatial):
            t.seconds = 0.0
        t0 = time.perf_counter()
        sampler.sample(rng)
        total = time.perf_counter() - t0
        read = read_store.seconds + read_image.seconds + load.seconds
        row = {"read": read, "masks": draw.seconds - read, "augmentation": total - draw.seconds, "total": total}
        if aug_split:
            row["spatial"] = spatial.seconds
            row["intensity"] = row["augmentation"] - row["spatial"]
        rows.append(row)
    return rows


def old_apply_view(transform, image, masks, seed):
    """The augmentation before masks were packed as bits: one int16 segmentation channel per mask."""
    import numpy as np
    import torch

    state = np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        np.random.seed(seed)
        torch.manual_seed(seed)
        out = transform(image=torch.from_numpy(np.ascontiguousarray(image)),
                        segmentation=torch.from_numpy(np.ascontiguousarray(masks.astype(np.int16))))
    np.random.set_state(state)
    return out["image"].float(), out["segmentation"] > 0


def run_old(sampler, rngs) -> list[dict]:
    """The whole-volume path, on the draws the new sampler makes from the same generators."""
    import numpy as np
    import torch

    from mass_nnu.pretraining.sampling import crop, crop_box

    rows = []
    for rng in rngs:
        drawn = sampler.draw(rng)  # the decisions only (case, tasks, centres), not timed
        aug_seeds = [int(rng.integers(2 ** 31)) for _ in range(2)]
        source = next(x for x in sampler.sources if x.case_id == drawn["case"])
        t0 = time.perf_counter()
        data, store, stats = sampler._load(source)
        image = np.asarray(data[:], np.float32)   # the whole preprocessed image
        layers = np.asarray(store.layers[:])      # the whole proposal stack
        t1 = time.perf_counter()
        low, high = crop_box(drawn["centers"][0], sampler.patch_size)  # in-crop counts from the full layers
        box = tuple(slice(max(int(a), 0), max(int(b), 0)) for a, b in zip(low, high))
        for layer in np.unique(stats[:, 0]):
            np.bincount(layers[(int(layer), *box)].ravel())
        chosen = drawn["tasks"]
        labels = chosen[:, 1].reshape(-1, 1, 1, 1)
        full_masks = (layers[chosen[:, 0]] == labels).astype(np.uint8)  # (K, *S) on the whole volume
        views = [(crop(image, c, sampler.context), crop(full_masks, c, sampler.context)) for c in drawn["centers"]]
        t2 = time.perf_counter()
        outs = [old_apply_view(tr, im, m, seed) for tr, (im, m), seed in zip((sampler.weak, sampler.strong), views,
                                                                          aug_seeds)]
        keep = outs[0][1].flatten(1).any(1)
        [torch.cat((m[keep], torch.ones((1, *m.shape[1:]), dtype=m.dtype))) for _, m in outs]
        t3 = time.perf_counter()
        rows.append({"read": t1 - t0, "masks": t2 - t1, "augmentation": t3 - t2, "total": t3 - t0})
        del image, layers, full_masks, views
    return rows


def part(args) -> dict:
    import numpy as np
    import torch

    torch.set_num_threads(1)
    sampler = build_sampler(args)
    rngs = [np.random.default_rng([args.seed, i]) for i in range(args.warmup + args.samples)]
    runner = (lambda r: run_new(sampler, r, args.aug_split)) if args.part == "new" else (lambda r: run_old(sampler, r))
    runner(rngs[:args.warmup])
    start = rss_mb()
    rows = runner(rngs[args.warmup:])
    store = sampler._load(sampler.sources[0])[1] if args.part == "new" else None
    return {"rows": rows, "peak_mb": peak_rss_mb() - start, "patch": list(sampler.patch_size),
            "context": list(sampler.context), "layers": len(store) if store is not None else None}


def main() -> None:
    parser = plans_parser(__doc__, "planned dataset with proposals")
    parser.add_argument("--patch", type=int, nargs="+", default=[128, 128, 128])
    parser.add_argument("--max-tasks", type=int, default=13)
    parser.add_argument("--samples", type=int, default=12)  # the draws vary (affine p 0.5 / 0.8)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--aug-split", action="store_true", help="also time the spatial part of the augmentation")
    parser.add_argument("--p4-cases", type=int, default=1, help="then P4 on this many cases (0: skip)")
    parser.add_argument("--working-spacing", type=float, default=2.0, help="P4: the proposals' working grid (mm)")
    parser.add_argument("--part", choices=("old", "new"), help="run one side only and print its JSON")
    args = parser.parse_args()
    if args.part:
        print("RESULT " + json.dumps(part(args)), flush=True)
        return
    results = {}
    for side in ("new", "old"):
        proc = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--part", side], capture_output=True,
                              text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode or not lines:
            sys.exit(f"{side} side failed:\n{proc.stderr[-3000:]}")
        results[side] = json.loads(lines[-1][len("RESULT "):])
    new, old = results["new"], results["old"]
    med = {side: {k: statistics.median(r[k] for r in results[side]["rows"]) for k in results[side]["rows"][0]}
           for side in results}
    print(f"dataset {args.d}, plans {args.p} {args.c}, patch {new['patch']} (context {new['context']}), "
          f"≤ {args.max_tasks} tasks, {new['layers']} proposal layers, median of {args.samples} samples "
          f"(+{args.warmup} warm-up), 1 thread")
    print(f"{'seconds per sample':28s}{'old':>10s}{'new':>10s}{'old/new':>10s}")
    for key in PHASES:
        print(f"{key:28s}{med['old'][key]:10.3f}{med['new'][key]:10.3f}{med['old'][key] / med['new'][key]:10.1f}")
    print(f"{'peak memory growth (MiB)':28s}{old['peak_mb']:10.1f}{new['peak_mb']:10.1f}"
          f"{old['peak_mb'] / max(new['peak_mb'], 1e-6):10.1f}")
    mean = {side: statistics.fmean(r["total"] for r in results[side]["rows"]) for side in results}
    print(f"{'total, mean':28s}{mean['old']:10.3f}{mean['new']:10.3f}{mean['old'] / mean['new']:10.1f}")
    if args.aug_split:
        print(f"new augmentation: spatial {med['new']['spatial']:.3f} s, intensity {med['new']['intensity']:.3f} s")
    worst = max(med["new"]["total"], mean["new"])  # a loader's throughput follows the mean
    print(f"new total {med['new']['total']:.3f} s per sample (median; mean {mean['new']:.3f}; target ≤ 1.0 for both): "
          f"{'met' if worst <= 1.0 else 'MISSED'}")
    if args.p4_cases:  # proposals per volume against nnU-Net's preprocessing (benchmarks/proposals_vs_preprocessing.py)
        from proposals_vs_preprocessing import measure_p4, p4_summary, print_p4

        from mass_nnu.adapter.datasets import Dataset

        rows = measure_p4(Dataset.resolve(args.d), args.p, args.c, args.p4_cases, args.working_spacing or None)
        print_p4(rows)
        summary = p4_summary(rows)
        print(f"P4 end to end {summary['p4_e2e_cpu']:.2f} by CPU time (target ≤ 1): "
              f"{'met' if summary['p4_e2e_cpu'] <= 1.0 else 'MISSED'}")


if __name__ == "__main__":
    main()
