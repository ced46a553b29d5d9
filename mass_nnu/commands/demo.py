"""`mass demo-data` (embedded datasets) and `mass demo` (the whole pipeline on them)."""
from __future__ import annotations

import typer

PHANTOM_IDS = (511, 512)  # unlabelled and labelled CT-like phantom pair written by --phantom


def demo_data(
    small: bool = typer.Option(False, "--small", help="Tiny volumes (about 48³) in seconds, for tests and the quick demo."),
    num_pretrain: int = typer.Option(20, "--num-pretrain", min=1, help="Unlabelled pretraining subjects."),
    num_train: int = typer.Option(10, "--num-train", min=1, help="Labelled training subjects of the downstream set."),
    num_test: int = typer.Option(5, "--num-test", min=0, help="Held-out test subjects (imagesTs/labelsTs)."),
    seed: int = typer.Option(0, "--seed", help="Random seed; the downstream set uses a different derived seed."),
    pretrain_id: int = typer.Option(501, "--pretrain-id", help="Dataset ID of the unlabelled cohort."),
    downstream_id: int = typer.Option(502, "--downstream-id", help="Dataset ID of the labelled dataset."),
    atlas_id: int = typer.Option(503, "--atlas-id", help="Dataset ID of the labelled atlas set (HarvardOxford/JHU groups, large variation, T1 or T2-like)."),
    fetch_atlases: bool = typer.Option(False, "--fetch-atlases", help="Get Debian's mricron-data (apt-get download, unpacked into $MASS_CACHE or ~/.cache/mass-nnu) if not cached yet."),
    atlas_deb: str = typer.Option(None, "--atlas-deb", help="A downloaded mricron-data .deb, or a folder it was unpacked into (dpkg-deb -x)."),
    phantom: bool = typer.Option(False, "--phantom", help=f"Also write the CT-like phantom pair (IDs {PHANTOM_IDS[0]} unlabelled, {PHANTOM_IDS[1]} labelled)."),
    phantom_full: bool = typer.Option(False, "--phantom-full", help="Write the CT phantom pair at full size (implies --phantom): 512×512×200 voxels (x y z) at 0.8×0.8×2.5 mm, int16 HU, rendered slab by slab (about 0.5 GB peak per case)."),
    force: bool = typer.Option(False, "--force", help="Overwrite existing dataset folders."),
) -> None:
    """Write the MNI152 demo datasets (nilearn's template) into nnUNet_raw; the atlas set's labels need mricron-data
    (--fetch-atlases once), else it gets tissue labels, with one warning line."""
    import time

    from mass_nnu.demo_data.atlas import ATLAS_NAME, find_atlases, write_atlas_dataset
    from mass_nnu.demo_data.mni import DOWNSTREAM_NAME, PRETRAIN_NAME, write_mni_datasets
    from mass_nnu.demo_data.phantom import phantom_geometry, write_phantom_dataset
    from mass_nnu.demo_data.writer import check_new_dataset, dataset_summary
    from mass_nnu.errors import MassError

    start = time.time()
    phantom = phantom or phantom_full
    phantom_jobs = [dict(dataset_id=PHANTOM_IDS[0], name="PhantomPretrain", num_train=num_pretrain, seed=seed,
                         labelled=False),
                    dict(dataset_id=PHANTOM_IDS[1], name="PhantomSeg", num_train=num_train, num_test=num_test,
                         seed=seed + 1)] if phantom else []
    ids = [pretrain_id, downstream_id, atlas_id] + [job["dataset_id"] for job in phantom_jobs]
    if len(set(ids)) < len(ids):
        raise MassError(f"dataset IDs {ids}: must all differ (the phantom pair uses {PHANTOM_IDS})")
    targets = [(pretrain_id, PRETRAIN_NAME), (downstream_id, DOWNSTREAM_NAME), (atlas_id, ATLAS_NAME)]
    for dataset_id, name in targets + [(job["dataset_id"], job["name"]) for job in phantom_jobs]:
        check_new_dataset(dataset_id, name, force)  # refuse before fetching or writing anything
    atlas, fallback = find_atlases(atlas_deb, fetch=fetch_atlases)
    if fallback:
        typer.echo(f"warning: {fallback}", err=True)
    folders = write_mni_datasets(pretrain_id, downstream_id, num_pretrain, num_train, num_test, small, seed, force)
    folders += (write_atlas_dataset(atlas_id, num_train, num_test, small, seed, force, atlas),)
    shape, spacing = phantom_geometry("full" if phantom_full else "small" if small else "default")
    folders += tuple(write_phantom_dataset(**job, shape=shape, spacing=spacing, force=force, slabs=phantom_full)
                     for job in phantom_jobs)
    for folder in folders:
        typer.echo(dataset_summary(folder))
    typer.echo(f"demo data ready in {time.time() - start:.1f} s")


def demo(
    ctx: typer.Context,
    workspace: str = typer.Option(None, "--workspace", help="Use this folder for the nnU-Net folders (default: as set, else ./mass_workspace)."),
    seed: int = typer.Option(0, "--seed"),
    device: str = typer.Option("cpu", "-device", help="cpu or cuda"),
    quick: bool = typer.Option(False, "--quick", help="A smoke run of every stage (a few iterations each)."),
    verbose: bool = typer.Option(False, "--verbose", help="Show nnU-Net's own planning output."),
) -> None:
    """Run the whole pipeline on the small MNI demo data and print a summary (≤ 15 min on 2 CPU cores)."""
    from mass_nnu.demo_pipeline import PRESETS, run_demo

    root = ctx.find_root().command  # this `mass` command line: each step runs one of its commands in-process

    def run_command(args: list[str]) -> None:
        code = root.main(args, prog_name="mass", standalone_mode=False)  # a failed step has printed its error
        if isinstance(code, int) and code:
            raise typer.Exit(code)

    run_demo(run_command, workspace=workspace, seed=seed, device=device, verbose=verbose,
             **PRESETS["quick" if quick else "default"])
