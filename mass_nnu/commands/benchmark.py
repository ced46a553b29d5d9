"""`mass benchmark`: label-efficiency benchmark (Dice vs number of labelled cases, MASS vs scratch and ablations)."""
from __future__ import annotations

from typing import List, Optional

import typer


def benchmark(
    dataset: str = typer.Option(..., "-d", help="Downstream dataset with imagesTs/labelsTs."),
    weights: str = typer.Option(..., "-w", help="Pretrained folder or nnunet_pretrained_weights.pth."),
    budgets: List[str] = typer.Option(["1", "2", "all"], "--budgets", help="Labelled cases per cell; repeat the flag."),
    seeds: int = typer.Option(1, "--seeds", min=1, help="Label subsets (and training seeds) per budget."),
    epochs: int = typer.Option(10, "--epochs", min=1),
    iters_per_epoch: int = typer.Option(25, "--iters-per-epoch", min=1),
    configuration: str = typer.Option("3d_fullres", "-c"),
    fold: str = typer.Option("0", "-f"),
    methods: List[str] = typer.Option(["mass", "scratch"], "--methods", help="mass, scratch, random-init (the in-context head from random weights, same schedule), incontext (no training); repeat the flag."),
    incontext: bool = typer.Option(False, "--incontext", help="Alias: add the incontext method."),
    split: str = typer.Option("validation", "--split", help="validation: the fold's validation cases, for every choice; test: also imagesTs/labelsTs, once, for the final table."),
    device: str = typer.Option("cpu", "-device"),
    out: Optional[str] = typer.Option(None, "-o", help="Output folder (default: $nnUNet_results/<Dataset>/mass_benchmark)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1, help="Override the plans' batch size."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Initial fine-tuning learning rate (default 1e-2)."),
    method_lr: List[str] = typer.Option([], "--method-lr", help="METHOD=LR: that method's own learning rate (e.g. "
                                        "scratch=0.03, tuned on validation); repeat the flag."),
    head: str = typer.Option("auto", "--head", help="MASS fine-tuning head: incontext, new or auto (see mass finetune)."),
    verbose: bool = typer.Option(False, "--verbose", help="Show nnU-Net's training output "
                                 "(default: in each cell's fold_k/mass_finetune_log.txt)."),
) -> None:
    """Fine-tune MASS, the from-scratch twin and the ablations per budget and seed; write results.csv/json, a table
    (with paired differences and in-context diagnostics) and a plot."""
    from mass_nnu.evaluation.label_efficiency import parse_method_lr, run_benchmark
    from mass_nnu.finetuning.settings import FinetuneSettings

    schedule = FinetuneSettings(num_epochs=epochs, num_iterations_per_epoch=iters_per_epoch, initial_lr=lr,
                                batch_size=batch_size, mirroring=False, head=head)
    methods = list(methods) + (["incontext"] if incontext else [])
    table = run_benchmark(dataset, weights, budgets, seeds, schedule, configuration, fold, methods, device, out, split,
                          parse_method_lr(method_lr), verbose)
    typer.echo(table)
