"""P4: time per volume of the CPU proposal backend against nnU-Net's preprocessing of the same volume.

    python benchmarks/proposals_vs_preprocessing.py -d 501 [-p nnUNetResEncUNetMPlans] [-c 3d_fullres] [--cases 5]

For each of the first ``--cases`` images of imagesTr, in one process and interleaved (so machine load hits both
sides alike): read the image (not timed), run the supervoxel backend on it (what `mass propose` does per case),
and run the plans' nnU-Net preprocessor on it (crop, normalise, resample; what `nnUNetv2_preprocess` does per
case, without writing). Prints per-case seconds and the ratio of the medians.
"""
from __future__ import annotations

import statistics
import time

from _common import plans_parser  # benchmarks/_common.py (the script's folder is on sys.path)


def main() -> None:
    parser = plans_parser(__doc__, "planned dataset")
    parser.add_argument("--cases", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import numpy as np

    from mass_nnu.adapter import inference
    from mass_nnu.adapter.datasets import Dataset
    from mass_nnu.proposals.run import make_backend

    dataset = Dataset.resolve(args.d)
    plans = inference.plans_for(dataset.plans(args.p), args.c)
    propose, _ = make_backend("supervoxel", args.seed, None, None, "cpu")
    rows = []
    for case, files in list(dataset.cases().items())[: args.cases]:
        data, properties = inference.read_image([str(files[c]) for c in sorted(files)], plans)
        spacing = properties["spacing"]
        t0 = time.perf_counter()
        layers = propose(np.asarray(data[0], np.float32), spacing)
        t1 = time.perf_counter()
        inference.preprocess(data.copy(), None, properties, plans)
        t2 = time.perf_counter()
        rows.append((case, tuple(data.shape[1:]), len(layers), t1 - t0, t2 - t1))

    print(f"dataset {args.d}, plans {args.p} {args.c}, spacing → {list(plans.configuration.spacing)}")
    print(f"{'case':24s}{'shape':>16s}{'layers':>8s}{'proposals (s)':>15s}{'nnU-Net pp (s)':>16s}{'ratio':>8s}")
    for case, shape, n, a, b in rows:
        print(f"{case:24s}{'×'.join(map(str, shape)):>16s}{n:8d}{a:15.2f}{b:16.2f}{a / b:8.1f}")
    prop = statistics.median(r[3] for r in rows)
    pp = statistics.median(r[4] for r in rows)
    print(f"{'median':48s}{prop:15.2f}{pp:16.2f}{prop / pp:8.1f}")
    print(f"P4 = proposals / nnU-Net preprocessing per volume = {prop / pp:.1f}")


if __name__ == "__main__":
    main()
