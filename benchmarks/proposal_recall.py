"""Proposal recall of the supervoxel backend over several labelled datasets, with settings variants side by side.

    python benchmarks/proposal_recall.py -d 502 -d 512 -d 503 [--cases 4] [--split Tr]
           [--variants default no-half-splits no-core both-off]

For the first ``--cases`` images of each dataset: run the supervoxel backend with each variant of its settings
(``mass propose`` does the same per case), map the layers to the image grid, and score every labelled structure by
the best IoU of any proposal (``proposals/evaluate.py``). Prints, per dataset and variant, the recall (fraction of
structures with best IoU ≥ 0.5), the mean best IoU, the proposals per case and the seconds per case, then the mean
best IoU per structure. The labels are read only here, to score: the backend never sees them.
"""
from __future__ import annotations

import argparse
import dataclasses
import time

VARIANTS = {
    "default": {},
    "no-half-splits": {"half_splits": False},
    "no-core": {"core_depth_mm": 0.0},
    "both-off": {"half_splits": False, "core_depth_mm": 0.0},
    "slic-working-grid": {"slic_max_spacing_mm": 0.0},  # every SLIC scale on the working grid (before per-scale grids)
    "slic-factor-1.5": {"slic_min_factor": 1.5},  # before 2026-12-02: a coarser SLIC grid only from a factor 1.5
    "working-3mm": {"working_spacing_mm": 3.0},  # `mass propose --working-spacing 3` (default 2)
    "working-4mm": {"working_spacing_mm": 4.0},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-d", action="append", required=True, help="labelled dataset ID (repeat)")
    parser.add_argument("--cases", type=int, default=4)
    parser.add_argument("--split", default="Tr", choices=("Tr", "Ts"))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--threshold", type=float, default=0.5)
    args = parser.parse_args()

    import numpy as np
    import SimpleITK as sitk

    from mass_nnu.adapter.datasets import Dataset
    from mass_nnu.grids import resample_nearest
    from mass_nnu.io import read_image
    from mass_nnu.proposals.evaluate import best_iou_per_structure
    from mass_nnu.proposals.supervoxel import SupervoxelSettings, supervoxel_proposals
    from mass_nnu.workspace import configure_environment

    configure_environment(quiet=True)
    rows, per_structure = [], {}
    for dataset_id in args.d:
        dataset = Dataset.resolve(dataset_id)
        names = {int(v): k for k, v in dataset.dataset_json()["labels"].items() if not isinstance(v, list) and v}
        cases = sorted(dataset.cases(args.split))[: args.cases]
        for variant in args.variants:
            settings = dataclasses.replace(SupervoxelSettings(), **VARIANTS[variant])
            best, counts, seconds = [], [], []
            for case in cases:
                image = read_image(dataset.image_file(case, split=args.split))
                label = sitk.GetArrayFromImage(read_image(dataset.label_file(case, split=args.split)))
                start = time.perf_counter()
                layers = supervoxel_proposals(sitk.GetArrayFromImage(image).astype(np.float32),
                                              image.GetSpacing()[::-1], settings)
                seconds.append(time.perf_counter() - start)
                layers = resample_nearest(layers, label.shape) if len(layers) else layers
                counts.append(sum(int(np.unique(layer).size - 1) for layer in layers))
                scores = best_iou_per_structure(layers, label)
                best += list(scores.values())
                for value, iou in scores.items():
                    per_structure.setdefault((dataset.name, names.get(value, str(value))), {}) \
                        .setdefault(variant, []).append(iou)
            rows.append((dataset.name, variant, len(cases), float(np.mean(np.asarray(best) >= args.threshold)),
                         float(np.mean(best)), float(np.mean(counts)), float(np.mean(seconds))))

    print(f"{'dataset':28s}{'variant':>16s}{'cases':>7s}{'recall':>8s}{'mean IoU':>10s}{'props':>8s}{'s/case':>8s}")
    for name, variant, n, recall, iou, props, secs in rows:
        print(f"{name:28s}{variant:>16s}{n:7d}{recall:8.2f}{iou:10.3f}{props:8.0f}{secs:8.1f}")
    print(f"\nmean best IoU per structure ({', '.join(args.variants)}):")
    for (name, structure), by_variant in per_structure.items():
        values = "  ".join(f"{np.mean(by_variant[v]):.3f}" for v in args.variants)
        print(f"{name:28s}{structure:>24s}  {values}")


if __name__ == "__main__":
    main()
