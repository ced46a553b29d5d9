"""`mass demo-data` (embedded datasets) and `mass demo` (the whole pipeline on them)."""
from __future__ import annotations

import typer


def demo_data(
    small: bool = typer.Option(False, "--small", help="Tiny volumes (about 48³) in seconds, for tests and the quick demo."),
    num_pretrain: int = typer.Option(20, "--num-pretrain", min=1, help="Unlabelled pretraining subjects."),
    num_train: int = typer.Option(10, "--num-train", min=1, help="Labelled training subjects of the downstream set."),
    num_test: int = typer.Option(5, "--num-test", min=0, help="Held-out test subjects (imagesTs/labelsTs)."),
    seed: int = typer.Option(0, "--seed", help="Random seed; the downstream set uses a different derived seed."),
    pretrain_id: int = typer.Option(501, "--pretrain-id", help="Dataset ID of the unlabelled cohort."),
    downstream_id: int = typer.Option(502, "--downstream-id", help="Dataset ID of the labelled dataset."),
    phantom: bool = typer.Option(False, "--phantom", help="Also write the CT-like phantom pair (IDs 511 and 512)."),
    force: bool = typer.Option(False, "--force", help="Overwrite existing dataset folders."),
) -> None:
    """Write the MNI152 demo datasets (nilearn's template, no download) into nnUNet_raw."""
    import time

    from mass_nnu.demo_data.mni import write_mni_datasets
    from mass_nnu.demo_data.phantom import write_phantom_dataset

    if pretrain_id == downstream_id:
        raise typer.BadParameter("--pretrain-id and --downstream-id must differ")
    start = time.time()
    folders = write_mni_datasets(pretrain_id, downstream_id, num_pretrain, num_train, num_test, small, seed, force)
    if phantom:
        shape = (32, 40, 40) if small else (96, 128, 128)
        folders += (write_phantom_dataset(511, "PhantomPretrain", num_pretrain, 0, shape, seed=seed, labelled=False,
                                          force=force),
                    write_phantom_dataset(512, "PhantomSeg", num_train, num_test, shape, seed=seed + 1, force=force))
    for folder in folders:
        typer.echo(f"wrote {folder}")
    typer.echo(f"demo data ready in {time.time() - start:.1f} s")


def demo(
    workspace: str = typer.Option(None, "--workspace", help="Use this folder for the nnU-Net folders (default: as set, else ./mass_workspace)."),
    seed: int = typer.Option(0, "--seed"),
    device: str = typer.Option("cpu", "-device", help="cpu or cuda"),
) -> None:
    """Run the whole pipeline on the small MNI demo data and print a summary (≤ 15 min on 2 CPU cores)."""
    from mass_nnu.demo_pipeline import run_demo

    run_demo(workspace=workspace, seed=seed, device=device)
