"""The same seed gives the same first-epoch losses on CPU, for pretraining and fine-tuning; another seed does not.
(Proposals: tests/test_propose.py::test_deterministic_and_resumable.)"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch


def _pretrain_losses(run_cli, exp, out: Path, seed: int) -> tuple[float, float]:
    result = run_cli("pretrain", "-d", exp["pretrain"], "-p", exp["plans"], "--epochs", 1, "--iters-per-epoch", 2,
                     "--val-iters", 1, "--batch-size", 1, "-np", 0, "--seed", seed, "-o", out)
    assert result.exit_code == 0, result.output
    history = torch.load(out / "checkpoint_final.pth", weights_only=True)["history"]
    return history["train_loss"][0], history["val_loss"][0]


def test_pretrain_same_seed_same_losses(experiment_env, run_cli, tmp_path):
    first = _pretrain_losses(run_cli, experiment_env, tmp_path / "a", 11)
    again = _pretrain_losses(run_cli, experiment_env, tmp_path / "b", 11)
    other = _pretrain_losses(run_cli, experiment_env, tmp_path / "c", 12)
    assert first == again
    assert first != other


def test_finetune_same_seed_same_losses(weights, experiment_env, run_cli, monkeypatch):
    from mass_nnu.io import load_nnunet_checkpoint

    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    path, _, _ = weights
    fold = Path(os.environ["nnUNet_results"]) / "Dataset712_PhantomSeg" / \
        f"nnUNetTrainerMASS_1epoch__{experiment_env['plans']}_mass__3d_fullres" / "fold_0"

    def losses(seed: int) -> list[float]:
        shutil.rmtree(fold.parent, ignore_errors=True)
        result = run_cli("finetune", "-d", 712, "-w", path, "-tr", "nnUNetTrainerMASS_1epoch", "-f", 0, "--seed", seed)
        assert result.exit_code == 0, result.output
        logging = load_nnunet_checkpoint(fold / "checkpoint_final.pth")["logging"]
        return [float(v) for v in logging["train_losses"] + logging["val_losses"]]

    first, again, other = losses(7), losses(7), losses(8)
    assert first == again
    assert first != other
