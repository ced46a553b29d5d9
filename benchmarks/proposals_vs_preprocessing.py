"""P4: time per volume of the CPU proposal backend against nnU-Net's preprocessing of the same volume.

    python benchmarks/proposals_vs_preprocessing.py -d 501 [-p nnUNetResEncUNetMPlans] [-c 3d_fullres] [--cases 5]
        [--working-spacing MM (default 2.0; 0 = raw grid)]

For each of the first ``--cases`` images of imagesTr, in one process and interleaved (so machine load hits both
sides alike): read the image (not timed), run the supervoxel backend on it (what `mass propose` does per case,
including the mapping of its working-grid layers back to the raw grid), and run the plans' nnU-Net preprocessor on
it (crop, normalise, resample; what `nnUNetv2_preprocess` does per case, without writing). Prints per-case wall and CPU seconds (``time.process_time``; with OMP_NUM_THREADS=1 both sides are
single-threaded, so CPU time is the load-independent figure),
the proposals' working grid, number of proposals, the peak memory of each side (the process's peak RSS during
that step, VmHWM after resetting it through /proc/self/clear_refs; Linux; it includes the baseline RSS before the
step, printed as well) and the ratio of the medians. The reset also resets what ``/usr/bin/time`` reports.
"""
from __future__ import annotations

import statistics
import time

from _common import plans_parser  # benchmarks/_common.py (the script's folder is on sys.path)


def main() -> None:
    parser = plans_parser(__doc__, "planned dataset")
    parser.add_argument("--cases", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--working-spacing", type=float, default=2.0, help="supervoxel working grid (mm); 0 = raw")
    args = parser.parse_args()

    import numpy as np

    from mass_nnu.adapter import inference
    from mass_nnu.adapter.datasets import Dataset
    from mass_nnu.grids import resample_nearest
    from mass_nnu.proposals.resample import working_grid
    from mass_nnu.proposals.run import make_backend
    from mass_nnu.proposals.store import count_proposals

    dataset = Dataset.resolve(args.d)
    plans = inference.plans_for(dataset.plans(args.p), args.c)
    propose, _ = make_backend("supervoxel", args.seed, None, None, "cpu", args.working_spacing or None)
    rows = []
    for case, files in list(dataset.cases().items())[: args.cases]:
        data, properties = inference.read_image([str(files[c]) for c in sorted(files)], plans)
        spacing = properties["spacing"]
        image = np.asarray(data[0], np.float32)
        grid = working_grid(image.shape, spacing, args.working_spacing or None)[0]
        base = rss_mib()
        reset_peak()
        c0, t0 = time.process_time(), time.perf_counter()
        layers = resample_nearest(propose(image, spacing), image.shape)  # as mass propose writes them
        c1, t1 = time.process_time(), time.perf_counter()
        peak_prop = peak_mib()
        count = count_proposals(layers)
        del layers, image
        reset_peak()
        c2, t2 = time.process_time(), time.perf_counter()
        inference.preprocess(data.copy(), None, properties, plans)
        c3, t3 = time.process_time(), time.perf_counter()
        rows.append((case, tuple(data.shape[1:]), grid, count, t1 - t0, t3 - t2, peak_prop, peak_mib(), base,
                     c1 - c0, c3 - c2))

    print(f"dataset {args.d}, plans {args.p} {args.c}, spacing → {list(plans.configuration.spacing)}; "
          f"proposals' working spacing {args.working_spacing or 'raw'} mm")
    print(f"{'case':20s}{'shape':>14s}{'working grid':>14s}{'proposals':>10s}{'prop. (s)':>10s}{'nnU-Net pp (s)':>15s}"
          f"{'ratio':>7s}{'CPU s':>8s}{'pp CPU s':>9s}{'ratio':>7s}{'prop. peak MiB':>15s}{'pp peak MiB':>12s}"
          f"{'before MiB':>11s}")
    for case, shape, grid, n, a, b, ma, mb, base, ca, cb in rows:
        print(f"{case:20s}{'×'.join(map(str, shape)):>14s}{'×'.join(map(str, grid)):>14s}{n:10d}{a:10.2f}{b:15.2f}"
              f"{a / b:7.1f}{ca:8.2f}{cb:9.2f}{ca / cb:7.1f}{ma:15.0f}{mb:12.0f}{base:11.0f}")
    prop = statistics.median(r[4] for r in rows)
    pp = statistics.median(r[5] for r in rows)
    cprop = statistics.median(r[9] for r in rows)
    cpp = statistics.median(r[10] for r in rows)
    print(f"{'median':58s}{prop:10.2f}{pp:15.2f}{prop / pp:7.1f}{cprop:8.2f}{cpp:9.2f}{cprop / cpp:7.1f}"
          f"{max(r[6] for r in rows):15.0f}{max(r[7] for r in rows):12.0f}")
    print(f"P4 = proposals / nnU-Net preprocessing per volume = {prop / pp:.1f} (wall), {cprop / cpp:.1f} (CPU time; "
          f"less sensitive to other jobs on the machine)")


def reset_peak() -> None:
    """Reset the process's peak RSS (VmHWM) to its current RSS (Linux ≥ 4.0); a no-op elsewhere."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def rss_mib() -> float:
    """The process's current RSS in MiB (the baseline each peak includes: libraries, the image); 0 without /proc."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024
    except (OSError, StopIteration):
        return 0.0


def peak_mib() -> float:
    """The process's peak RSS since the last reset_peak (VmHWM), in MiB; ru_maxrss where /proc is missing."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024
    except (OSError, StopIteration):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

if __name__ == "__main__":
    main()
