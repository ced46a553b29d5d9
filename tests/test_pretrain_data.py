"""Pretraining data: proposals on the preprocessed grid, the two-view task sampler, and bad inputs."""
from __future__ import annotations

import shutil

import numpy as np
import pytest


def _sampler(experiment, max_tasks=13, patch=None):
    from mass_nnu.adapter.datasets import Dataset
    from mass_nnu.adapter.preprocessed import data_folder
    from mass_nnu.pretraining.sampling import CaseSource, SamplerSettings, TaskSampler, prepare_proposals

    plans = Dataset.resolve(experiment["pretrain"]).plans(experiment["plans"])
    folder, cases = prepare_proposals(experiment["pretrain"], plans, experiment["configuration"])
    data_dir = data_folder(Dataset.resolve(experiment["pretrain"]), plans, experiment["configuration"])
    patch = patch or plans["configurations"][experiment["configuration"]]["patch_size"]
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
    from mass_nnu.proposals.store import layer_table, open_proposals

    _, folder, data_dir, cases = _sampler(experiment_env)
    assert cases and folder.name.endswith("_proposals") and folder.parent == data_dir.parent
    for case in cases:
        data, _ = load_case(data_dir, case)
        store = open_proposals(folder / f"{case}.b2nd")
        assert store.layers.shape[1:] == data.shape[1:] and len(store.table) > 0
        assert np.array_equal(store.table, np.concatenate([layer_table(store.layers[i], i) for i in range(len(store))]))
    stamps = [(folder / f"{cases[0]}{ext}").stat().st_mtime_ns for ext in (".b2nd", ".json")]
    _sampler(experiment_env)
    assert [(folder / f"{cases[0]}{ext}").stat().st_mtime_ns for ext in (".b2nd", ".json")] == stamps  # made once


def unpacked(sample: dict) -> dict:
    """One sample with its masks unpacked as the trainer does on the device: (max_tasks, *P) bool."""
    from mass_nnu.pretraining.sampling import unpack_batch

    return {key: value[0] for key, value in unpack_batch({k: v[None] for k, v in sample.items()}).items()}


def test_sampler_views_and_tasks(experiment_env):
    import torch

    sampler, _, _, _ = _sampler(experiment_env)
    patch = sampler.patch_size
    rng = np.random.default_rng(0)
    for _ in range(4):
        packed = sampler.sample(rng)
        # masks travel packed as bits: 12 task masks in 2 uint8 channels; slots say which mask each task slot holds
        assert packed["ref_masks"].shape == (2, *patch) and packed["ref_masks"].dtype == torch.uint8
        assert packed["slots"].shape == (13,) and packed["slots"].dtype == torch.int64
        s = unpacked(packed)
        assert s["ref_image"].shape[1:] == patch and s["query_image"].shape == s["ref_image"].shape
        assert s["ref_masks"].shape == (13, *patch) and s["query_masks"].shape == (13, *patch)
        assert s["valid"].shape == (13,) and s["valid"].dtype == torch.bool
        assert s["ref_masks"].dtype == torch.bool and s["query_masks"].dtype == torch.bool  # float on the device
        assert s["ref_image"].dtype == torch.float32
        k = int(s["valid"].sum())
        assert 2 <= k <= 13 and bool(s["valid"][:k].all()) and not bool(s["valid"][k:].any())
        # exactly one all-ones "whole crop" task, the last real slot; padded slots are empty
        assert bool(s["ref_masks"][k - 1].all()) and bool(s["query_masks"][k - 1].all())
        assert s["ref_masks"][:k].flatten(1).any(1).all()  # every task is in the reference view (no zero token)
        assert not s["ref_masks"][k:].any() and not s["query_masks"][k:].any()
        # the anchor structure is in both views; the views differ (crop and augmentation)
        assert s["ref_masks"][0].sum() > 0 and s["query_masks"][0].sum() > 0
        assert not torch.equal(s["ref_image"], s["query_image"])


def test_sampler_respects_max_tasks(experiment_env):
    sampler, _, _, _ = _sampler(experiment_env, max_tasks=4)
    s = unpacked(sampler.sample(np.random.default_rng(1)))
    assert s["ref_masks"].shape[0] == 4 and int(s["valid"].sum()) <= 4


def test_view_centres_overlap_by_the_definition():
    """crop_overlap = |A ∩ B| / |A| of the two context crops (index boxes); here counted box by box."""
    from mass_nnu.pretraining.sampling import SamplerSettings, crop_box, crop_overlap, view_centres

    settings, patch = SamplerSettings(), (16, 24, 20)
    context = tuple(p + 2 * round(0.15 * p) for p in patch)
    shift = np.array([int(0.25 * p) for p in patch])
    rng, anchor, overlaps = np.random.default_rng(0), np.array([30, 5, 40]), []
    for _ in range(300):
        ref, query = view_centres(anchor, patch, context, settings, rng)
        (a0, a1), (b0, b1) = crop_box(ref, context), crop_box(query, context)
        inter = np.prod(np.clip(np.minimum(a1, b1) - np.maximum(a0, b0), 0, None))
        overlap = inter / np.prod(a1 - a0)
        assert overlap == pytest.approx(crop_overlap(ref, query, context)) and overlap >= 0.67
        assert (np.abs(ref - anchor) <= shift).all() and (np.abs(query - anchor) <= shift).all()  # both hold it
        overlaps.append(overlap)
    assert min(overlaps) < 0.75 and np.mean(overlaps) < 0.95  # the views do move apart


def test_small_patch_tasks_come_from_the_reference_crop(experiment_env):
    """Patch much smaller than the volume: tasks = proposals the reference view holds; masks = crops of the
    proposals; a task may leave the query view and then stays as an empty (valid) target."""
    from mass_nnu.pretraining.sampling import crop, crop_overlap
    from mass_nnu.proposals.store import read_proposals

    sampler, folder, _, _ = _sampler(experiment_env, patch=(12, 12, 12))
    s = sampler.settings
    rng = np.random.default_rng(3)
    for _ in range(3):
        drawn = sampler.draw(rng)
        layers = read_proposals(folder / f"{drawn['case']}.b2nd")[0]
        ref, query = drawn["centers"]
        assert crop_overlap(ref, query, sampler.context) >= s.min_overlap
        tasks = drawn["tasks"]
        assert 1 <= len(tasks) <= s.max_tasks - 1 and len({tuple(t[:2]) for t in tasks}) == len(tasks)
        assert layers[tasks[0][0]][tuple(drawn["anchor"])] == tasks[0][1]  # the anchor lies in task 0
        for view, center in zip(drawn["views"], drawn["centers"]):
            for mask, (layer, label) in zip(view[1], tasks[:, :2]):
                assert np.array_equal(mask, crop(layers[layer][None], center, sampler.context)[0] == label)
        inside = [(crop(layers[l][None], ref, sampler.patch_size)[0] == lab).sum() for l, lab in tasks[1:, :2]]
        assert all(n >= s.min_voxels for n in inside)

    # the rule for views: a task the reference view lacks is dropped, one the query view lacks stays (empty target)
    context = sampler.context
    ref_masks, query_masks = np.zeros((3, *context), np.uint8), np.zeros((3, *context), np.uint8)
    ref_masks[:2], query_masks[0] = 1, 1  # task 1 left the query crop, task 2 is not in the reference crop
    image = np.random.default_rng(0).normal(size=(1, *context)).astype(np.float32)
    sampler.draw = lambda rng: {"views": [(image, ref_masks), (image, query_masks)]}
    sample = unpacked(sampler.sample(rng))
    assert sample["valid"].tolist() == [True] * 3 + [False] * (s.max_tasks - 3)  # tasks 0, 1 and the whole crop
    assert sample["ref_masks"][1].any() and not sample["query_masks"][1].any() and sample["query_masks"][0].any()


class _CountingSampler:
    def batch(self, rng, batch_size):
        import torch

        return {"x": torch.as_tensor(rng.integers(2 ** 62, size=batch_size))}


def test_stream_is_the_same_for_any_workers_and_resumes_exactly():
    from mass_nnu.pretraining.sampling import BatchStream

    stream = BatchStream(_CountingSampler(), batch_size=2, iterations=3, seed=5, rank=1)

    def take(loader, n):
        it = iter(loader)
        return [next(it)["x"].tolist() for _ in range(n)]

    main = take(stream.loader(0, 0), 9)  # three epochs from one iterator
    assert take(stream.loader(0, 2), 9) == main  # two persistent workers, 3 batches per epoch: same order
    assert take(stream.loader(2, 0), 3) == main[6:]  # resumed at epoch 2
    assert len({tuple(b) for b in main}) == 9
    assert BatchStream(_CountingSampler(), 2, 3, seed=5, rank=0).batch(0, 0)["x"].tolist() != main[0]


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
    paths = sorted((private_copy["raw"] / "proposalsTr").glob("*.b2nd"))
    assert paths
    for path in paths:
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


def test_packed_masks_augment_like_separate_masks():
    """apply_view moves 8 masks per segmentation channel as bits; the result equals resampling each mask as its
    own channel (the previous code), with and without a spatial draw."""
    import torch

    from mass_nnu.adapter.augmentation import apply_view, pack_masks, view_transforms
    from mass_nnu.pretraining.sampling import unpack_task_masks

    def unpack_masks(packed, count):
        return unpack_task_masks(packed[None], torch.arange(count)[None])[0]

    rng = np.random.default_rng(0)
    masks = rng.random((13, 20, 22, 24)) < 0.3
    assert torch.equal(unpack_masks(torch.from_numpy(pack_masks(masks)).to(torch.uint8), 13), torch.from_numpy(masks))
    image = rng.normal(size=(1, 20, 22, 24)).astype(np.float32)
    transform = view_transforms((16, 16, 16), True)
    for seed in range(4):
        image_out, packed_out = apply_view(transform, image, masks, seed)
        masks_out = unpack_masks(packed_out, 13)
        with torch.random.fork_rng(devices=[]):
            np.random.seed(seed)
            torch.manual_seed(seed)
            ref = transform(image=torch.from_numpy(image), segmentation=torch.from_numpy(masks.astype(np.int16)))
        assert torch.equal(masks_out, ref["segmentation"] > 0) and torch.equal(image_out, ref["image"].float())


def test_unpack_task_masks_puts_every_slot_in_place():
    """Packed masks + slots -> the (B, T, *P) bool masks: each slot its own mask, the whole crop all ones, padding
    empty, per sample (two samples with different slot orders)."""
    import torch

    from mass_nnu.adapter.augmentation import pack_masks
    from mass_nnu.pretraining.sampling import EMPTY, WHOLE_CROP, unpack_task_masks

    rng = np.random.default_rng(5)
    masks = rng.random((2, 11, 3, 4, 5)) < 0.4  # 11 masks per sample: two packed channels
    packed = torch.stack([torch.from_numpy(pack_masks(m)).to(torch.uint8) for m in masks])
    slots = torch.tensor([[0, 3, 10, 9, WHOLE_CROP, EMPTY], [8, 1, WHOLE_CROP, EMPTY, EMPTY, EMPTY]])
    out = unpack_task_masks(packed, slots)
    assert out.shape == (2, 6, 3, 4, 5) and out.dtype == torch.bool
    for b in range(2):
        for j, slot in enumerate(slots[b].tolist()):
            expected = {WHOLE_CROP: np.ones((3, 4, 5), bool), EMPTY: np.zeros((3, 4, 5), bool)}.get(slot)
            assert np.array_equal(out[b, j].numpy(), masks[b, slot] if expected is None else expected)
