"""Demo data: MNI152 cohorts and the CT-like phantom (determinism, geometry, labels, nnU-Net integrity, CLI)."""
import json

import numpy as np
import pytest
import SimpleITK as sitk


def _read(folder, sub):
    return {p.name: sitk.ReadImage(str(p)) for p in sorted((folder / sub).glob("*.nii.gz"))}


def _arrays(folder, sub):
    return {name: sitk.GetArrayFromImage(image) for name, image in _read(folder, sub).items()}


def test_mni_subject_deterministic_and_seed_dependent():
    from mass_nnu.demo_data.mni import make_subject

    a, la, ba, grid_a = make_subject(seed=11, small=True)
    b, lb, bb, grid_b = make_subject(seed=11, small=True)
    c, lc, _, _ = make_subject(seed=12, small=True)
    assert a.tobytes() == b.tobytes() and la.tobytes() == lb.tobytes() and ba.tobytes() == bb.tobytes()
    assert grid_a.GetSpacing() == grid_b.GetSpacing()
    assert a.shape != c.shape or not np.allclose(a, c)
    assert a.dtype == np.float32 and la.dtype == np.uint8 and max(a.shape) <= 64


def test_mni_datasets(nnunet_env):
    from mass_nnu.adapter.verify import verify_raw_dataset
    from mass_nnu.demo_data.mni import LABELS, write_mni_datasets

    pretrain, downstream = write_mni_datasets(num_pretrain=2, num_train=2, num_test=1, small=True, seed=3)
    meta = json.loads((downstream / "dataset.json").read_text())
    assert meta["numTraining"] == 2 and meta["channel_names"] == {"0": "T1"} and meta["labels"] == LABELS
    for split in ("Tr", "Ts"):
        images, labels = _read(downstream, f"images{split}"), _read(downstream, f"labels{split}")
        assert [n.replace("_0000", "") for n in images] == list(labels) and len(labels) == (2 if split == "Tr" else 1)
        for name, image in images.items():
            label = labels[name.replace("_0000", "")]
            assert image.GetSize() == label.GetSize() and max(image.GetSize()) <= 64
            assert np.allclose(image.GetSpacing(), label.GetSpacing())
            assert np.allclose(image.GetOrigin(), label.GetOrigin())
            assert np.allclose(image.GetDirection(), label.GetDirection())
            assert all(3.0 < s < 5.0 for s in image.GetSpacing())
            lab, img = sitk.GetArrayFromImage(label), sitk.GetArrayFromImage(image)
            assert set(np.unique(lab).tolist()) == set(LABELS.values()), "every structure in every case"
            # labels follow the warped image: T1 brightness WM > GM > ventricles
            wm, gm, vent = (np.median(img[np.isin(lab, v)]) for v in ((1, 2), (3, 4), (5,)))
            assert wm > gm > vent, (wm, gm, vent)
            # the subject's left (LPS +x) holds the left labels: hemisphere centroids on the right side of x = 0
            zyx = np.argwhere(lab == 1)[::50]
            x_left = np.mean([label.TransformIndexToPhysicalPoint([int(i) for i in p[::-1]])[0] for p in zyx])
            zyx = np.argwhere(lab == 2)[::50]
            x_right = np.mean([label.TransformIndexToPhysicalPoint([int(i) for i in p[::-1]])[0] for p in zyx])
            assert x_left > 10 and x_right < -10
            assert 0.7 < (lab == 1).sum() / (lab == 2).sum() < 1.4
    pre_meta = json.loads((pretrain / "dataset.json").read_text())
    assert pre_meta["labels"] == {"background": 0, "foreground": 1} and "labelsTr" in pre_meta["description"]
    pre_images, pre_labels = _arrays(pretrain, "imagesTr"), _arrays(pretrain, "labelsTr")
    assert len(pre_images) == 2
    for name, image in pre_images.items():
        brain = pre_labels[name.replace("_0000", "")]
        assert set(np.unique(brain).tolist()) == {0, 1} and 0.15 < brain.mean() < 0.7
        assert np.median(image[brain == 1]) > 5 * np.median(image[brain == 0])
    for folder in (pretrain, downstream):
        verify_raw_dataset(folder)

    # same seed again: byte-identical arrays; the downstream set differs from the pretraining cohort
    first = _arrays(downstream, "imagesTr")
    _, again = write_mni_datasets(num_pretrain=2, num_train=2, num_test=1, small=True, seed=3, force=True)
    assert all(first[k].tobytes() == v.tobytes() for k, v in _arrays(again, "imagesTr").items())
    assert not any(a.shape == b.shape and np.allclose(a, b) for a in first.values() for b in pre_images.values())


def test_mni_crash_leaves_no_half_dataset(nnunet_env, monkeypatch):
    from mass_nnu.adapter.datasets import raw_root
    from mass_nnu.demo_data import mni

    real, calls = mni.make_subject, []

    def failing(**kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("disk full")
        return real(**kwargs)

    monkeypatch.setattr(mni, "make_subject", failing)
    with pytest.raises(RuntimeError):
        mni.write_mni_datasets(num_pretrain=2, num_train=1, num_test=0, small=True)
    assert list(raw_root().iterdir()) == []


def test_phantom_pair(nnunet_env):
    import time

    from scipy.ndimage import binary_erosion

    from mass_nnu.adapter.verify import verify_raw_dataset
    from mass_nnu.demo_data.phantom import ORGANS, make_phantom_case, write_phantom_dataset
    from mass_nnu.errors import MassError

    start = time.perf_counter()
    make_phantom_case((32, 40, 40), seed=9)
    assert time.perf_counter() - start < 1.0

    one = write_phantom_dataset(601, "PhA", 2, 1, seed=5)
    first = _arrays(one, "imagesTr")
    two = write_phantom_dataset(601, "PhA", 2, 1, seed=5, force=True)
    assert all(first[k].tobytes() == v.tobytes() for k, v in _arrays(two, "imagesTr").items())
    other = write_phantom_dataset(602, "PhB", 2, 0, seed=6)
    assert not any(np.array_equal(a, b) for a, b in zip(first.values(), _arrays(other, "imagesTr").values()))
    meta = json.loads((two / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "CT"} and meta["file_ending"] == ".nii.gz"
    for split in ("Tr", "Ts"):
        images, labels = _arrays(two, f"images{split}"), _arrays(two, f"labels{split}")
        for name, image in images.items():
            label = labels[name.replace("_0000", "")]
            assert set(np.unique(label).tolist()) == set(meta["labels"].values())
            assert image.min() < -800 and np.median(image[label == 0]) < -500  # air around the body
            for value, organ, hu in ORGANS[:5]:  # each organ's core (away from partial volume) at its own HU
                assert abs(np.median(image[binary_erosion(label == value)]) - hu) < 30, organ
            lesion, liver = np.median(image[label == 6]), np.median(image[label == 1])
            assert lesion < liver - 25, "lesions are hypodense"
            # kidneys sit on their side (array x grows towards LPS +x, the subject's left)
            assert np.argwhere(label == 2)[:, 2].mean() > np.argwhere(label == 3)[:, 2].mean()
    unlabelled = write_phantom_dataset(603, "PhC", 2, 0, labelled=False)
    pre_meta = json.loads((unlabelled / "dataset.json").read_text())
    assert pre_meta["labels"] == {"background": 0, "foreground": 1} and "body mask" in pre_meta["description"]
    for folder in (two, unlabelled):
        verify_raw_dataset(folder)
    next((unlabelled / "labelsTr").iterdir()).unlink()
    with pytest.raises(MassError, match="integrity check failed"):
        verify_raw_dataset(unlabelled)


def test_cli_writes_summarises_and_refuses_to_overwrite(nnunet_env, run_cli):
    from mass_nnu.adapter.datasets import raw_root

    args = ("demo-data", "--small", "--num-pretrain", "1", "--num-train", "1", "--num-test", "0")
    (raw_root() / "Dataset502_MNISeg").mkdir(parents=True)
    refused = run_cli(*args)
    assert refused.exit_code == 1 and "already exists" in refused.stderr and "Traceback" not in refused.output
    assert sorted(p.name for p in raw_root().iterdir()) == ["Dataset502_MNISeg"], "nothing written when refusing"

    first = run_cli(*args, "--force", "--phantom")
    assert first.exit_code == 0, first.output
    for name in ("Dataset501_MNIPretrain", "Dataset502_MNISeg", "Dataset511_PhantomPretrain", "Dataset512_PhantomSeg"):
        assert name in first.stdout and (raw_root() / name / "dataset.json").is_file()
    assert "1 train cases" in first.stdout and "shape (z y x) 32 x 40 x 40" in first.stdout

    again = run_cli(*args)
    assert again.exit_code == 1 and "--force" in again.stderr
    clash = run_cli(*args, "--pretrain-id", "512", "--phantom", "--force")
    assert clash.exit_code == 1 and "must all differ" in clash.stderr


def test_full_size_phantom_geometry(nnunet_env):
    """--phantom-full's documented geometry (512×512×200 at 0.8×0.8×2.5 mm, x y z), checked on a downscaled
    slab-rendered write with that spacing; the slab size does not change the result."""
    from mass_nnu.demo_data.phantom import make_phantom_case_slabs, phantom_geometry, write_phantom_dataset
    from mass_nnu.errors import MassError

    shape, spacing = phantom_geometry("full")
    assert shape == (200, 512, 512) and spacing == (2.5, 0.8, 0.8)  # array order z, y, x
    assert phantom_geometry("small")[0] == (32, 40, 40)
    with pytest.raises(MassError, match="phantom size 'huge'"):
        phantom_geometry("huge")
    folder = write_phantom_dataset(604, "PhFull", 1, 0, shape=(20, 32, 32), spacing=spacing, slabs=True)
    image = sitk.ReadImage(str(next((folder / "imagesTr").glob("*.nii.gz"))))
    assert image.GetSize() == (32, 32, 20) and image.GetSpacing() == pytest.approx((0.8, 0.8, 2.5))
    assert image.GetPixelID() == sitk.sitkInt16
    a, la = make_phantom_case_slabs((20, 32, 32), seed=3, slab=3)
    b, lb = make_phantom_case_slabs((20, 32, 32), seed=3, slab=64)
    assert np.array_equal(a, b) and np.array_equal(la, lb) and set(np.unique(la)) >= {0, 1, 2, 3, 4, 5}
