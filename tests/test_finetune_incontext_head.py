"""`mass finetune --head incontext`: the whole pretrained MASS model as nnU-Net's network, one in-context task per
class, task tokens encoded from the labelled training cases. Uses a real (tiny) `mass pretrain` folder."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_TRAINER as TINY

os.environ.setdefault("nnUNet_def_n_proc", "1")  # no worker pools in validation and evaluation
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def incontext_trainer(pretrained: Path, experiment_env):
    from mass_nnu.adapter.datasets import Dataset
    from mass_nnu.adapter.training import build_trainer, fold_cases
    from mass_nnu.finetuning.trainer import TRAINERS
    from mass_nnu.io import load_checkpoint

    plans = Dataset.resolve(experiment_env["downstream"]).plans(experiment_env["plans"])
    plans["mass_finetune"] = {"head": "incontext", "seed": 0,
                              "mass_config": load_checkpoint(pretrained / "checkpoint_final.pth")["mass_config"],
                              "label_budget": {"num_labeled": 1, "fraction": None, "seed": 0}}
    fold_cases(712, plans, "3d_fullres", 0)  # splits_final.json for 4 cases, as mass finetune writes it
    trainer = build_trainer(TRAINERS[TINY], plans, "3d_fullres", 0, Dataset.resolve(712).dataset_json(), "cpu", False)
    trainer.pretrained_weights = str(pretrained)
    trainer.initialize()
    return trainer


def test_network_starts_as_incontext_segmentation_of_the_labelled_case(uninterrupted, experiment_env):
    from mass_nnu.finetuning.incontext_head import InContextHeadNetwork
    from mass_nnu.model.artifacts import load_mass_model
    from mass_nnu.model.references import Reference, encode_tasks

    trainer = incontext_trainer(uninterrupted, experiment_env)
    network = trainer.network
    num_classes = trainer.label_manager.num_segmentation_heads
    assert isinstance(network, InContextHeadNetwork) and network.num_tasks == num_classes - 1 >= 2

    model, _ = load_mass_model(uninterrupted)
    own = network.mass.state_dict()
    assert all(torch.equal(value, own[key]) for key, value in model.state_dict().items()), "MASS weights not loaded"

    # tokens = what in-context segmentation encodes from the one labelled case, class by class
    train_keys, _ = trainer.do_split()
    assert len(train_keys) == 1
    data, seg, _, _ = trainer.dataset_class(trainer.preprocessed_dataset_folder, train_keys).load_case(train_keys[0])
    seg = np.asarray(seg[:])[0]
    labels = list(range(1, num_classes))
    assert all(np.any(seg == c) for c in labels)
    patch = tuple(trainer.configuration_manager.patch_size)
    reference = Reference("case", np.asarray(data[:], dtype=np.float32), seg, labels)
    tokens = encode_tasks(model, patch, [reference], labels)
    for parameter, expected in zip(network.task_tokens, tokens.scales):
        assert torch.allclose(parameter, expected, atol=1e-6)
    assert not torch.allclose(network.task_tokens[0][0, 0], network.task_tokens[0][0, 1])  # classes differ

    # before any step: background logit 0, class logits = in-context logits (argmax = "highest sigmoid > 0.5")
    x = torch.randn(1, 1, *patch, generator=torch.Generator().manual_seed(0))
    trainer.set_deep_supervision_enabled(False)
    with torch.no_grad():
        out = network.eval()(x)
        expected = model.eval().segment(x, tokens, deep_supervision=False)[0]
    assert out.shape == (1, num_classes, *patch)
    assert torch.all(out[:, 0] == 0) and torch.allclose(out[:, 1:], expected, atol=1e-4)

    # deep supervision outputs for nnU-Net's loss, and gradients reach the task tokens
    trainer.set_deep_supervision_enabled(True)
    outputs = network.train()(x)
    assert isinstance(outputs, list) and len(outputs) == len(model.head.outputs) and outputs[0].shape == out.shape
    sum(o[:, 1].mean() for o in outputs).backward()
    assert network.task_tokens[0].grad is not None and network.task_tokens[0].grad.abs().sum() > 0


def test_cli_incontext_head_trains_predicts_and_refuses_bad_combinations(uninterrupted, weights, experiment_env,
                                                                          run_cli):
    result = run_cli("finetune", "-d", 712, "-w", uninterrupted, "--num-labeled", 1, "-tr", TINY, "--no-mirroring")
    assert result.exit_code == 0, result.output
    assert "head incontext" in result.output and "Dice (%)" in result.output
    model_dir = Path(os.environ["nnUNet_results"]) / "Dataset712_PhantomSeg" / \
        f"{TINY}__{experiment_env['plans']}_mass_n1s0_hic__3d_fullres"
    plans = json.loads((model_dir / "plans.json").read_text())
    assert plans["mass_finetune"]["head"] == "incontext" and "num_token_scales" in plans["mass_finetune"]["mass_config"]
    fold = model_dir / "fold_0"
    # nnU-Net's predictor rebuilt the MASS network from the results folder's plans
    assert len(list((fold / "predictions_imagesTs").glob("*.nii.gz"))) == 2
    from mass_nnu.io import load_nnunet_checkpoint

    final = load_nnunet_checkpoint(fold / "checkpoint_final.pth")["network_weights"]
    assert any(k.startswith("task_tokens.") for k in final) and any(k.startswith("mass.conditioning.") for k in final)
    assert "task tokens of" in "".join(p.read_text() for p in fold.glob("training_log_*.txt"))
    # --c on a finished run reloads the checkpoint (tokens included) into a rebuilt network: same predictions
    import SimpleITK as sitk

    def predictions():
        return {p.name: sitk.GetArrayFromImage(sitk.ReadImage(str(p)))
                for p in sorted((fold / "predictions_imagesTs").glob("*.nii.gz"))}

    first = predictions()
    again = run_cli("finetune", "-d", 712, "-w", uninterrupted, "--num-labeled", 1, "-tr", TINY, "--no-mirroring",
                    "--c")
    assert again.exit_code == 0 and "resuming from" in again.output, again.output
    second = predictions()
    assert first.keys() == second.keys() and all(np.array_equal(first[k], second[k]) for k in first)

    path, _, _ = weights  # a bare backbone weights file: no MASS checkpoint beside it
    auto = run_cli("finetune", "-d", 712, "-w", path, "--num-labeled", 1, "-tr", TINY, "--no-mirroring", "--epochs", 1,
                   "--iters-per-epoch", 1)
    assert auto.exit_code == 0 and "head new" in auto.output
    for args, message in [(("-w", path, "--head", "incontext"), "needs the full MASS checkpoint"),
                          (("-w", uninterrupted, "--head", "linear"), "--head linear: choose"),
                          (("-w", uninterrupted, "--head", "incontext", "--transfer", "encoder"), "applies to --head new")]:
        bad = run_cli("finetune", "-d", 712, *args, "-tr", TINY)
        assert bad.exit_code == 1 and message in bad.output and "Traceback" not in bad.output, bad.output
