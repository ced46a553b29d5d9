"""Demo data with real atlas labels (Dataset503): grouping, alignment with the template, labels, contrasts,
determinism, nnU-Net integrity, and the fallback without mricron-data.

The atlas comes from $MASS_ATLAS_DEB (a .deb or an unpacked folder), else the user's cache, else
`apt-get download mricron-data` into a temporary cache; the tests that need it skip when none works."""
import json
import os

import numpy as np
import pytest
import SimpleITK as sitk


@pytest.fixture(scope="session")
def atlas_folder(tmp_path_factory):
    from mass_nnu.demo_data.atlas import TEMPLATES_DIR, default_cache, fetch_atlases
    from mass_nnu.errors import MassError

    source = os.environ.get("MASS_ATLAS_DEB")
    use_cache = source is None and (default_cache() / TEMPLATES_DIR).is_dir()
    try:
        return fetch_atlases(source, default_cache() if use_cache else tmp_path_factory.mktemp("cache") / "atlas")
    except MassError as error:
        pytest.skip(f"mricron-data unavailable: {error}")


def _cases(folder, split):
    images = sorted((folder / f"images{split}").glob("*.nii.gz"))
    return [(p.name[:-len("_0000.nii.gz")], sitk.GetArrayFromImage(sitk.ReadImage(str(p))),
             sitk.GetArrayFromImage(sitk.ReadImage(str(folder / f"labels{split}" / p.name.replace("_0000", "")))))
            for p in images]


def test_grouping_and_seeds_are_data():
    from mass_nnu.demo_data import atlas, mni

    grouped = [name for names in atlas.CORTEX_GROUPS.values() for name in names]
    assert sorted(grouped) == sorted(atlas.CORTEX_NAMES) and len(grouped) == 48, "each region in one group"
    assert list(atlas.ATLAS_LABELS.values()) == list(range(len(atlas.ATLAS_LABELS)))
    # more variation than the pretraining cohort, which has more than Dataset502
    warps = (mni.DOWNSTREAM_WARP, mni.PRETRAIN_WARP, atlas.ATLAS_WARP)
    assert [w.scale[1] - w.scale[0] for w in warps] == sorted(w.scale[1] - w.scale[0] for w in warps)
    assert [w.bspline_mm for w in warps] == sorted(w.bspline_mm for w in warps)
    assert atlas.ATLAS_WARP.mesh_cells < mni.PRETRAIN_WARP.mesh_cells and atlas.ATLAS_WARP.per_axis_scale
    assert len({0, mni.DOWNSTREAM_SEED_OFFSET, atlas.ATLAS_SEED_OFFSET}) == 3, "base seeds of 501, 502, 503 differ"


def test_atlas_groups_lie_on_the_template(atlas_folder):
    from mass_nnu.demo_data.atlas import group_maps
    from mass_nnu.demo_data.mni import load_template

    template = load_template()
    brain, gm, wm = (sitk.GetArrayViewFromImage(template[k]) for k in ("brain", "gm", "wm"))
    centroid = {}
    for channel, image in group_maps(atlas_folder, template["t1"]).items():
        region = sitk.GetArrayViewFromImage(image) > 0.5
        assert region.sum() > 10_000 and brain[region].mean() > 0.8, channel  # resampled by world coordinates
        tissue = wm if channel in ("atlas_corpus_callosum", "atlas_internal_capsule") else gm
        assert tissue[region].mean() > 0.4, channel
        index = np.argwhere(region).mean(0)[::-1].tolist()
        centroid[channel[len("atlas_"):]] = np.array(image.TransformContinuousIndexToPhysicalPoint(index))
    # LPS world frame: y grows backwards, z upwards
    assert centroid["frontal"][1] < centroid["parietal"][1] < centroid["occipital"][1]
    assert centroid["temporal"][2] < centroid["insula_operculum"][2] < centroid["parietal"][2]
    assert abs(centroid["corpus_callosum"][0]) < 5 and centroid["corpus_callosum"][2] > centroid["internal_capsule"][2]


def test_atlas_dataset(nnunet_env, atlas_folder):
    from mass_nnu.adapter.verify import verify_raw_dataset
    from mass_nnu.demo_data.atlas import (
        ATLAS_LABELS,
        ATLAS_SEED_OFFSET,
        CORTEX_GROUPS,
        TRACT_GROUPS,
        make_atlas_subject,
        write_atlas_dataset,
    )
    from mass_nnu.demo_data.mni import subject_seed

    folder = write_atlas_dataset(503, num_train=2, num_test=1, small=True, seed=3, atlas=atlas_folder)
    assert folder.name == "Dataset503_MNIAtlasSeg"
    meta = json.loads((folder / "dataset.json").read_text())
    assert meta["labels"] == ATLAS_LABELS and meta["channel_names"] == {"0": "MRI"} and meta["numTraining"] == 2
    cases = _cases(folder, "Tr") + _cases(folder, "Ts")
    assert meta["contrast"] == {"mniatlasseg_tr000": "T1", "mniatlasseg_tr001": "T2", "mniatlasseg_ts000": "T1"}
    cortex = [ATLAS_LABELS[g] for g in CORTEX_GROUPS]
    tracts = [ATLAS_LABELS[g] for g in TRACT_GROUPS]
    for name, image, label in cases:
        counts = np.bincount(label.ravel(), minlength=len(ATLAS_LABELS))
        assert len(counts) == len(ATLAS_LABELS) and counts[1:].min() >= 100, (name, counts)  # every group, sizeable
        # T1: white matter brighter than cortex; T2-like: darker
        cortex_median, tract_median = np.median(image[np.isin(label, cortex)]), np.median(image[np.isin(label, tracts)])
        assert (tract_median > 1.1 * cortex_median) if meta["contrast"][name] == "T1" else \
            (tract_median < 0.9 * cortex_median), (name, cortex_median, tract_median)
    # the files are the generator's output; the same seed gives the same bytes; labels lie inside the brain
    image, label, brain, _ = make_atlas_subject(seed=subject_seed(3 + ATLAS_SEED_OFFSET, 1), small=True, t2=True,
                                                atlas=atlas_folder)
    again = make_atlas_subject(seed=subject_seed(3 + ATLAS_SEED_OFFSET, 1), small=True, t2=True, atlas=atlas_folder)
    assert image.tobytes() == again[0].tobytes() and label.tobytes() == again[1].tobytes()
    assert label.tobytes() == cases[1][2].tobytes() and np.array_equal(image, cases[1][1])
    assert brain[label > 0].all()
    verify_raw_dataset(folder)


def test_fallback_without_atlas_is_one_line_and_valid(nnunet_env, run_cli, tmp_path, monkeypatch):
    from mass_nnu.adapter.datasets import raw_root
    from mass_nnu.adapter.verify import verify_raw_dataset
    from mass_nnu.demo_data.atlas import find_atlases
    from mass_nnu.demo_data.mni import LABELS

    monkeypatch.setenv("MASS_CACHE", str(tmp_path / "empty_cache"))
    for source, fetch, reason in ((tmp_path / "missing.deb", False, "no such .deb file"),
                                  (tmp_path, False, "no HarvardOxford"), (None, False, "no mricron-data atlases cached")):
        folder, line = find_atlases(source, fetch)
        assert folder is None and reason in line and "\n" not in line and "tissue labels" in line
    with monkeypatch.context() as patch:
        patch.setenv("PATH", str(tmp_path))  # no apt-get
        assert "apt-get: not found" in find_atlases(fetch=True)[1]

    result = run_cli("demo-data", "--small", "--num-pretrain", "1", "--num-train", "2", "--num-test", "0")
    assert result.exit_code == 0, result.output
    warnings = result.stderr.strip().splitlines()
    assert len(warnings) == 1 and warnings[0].startswith("warning: atlas labels unavailable"), result.stderr
    folder = raw_root() / "Dataset503_MNIAtlasSeg"
    assert str(folder) in result.stdout
    meta = json.loads((folder / "dataset.json").read_text())
    assert meta["labels"] == LABELS and "fallback" in meta["description"] and meta["contrast"]["mniatlasseg_tr001"] == "T2"
    for name, image, label in _cases(folder, "Tr"):
        assert set(np.unique(label).tolist()) == set(LABELS.values()), name
    verify_raw_dataset(folder)
