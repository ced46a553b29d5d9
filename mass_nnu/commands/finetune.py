"""`mass finetune`: nnU-Net training from MASS-pretrained weights (or the from-scratch twin)."""
from __future__ import annotations

from typing import Optional

import typer


def finetune(
    dataset: str = typer.Option(..., "-d", help="Downstream dataset ID or name (17, 017, Dataset017_BTCV)."),
    configuration: Optional[str] = typer.Option(None, "-c", help="Configuration (default: the weights', else 3d_fullres)."),
    fold: str = typer.Option("0", "-f", help="Fold 0-4 or 'all'."),
    weights: Optional[str] = typer.Option(None, "-w", help="nnunet_pretrained_weights.pth or a MASSPretrainer folder "
                                                            "(default: the only one under nnUNet_results)."),
    plans: Optional[str] = typer.Option(None, "-p", help="Plans identifier (default: the weights')."),
    num_labeled: Optional[int] = typer.Option(None, "--num-labeled", help="Label budget: N training cases."),
    fraction: Optional[float] = typer.Option(None, "--fraction", help="Label budget: a fraction of the training cases."),
    scratch: bool = typer.Option(False, "--scratch", help="From-scratch twin: same plans and schedule, no weights."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Epochs (default: the trainer's, 1000)."),
    iterations: Optional[int] = typer.Option(None, "--iters-per-epoch", help="Iterations per epoch (default 250)."),
    device: str = typer.Option("cpu", "-device", help="cpu, cuda or mps."),
    continue_training: bool = typer.Option(False, "--c", help="Resume from the latest checkpoint."),
    npz: bool = typer.Option(False, "--npz", help="Save softmax probabilities at final validation."),
    seed: int = typer.Option(0, "--seed", help="Seed of the label-budget draw and of training (initialisation; sampling and augmentation with nnUNet_n_proc_DA=0)."),
    no_mirroring: bool = typer.Option(False, "--no-mirroring", help="No mirroring in augmentation and inference."),
    trainer: str = typer.Option("nnUNetTrainerMASS", "-tr", help="Trainer variant (nnUNetTrainerMASS_50epochs, ...)."),
    num_processes: int = typer.Option(2, "-np", help="Processes for planning and preprocessing."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1, help="Override the plans' batch size."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Initial learning rate (default: the trainer's, 1e-2)."),
    transfer: str = typer.Option("all", "--transfer", help="all: encoder and decoder weights; encoder: decoder from scratch."),
    random_init: bool = typer.Option(False, "--random-init", help="Ablation: the in-context head from random weights (same architecture and schedule, the MASS weights not loaded)."),
    verbose: bool = typer.Option(False, "--verbose", help="Show nnU-Net's training output "
                                 "(default: in <fold folder>/mass_finetune_log.txt, with a progress bar)."),
    head: str = typer.Option("auto", "--head", help="incontext: the whole MASS model, one in-context task per class; new: the pretrained backbone with a fresh nnU-Net head; auto: incontext when the full MASS checkpoint is beside the weights (docs/finetuning.md)."),
) -> None:
    """Fine-tune nnU-Net from MASS weights with an optional label budget; evaluate on imagesTs/labelsTs."""
    from mass_nnu.finetuning.run import finetune_dataset
    from mass_nnu.finetuning.settings import FinetuneSettings

    settings = FinetuneSettings(num_epochs=epochs, num_iterations_per_epoch=iterations, initial_lr=lr,
                                batch_size=batch_size, mirroring=not no_mirroring, seed=seed, transfer=transfer,
                                head=head, num_labeled=num_labeled, fraction=fraction, random_init=random_init or None)
    finetune_dataset(dataset, settings, weights, scratch, plans, configuration, fold, trainer, device,
                     continue_training, npz, num_processes, verbose=verbose)
