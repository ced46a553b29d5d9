"""kill -9 after a checkpoint, then `--c`: `mass pretrain` and `mass finetune` continue from the saved epoch, the
final outputs are valid, and no checkpoint is ever half-written (temporary file, fsync, rename)."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ENV = {"nnUNet_n_proc_DA": "0", "nnUNet_def_n_proc": "1", "OMP_NUM_THREADS": "1"}


def start(args, env) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mass_nnu", *map(str, args)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def kill_after(proc: subprocess.Popen, checkpoint: Path, timeout: float = 400) -> None:
    """SIGKILL ``proc`` as soon as ``checkpoint`` exists (it must appear before the process ends)."""
    deadline = time.time() + timeout
    while not checkpoint.is_file():
        assert proc.poll() is None, f"ended before writing {checkpoint.name}:\n{proc.stdout.read()[-3000:]}"
        assert time.time() < deadline, "no checkpoint in time"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL


def no_temporary_files(folder: Path) -> bool:
    return not [p for p in folder.rglob("*") if p.name.endswith(".tmp") or ".tmp." in p.name]


def test_pretrain_kill_9_and_resume(experiment_env, tmp_path):
    out = tmp_path / "pretrain"
    env = {**os.environ, **ENV}
    args = ["pretrain", "-d", experiment_env["pretrain"], "-p", experiment_env["plans"], "--epochs", 6,
            "--iters-per-epoch", 2, "--val-iters", 1, "--batch-size", 1, "-np", 0, "--seed", 5, "-o", out]
    kill_after(start(args, env), out / "checkpoint_latest.pth")
    assert not (out / "checkpoint_final.pth").exists()
    saved = torch.load(out / "checkpoint_latest.pth", weights_only=True)["epoch"]
    assert 1 <= saved < 6

    resumed = subprocess.run([sys.executable, "-m", "mass_nnu", *map(str, args), "--c"], env=env, capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    match = re.search(r"resumed from checkpoint_latest.pth at epoch (\d+)", resumed.stdout)
    assert match and int(match.group(1)) >= saved
    assert f"Epoch {int(match.group(1)) - 1}:" not in resumed.stdout.split("resumed from")[1]
    final = torch.load(out / "checkpoint_final.pth", weights_only=True)
    assert final["epoch"] == 6 and len(final["history"]["train_loss"]) == 6
    assert torch.load(out / "nnunet_pretrained_weights.pth", weights_only=True)["network_weights"]
    assert no_temporary_files(out)


def test_finetune_kill_9_and_resume(weights, experiment_env, tmp_path):
    from mass_nnu.io import load_nnunet_checkpoint

    path, _, _ = weights
    env = {**os.environ, **ENV}
    args = ["finetune", "-d", experiment_env["downstream"], "-w", path, "-tr", "nnUNetTrainerMASS_2epochs",
            "--epochs", 8, "--num-labeled", 2, "--no-mirroring", "-f", 2]
    fold = Path(os.environ["nnUNet_results"]) / "Dataset712_PhantomSeg" / \
        f"nnUNetTrainerMASS_2epochs__{experiment_env['plans']}_mass_n2s0_e8__3d_fullres" / "fold_2"
    kill_after(start(args, env), fold / "checkpoint_latest.pth")
    assert not (fold / "checkpoint_final.pth").exists()
    saved = load_nnunet_checkpoint(fold / "checkpoint_latest.pth")["current_epoch"]
    assert 1 <= saved < 8

    resumed = subprocess.run([sys.executable, "-m", "mass_nnu", *map(str, args), "--c", "--verbose"], env=env,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout and "checkpoint_latest.pth" in resumed.stdout
    after = resumed.stdout.split("resuming from")[1]
    epochs = [int(e) for e in re.findall(r"Epoch (\d+)", after)]
    assert epochs and min(epochs) >= saved and max(epochs) == 7, epochs
    final = load_nnunet_checkpoint(fold / "checkpoint_final.pth")
    assert final["current_epoch"] == 8
    assert (fold / "validation" / "summary.json").is_file() and (fold / "mass_finetune_results.json").is_file()
    assert no_temporary_files(fold)


def test_checkpoint_writes_are_atomic(tmp_path, monkeypatch):
    """A crash inside torch.save leaves the previous checkpoint intact; stale temporary files of a killed writer
    are removed by the next save."""
    from mass_nnu.io import load_checkpoint, save_checkpoint

    target = tmp_path / "checkpoint_latest.pth"
    save_checkpoint({"network_weights": {"w": torch.ones(2)}}, target)
    before = target.read_bytes()
    real_save = torch.save

    def dies_half_way(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        with open(f, "r+b") as handle:
            handle.truncate(10)
        raise KeyboardInterrupt  # as a kill would stop it

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"network_weights": {"w": torch.zeros(2)}}, target)
    assert target.read_bytes() == before and no_temporary_files(tmp_path)

    monkeypatch.setattr(torch, "save", real_save)
    (tmp_path / ".checkpoint_latest.pth.abc123.tmp.pth").write_bytes(b"half")  # left by a kill -9
    save_checkpoint({"network_weights": {"w": torch.zeros(2)}}, target)
    assert torch.equal(load_checkpoint(target)["network_weights"]["w"], torch.zeros(2))
    assert no_temporary_files(tmp_path)
