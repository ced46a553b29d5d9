"""The adapter: the layer an nnU-Net upgrade breaks first. Plans load and transfer, dataset resolution, the
preprocessed case listing, trainer construction and nnU-Net's predictor and evaluation on a tiny dataset."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_TRAINER as TINY

os.environ.setdefault("nnUNet_def_n_proc", "1")
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_dataset_resolves_ids_names_files_and_results_folders(experiment_env):
    from nnunetv2.utilities.file_path_utilities import get_output_folder

    from mass_nnu.adapter.datasets import Dataset
    from mass_nnu.errors import MassError

    dataset = Dataset.resolve(712)
    assert Dataset.resolve("712") == Dataset.resolve("Dataset712_PhantomSeg") == dataset
    assert Dataset.resolve(dataset) is dataset and dataset.id == 712 and str(dataset) == "Dataset712_PhantomSeg"
    assert dataset.raw == Path(os.environ["nnUNet_raw"]) / dataset.name
    cases = dataset.cases()
    assert len(cases) == 4 and all(set(files) == {0} for files in cases.values())
    case = sorted(cases)[0]
    assert cases[case][0] == dataset.image_file(case) and dataset.image_file(case).is_file()
    assert dataset.label_file(case).is_file() and len(dataset.cases("Ts")) == 2
    assert dataset.dataset_json()["labels"]["background"] == 0 and dataset.file_ending == ".nii.gz"
    # the one results folder name is nnU-Net's own
    assert dataset.model_folder(TINY, "P", "3d_fullres") == Path(get_output_folder(712, TINY, "P", "3d_fullres"))
    with pytest.raises(MassError, match="unknown plans 'NoSuch'"):
        dataset.plans("NoSuch")
    with pytest.raises(MassError, match="unknown dataset '987'"):
        Dataset.resolve(987)


def test_transferred_plans_keep_the_architecture_and_take_the_datasets_normalisation(experiment_env):
    from mass_nnu.adapter.datasets import Dataset
    from mass_nnu.adapter.networks import build_network
    from mass_nnu.planning.transfer import transferred_plans

    target = Dataset.resolve(712).plans(experiment_env["plans"])
    moved = Dataset.resolve(711).plans(experiment_env["plans"])
    assert moved["plans_name"] == target["plans_name"] and moved["mass_transfer"]["architecture_from"] == target["dataset_name"]
    shapes = lambda plans: {k: v.shape for k, v in build_network(plans, "3d_fullres", 1, 1).state_dict().items()}  # noqa: E731
    assert shapes(moved) == shapes(target)
    intensity = {"normalization_schemes": ["ZScoreNormalization"], "use_mask_for_norm": [True],
                 "foreground_intensity_properties_per_channel": {"0": {"mean": 1.0}}}
    merged = transferred_plans(target, Dataset("Dataset999_Other"), "X", "SimpleITKIO", intensity)
    config = merged["configurations"]["3d_fullres"]
    assert merged["dataset_name"] == "Dataset999_Other" and merged["plans_name"] == "X"
    assert config["normalization_schemes"] == ["ZScoreNormalization"] and config["use_mask_for_norm"] == [True]
    assert config["patch_size"] == target["configurations"]["3d_fullres"]["patch_size"]
    assert target["configurations"]["3d_fullres"]["normalization_schemes"] != ["ZScoreNormalization"]  # a copy


def test_preprocessed_case_listing(experiment_env, tmp_path):
    from mass_nnu.adapter.datasets import Dataset
    from mass_nnu.adapter.preprocessed import data_folder, load_case, preprocessed_case_ids, require_case_ids
    from mass_nnu.errors import MassError

    dataset = Dataset.resolve(712)
    plans = dataset.plans(experiment_env["plans"])
    folder = data_folder(dataset, plans, "3d_fullres")
    assert preprocessed_case_ids(folder) == sorted(dataset.cases())
    data, properties = load_case(folder, preprocessed_case_ids(folder)[0])
    assert data.dtype == np.float32 and data.ndim == 4 and "bbox_used_for_cropping" in properties
    assert preprocessed_case_ids(tmp_path / "absent") == [] and preprocessed_case_ids(tmp_path) == []
    with pytest.raises(MassError, match="not preprocessed"):
        require_case_ids(tmp_path)


def test_trainer_construction_predictor_and_evaluation(experiment_env, tmp_path, capfd):
    """A trainer built as nnUNetv2_train builds it; its checkpoint predicted by nnU-Net's predictor, scored by
    nnU-Net's evaluation."""
    import torch

    from mass_nnu.adapter.datasets import Dataset
    from mass_nnu.adapter.training import build_trainer, evaluate_folder, fold_cases, predict_folder
    from mass_nnu.finetuning.trainer import TRAINERS
    from mass_nnu.io import save_json_atomic

    dataset = Dataset.resolve(712)
    plans = dataset.plans(experiment_env["plans"])
    train, val = fold_cases(dataset, plans, "3d_fullres", 0)
    assert train and val and not set(train) & set(val) and sorted(train + val) == sorted(dataset.cases())
    plans["plans_name"] = "AdapterTestPlans"
    trainer = build_trainer(TRAINERS[TINY], plans, "3d_fullres", 0, dataset.dataset_json(), "cpu", False)
    assert trainer.num_epochs == 1 and trainer.device == torch.device("cpu")
    assert Path(trainer.output_folder_base) == dataset.model_folder(TINY, "AdapterTestPlans", "3d_fullres")
    trainer.initialize()
    save_json_atomic(plans, Path(trainer.output_folder_base) / "plans.json")
    save_json_atomic(dataset.dataset_json(), Path(trainer.output_folder_base) / "dataset.json")
    trainer.save_checkpoint(str(Path(trainer.output_folder) / "checkpoint_final.pth"))

    out = tmp_path / "pred"
    capfd.readouterr()
    predict_folder(Path(trainer.output_folder_base), 0, dataset.raw / "imagesTs", out, "cpu", mirroring=False,
                   tile_progress=False)
    assert "100%|" not in capfd.readouterr().err  # quiet: no per-case tile bar
    predicted = sorted(p.name for p in out.glob("*.nii.gz"))
    assert predicted == sorted(f"{c}.nii.gz" for c in dataset.cases("Ts"))
    predict_folder(Path(trainer.output_folder_base), 0, dataset.raw / "imagesTs", out, "cpu", mirroring=False)
    assert "100%|" in capfd.readouterr().err
    summary = evaluate_folder(dataset.raw / "labelsTs", out, plans, dataset.dataset_json(), tmp_path / "summary.json")
    labels = {str(v) for k, v in dataset.dataset_json()["labels"].items() if k != "background"}
    assert {str(k) for k in summary["mean"]} == labels and json.loads((tmp_path / "summary.json").read_text())["mean"]
