"""P4: time per volume of the CPU proposal backend against nnU-Net's preprocessing of the same volume.

    python benchmarks/proposals_vs_preprocessing.py -d 501 [-p nnUNetResEncUNetMPlans] [-c 3d_fullres] [--cases 5]
        [--working-spacing MM (default 2.0; 0 = raw grid)]

For each of the first ``--cases`` images of imagesTr, in one process and interleaved (so machine load hits both
sides alike), two comparisons:
- **compute**: on the image already in memory, the supervoxel backend (including the mapping of its working-grid
  layers back to the raw grid) against the plans' nnU-Net preprocessor (crop, normalise, resample), nothing written;
- **end to end**: what each command does per case, from the raw file to the written output: `mass propose`'s
  per-case step (read, propose, write the `.b2nd` + table; ``proposals.run.propose_case``) against
  `nnUNetv2_preprocess`'s (read image and label, crop, normalise, resample, sample foreground locations, write the
  `.b2nd` + `.pkl`; ``DefaultPreprocessor.run_case_save``), both into a temporary folder.
Wall and CPU seconds (``time.process_time``; with OMP_NUM_THREADS=1 both sides are single-threaded, so CPU time is
the load-independent figure) per case, the ratio of the medians (P4), and the compute step's peak memory (VmHWM
after a reset through /proc/self/clear_refs; Linux; it includes the baseline RSS, printed as well; the reset also
resets what ``/usr/bin/time`` reports). ``measure_p4`` is shared with ``benchmarks/pretrain_data.py``.
"""
from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

from _common import plans_parser  # benchmarks/_common.py (the script's folder is on sys.path)


def measure_p4(dataset, plans_identifier: str, configuration: str, cases: int, working_spacing: float | None,
               seed: int = 0) -> list[dict]:
    """Per case: compute and end-to-end seconds (wall, CPU) of both sides, proposals, grids, peaks."""
    import numpy as np

    from mass_nnu.adapter import inference
    from mass_nnu.grids import resample_nearest
    from mass_nnu.proposals.resample import working_grid
    from mass_nnu.proposals.run import make_backend, propose_case
    from mass_nnu.proposals.store import count_proposals

    plans = inference.plans_for(dataset.plans(plans_identifier), configuration)
    propose, params = make_backend("supervoxel", seed, None, None, "cpu", working_spacing)
    dataset_json = dataset.dataset_json()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for case, files in list(dataset.cases().items())[:cases]:
            images = [str(files[c]) for c in sorted(files)]
            data, properties = inference.read_image(images, plans)
            spacing = properties["spacing"]
            image = np.asarray(data[0], np.float32)
            row = {"case": case, "shape": tuple(data.shape[1:]), "base": rss_mib(),
                   "grid": working_grid(image.shape, spacing, working_spacing)[0]}
            reset_peak()
            with timed(row, "prop"):
                layers = resample_nearest(propose(image, spacing), image.shape)  # as mass propose writes them
            row["prop_peak"], row["proposals"] = peak_mib(), count_proposals(layers)
            del layers, image
            reset_peak()
            with timed(row, "pp"):
                inference.preprocess(data.copy(), None, properties, plans)
            row["pp_peak"] = peak_mib()
            with timed(row, "prop_e2e"):
                propose_case((propose, Path(images[0]), Path(tmp) / f"{case}.b2nd", "supervoxel", params))
            label = dataset.label_file(case)
            with timed(row, "pp_e2e"):
                inference.preprocess_case_to_files(images, label if label.is_file() else None,
                                                   str(Path(tmp) / f"{case}_pp"), plans, dataset_json)
            rows.append(row)
    return rows


class timed:
    """``with timed(row, key)``: row[key] = wall seconds, row[key + "_cpu"] = CPU seconds of the block."""

    def __init__(self, row: dict, key: str):
        self.row, self.key = row, key

    def __enter__(self):
        self.cpu, self.wall = time.process_time(), time.perf_counter()

    def __exit__(self, *exc):
        self.row[self.key] = time.perf_counter() - self.wall
        self.row[self.key + "_cpu"] = time.process_time() - self.cpu


def p4_summary(rows: list[dict]) -> dict:
    """Medians and their ratios (P4), compute and end to end, by wall and by CPU time."""
    med = {k: statistics.median(r[k] for r in rows)
           for k in ("prop", "pp", "prop_e2e", "pp_e2e", "prop_cpu", "pp_cpu", "prop_e2e_cpu", "pp_e2e_cpu")}
    return {**med, "p4": med["prop"] / med["pp"], "p4_cpu": med["prop_cpu"] / med["pp_cpu"],
            "p4_e2e": med["prop_e2e"] / med["pp_e2e"], "p4_e2e_cpu": med["prop_e2e_cpu"] / med["pp_e2e_cpu"]}


def print_p4(rows: list[dict]) -> None:
    print(f"{'case':20s}{'shape':>14s}{'working grid':>14s}{'proposals':>10s} | compute: {'prop. s':>8s}{'pp s':>7s}"
          f"{'CPU':>7s}{'pp CPU':>7s}{'P4':>6s} | end to end: {'prop. s':>8s}{'pp s':>7s}{'CPU':>7s}{'pp CPU':>7s}"
          f"{'P4':>6s} | peak MiB: {'prop.':>6s}{'pp':>6s}{'before':>7s}")
    for r in rows:
        print(f"{r['case']:20s}{'×'.join(map(str, r['shape'])):>14s}{'×'.join(map(str, r['grid'])):>14s}"
              f"{r['proposals']:10d} |          {r['prop']:8.2f}{r['pp']:7.2f}{r['prop_cpu']:7.2f}{r['pp_cpu']:7.2f}"
              f"{r['prop'] / r['pp']:6.1f} |             {r['prop_e2e']:8.2f}{r['pp_e2e']:7.2f}{r['prop_e2e_cpu']:7.2f}"
              f"{r['pp_e2e_cpu']:7.2f}{r['prop_e2e'] / r['pp_e2e']:6.2f} |           {r['prop_peak']:6.0f}"
              f"{r['pp_peak']:6.0f}{r['base']:7.0f}")
    s = p4_summary(rows)
    print(f"P4 = proposals / nnU-Net preprocessing per volume (median over {len(rows)} case(s)): compute only "
          f"{s['p4']:.1f} (wall), {s['p4_cpu']:.1f} (CPU); end to end (raw file to written output, what `mass "
          f"propose` and `nnUNetv2_preprocess` do per case) {s['p4_e2e']:.2f} (wall), {s['p4_e2e_cpu']:.2f} (CPU)")


def main() -> None:
    parser = plans_parser(__doc__, "planned dataset")
    parser.add_argument("--cases", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--working-spacing", type=float, default=2.0, help="supervoxel working grid (mm); 0 = raw")
    args = parser.parse_args()

    from mass_nnu.adapter.datasets import Dataset

    rows = measure_p4(Dataset.resolve(args.d), args.p, args.c, args.cases, args.working_spacing or None, args.seed)
    print(f"dataset {args.d}, plans {args.p} {args.c}; proposals' working spacing {args.working_spacing or 'raw'} mm")
    print_p4(rows)


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
