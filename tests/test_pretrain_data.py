"""Pretraining data: proposals on the preprocessed grid, the two-view task sampler, and bad inputs."""
from __future__ import annotations

import shutil

import numpy as np
import pytest


def _sampler(experiment, max_tasks=13):
    from mass_nnu.adapter.datasets import Dataset
    from mass_nnu.adapter.preprocessed import data_folder
    from mass_nnu.pretraining.sampling import CaseSource, SamplerSettings, TaskSampler, prepare_proposals

    plans = Dataset.resolve(experiment["pretrain"]).plans(experiment["plans"])
    folder, cases = prepare_proposals(experiment["pretrain"], plans, experiment["configuration"])
    data_dir = data_folder(Dataset.resolve(experiment["pretrain"]), plans, experiment["configuration"])
    patch = plans["configurations"][experiment["configuration"]]["patch_size"]
    sources = [CaseSource(data_dir, folder, c) for c in cases]
    return TaskSampler(sources, patch, SamplerSettings(max_tasks=max_tasks)), folder, data_dir, cases


def test_to_preprocessed_grid_transposes_crops_and_resamples():
    from mass_nnu.adapter.preprocessed import to_preprocessed_grid

    raw = np.zeros((1, 6, 8, 10), np.uint16)
    raw[0, 2:4, 3:5, 4:8] = 7  # a box inside the crop
    properties = {"bbox_used_for_cropping": [[1, 5], [2, 6], [0, 8]]}
    # transpose (2, 0, 1): raw axes (z, y, x) -> (x, z, y); the bbox is in transposed order
    out = to_preprocessed_grid(raw, properties, (2, 0, 1), (16, 8, 4))
    assert out.shape == (1, 16, 8, 4) and out.dtype == np.uint16
    expected = raw.transpose(0, 3, 1, 2)[:, 1:5, 2:6, 0:8].repeat(4, 1).repeat(2, 2)[:, :, :, 1::2]  # centre mapping: 8 -> 4 keeps 1, 3, 5, 7
    assert np.array_equal(out, expected)


def test_preprocessed_proposals_match_images_and_are_reused(experiment_env):
    from mass_nnu.adapter.preprocessed import load_case

    _, folder, data_dir, cases = _sampler(experiment_env)
    assert cases and folder.name.endswith("_proposals") and folder.parent == data_dir.parent
    for case in cases:
        data, _ = load_case(data_dir, case)
        with np.load(folder / f"{case}.npz") as f:
            assert f["layers"].shape[1:] == data.shape[1:]
            assert len(f["stats"]) > 0
    stamp = (folder / f"{cases[0]}.npz").stat().st_mtime_ns
    _sampler(experiment_env)
    assert (folder / f"{cases[0]}.npz").stat().st_mtime_ns == stamp  # made once, then skipped


def test_sampler_views_and_tasks(experiment_env):
    import torch

    sampler, _, _, _ = _sampler(experiment_env)
    patch = sampler.patch_size
    rng = np.random.default_rng(0)
    for _ in range(4):
        s = sampler.sample(rng)
        assert s["ref_image"].shape[1:] == patch and s["query_image"].shape == s["ref_image"].shape
        assert s["ref_masks"].shape == (13, *patch) and s["query_masks"].shape == (13, *patch)
        assert s["valid"].shape == (13,) and s["valid"].dtype == torch.bool
        for masks in (s["ref_masks"], s["query_masks"]):
            assert set(torch.unique(masks).tolist()) <= {0.0, 1.0}
        k = int(s["valid"].sum())
        assert 2 <= k <= 13 and bool(s["valid"][:k].all()) and not bool(s["valid"][k:].any())
        # exactly one all-ones "whole crop" task, the last real slot; padded slots are empty
        assert bool(s["ref_masks"][k - 1].all()) and bool(s["query_masks"][k - 1].all())
        assert sum(bool(m.all()) for m in s["ref_masks"][:k]) >= 1
        assert not s["ref_masks"][k:].any() and not s["query_masks"][k:].any()
        # the anchor structure is in both views; the views differ (crop and augmentation)
        assert s["ref_masks"][0].sum() > 0 and s["query_masks"][0].sum() > 0
        assert not torch.equal(s["ref_image"], s["query_image"])


def test_sampler_respects_max_tasks(experiment_env):
    sampler, _, _, _ = _sampler(experiment_env, max_tasks=4)
    s = sampler.sample(np.random.default_rng(1))
    assert s["ref_masks"].shape[0] == 4 and int(s["valid"].sum()) <= 4


def _pretrain_args(exp):
    return ("pretrain", "-d", exp["pretrain"], "-p", exp["plans"], "--epochs", "1", "--iters-per-epoch", "1",
            "--val-iters", "1", "--batch-size", "1", "-np", "0")


def _drop_mapped_proposals(pre):
    for folder in pre.glob("*_proposals"):
        shutil.rmtree(folder)


def test_no_proposals_is_a_clear_error(private_copy, run_cli):
    shutil.rmtree(private_copy["raw"] / "proposalsTr")
    _drop_mapped_proposals(private_copy["pre"])
    result = run_cli(*_pretrain_args(private_copy))
    assert result.exit_code == 1, result.output
    assert "proposalsTr" in result.stderr and "mass propose -d" in result.stderr
    assert "Traceback" not in result.output


def test_proposals_for_another_image_are_refused(private_copy, run_cli):
    from mass_nnu.proposals.store import read_proposals, write_proposals

    _drop_mapped_proposals(private_copy["pre"])
    for path in sorted((private_copy["raw"] / "proposalsTr").glob("*.npz")):
        layers, geometry = read_proposals(path)
        geometry["shape"] = [geometry["shape"][0] + 2, *geometry["shape"][1:]]
        layers = np.concatenate([layers, layers[:, :2]], axis=1)
        write_proposals(path, layers, geometry, "test", {})
    result = run_cli(*_pretrain_args(private_copy))
    assert result.exit_code == 1, result.output
    assert "another image" in result.stderr and "Traceback" not in result.output


def test_unknown_plans_and_missing_preprocessing(private_copy, run_cli):
    args = list(_pretrain_args(private_copy))
    args[args.index("-p") + 1] = "NoSuchPlans"
    result = run_cli(*args)
    assert result.exit_code == 1 and "unknown plans 'NoSuchPlans'" in result.stderr

    for folder in private_copy["pre"].iterdir():
        if folder.is_dir():
            shutil.rmtree(folder)  # plans stay, preprocessed data is gone
    result = run_cli(*_pretrain_args(private_copy))
    assert result.exit_code == 1, result.output
    assert "mass plan" in result.stderr and "Traceback" not in result.output
