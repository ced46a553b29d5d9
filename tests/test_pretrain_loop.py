"""`mass pretrain` end to end: outputs, weight export into nnU-Net, kill + --c resume (exact), DDP on gloo."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import PRETRAIN_EPOCHS as EPOCHS
from conftest import pretrain_args as _args


def test_outputs_load_safely_and_transfer_to_nnunet(uninterrupted, experiment_env):
    import torch
    from nnunetv2.run.load_pretrained_weights import load_pretrained_weights

    from mass_nnu.adapter.networks import build_network
    from mass_nnu.io import architecture_fingerprint
    from mass_nnu.model.artifacts import load_mass_model

    out = uninterrupted
    for name in ("checkpoint_final.pth", "checkpoint_latest.pth", "nnunet_pretrained_weights.pth", "plans.json",
                 "dataset.json", "progress.png"):
        assert (out / name).is_file(), name
    logs = list(out.glob("training_log_*.txt"))
    assert len(logs) == 1 and "Epoch 1:" in logs[0].read_text() and "val Dice" in logs[0].read_text()

    final = torch.load(out / "checkpoint_final.pth", weights_only=True)
    latest = torch.load(out / "checkpoint_latest.pth", weights_only=True)
    export = torch.load(out / "nnunet_pretrained_weights.pth", weights_only=True)
    for key in ("plans", "configuration", "dataset_json", "mass_config", "architecture_fingerprint"):
        assert key in final, key
    assert {"optimizer", "scheduler", "epoch"} <= set(latest) and latest["epoch"] == EPOCHS
    assert len(final["history"]["val_loss"]) == EPOCHS

    # the exported backbone = the EMA weights' backbone part, CPU tensors, nnssl plan beside it
    ema_backbone = {k[len("backbone."):]: v for k, v in final["network_weights"].items() if k.startswith("backbone.")}
    assert ema_backbone.keys() == export["network_weights"].keys()
    assert all(torch.equal(ema_backbone[k], v) and v.device.type == "cpu" for k, v in export["network_weights"].items())
    assert export["architecture_fingerprint"] == architecture_fingerprint(export["network_weights"])
    plan = export["nnssl_adaptation_plan"]
    assert plan["key_to_encoder"] == "encoder.stages" and plan["key_to_stem"] == "encoder.stem"
    assert "key_to_lpe" in plan and plan["pretrain_num_input_channels"] == 1
    assert list(plan["recommended_downstream_patchsize"]) == list(
        final["plans"]["configurations"][final["configuration"]]["patch_size"])
    assert isinstance(export["citations"], list) and export["citations"]

    # stock nnU-Net weight loading into a fresh downstream network (other class count: seg_layers skipped)
    network = build_network(final["plans"], final["configuration"], 1, num_output_channels=3)
    load_pretrained_weights(network, str(out / "nnunet_pretrained_weights.pth"), verbose=False)
    key = next(k for k in export["network_weights"] if ".seg_layers." not in k and k.endswith("weight"))
    assert torch.equal(network.state_dict()[key], export["network_weights"][key])

    model, info = load_mass_model(out)
    assert info["configuration"] == experiment_env["configuration"]
    assert torch.equal(model.state_dict()[f"backbone.{key}"], export["network_weights"][key])


def test_kill_and_resume_equals_uninterrupted(uninterrupted, experiment_env, tmp_path, run_cli, monkeypatch):
    import torch

    from mass_nnu.pretraining import trainer as trainer_module

    out = tmp_path / "resumed"
    original = trainer_module.MASSPretrainer.train_step
    calls = {"n": 0}

    def dies_in_second_epoch(self, batch):
        calls["n"] += 1
        if calls["n"] == 2:  # iterations per epoch = 1: the first step of epoch 1
            raise KeyboardInterrupt
        return original(self, batch)

    monkeypatch.setattr(trainer_module.MASSPretrainer, "train_step", dies_in_second_epoch)
    result = run_cli(*_args(experiment_env, out))
    assert result.exit_code == 130, result.output
    assert (out / "checkpoint_latest.pth").is_file() and not (out / "checkpoint_final.pth").exists()
    monkeypatch.setattr(trainer_module.MASSPretrainer, "train_step", original)

    result = run_cli(*_args(experiment_env, out), "--c")
    assert result.exit_code == 0, result.output
    assert "resumed from checkpoint_latest.pth at epoch 1" in result.output

    a = torch.load(uninterrupted / "checkpoint_final.pth", weights_only=True)
    b = torch.load(out / "checkpoint_final.pth", weights_only=True)
    assert a["network_weights"].keys() == b["network_weights"].keys()
    different = [k for k in a["network_weights"] if not torch.equal(a["network_weights"][k], b["network_weights"][k])]
    assert not different, f"{len(different)} tensors differ after resume, e.g. {different[:3]}"
    assert a["history"]["train_loss"] == b["history"]["train_loss"]
    assert a["history"]["val_loss"] == b["history"]["val_loss"]


def test_ddp_gloo_two_processes(experiment_env, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, **experiment_env["env"], "OMP_NUM_THREADS": "1", "nnUNet_n_proc_DA": "0"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "mass_nnu", *[str(a) for a in _args(experiment_env, out, epochs=1)]]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "world size 2" in proc.stdout
    assert (out / "checkpoint_final.pth").is_file() and (out / "nnunet_pretrained_weights.pth").is_file()
    assert len(list(out.glob("training_log_*.txt"))) == 1  # only rank 0 writes


def test_stock_nnunet_train_accepts_our_weights_file(uninterrupted, experiment_env, tmp_path):
    """`nnUNetv2_train <downstream> 3d_fullres <fold> -pretrained_weights <our export>` starts and trains; only
    nnU-Net's own loader touches the weights (our trainer is told to start from scratch)."""
    from mass_nnu.adapter.datasets import Dataset
    from mass_nnu.adapter.training import fold_cases
    from mass_nnu.workspace import register_trainer_shim

    register_trainer_shim()
    downstream = Dataset.resolve(experiment_env["downstream"])  # 4 cases: nnU-Net needs our splits_final.json
    fold_cases(downstream, downstream.plans(experiment_env["plans"]), "3d_fullres", 3)
    weights = uninterrupted / "nnunet_pretrained_weights.pth"
    env = {**os.environ, "MASS_PRETRAINED_WEIGHTS": "scratch", "nnUNet_n_proc_DA": "0", "nnUNet_def_n_proc": "1",
           "OMP_NUM_THREADS": "1"}
    cmd = [str(Path(sys.executable).parent / "nnUNetv2_train"), str(experiment_env["downstream"]), "3d_fullres", "3",
           "-p", experiment_env["plans"], "-tr", "nnUNetTrainerMASS_1epoch", "-pretrained_weights", str(weights),
           "-device", "cpu"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Loading pretrained weights from file" in proc.stdout
    assert "training from scratch" in proc.stdout  # our loader stood aside
    fold = Path(os.environ["nnUNet_results"]) / "Dataset712_PhantomSeg" / \
        f"nnUNetTrainerMASS_1epoch__{experiment_env['plans']}__3d_fullres" / "fold_3"
    import torch

    from mass_nnu.io import load_nnunet_checkpoint

    trained = load_nnunet_checkpoint(fold / "checkpoint_final.pth")["network_weights"]
    pretrained = torch.load(weights, weights_only=True)["network_weights"]
    key = "encoder.stem.convs.0.conv.weight"
    relative_change = (trained[key] - pretrained[key]).norm() / pretrained[key].norm()
    assert relative_change < 0.5, f"{key} moved {relative_change:.2f} of its norm: the weights were not loaded"
