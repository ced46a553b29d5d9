import json

import numpy as np
import pytest
import SimpleITK as sitk


def _arrays(folder, sub):
    return {p.name: sitk.GetArrayFromImage(sitk.ReadImage(str(p))) for p in sorted((folder / sub).glob("*.nii.gz"))}


@pytest.fixture()
def mni_small(nnunet_env):
    from mass_nnu.demo_data.mni import write_mni_datasets

    return write_mni_datasets(num_pretrain=2, num_train=2, num_test=1, small=True, seed=3)


def test_mni_deterministic_and_seed_dependent(nnunet_env, tmp_path):
    from mass_nnu.demo_data.mni import load_template, make_subject

    template = load_template()
    a, la, _ = make_subject(template, seed=11, small=True)
    b, lb, _ = make_subject(template, seed=11, small=True)
    c, _, _ = make_subject(template, seed=12, small=True)
    assert np.array_equal(a, b) and np.array_equal(la, lb)
    assert a.shape != c.shape or not np.allclose(a, c)


def test_mni_images_and_labels_line_up(mni_small):
    pretrain, downstream = mni_small
    meta = json.loads((downstream / "dataset.json").read_text())
    assert meta["numTraining"] == 2 and meta["channel_names"] == {"0": "T1"}
    for split in ("Tr", "Ts"):
        for image_path in sorted((downstream / f"images{split}").glob("*_0000.nii.gz")):
            label_path = downstream / f"labels{split}" / image_path.name.replace("_0000", "")
            image, label = sitk.ReadImage(str(image_path)), sitk.ReadImage(str(label_path))
            assert image.GetSize() == label.GetSize()
            assert np.allclose(image.GetSpacing(), label.GetSpacing())
            assert np.allclose(image.GetOrigin(), label.GetOrigin())
            values = set(np.unique(sitk.GetArrayFromImage(label)).tolist())
            assert values == set(meta["labels"].values()), "every structure must be present in every case"
            spacing = image.GetSpacing()[0]
            assert 3.0 < spacing < 5.0 and max(image.GetSize()) <= 64
    # left and right hemispheres have comparable white matter volumes
    label = next(iter(_arrays(downstream, "labelsTr").values()))
    left, right = (label == 1).sum(), (label == 2).sum()
    assert 0.6 < left / right < 1.6
    pre_meta = json.loads((pretrain / "dataset.json").read_text())
    assert pre_meta["labels"] == {"background": 0, "foreground": 1}
    assert len(list((pretrain / "imagesTr").glob("*.nii.gz"))) == 2


def test_phantom_deterministic_and_labelled(nnunet_env):
    from mass_nnu.demo_data.phantom import write_phantom_dataset

    one = write_phantom_dataset(601, "PhA", 2, 1, seed=5)
    first = _arrays(one, "imagesTr")
    two = write_phantom_dataset(601, "PhA", 2, 1, seed=5, force=True)
    assert all(np.array_equal(first[k], v) for k, v in _arrays(two, "imagesTr").items())
    labels = _arrays(two, "labelsTr")
    meta = json.loads((two / "dataset.json").read_text())
    for label in labels.values():
        assert set(np.unique(label)) <= set(meta["labels"].values())
        assert {1, 2, 3, 4, 5} <= set(np.unique(label).tolist())
    image = next(iter(first.values()))
    assert image.min() < -800 and 40 < np.median(image[next(iter(labels.values())) == 1]) < 90


def test_verify_dataset_integrity_passes(mni_small, nnunet_env):
    from mass_nnu.adapter.verify import verify_raw_dataset
    from mass_nnu.demo_data.phantom import write_phantom_dataset

    for folder in (*mni_small, write_phantom_dataset(603, "PhC", 2, 0, labelled=False)):
        verify_raw_dataset(folder)


def test_cli_writes_and_refuses_to_overwrite(nnunet_env, run_cli):
    args = ("demo-data", "--small", "--num-pretrain", "1", "--num-train", "1", "--num-test", "1")
    first = run_cli(*args)
    assert first.exit_code == 0, first.output
    assert "Dataset502_MNISeg" in first.stdout
    second = run_cli(*args)
    assert second.exit_code == 1
    assert "already exists" in second.stderr and "Traceback" not in second.output
