"""`mass pretrain`: in-context segmentation pretraining on mask proposals."""
from __future__ import annotations

from typing import List, Optional

import typer


def pretrain(
    dataset: List[str] = typer.Option(..., "-d", help="Pretraining dataset ID(s); several may be mixed."),
    plans: str = typer.Option("nnUNetResEncUNetMPlans", "-p", help="Plans identifier (transferred from the downstream dataset)."),
    configuration: str = typer.Option("3d_fullres", "-c"),
    epochs: int = typer.Option(50, "--epochs", min=1),
    iters_per_epoch: int = typer.Option(50, "--iters-per-epoch", min=1),
    val_iters: int = typer.Option(4, "--val-iters", min=1),
    batch_size: int = typer.Option(2, "--batch-size", min=1),
    lr: float = typer.Option(1e-3, "--lr"),
    optimizer: str = typer.Option("adamw", "--optimizer"),
    ema: float = typer.Option(0.99, "--ema", help="EMA decay of the exported weights."),
    max_tasks: int = typer.Option(13, "--max-tasks", min=2, help="Masks per sample, incl. the all-ones task."),
    device: str = typer.Option("cpu", "-device", help="cpu or cuda (multi-GPU: launch with torchrun)."),
    resume: bool = typer.Option(False, "--c", help="Continue from checkpoint_latest.pth."),
    num_processes: Optional[int] = typer.Option(None, "-np", min=0, help="Data-loading workers (default: nnUNet_n_proc_DA or 2)."),
    seed: int = typer.Option(0, "--seed"),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the model (CUDA only; ignored on CPU, as in nnU-Net)."),
    activation_checkpointing: Optional[bool] = typer.Option(None, "--activation-checkpointing/--no-activation-checkpointing", help="Recompute the reference view's encoder pass in backward instead of keeping its activations: less memory, one more encoder forward per step, same results. Default: on only when the memory check finds that the step fits with it and not without."),
    output: Optional[str] = typer.Option(None, "-o", help="Output folder (default: nnU-Net's results layout)."),
    memory_check: bool = typer.Option(True, "--memory-check/--no-memory-check", help="Estimate the step's peak memory before the first step and stop with one line if it cannot fit."),
) -> None:
    """Pretrain the plans' nnU-Net network by in-context segmentation of proposals; exports nnU-Net weights."""
    import os
    from pathlib import Path

    from mass_nnu.pretraining.trainer import PretrainSettings
    from mass_nnu.pretraining.trainer import pretrain as run

    workers = num_processes if num_processes is not None else int(os.environ.get("nnUNet_n_proc_DA", "2"))
    settings = PretrainSettings(epochs=epochs, iterations_per_epoch=iters_per_epoch, val_iterations=val_iters,
                                batch_size=batch_size, lr=lr, optimizer=optimizer, ema_decay=ema, seed=seed,
                                num_workers=workers, compile=compile, max_tasks=max_tasks,
                                activation_checkpointing=activation_checkpointing,
                                memory_check=memory_check)
    folder = run(dataset, plans, configuration, settings, device, resume, Path(output) if output else None)
    typer.echo(f"pretrained weights: {folder / 'nnunet_pretrained_weights.pth'}")
