"""`mass propose`: class-agnostic 3D mask proposals for a dataset's images, written into nnU-Net raw format."""
from __future__ import annotations

from typing import Optional

import typer


def propose(
    dataset: str = typer.Option(..., "-d", help="Dataset ID or name."),
    backend: str = typer.Option("supervoxel", "--backend", help="supervoxel (CPU, no weights) or sam2."),
    num_processes: int = typer.Option(1, "-np", min=1, help="Parallel cases (supervoxel backend)."),
    shard: Optional[str] = typer.Option(None, "--shard", help="i/n: process every n-th case from i (0-based)."),
    out_id: Optional[str] = typer.Option(None, "--out-id", help="Write into this dataset instead (made from -d if "
                                         "new: dataset.json copied, images hard-linked)."),
    seed: int = typer.Option(0, "--seed", help="Random seed (k-means sampling)."),
    eval_labels: Optional[str] = typer.Option(None, "--eval-labels", help="Label folder: report proposal recall."),
    sam2_checkpoint: Optional[str] = typer.Option(None, "--sam2-checkpoint", help="Local SAM 2 checkpoint (.pt)."),
    sam2_config: Optional[str] = typer.Option(None, "--sam2-config", help="SAM 2 config, e.g. configs/sam2.1/sam2.1_hiera_l.yaml"),
    device: str = typer.Option("cpu", "-device", help="cpu or cuda (sam2 backend)."),
    working_spacing: float = typer.Option(2.0, "--working-spacing", min=0,
                                          help="Supervoxel backend: run on a grid of this spacing in mm (only "
                                               "downsampled, never upsampled); 0 = the raw grid."),
    sam2_spacing: float = typer.Option(1.5, "--sam2-spacing", min=0,
                                       help="SAM 2 backend: working grid in mm (the paper's 1.5); 0 = the raw grid."),
    half_splits: bool = typer.Option(True, "--half-splits/--no-half-splits",
                                     help="Supervoxel backend: also split each intensity class into halves along the "
                                          "foreground's principal axes."),
    core_depth: float = typer.Option(10.0, "--core-depth", min=0,
                                     help="Supervoxel backend: also propose each class's part deeper than this many "
                                          "mm inside the foreground; 0 = off."),
) -> None:
    """Write proposals to $nnUNet_raw/<Dataset>/proposalsTr/<case>.b2nd + .json (reruns skip finished cases)."""
    from mass_nnu.proposals.run import evaluate_recall, propose_dataset

    summary = propose_dataset(dataset, backend, shard, seed, sam2_checkpoint, sam2_config, device, num_processes,
                              out_id, working_spacing or None, sam2_spacing or None, half_splits, core_depth)
    typer.echo(f"proposals ({summary['dataset']}): {summary['cases_done']} cases written, "
               f"{summary['cases_skipped']} already done, "
               f"{summary['proposals_per_case']:.0f} proposals/case, {summary['seconds_per_case']:.1f} s/case"
               + (f", {len(summary['cases_empty'])} with zero proposals" if summary["cases_empty"] else ""))
    if eval_labels:
        report = evaluate_recall(summary["dataset"], eval_labels)
        per = ", ".join(f"{k}: {v:.2f}" for k, v in report["per_structure_mean_best_iou"].items())
        typer.echo(f"recall (best IoU ≥ {report['threshold']}): {report['recall']:.2f}; mean best IoU "
                   f"{report['mean_best_iou']:.2f}; per structure: {per}")
