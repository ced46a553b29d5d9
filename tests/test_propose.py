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
    result = run_cli("propose", "-d", "720", "--eval-labels", phantom / "labelsTr")
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
    assert video.calls.count("forward") == video.calls.count("reverse") == video.calls.count("init") == video.calls.count("reset") >= 1
    # masks are 3D: propagated beyond their seed slice
    assert max(int((layer > 0).any(axis=(1, 2)).sum()) for layer in layers) > 5
    assert seed_slices(np.ones((40, 4, 4), bool), 0, 1.0, 30.0, 10) == [int(round(v)) for v in np.linspace(0, 39, 10)]
