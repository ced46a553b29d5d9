"""mass finetune and nnUNetTrainerMASS on the shared phantom experiment (711 pretrain plans -> 712 downstream).

The weights files here are made from freshly built networks with random weights (same keys as 'mass pretrain'
exports), so these tests check the plumbing, not the benefit of pretraining."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_TRAINER as TINY
from conftest import write_weights

os.environ.setdefault("nnUNet_def_n_proc", "1")  # no worker pools in validation and evaluation
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def encoder_equal(network, state: dict) -> bool:
    own = {k: v for k, v in network.state_dict().items() if k.startswith("encoder.")}
    return all(torch.equal(v.cpu(), state[k]) for k, v in own.items())


def test_budget_is_deterministic_nested_and_checked():
    from mass_nnu.errors import MassError
    from mass_nnu.finetuning.budget import select_budget

    cases = [f"case_{i:03d}" for i in range(10)]
    two = select_budget(cases, num_labeled=2, seed=3)
    assert two == select_budget(list(reversed(cases)), num_labeled=2, seed=3) and len(two) == 2
    assert set(two) <= set(select_budget(cases, num_labeled=5, seed=3))
    assert any(select_budget(cases, num_labeled=2, seed=s) != two for s in range(4, 10))
    assert len(select_budget(cases, fraction=0.25)) == 2 and select_budget(cases) == cases
    with pytest.raises(MassError, match="more than the 10"):
        select_budget(cases, num_labeled=11)


def test_transfer_adapts_input_channels_and_refuses_other_architectures(experiment_env):
    from mass_nnu.adapter.datasets import Dataset
    from mass_nnu.adapter.networks import build_network
    from mass_nnu.errors import MassError
    from mass_nnu.finetuning.trainer import transfer_weights

    plans = Dataset.resolve(experiment_env["pretrain"]).plans(experiment_env["plans"])
    source = build_network(plans, "3d_fullres", 1, 1).state_dict()
    target = build_network(plans, "3d_fullres", 2, 3)
    logged = []
    report = transfer_weights(target, source, "w.pth", lambda *a, **k: logged.append(a[0]), num_input_channels=2)
    assert report["adapted"] and all(".seg_layers." in k for k in report["skipped"])
    key = report["adapted"][0]
    assert torch.allclose(target.state_dict()[key][:, 0], source[key][:, 0] / 2)
    assert any("adapted" in line for line in logged)

    fresh = build_network(plans, "3d_fullres", 1, 3)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    report = transfer_weights(fresh, source, "w.pth", lambda *a, **k: None, 1, encoder_only=True)
    after = fresh.state_dict()
    decoder = [k for k in after if k.startswith("decoder.stages.") and k.endswith("conv.weight")]
    assert decoder and all(k in report["skipped"] and torch.equal(after[k], before[k]) for k in decoder)
    assert all(torch.equal(after[k], source[k]) for k in after if k.startswith("encoder."))
    smaller = json.loads(json.dumps(plans))
    arch = smaller["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
    arch["features_per_stage"] = [f // 2 for f in arch["features_per_stage"]]
    with pytest.raises(MassError, match="another architecture.*mass plan -d"):
        transfer_weights(build_network(smaller, "3d_fullres", 1, 3), source, "w.pth", print, 1)


def test_initialize_loads_encoder_and_scratch_twin_differs(weights, experiment_env):
    from mass_nnu.adapter.datasets import Dataset
    from mass_nnu.adapter.training import build_trainer
    from mass_nnu.finetuning.trainer import SCRATCH, TRAINERS

    path, state, _ = weights

    plans = Dataset.resolve(experiment_env["downstream"]).plans(experiment_env["plans"])
    networks = {}
    for mode in (str(path), SCRATCH):
        trainer = build_trainer(TRAINERS[TINY], plans, "3d_fullres", 0, Dataset.resolve(712).dataset_json(), "cpu", False)
        trainer.pretrained_weights = mode
        trainer.initialize()
        networks[mode] = trainer.network
    assert encoder_equal(networks[str(path)], state)
    assert not encoder_equal(networks[SCRATCH], state)
    assert trainer.warmup_epochs == 0 and trainer.num_epochs == 1 and trainer.mirroring is False
    assert trainer.num_iterations_per_epoch == 2 and trainer.num_val_iterations_per_epoch == 1


def interrupt_after_first_epoch(monkeypatch):
    """Make the next run save checkpoint_latest after epoch 0 and stop (like Ctrl-C) before epoch 1."""
    from mass_nnu.finetuning import trainer as trainer_module

    cls = trainer_module.nnUNetTrainerMASS
    original_start, original_epoch = cls.on_train_start, cls.on_train_epoch_start

    def start_saving_every_epoch(self):
        original_start(self)
        self.save_every = 1

    def stop_at_epoch_one(self):
        if self.current_epoch == 1:
            raise KeyboardInterrupt
        original_epoch(self)

    monkeypatch.setattr(cls, "on_train_start", start_saving_every_epoch)
    monkeypatch.setattr(cls, "on_train_epoch_start", stop_at_epoch_one)


def test_cli_budget_resume_scratch_twin_and_errors(weights, experiment_env, run_cli, tmp_path, monkeypatch):
    path, _, _ = weights
    args = ["finetune", "-d", 712, "-w", path, "--num-labeled", 2, "-tr", TINY, "--epochs", 2, "--no-mirroring"]
    fold = Path(os.environ["nnUNet_results"]) / "Dataset712_PhantomSeg" / \
        f"{TINY}__{experiment_env['plans']}_mass_n2s0_e2__3d_fullres" / "fold_0"
    interrupt_after_first_epoch(monkeypatch)
    first = run_cli(*args)
    assert first.exit_code == 130
    # quiet by default: nnU-Net's epoch log goes to the fold's log file, not to the screen
    assert "Epoch 0" not in first.output and "Epoch 0" in (fold / "mass_finetune_log.txt").read_text()
    monkeypatch.undo()
    result = run_cli(*args, "--c", "--verbose")
    assert result.exit_code == 0, result.output
    assert "resuming from" in result.output and "checkpoint_latest.pth" in result.output
    resumed = result.output.split("resuming from")[-1]
    assert "Epoch 0" not in resumed and "Epoch 1" in resumed
    assert "Dice (%)" in result.output and "liver" in result.output
    summary = json.loads((fold / "mass_finetune_results.json").read_text())
    budget = json.loads((fold / "label_budget.json").read_text())
    splits = json.loads((Path(os.environ["nnUNet_preprocessed"]) / "Dataset712_PhantomSeg" / "splits_final.json").read_text())
    assert len(budget["train"]) == 2 and set(budget["train"]) <= set(splits[0]["train"])
    assert budget["val"] == splits[0]["val"] and not set(budget["train"]) & set(splits[0]["val"])
    assert summary["scratch"] is False and summary["epochs"] == 2 and set(summary["dice"]) == {"validation", "test"}
    assert len(list((fold / "predictions_imagesTs").glob("*.nii.gz"))) == 2
    assert "MASS weights from" in "".join(p.read_text() for p in fold.glob("training_log_*.txt"))

    twin = run_cli("finetune", "-d", 712, "-w", path, "--num-labeled", 2, "-tr", TINY, "--no-mirroring", "--scratch")
    assert twin.exit_code == 0, twin.output
    twin_fold = Path(str(fold).replace("_mass_n2s0_e2", "_scratch_n2s0"))
    assert json.loads((twin_fold / "label_budget.json").read_text())["train"] == budget["train"]
    assert "training from scratch" in "".join(p.read_text() for p in twin_fold.glob("training_log_*.txt"))

    too_many = run_cli("finetune", "-d", 712, "-w", path, "--num-labeled", 99, "-tr", TINY)
    assert too_many.exit_code == 1 and "more than the" in too_many.output
    unknown = run_cli("finetune", "-d", 987, "-w", path)
    assert unknown.exit_code == 1 and "unknown dataset" in unknown.output
    other = tmp_path / "other_run" / "nnunet_pretrained_weights.pth"
    write_weights(weights[2], other, seed=1)
    reused = run_cli("finetune", "-d", 712, "-w", other, "--num-labeled", 2, "-tr", TINY, "--epochs", 2, "--no-mirroring")
    assert reused.exit_code == 1 and "trained from other weights" in reused.stderr
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(path.read_bytes()[:1000])
    bad = run_cli("finetune", "-d", 712, "-w", corrupt)
    assert bad.exit_code == 1 and "corrupt" in bad.output


def test_weights_of_another_architecture_give_one_clear_error(experiment_env, run_cli, tmp_path):
    from mass_nnu.adapter.datasets import Dataset

    plans = Dataset.resolve(experiment_env["pretrain"]).plans(experiment_env["plans"])
    arch = plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
    arch["features_per_stage"] = [f // 2 for f in arch["features_per_stage"]]
    write_weights(plans, tmp_path / "other.pth")
    result = run_cli("finetune", "-d", 712, "-w", tmp_path / "other.pth", "-tr", TINY)
    assert result.exit_code == 1
    assert "another architecture" in result.output and "--target-dataset" in result.output


def test_stock_nnunet_train_and_predict_find_the_trainer(weights, experiment_env, tmp_path):
    from mass_nnu.workspace import register_trainer_shim

    path, _, _ = weights
    register_trainer_shim()
    env = {**os.environ, "MASS_PRETRAINED_WEIGHTS": str(path), "nnUNet_n_proc_DA": "0", "nnUNet_def_n_proc": "1",
           "OMP_NUM_THREADS": "1"}
    plans = experiment_env["plans"]
    bin_dir = Path(sys.executable).parent
    train = subprocess.run([str(bin_dir / "nnUNetv2_train"), "712", "3d_fullres", "1", "-tr", TINY, "-p", plans,
                            "-device", "cpu"], env=env, capture_output=True, text=True, timeout=300)
    assert train.returncode == 0, train.stdout[-2000:] + train.stderr[-2000:]
    assert "MASS weights from" in train.stdout
    out = tmp_path / "stock_predictions"
    images = Path(os.environ["nnUNet_raw"]) / "Dataset712_PhantomSeg" / "imagesTs"
    predict = subprocess.run([str(bin_dir / "nnUNetv2_predict"), "-i", str(images), "-o", str(out), "-d", "712",
                              "-c", "3d_fullres", "-f", "1", "-tr", TINY, "-p", plans, "--disable_tta",
                              "-device", "cpu", "-npp", "1", "-nps", "1"], env=env, capture_output=True, text=True,
                             timeout=300)
    assert predict.returncode == 0, predict.stdout[-2000:] + predict.stderr[-2000:]
    assert len(list(out.glob("*.nii.gz"))) == 2
