"""`mass plan`: nnU-Net planning and preprocessing (ResEnc presets), with plans transfer for pretraining."""
from __future__ import annotations

from typing import List, Optional

import typer


def plan(
    dataset: List[str] = typer.Option(..., "-d", help="Dataset ID(s) or name(s) to plan and preprocess."),
    planner: str = typer.Option("nnUNetPlannerResEncM", "-pl", help="nnUNetPlannerResEncM, ...L, ...XL"),
    configuration: List[str] = typer.Option(["3d_fullres"], "-c", help="Configuration(s) to preprocess."),
    num_processes: int = typer.Option(2, "-np", min=1, help="Processes for fingerprinting and preprocessing."),
    target_dataset: Optional[str] = typer.Option(None, "--target-dataset",
                                                 help="Downstream dataset whose plans decide the architecture."),
    no_preprocess: bool = typer.Option(False, "--no-pp", help="Plan only."),
    verify: bool = typer.Option(False, "--verify_dataset_integrity", help="Run nnU-Net's integrity check first."),
    base_features: Optional[int] = typer.Option(None, "--base-features", min=4,
                                                help="U-Net width of the first stage (nnU-Net: 32); smaller = CPU preset, plans '<name>_f<N>'."),
    verbose: bool = typer.Option(False, "--verbose", help="Show nnU-Net's own planning output (default: in <preprocessed dataset>/mass_plan_log.txt)."),
) -> None:
    """Fingerprint, plan and preprocess with nnU-Net; pretraining datasets can take a target's architecture."""
    from mass_nnu.planning.plan import plan_datasets, summary_table

    identifier = plan_datasets(dataset, planner, configuration, num_processes, target_dataset,
                               preprocess=not no_preprocess, verify=verify, base_features=base_features,
                               verbose=verbose)
    shown = ([target_dataset] if target_dataset else []) + [d for d in dataset if d != target_dataset]
    typer.echo(f"\nplans '{identifier}', configuration {configuration[0]}:")
    typer.echo(summary_table(shown, identifier, configuration[0]))
