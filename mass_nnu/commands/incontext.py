"""`mass segment`, `mass embed`, `mass probe`: in-context segmentation and frozen-encoder features."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

MODEL_HELP = "Pretrained folder (…/MASSPretrainer__<plans>__<config>) or a checkpoint file."


def segment(
    model: Path = typer.Option(..., "-m", help=MODEL_HELP),
    ref: List[Path] = typer.Option(..., "--ref", help="Reference image (repeat for K-shot; first channel _0000)."),
    ref_mask: List[Path] = typer.Option(..., "--ref-mask", help="Its label map; paired with --ref in order."),
    inputs: List[Path] = typer.Option(..., "-i", help="Query image(s) or folder(s) (repeat -i for more)."),
    output: Path = typer.Option(..., "-o", help="Output folder for <case>.nii.gz."),
    device: str = typer.Option("cpu", "-device", help="cpu, cuda or mps."),
    labels: Optional[List[int]] = typer.Option(None, "--labels", help="Only these reference labels (repeatable)."),
    gt: Optional[Path] = typer.Option(None, "--gt", help="Folder with <case>.nii.gz ground truth: Dice per label."),
    step_size: float = typer.Option(0.5, "--step-size", help="Sliding-window step as a fraction of the patch."),
    no_largest_component: bool = typer.Option(False, "--no-largest-component",
                                              help="Keep every component (default: largest per label)."),
    whole_image: bool = typer.Option(False, "--whole-image", help="Tile the whole image, not its foreground box."),
    random_init: bool = typer.Option(False, "--random-init", help="Same architecture, random weights (baseline)."),
    seed: int = typer.Option(0, "--seed", help="Seed of --random-init."),
) -> None:
    """Segment new structures in query images from annotated references, with no training."""
    from mass_nnu.errors import MassError
    from mass_nnu.incontext.common import load_pretrained
    from mass_nnu.incontext.segment import dice_table, segment_cases

    if len(ref) != len(ref_mask):
        raise MassError(f"--ref given {len(ref)} time(s) but --ref-mask {len(ref_mask)}: pair every image with its mask")
    pretrained = load_pretrained(model, device, random_init, seed)
    results = segment_cases(pretrained, list(zip(ref, ref_mask)), inputs, output, labels or None, step_size,
                            not no_largest_component, whole_image, gt)
    typer.echo(f"segmentations written to {output}")
    if gt:
        typer.echo(dice_table(results))
        typer.echo(f"Dice saved to {output / 'summary.json'}")


def embed(
    model: Path = typer.Option(..., "-m", help=MODEL_HELP),
    inputs: Optional[List[Path]] = typer.Option(None, "-i", help="Image file(s) or folder(s) (repeat -i)."),
    dataset: Optional[str] = typer.Option(None, "-d", help="Dataset ID or name: its preprocessed (else raw) imagesTr."),
    output: Path = typer.Option(..., "-o", help="features.npz to write."),
    device: str = typer.Option("cpu", "-device", help="cpu, cuda or mps."),
    scales: int = typer.Option(3, "--scales", help="How many of the deepest encoder stages to pool."),
    random_init: bool = typer.Option(False, "--random-init",
                                     help="Same architecture, random weights: the from-scratch baseline."),
    seed: int = typer.Option(0, "--seed", help="Seed of --random-init."),
) -> None:
    """Frozen-encoder features (average + max pooled at several scales), one row per case."""
    from mass_nnu.errors import MassError
    from mass_nnu.incontext.common import load_pretrained
    from mass_nnu.incontext.features import dataset_volumes, file_volumes
    from mass_nnu.incontext.features import embed as embed_cases

    if (inputs is None) == (dataset is None):
        raise MassError("mass embed: give either -i FILES/FOLDERS or -d DATASET")
    pretrained = load_pretrained(model, device, random_init, seed)
    volumes = file_volumes(pretrained, inputs) if inputs else dataset_volumes(pretrained, dataset)
    features = embed_cases(pretrained, volumes, output, scales)
    typer.echo(f"{features.shape[0]} cases x {features.shape[1]} features -> {output}")


def probe(
    features: Path = typer.Argument(..., help="features.npz from 'mass embed'."),
    labels: Path = typer.Argument(..., help="labels.csv with columns case_id,label."),
    folds: int = typer.Option(5, "--folds", help="Stratified cross-validation folds."),
    seed: int = typer.Option(0, "--seed", help="Seed of the fold split."),
    output: Optional[Path] = typer.Option(None, "-o", help="Also write the results as JSON."),
) -> None:
    """Linear probe (standardised logistic regression): cross-validated accuracy and AUC."""
    from mass_nnu.incontext.probe import probe as run_probe

    result = run_probe(features, labels, folds, seed)
    typer.echo(f"{result['cases']} cases, {result['features']} features, classes {result['classes']}, "
               f"{folds}-fold CV (seed {seed})")
    typer.echo(f"accuracy {result['accuracy']:.3f} (fold std {result['accuracy_fold_std']:.3f}, chance "
               f"{result['chance_accuracy']:.3f})   AUC {result['auc']:.3f}")
    if output:
        from mass_nnu.io import save_json_atomic

        save_json_atomic(result, output)
