"""`mass pretrain` end to end: outputs, weight export into nnU-Net, kill + --c resume (exact), DDP on gloo."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import PRETRAIN_EPOCHS as EPOCHS
from conftest import pretrain_args as _args
from conftest import torch_threads


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
    assert list(plan["pretrain_plan"]["configurations"]) == [final["configuration"]]
    assert isinstance(export["citations"], list) and all(isinstance(c, dict) and c["title"] for c in export["citations"])

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
    with torch_threads(1):  # as the uninterrupted run
        result = run_cli(*_args(experiment_env, out))
    assert result.exit_code == 130, result.output
    assert (out / "checkpoint_latest.pth").is_file() and not (out / "checkpoint_final.pth").exists()
    monkeypatch.setattr(trainer_module.MASSPretrainer, "train_step", original)

    with torch_threads(1):
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


@pytest.mark.parametrize("checkpointing", ["--no-activation-checkpointing", "--activation-checkpointing"])
def test_ddp_gloo_two_processes(experiment_env, tmp_path, checkpointing):
    """Two ranks under nnU-Net's DDP, also with the reference's encoder pass recomputed in backward (which the
    memory check may turn on by itself)."""
    out = tmp_path / "ddp"
    env = {**os.environ, **experiment_env["env"], "OMP_NUM_THREADS": "1", "nnUNet_n_proc_DA": "0"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "mass_nnu", *[str(a) for a in _args(experiment_env, out, epochs=1)], checkpointing]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "world size 2" in proc.stdout
    assert ("reference encoder checkpointed" in proc.stdout) == (checkpointing == "--activation-checkpointing")
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


# -- units: collectives, validation Dice, nnssl export (no training run) ----------------------------------------

def _two_rank_env(monkeypatch, rank: int):
    import torch

    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("LOCAL_RANK", str(rank))
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "barrier", lambda **kw: calls.append(("barrier", kw)))
    return calls


class _Handed(Exception):
    pass


def test_collectives_use_the_ranks_device(monkeypatch):
    """NCCL refuses CPU tensors: a CUDA rank's collectives must hand over tensors on cuda:LOCAL_RANK. No GPU here:
    the 'meta' device stands in for the rank's accelerator, and all_reduce records what it was handed."""
    import torch

    from mass_nnu.pretraining.trainer import Distributed

    calls = _two_rank_env(monkeypatch, rank=1)
    dist = Distributed("cuda")
    assert dist.device == torch.device("cuda", 1) and dist.backend == "nccl"
    dist.barrier()
    assert calls == [("barrier", {"device_ids": [1]})]

    handed = []

    def all_reduce(tensor, *args, **kwargs):
        handed.append(tensor.device)
        raise _Handed  # a meta tensor holds no value to read back

    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    dist.device = torch.device("meta")
    with pytest.raises(_Handed):
        dist.mean(1.0)
    assert handed == [torch.device("meta")]

    gloo = Distributed("cpu")  # gloo: CPU tensors, values reduced
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda t, *a, **k: (handed.append(t.device), t.mul_(2)))
    assert gloo.backend == "gloo" and gloo.mean(3.0) == 3.0 and handed[-1] == torch.device("cpu")


def test_rank_zero_prepares_first(monkeypatch):
    from mass_nnu.pretraining.trainer import Distributed

    for rank, expected in ((0, ["work", "barrier"]), (1, ["barrier", "work"])):
        calls = _two_rank_env(monkeypatch, rank)
        with Distributed("cpu").main_first():
            calls.append(("work", {}))
        assert [c[0] for c in calls] == expected


def test_validation_dice_skips_empty_against_empty():
    from types import SimpleNamespace

    import torch

    from mass_nnu.model.loss import InContextLoss
    from mass_nnu.pretraining.trainer import MASSPretrainer

    target = torch.zeros(1, 4, 4, 4, 4, dtype=torch.bool)
    target[0, 0, :2] = True  # task 0: predicted half -> Dice 2/3
    target[:, 2] = True      # task 2 (last real slot): the all-ones task, not scored
    logits = torch.full(target.shape, -5.0)
    logits[0, 0, :1] = 5.0
    logits[:, 2] = 5.0       # task 1: empty target, empty prediction -> not scored (it was 1); slot 3 padded
    from mass_nnu.adapter.augmentation import pack_masks
    from mass_nnu.pretraining.sampling import EMPTY, WHOLE_CROP

    packed = torch.from_numpy(pack_masks(target[0, :2].numpy())).to(torch.uint8)[None]  # as the sampler sends them
    slots = torch.tensor([[0, 1, WHOLE_CROP, EMPTY]])
    batch = {"ref_image": torch.zeros(1, 1, 4, 4, 4), "ref_masks": packed, "query_image": torch.zeros(1, 1, 4, 4, 4),
             "query_masks": packed, "slots": slots, "valid": slots != EMPTY}
    fake = SimpleNamespace(val_batches=[batch], device=torch.device("cpu"), loss=InContextLoss(),
                           ema=lambda *args: [logits], _autocast=lambda: torch.autocast("cpu", enabled=False))
    _, dice = MASSPretrainer.validate(fake)
    assert dice == pytest.approx(2 / 3)


def test_nnssl_plan_holds_only_the_pretraining_configuration():
    from mass_nnu.model.artifacts import CITATIONS, adaptation_plan

    arch = {"network_class_name": "X", "arch_kwargs": {"n_stages": 2}, "_kw_requires_import": []}
    plans = {"plans_name": "P", "configurations": {
        "2d": {"patch_size": [64, 64], "batch_size": 12, "architecture": arch},
        "3d_fullres": {"patch_size": [32, 40, 40], "batch_size": 2, "spacing": [1, 1, 1], "architecture": arch},
        "3d_big": {"inherits_from": "3d_fullres", "patch_size": [64, 80, 80]}}}
    plan = adaptation_plan(plans, "3d_big", 1)
    configs = plan["pretrain_plan"]["configurations"]
    assert list(configs) == ["3d_big"]  # nnU-Net master reads the first configuration
    assert configs["3d_big"] == {"patch_size": [64, 80, 80], "batch_size": 2, "spacing": [1, 1, 1],
                                 "architecture": arch}  # inheritance resolved
    assert plan["recommended_downstream_patchsize"] == [64, 80, 80] and plan["pretrain_plan"]["plans_name"] == "P"
    assert list(plans["configurations"]) == ["2d", "3d_fullres", "3d_big"]  # the plans themselves are untouched
    assert all(isinstance(c, dict) and c["title"] and ("doi" in c or "url" in c) for c in CITATIONS)


def test_refuses_a_step_that_cannot_fit_in_one_line(experiment_env, tmp_path, run_cli, monkeypatch):
    """The memory check runs before the first step: one error line with the estimate and the ways out, exit 1,
    no checkpoint (the available memory is forced down to 64 MiB)."""
    from mass_nnu.pretraining import trainer

    monkeypatch.setattr(trainer, "available_memory", lambda device: 64 * 2 ** 20)
    out = tmp_path / "refused"
    result = run_cli(*_args(experiment_env, out))
    assert result.exit_code == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("mass: error: pretraining needs about")
    assert "GiB is available" in lines[0] and "smaller patch" in lines[0] and "--no-memory-check" in lines[0]
    assert "--activation-checkpointing" not in lines[0]  # by default already tried: it does not fit either
    assert not out.exists() or not list(out.glob("checkpoint_*.pth"))


def test_checkpointing_is_turned_on_when_only_it_makes_the_step_fit(experiment_env, tmp_path, run_cli, monkeypatch):
    """Available memory between the real estimates with and without activation checkpointing: by default the run
    turns checkpointing on and trains; with --no-activation-checkpointing it refuses and names the option."""
    import torch

    from mass_nnu.adapter.datasets import Dataset
    from mass_nnu.pretraining import trainer
    from mass_nnu.pretraining.memory import estimate_memory

    plans = Dataset.resolve(experiment_env["pretrain"]).plans(experiment_env["plans"])
    plain, lean = (estimate_memory(plans, "3d_fullres", 1, {}, 1, 13, checkpoint_reference=c).total
                   for c in (False, True))
    assert lean < plain
    monkeypatch.setattr(trainer, "available_memory", lambda device: (lean + plain) // 2)
    out = tmp_path / "auto"
    result = run_cli(*_args(experiment_env, out, epochs=1))
    assert result.exit_code == 0, result.output
    assert "turning it on" in result.output and "reference encoder checkpointed" in result.output
    saved = torch.load(out / "checkpoint_final.pth", weights_only=True)
    assert saved["settings"]["activation_checkpointing"] is True

    refused = tmp_path / "off"
    result = run_cli(*_args(experiment_env, refused, epochs=1), "--no-activation-checkpointing")
    assert result.exit_code == 1
    assert "--activation-checkpointing" in result.stderr.strip().splitlines()[-1]
    assert not refused.exists() or not list(refused.glob("checkpoint_*.pth"))
