"""`mass demo`: demo data → plan → propose → pretrain → finetune (MASS and scratch) → in-context → summary."""
from __future__ import annotations

import time

DEMO_PRETRAIN_ID, DEMO_DOWNSTREAM_ID = 501, 502


def run_demo(workspace: str | None = None, seed: int = 0, device: str = "cpu") -> dict:
    import typer

    from mass_nnu.adapter.datasets import raw_root
    from mass_nnu.demo_data.mni import write_mni_datasets
    from mass_nnu.workspace import configure_environment

    if workspace:
        import os

        for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
            os.environ.pop(var, None)
        configure_environment(workspace)
    timings: dict[str, float] = {}
    start = time.time()
    if not list(raw_root().glob(f"Dataset{DEMO_DOWNSTREAM_ID}_*")):
        write_mni_datasets(DEMO_PRETRAIN_ID, DEMO_DOWNSTREAM_ID, num_pretrain=20, num_train=10, num_test=5,
                           small=True, seed=seed)
    timings["demo data"] = time.time() - start
    typer.echo("\nmass demo summary")
    for step, seconds in timings.items():
        typer.echo(f"  {step:<12} {seconds:7.1f} s")
    return timings
