import json
import sys
import warnings

import numpy as np
import pytest
import SimpleITK as sitk


@pytest.fixture()
def phantom(nnunet_env):
    from mass_nnu.demo_data.phantom import write_phantom_dataset

    return write_phantom_dataset(720, "PropPh", 4, 0, shape=(28, 36, 36), seed=3)


def test_supervoxel_proposals_find_the_organs(phantom, run_cli):
    # the raw grid: the 1.5 mm phantom is only 28 × 36 × 36 voxels (a 2 mm working grid is tested below)
    result = run_cli("propose", "-d", "720", "--working-spacing", "0", "--eval-labels", phantom / "labelsTr")
    assert result.exit_code == 0, result.output
    assert "4 cases written" in result.stdout
    summary = json.loads((phantom / "proposalsTr" / "summary.json").read_text())
    assert 20 <= summary["proposals_per_case"] <= 500
    from mass_nnu.proposals.run import evaluate_recall
    from mass_nnu.proposals.store import read_proposals

    report = evaluate_recall(720, phantom / "labelsTr")
    assert report["recall"] >= 0.5, report["per_structure_mean_best_iou"]
    arrays = sorted((phantom / "proposalsTr").glob("*.b2nd"))
    assert len(arrays) == 4 and {p.name for p in (phantom / "proposalsTr").glob("*.json")} == \
        {p.name.replace(".b2nd", ".json") for p in arrays} | {"summary.json"}  # a table beside every array
    layers, geometry = read_proposals(next((phantom / "proposalsTr").glob("*.b2nd")))
    assert layers.dtype == np.uint16 and layers.ndim == 4 and list(layers.shape[1:]) == geometry["shape"]


def test_deterministic_and_resumable(phantom):
    from mass_nnu.proposals.run import propose_dataset
    from mass_nnu.proposals.store import open_proposals, read_proposals

    first = propose_dataset(720, shard="0/2")
    assert first["cases_done"] == 2
    files = sorted((phantom / "proposalsTr").glob("*.b2nd"))
    assert len(files) == 2
    before = {p.name: read_proposals(p)[0] for p in files}
    tables = {p.name: open_proposals(p).table for p in files}
    assert [first["per_case"][p.name[:-5]]["proposals"] for p in files] == [len(tables[p.name]) for p in files]
    again = propose_dataset(720, shard="0/2")
    assert again["cases_done"] == 0 and again["cases_skipped"] == 2
    for p in files:
        p.with_name(p.name.replace(".b2nd", ".json")).unlink()  # an array without its table is not done
    assert propose_dataset(720, shard="0/2")["cases_done"] == 2
    assert all(np.array_equal(read_proposals(phantom / "proposalsTr" / k)[0], v) for k, v in before.items())
    assert all(np.array_equal(open_proposals(phantom / "proposalsTr" / k).table, v) for k, v in tables.items())


def test_out_id_writes_a_new_dataset(phantom, run_cli):
    from mass_nnu.adapter.datasets import Dataset
    from mass_nnu.proposals.run import propose_dataset

    result = run_cli("propose", "-d", "720", "--shard", "0/4", "--out-id", "730")
    assert result.exit_code == 0, result.output
    out = Dataset.resolve(730).raw
    assert out.name == "Dataset730_PropPh" and not (phantom / "proposalsTr").exists()
    assert sorted(p.name for p in (out / "imagesTr").iterdir()) == sorted(p.name for p in (phantom / "imagesTr").iterdir())
    tables = [p for p in (out / "proposalsTr").glob("*.json") if p.name != "summary.json"]
    assert len(list((out / "proposalsTr").glob("*.b2nd"))) == len(tables) == 1
    # an existing output dataset is reused: the rerun skips the finished case
    assert propose_dataset(720, shard="0/4", out_id=730)["cases_skipped"] == 1
    assert run_cli("propose", "-d", "720", "--out-id", "x1").exit_code == 1


def test_shape_rules_can_be_turned_off(phantom, run_cli):
    """--no-half-splits --core-depth 0 (the label-shaped rules off, docs/proposals.md) reach the backend: recorded
    in the case's table and fewer proposals than with the defaults on the same case."""
    from mass_nnu.adapter.datasets import Dataset
    from mass_nnu.proposals.store import open_proposals

    assert run_cli("propose", "-d", "720", "--shard", "0/4", "--out-id", "731").exit_code == 0
    result = run_cli("propose", "-d", "720", "--shard", "0/4", "--out-id", "732", "--no-half-splits", "--core-depth", "0")
    assert result.exit_code == 0, result.output
    on, off = (open_proposals(next((Dataset.resolve(i).raw / "proposalsTr").glob("*.b2nd"))) for i in (731, 732))
    assert (on.params["half_splits"], on.params["core_depth_mm"]) == (True, 10.0)
    assert (off.params["half_splits"], off.params["core_depth_mm"]) == (False, 0.0)
    assert 0 < len(off.table) < len(on.table)
    assert run_cli("propose", "-d", "720", "--core-depth", "-1").exit_code != 0


def test_coarse_slic_scales_run_on_a_coarser_grid():
    """A scale with large supervoxels runs on a coarser grid (capped at slic_max_spacing_mm, only for a factor
    ≥ slic_min_factor) and comes back on the working grid with labels only inside the foreground."""
    import dataclasses

    from mass_nnu.proposals.supervoxel import SupervoxelSettings, slic_layers, slic_spacing

    s = SupervoxelSettings()
    foreground = np.zeros((40, 48, 48), bool)
    foreground[4:36, 6:42, 6:42] = True  # 41 472 voxels at 1 mm
    assert slic_spacing(foreground, (1.0, 1.0, 1.0), 12, s) == pytest.approx((41472 / 12) ** (1 / 3) / 8)  # 1.89 mm
    assert slic_spacing(foreground, (1.0, 1.0, 1.0), 120, s) is None  # edge 7 voxels: stays on the working grid
    assert slic_spacing(foreground, (1.0, 1.0, 1.0), 1, s) == 4.0  # capped
    assert slic_spacing(foreground, (1.0, 1.0, 1.0), 30, s) == pytest.approx((41472 / 30) ** (1 / 3) / 8)  # 1.39
    assert slic_spacing(foreground, (1.0, 1.0, 1.0), 30, dataclasses.replace(s, slic_min_factor=1.5)) is None
    assert slic_spacing(foreground, (1.0, 1.0, 1.0), 12, dataclasses.replace(s, slic_max_spacing_mm=0)) is None
    rng = np.random.default_rng(0)
    image = np.where(foreground, 0.5 + 0.1 * rng.standard_normal(foreground.shape), 0).astype(np.float32)
    image[4:36, 6:24] += 0.3
    coarse, fine = slic_layers(image, foreground, (1.0, 1.0, 1.0), dataclasses.replace(s, slic_segments=(12, 120)))
    for layer in (coarse, fine):
        assert layer.shape == foreground.shape and not layer[~foreground].any()
        assert np.count_nonzero(layer[foreground]) > 0.95 * foreground.sum()
    assert 4 <= len(np.unique(coarse[foreground])) <= 30 and len(np.unique(fine[foreground])) > 40


def test_shards_partition_the_cases():
    from mass_nnu.errors import MassError
    from mass_nnu.proposals.run import parse_shard, shard_cases

    cases = [f"c{i}" for i in range(7)]
    parts = [shard_cases(cases, parse_shard(f"{i}/3")) for i in range(3)]
    assert sorted(sum(parts, [])) == sorted(cases)
    assert not set(parts[0]) & set(parts[1])
    for bad in ("3/3", "a/b", "1", "-1/2"):
        with pytest.raises(MassError):
            parse_shard(bad)


def test_constant_image_warns_without_crash(nnunet_env):
    from mass_nnu.demo_data.writer import new_dataset, write_dataset_json, write_image
    from mass_nnu.proposals.run import propose_dataset

    with new_dataset(721, "Flat") as folder:
        write_image(np.full((20, 24, 24), 7.0), (2, 2, 2), path=folder / "imagesTr" / "flat_000_0000.nii.gz")
        write_dataset_json(folder, "CT", {"background": 0, "foreground": 1}, 1, "x", "Flat")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = propose_dataset(721)
    assert summary["cases_empty"] == ["flat_000"]
    assert any("zero proposals" in str(w.message) for w in caught)


def test_eval_needs_matching_labels(phantom, run_cli, tmp_path):
    assert run_cli("propose", "-d", "720", "--shard", "1/2").exit_code == 0
    empty = tmp_path / "labels"
    empty.mkdir()
    result = run_cli("propose", "-d", "720", "--shard", "1/2", "--eval-labels", empty)
    assert result.exit_code == 1
    assert "no label for image" in result.stderr and "Traceback" not in result.output


def test_unknown_dataset_and_bad_backend(nnunet_env, run_cli, phantom):
    result = run_cli("propose", "-d", "998")
    assert result.exit_code == 1 and "unknown dataset '998'" in result.stderr
    result = run_cli("propose", "-d", "720", "--backend", "magic")
    assert result.exit_code == 1 and "choose one of supervoxel, sam2" in result.stderr


def test_sam2_errors(phantom, run_cli, tmp_path, monkeypatch):
    result = run_cli("propose", "-d", "720", "--backend", "sam2")
    assert result.exit_code == 1 and "--sam2-checkpoint" in result.stderr
    result = run_cli("propose", "-d", "720", "--backend", "sam2", "--sam2-checkpoint", tmp_path / "none.pt",
                     "--sam2-config", "configs/sam2.1/sam2.1_hiera_l.yaml")
    assert result.exit_code == 1 and "none.pt: SAM 2 checkpoint not found" in result.stderr
    (tmp_path / "w.pt").write_bytes(b"x")
    monkeypatch.setitem(sys.modules, "sam2", None)  # simulate a missing package
    monkeypatch.setitem(sys.modules, "sam2.build_sam", None)
    result = run_cli("propose", "-d", "720", "--backend", "sam2", "--sam2-checkpoint", tmp_path / "w.pt",
                     "--sam2-config", "c.yaml")
    assert result.exit_code == 1 and "pip install 'mass-nnu[sam2]'" in result.stderr


class ThresholdMaskGenerator:
    """Stands in for SAM2AutomaticMaskGenerator: connected components of bright regions of a frame."""

    def generate(self, rgb):
        from scipy import ndimage

        labels, n = ndimage.label(rgb[..., 0] > 215)
        return [{"segmentation": labels == i, "predicted_iou": 0.9} for i in range(1, n + 1)]


class IntensityVideoPredictor:
    """Stands in for SAM2VideoPredictor: tracks an object to neighbouring frames by overlap with bright voxels,
    mirroring the real call sequence (init_state, add_new_mask, propagate_in_video both ways, reset_state)."""

    def __init__(self):
        self.calls = []

    def init_state(self, video_path):
        from pathlib import Path

        from PIL import Image

        frames = [np.asarray(Image.open(p))[..., 0] for p in sorted(Path(video_path).glob("*.jpg"))]
        self.calls.append("init")
        return {"frames": np.stack(frames), "masks": {}}

    def add_new_mask(self, state, frame_idx, obj_id, mask):
        state["masks"][obj_id] = (frame_idx, mask)

    def propagate_in_video(self, state, start_frame_idx, reverse=False):
        self.calls.append("reverse" if reverse else "forward")
        frames = state["frames"]
        order = range(start_frame_idx, -1, -1) if reverse else range(start_frame_idx, len(frames))
        current = {k: m for k, (_, m) in state["masks"].items()}
        for f in order:
            ids = sorted(current)
            logits = []
            for k in ids:
                current[k] = current[k] & (frames[f] > 215)
                logits.append(np.where(current[k], 1.0, -1.0)[None])
            yield f, ids, np.stack(logits)

    def reset_state(self, state):
        self.calls.append("reset")


def test_sam2_pipeline_with_stand_in_predictor(phantom):
    from mass_nnu.proposals.sam2_backend import Sam2Models, Sam2Settings, sam2_proposals, seed_slices

    image = sitk.GetArrayFromImage(sitk.ReadImage(str(next((phantom / "imagesTr").glob("*.nii.gz")))))
    video = IntensityVideoPredictor()
    settings = Sam2Settings(min_seeds=3, seed_every_mm=100)
    layers = sam2_proposals(image, (1.5, 1.5, 1.5), Sam2Models(ThresholdMaskGenerator(), video), settings)
    assert layers.ndim == 4 and layers.shape[1:] == image.shape and layers.max() > 0
    # frames are loaded once per volume; each seed is propagated both ways, then the state is reset
    assert video.calls.count("init") == 1
    assert video.calls.count("forward") == video.calls.count("reverse") == video.calls.count("reset") >= 1
    # masks are 3D: propagated beyond their seed slice
    assert max(int((layer > 0).any(axis=(1, 2)).sum()) for layer in layers) > 5
    assert seed_slices(np.ones((40, 4, 4), bool), 0, 1.0, 30.0, 10) == [int(round(v)) for v in np.linspace(0, 39, 10)]


def test_working_grid_and_mapping_back():
    from mass_nnu.grids import resample_nearest
    from mass_nnu.proposals.resample import to_working_grid, working_grid

    # only downsampled (z at 2.5 mm stays), same field of view (n * spacing kept)
    shape, spacing = working_grid((10, 30, 31), (2.5, 0.8, 0.8), 2.0)
    assert shape == (10, 12, 12) and np.allclose(np.multiply(shape, spacing), (25, 24, 24.8))
    assert working_grid((10, 30, 31), (2.5, 0.8, 0.8), None) == ((10, 30, 31), (2.5, 0.8, 0.8))
    # a linear ramp stays the ramp at the working voxel centres (no half-voxel shift)
    ramp = np.broadcast_to(np.arange(40, dtype=np.float32)[None, None], (2, 3, 40))
    small, sp = to_working_grid(ramp, (4, 4, 1), 4.0)
    assert small.shape == (2, 3, 10) and sp == (4.0, 4.0, 4.0)
    assert np.allclose(small[0, 0, 1:-1], np.arange(1, 9) * 4 + 1.5, atol=1e-3)  # inside (edges: nearest padding)
    # interpolated slice by slice: the same float32 numbers as the whole-array formula
    from mass_nnu.proposals.resample import _linear_axis
    noise = np.random.default_rng(0).normal(0, 100, (13, 5, 7)).astype(np.float32)
    for axis in range(3):
        for size in (1, 3, 6, 13):
            n = noise.shape[axis]
            coords = np.clip((np.arange(size) + 0.5) * n / size - 0.5, 0, n - 1)
            lo = np.floor(coords).astype(np.intp)
            hi = np.minimum(lo + 1, n - 1)
            w = (coords - lo).astype(np.float32).reshape([size if a == axis else 1 for a in range(3)])
            expected = np.take(noise, lo, axis=axis) * (1 - w) + np.take(noise, hi, axis=axis) * w
            assert np.array_equal(_linear_axis(noise, axis, size), expected)
    # back to the raw grid: raw voxel i takes the working voxel whose centre is nearest
    layers = np.arange(10, dtype=np.uint16)[None, None, None].repeat(2, 1).repeat(3, 2)
    raw = resample_nearest(layers, (2, 3, 40))
    assert raw.shape == (1, 2, 3, 40) and raw.dtype == np.uint16
    assert raw[0, 0, 0].tolist() == [i // 4 for i in range(40)]


def test_working_spacing_option_writes_raw_grid_layers(phantom, run_cli):
    from mass_nnu.proposals.store import open_proposals, read_proposals

    result = run_cli("propose", "-d", "720", "--shard", "0/4", "--working-spacing", "3")
    assert result.exit_code == 0, result.output
    path = next((phantom / "proposalsTr").glob("*.b2nd"))
    layers, geometry = read_proposals(path)
    assert list(layers.shape[1:]) == geometry["shape"] and len(layers) > 0
    assert open_proposals(path).params["working_spacing_mm"] == 3.0
    # made on the 3 mm grid (factor 2 of 1.5 mm): constant on 2×2×2 blocks of the raw grid
    assert np.array_equal(layers[:, ::2, ::2, ::2], layers[:, 1::2, 1::2, 1::2])


def _brute_force_dedupe(masks, iou):
    kept = []
    for i, m in enumerate(masks):
        if all((m & masks[j]).sum() / (m | masks[j]).sum() < iou for j in kept):
            kept.append(i)
    return kept


def test_bounding_box_dedupe_keeps_exactly_the_non_duplicates():
    from mass_nnu.proposals.filtering import Deduplicator, crop_proposal

    rng = np.random.default_rng(0)
    masks = []
    for _ in range(30):
        m = np.zeros((20, 24, 24), bool)
        lo = rng.integers(0, 12, 3)
        m[tuple(slice(a, a + b) for a, b in zip(lo, rng.integers(3, 9, 3)))] = True
        masks.append(m)
        if rng.random() < 0.5:  # a near-duplicate: one voxel more or fewer, or a 1-voxel shift
            d = m.copy()
            d[tuple(np.argwhere(m)[0])] = False
            masks.append(d if rng.random() < 0.5 else np.roll(m, 1, axis=int(rng.integers(3))))
    dedup = Deduplicator(0.95)
    kept = [i for i, m in enumerate(masks) if dedup.add(crop_proposal(m))]
    assert kept == _brute_force_dedupe(masks, 0.95) and len(kept) < len(masks)
    n = len(masks)
    assert dedup.compared < n * (n - 1) / 10  # the box pre-filter skipped most pairs


def test_cropped_masks_pack_into_non_overlapping_layers():
    from mass_nnu.proposals.filtering import crop_proposal
    from mass_nnu.proposals.sam2_backend import pack_proposals

    shape = (12, 14, 16)
    a, b, c = (np.zeros(shape, bool) for _ in range(3))
    a[2:8, 2:9, 3:10] = True
    b[5:10, 6:12, 8:14] = True   # overlaps a
    c[9:12, 0:3, 0:4] = True     # disjoint from a
    layers = pack_proposals([crop_proposal(m) for m in (a, b, c)], shape)
    assert layers.shape == (2, *shape) and layers.dtype == np.uint16
    found = [(l, v) for l, layer in enumerate(layers) for v in np.unique(layer)[1:]]
    assert len(found) == 3
    for m in (a, b, c):  # every mask is exactly one (layer, label) pair
        assert sum(np.array_equal(layers[l] == v, m) for l, v in found) == 1


def test_components_split_classes_and_never_wrap_uint16():
    from mass_nnu.proposals.supervoxel import components

    classes = np.zeros((3, 6, 8), np.uint16)
    classes[:, :, :4], classes[:, :, 4:] = 1, 2      # two touching classes: two components
    classes[1, 2, 6] = 1                              # an island of class 1 inside class 2
    out = components(classes)
    assert len(np.unique(out[out > 0])) == 3 and out[1, 2, 6] != out[0, 0, 0] != out[0, 0, 7]
    many = np.zeros((5, 256, 512), np.uint16)
    many[::2, ::2, ::2] = 1                           # 3 × 128 × 256 isolated voxels: more than 65535 labels
    many[4, 100:104, 0:8] = 2                         # plus one larger component (4 × 8 voxels)
    out = components(many)
    assert out.dtype == np.uint16 and len(np.unique(out)) - 1 == 65535
    block = out[4, 100:104, 0:8]
    assert (block > 0).all() and len(np.unique(block)) == 1 and np.count_nonzero(out == block[0, 0]) == 32


def test_components_number_like_skimage_label():
    """The proposals' order (which of two duplicates survives) depends on the numbering: cc3d's must be skimage's."""
    from scipy import ndimage
    from skimage.measure import label

    from mass_nnu.proposals.supervoxel import components

    rng = np.random.default_rng(3)
    classes = ndimage.zoom(rng.integers(0, 4, (6, 7, 8)), 4, order=0).astype(np.uint16)  # blocky classes, some 0
    classes[rng.random(classes.shape) < 0.05] = 2  # speckle: many one-voxel components
    expected = label(classes, background=0, connectivity=1)
    assert expected.max() > 100
    assert np.array_equal(components(classes), expected)


def test_filter_layer_applies_every_rule_to_every_label():
    """The vectorised filter keeps exactly the labels that ``passes`` accepts one by one, with their boxes and sizes."""
    from scipy import ndimage

    from mass_nnu.proposals.filtering import FilterSettings, filter_layer, passes

    rng = np.random.default_rng(4)
    layer = ndimage.zoom(rng.integers(0, 60, (5, 6, 6)), (6, 5, 5), order=0).astype(np.uint16)
    layer[layer == 7] = 0                                   # a missing label value
    layer[2:4, :, 10] = 61                                  # a thin sheet (fails the fill rule at some sizes)
    foreground = np.ones(layer.shape, bool)
    foreground[:, :4] = False                               # labels partly outside the foreground
    settings = FilterSettings(min_volume_mm3=30.0, min_fill=0.3, min_inside=0.9)
    labels, boxes, sizes = filter_layer(layer, foreground, 1.0, settings)
    fg_volume = int(foreground.sum())
    expected = []
    for value, box in enumerate(ndimage.find_objects(layer), start=1):
        if box is None:
            continue
        mask = layer == value
        box_volume = int(np.prod([s.stop - s.start for s in box]))
        if passes(int(mask.sum()), int((mask & foreground).sum()), box_volume, fg_volume, 1.0, settings):
            expected.append((value, box, int(mask.sum())))
    assert 0 < len(expected) < len(np.unique(layer)) - 1     # some kept, some dropped
    assert [v for v, _, _ in expected] == list(labels)
    assert [b for _, b, _ in expected] == boxes and [n for _, _, n in expected] == list(sizes)
    inside = np.where(foreground, layer, 0).astype(np.uint16)  # every label inside: the same, without the count
    fast, slow = (filter_layer(inside, foreground, 1.0, settings, flag) for flag in (True, False))
    assert np.array_equal(fast[0], slow[0]) and fast[1] == slow[1] and np.array_equal(fast[2], slow[2])


def test_finalize_relabels_the_kept_proposals_into_the_volume():
    """Kept labels are numbered 1..n per layer in label order, duplicates (IoU ≥ dedupe_iou with an earlier layer)
    and filtered labels vanish, a layer without a kept proposal is dropped, and the crop lands at its box."""
    from mass_nnu.proposals.filtering import FilterSettings, finalize

    first, second, empty = (np.zeros((4, 6, 6), np.uint16) for _ in range(3))
    first[:, :3, :3], first[:, 3:, 3:], first[0, 5, 0] = 3, 5, 8   # 8: one voxel, below the minimum volume
    second[:, :3, :3], second[:, 3:, :3] = 2, 9                    # 2 duplicates first's 3
    empty[0, 5, 0] = 4
    settings = FilterSettings(min_volume_mm3=2.0, min_fraction=0.0, max_fraction=1.0, min_fill=0.0, min_inside=0.0)
    box = (slice(1, 5), slice(2, 8), slice(0, 6))
    out = finalize(iter([first, second, empty]), np.ones(first.shape, bool), (1.0, 1.0, 1.0), settings, box, (6, 9, 7))
    assert out.shape == (2, 6, 9, 7) and out.dtype == np.uint16
    expected = np.zeros((2, 4, 6, 6), np.uint16)
    expected[0][first == 3], expected[0][first == 5], expected[1][second == 9] = 1, 2, 1
    assert np.array_equal(out[(slice(None), *box)], expected) and out.sum() == expected.sum()


def test_filter_layer_on_a_tiny_crop_with_large_label_values():
    """Label values above the crop's voxel count (cc3d.statistics refuses them) still filter like any others."""
    from mass_nnu.proposals.filtering import FilterSettings, filter_layer

    layer = np.zeros((2, 3, 4), np.uint16)
    layer[0] = 500                     # 12 voxels, label value 500 > 24 voxels
    layer[1, :, :2] = 7                # 6 voxels
    settings = FilterSettings(min_volume_mm3=8.0, min_fraction=0.0, max_fraction=1.0, min_fill=0.0, min_inside=0.0)
    labels, boxes, sizes = filter_layer(layer, np.ones(layer.shape, bool), 1.0, settings)
    assert list(labels) == [500] and list(sizes) == [12] and boxes == [(slice(0, 1), slice(0, 3), slice(0, 4))]


def test_fill_holes_equals_scipy():
    """The labelling fill equals ``ndimage.binary_fill_holes`` (6-connected background joined to the border)."""
    from scipy import ndimage

    from mass_nnu.proposals.filtering import fill_holes

    rng = np.random.default_rng(5)
    for _ in range(40):
        shape = tuple(rng.integers(1, 16, 3))
        mask = ndimage.gaussian_filter(rng.random(shape), rng.uniform(0.5, 2)) > rng.uniform(0.3, 0.7)
        assert np.array_equal(fill_holes(mask), ndimage.binary_fill_holes(mask))
    shell = np.ones((5, 5, 5), bool)
    shell[2, 2, 2] = False
    assert fill_holes(shell).all() and not fill_holes(np.zeros((3, 3, 3), bool)).any()


def test_supervoxel_table_equals_the_table_of_the_mapped_layers():
    """``with_table``: the same layers, and the table the writer would count on them mapped to the raw grid."""
    from mass_nnu.grids import resample_nearest
    from mass_nnu.proposals.store import layer_table
    from mass_nnu.proposals.supervoxel import supervoxel_proposals

    rng = np.random.default_rng(6)
    z, y, x = np.ogrid[:33, :50, :47]
    image = 100.0 * (((z - 16) / 14) ** 2 + ((y - 25) / 22) ** 2 + ((x - 23) / 20) ** 2 < 1)
    image += 80.0 * (((z - 12) / 6) ** 2 + ((y - 20) / 8) ** 2 + ((x - 16) / 7) ** 2 < 1)
    image += 160.0 * (((z - 20) / 5) ** 2 + ((y - 32) / 6) ** 2 + ((x - 30) / 6) ** 2 < 1)
    image = (image + rng.normal(0, 5, image.shape)).astype(np.float32)
    layers, table = supervoxel_proposals(image, (1.3, 0.9, 0.95), with_table=True)
    assert np.array_equal(layers, supervoxel_proposals(image, (1.3, 0.9, 0.95))) and len(table) > 3
    assert layers.shape[1:] != image.shape
    expected = np.concatenate([layer_table(resample_nearest(layer, image.shape), i) for i, layer in enumerate(layers)])
    assert np.array_equal(table, expected)


def test_intensity_classes_cluster_on_one_thread(monkeypatch):
    """k-means runs with one OpenMP thread: its reduction order otherwise made the proposals of the same image
    differ between machines with different core counts (seen on the MNI sets: 1 and 2 threads, other hashes)."""
    from threadpoolctl import threadpool_info

    from mass_nnu.proposals import supervoxel

    threads = []

    class Recording(supervoxel.KMeans):
        def fit(self, *args, **kwargs):
            threads.extend(i["num_threads"] for i in threadpool_info() if i["user_api"] == "openmp")
            return super().fit(*args, **kwargs)

    monkeypatch.setattr(supervoxel, "KMeans", Recording)
    image = np.random.default_rng(0).random((6, 8, 8)).astype(np.float32)
    foreground = np.ones(image.shape, bool)
    classes = supervoxel.intensity_classes(image[foreground].reshape(-1, 1), foreground, 3, seed=0)
    assert set(np.unique(classes)) == {1, 2, 3}
    assert threads and set(threads) == {1}
