"""mass segment / embed / probe: geometry, multi-label and K-shot, the sliding-window pipeline, bad inputs, probes."""
from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import torch_threads

from mass_nnu.errors import MassError

PHANTOM_SPACING = (1.5, 1.5, 1.5)
# CT intensity statistics like nnU-Net's fingerprint of the phantom
CT_PROPERTIES = {"max": 241.5, "mean": 71.6, "median": 59.6, "min": -37.5, "percentile_00_5": 1.5,
                 "percentile_99_5": 192.3, "std": 41.4}


def phantom_plans(patch=(24, 32, 32), spacing=(1.2, 1.5, 1.5), features=(8, 16, 32, 32)) -> dict:
    """nnU-Net ResEnc plans as nnU-Net's planner writes them, with a tiny network. The spacing differs from the
    phantom's (resampling is exercised) and the patch is smaller than the volume (several tiles)."""
    n = len(features)
    strides = [[1, 1, 1]] + [[2, 2, 2]] * (n - 1)
    arch = dict(n_stages=n, features_per_stage=list(features), conv_op="torch.nn.modules.conv.Conv3d",
                kernel_sizes=[[3, 3, 3]] * n, strides=strides, n_blocks_per_stage=[1] * n,
                n_conv_per_stage_decoder=[1] * (n - 1), conv_bias=True,
                norm_op="torch.nn.modules.instancenorm.InstanceNorm3d", norm_op_kwargs={"eps": 1e-5, "affine": True},
                dropout_op=None, dropout_op_kwargs=None, nonlin="torch.nn.LeakyReLU", nonlin_kwargs={"inplace": True})
    resampling = {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None}
    return {
        "dataset_name": "Dataset990_Phantom", "plans_name": "nnUNetResEncUNetMPlans",
        "original_median_spacing_after_transp": list(PHANTOM_SPACING), "original_median_shape_after_transp": [32, 40, 40],
        "image_reader_writer": "SimpleITKIO", "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
        "experiment_planner_used": "nnUNetPlannerResEncM", "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {"0": CT_PROPERTIES},
        "configurations": {"3d_fullres": {
            "data_identifier": "nnUNetPlans_3d_fullres", "preprocessor_name": "DefaultPreprocessor", "batch_size": 2,
            "patch_size": list(patch), "median_image_size_in_voxels": [40, 40, 40], "spacing": list(spacing),
            "normalization_schemes": ["CTNormalization"], "use_mask_for_norm": [False],
            "resampling_fn_data": "resample_data_or_seg_to_shape", "resampling_fn_seg": "resample_data_or_seg_to_shape",
            "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
            "resampling_fn_data_kwargs": resampling, "resampling_fn_seg_kwargs": {**resampling, "is_seg": True, "order": 1},
            "resampling_fn_probabilities_kwargs": {**resampling, "order": 1}, "batch_dice": False,
            "pool_op_kernel_sizes": strides, "conv_kernel_sizes": [[3, 3, 3]] * n,
            "architecture": {"network_class_name": "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet",
                             "arch_kwargs": arch, "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]},
        }},
    }


def save_random_model(folder, plans: dict, seed: int = 0):
    """A pretrained folder in the documented format, with random weights (what `mass pretrain` writes)."""
    import torch

    from mass_nnu.io import architecture_fingerprint, save_checkpoint
    from mass_nnu.model.mass_model import build_mass_model

    torch.manual_seed(seed)
    model = build_mass_model(plans, "3d_fullres", 1, num_learned_tokens=2, task_encoder_blocks=1,
                             conditioning_blocks=1, head_hidden=32)
    save_checkpoint({"network_weights": model.state_dict(), "plans": plans, "configuration": "3d_fullres",
                     "dataset_json": {"channel_names": {"0": "CT"}, "labels": {"background": 0}},
                     "mass_config": model.mass_config(),
                     "architecture_fingerprint": architecture_fingerprint(model.backbone.state_dict())},
                    folder / "checkpoint_final.pth")
    return folder


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Phantom dataset (4 training cases, 2 test cases), a random-weight model folder, odd-geometry files."""
    from mass_nnu.demo_data.phantom import make_phantom_case, write_phantom_dataset
    from mass_nnu.demo_data.writer import write_image
    from mass_nnu.workspace import NNUNET_FOLDERS, configure_environment

    root = tmp_path_factory.mktemp("incontext")
    # tiny networks: one thread is as fast, and much faster on a busy machine
    with torch_threads(1), pytest.MonkeyPatch.context() as mp:
        for var, sub in NNUNET_FOLDERS.items():
            mp.setenv(var, str(root / sub))
        configure_environment(quiet=True)
        raw = write_phantom_dataset(990, "Phantom", 4, num_test=2, shape=(32, 40, 40), spacing=PHANTOM_SPACING)
        model = save_random_model(root / "results" / "Dataset990_Phantom" / "MASSPretrainer__nnUNetResEncUNetMPlans__3d_fullres",
                                  phantom_plans(), seed=123)
        # a query with anisotropic spacing, an origin and a flipped, permuted direction
        image, label = make_phantom_case((30, 36, 40), seed=77, noise_hu=2.0)
        odd = dict(spacing_zyx=(1.8, 1.2, 1.5), origin_xyz=(-12.5, 40.0, 7.25),
                   direction=(0, 1, 0, -1, 0, 0, 0, 0, 1))
        write_image(image, path=root / "odd" / "odd_0000.nii.gz", **odd)
        write_image(label, path=root / "odd_gt" / "odd.nii.gz", dtype=np.uint8, **odd)
        yield {"root": root, "raw": raw, "model": model}


def ref_args(raw, *cases):
    args = []
    for case in cases:
        args += ["--ref", raw / "imagesTr" / f"phantom_tr{case:03d}_0000.nii.gz",
                 "--ref-mask", raw / "labelsTr" / f"phantom_tr{case:03d}.nii.gz"]
    return args


def read(path):
    import SimpleITK as sitk

    image = sitk.ReadImage(str(path))
    return image, sitk.GetArrayFromImage(image)


def test_segment_geometry_labels_and_dice(workspace, run_cli):
    """Output header equals the query's (size, spacing, origin, direction); labels come from the references;
    --gt writes Dice per label; folders work as input."""
    root, raw = workspace["root"], workspace["raw"]
    out = root / "out_geometry"
    result = run_cli("segment", "-m", workspace["model"], *ref_args(raw, 0), "--labels", 2, "--labels", 5,
                     "-i", root / "odd" / "odd_0000.nii.gz", "-i", raw / "imagesTs", "-o", out, "--gt", root / "odd_gt")
    assert result.exit_code != 0 and "no ground truth for case 'phantom_ts000'" in result.output
    result = run_cli("segment", "-m", workspace["model"], *ref_args(raw, 0), "--labels", 2, "--labels", 5,
                     "-i", root / "odd" / "odd_0000.nii.gz", "-o", out, "--gt", root / "odd_gt")
    assert result.exit_code == 0, result.output
    query, _ = read(root / "odd" / "odd_0000.nii.gz")
    seg, array = read(out / "odd.nii.gz")
    assert seg.GetSize() == query.GetSize()
    assert np.allclose(seg.GetSpacing(), query.GetSpacing())
    assert np.allclose(seg.GetOrigin(), query.GetOrigin())
    assert np.allclose(seg.GetDirection(), query.GetDirection())
    assert set(np.unique(array)) <= {0, 2, 5}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["labels"] == [2, 5] and set(summary["dice_per_case"]["odd"]) == {"2", "5"}
    assert "label 2" in result.output and "label 5" in result.output

    result = run_cli("segment", "-m", workspace["model"], *ref_args(raw, 0, 1), "-i", raw / "imagesTs", "-o", out)
    assert result.exit_code == 0, result.output  # 2-shot, a folder as input
    assert sorted(p.name for p in out.glob("phantom_ts*.nii.gz")) == ["phantom_ts000.nii.gz", "phantom_ts001.nii.gz"]


def oracle(plans: dict, thresholds_hu):
    """A stand-in model whose task k is 'intensity above thresholds_hu[k]' (+-10 logits, later tasks win ties by
    +10): it lets the real tiling, resampling and export be checked against the raw image."""
    import torch

    props = plans["foreground_intensity_properties_per_channel"]["0"]
    cuts = [(t - props["mean"]) / props["std"] for t in thresholds_hu]

    class Oracle(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.anchor = torch.nn.Parameter(torch.zeros(1))

        def segment(self, query, tokens, deep_supervision=False):
            assert tokens.num_tasks == len(cuts)
            return [torch.cat([(query[:, :1] > c).float() * (20 + 10 * k) - 10 for k, c in enumerate(cuts)], 1)]

    return Oracle()


def test_sliding_window_and_export_against_an_oracle(workspace):
    """Tiles (several, Gaussian-weighted), foreground box, resampling to the plans' spacing and back, un-cropping
    and overlap resolution: the result must match thresholds of the raw image on a rotated, anisotropic query."""
    import torch
    from scipy import ndimage

    from mass_nnu.adapter import inference
    from mass_nnu.incontext.common import Pretrained
    from mass_nnu.incontext.segment import foreground_box, predict_logits, to_label_map
    from mass_nnu.model.mass_model import TaskTokens

    plans = phantom_plans()
    nnunet_plans = inference.plans_for(plans, "3d_fullres")
    pretrained = Pretrained(oracle(plans, (35.0, 100.0)), {}, nnunet_plans, 1, "oracle")
    tokens = TaskTokens([torch.zeros(1, 2, 1, 4)], torch.ones(1, 2, dtype=torch.bool))
    path = workspace["root"] / "odd" / "odd_0000.nii.gz"
    data, properties = inference.read_image([path], nnunet_plans)
    raw_image = data[0].copy()
    data, _, properties = inference.preprocess(data, None, properties, nnunet_plans)
    region = foreground_box(data, pretrained.patch_size)
    assert len(inference.tile_starts([s.stop - s.start for s in region], pretrained.patch_size, 0.5)) > 1
    logits = predict_logits(pretrained, tokens, data, 0.5, region)
    label_map = to_label_map(logits, properties, pretrained, [3, 7], largest_component=False)
    expected = np.where(raw_image > 100, 7, np.where(raw_image > 35, 3, 0))
    assert label_map.shape == expected.shape
    for label in (3, 7):
        # thin structures lose a little to resampling there and back; a wrong axis or offset would give ~0
        assert inference.dice(expected, label_map, label) > 0.8, label
        shift = np.argwhere(expected == label).mean(0) - np.argwhere(label_map == label).mean(0)
        assert np.abs(shift).max() < 1.0, shift
    one_piece = to_label_map(logits, properties, pretrained, [3, 7], largest_component=True)
    full = np.ones((3, 3, 3))  # skimage's default connectivity, which nnU-Net's post-processing uses
    assert ndimage.label(one_piece == 3, full)[1] == 1 < ndimage.label(label_map == 3, full)[1]


def test_multi_label_and_k_shot_tokens(workspace):
    """One task per reference label; 2-shot tokens are the token average and change the prediction."""
    import torch

    from mass_nnu.incontext.common import load_pretrained
    from mass_nnu.incontext.segment import load_reference, predict_logits
    from mass_nnu.model.references import encode_tasks, reference_crop

    raw = workspace["raw"]
    pretrained = load_pretrained(workspace["model"])
    refs = [load_reference(raw / "imagesTr" / f"phantom_tr{i:03d}_0000.nii.gz",
                           raw / "labelsTr" / f"phantom_tr{i:03d}.nii.gz", pretrained, [1, 2, 4]) for i in (0, 1)]
    assert refs[0].labels == [1, 2, 4]
    image, mask = reference_crop(refs[0], 2, pretrained.patch_size)
    assert image.shape == (1, *pretrained.patch_size) and mask.shape == (1, *pretrained.patch_size)
    centre = np.argwhere(mask[0]).mean(0)
    assert np.all(np.abs(centre - np.array(pretrained.patch_size) / 2) < 3)  # structure in the middle of the crop
    one = encode_tasks(pretrained.model, pretrained.patch_size, refs[:1], [1, 2, 4])
    two = encode_tasks(pretrained.model, pretrained.patch_size, refs, [1, 2, 4])
    second = encode_tasks(pretrained.model, pretrained.patch_size, refs[1:], [1, 2, 4])
    assert one.num_tasks == 3 and tuple(one.valid.shape) == (1, 3)
    assert torch.allclose(two.scales[0], (one.scales[0] + second.scales[0]) / 2, atol=1e-6)
    query = refs[1].data
    a, b = predict_logits(pretrained, one, query), predict_logits(pretrained, two, query)
    assert a.shape == (3, *query.shape[1:])
    assert (a - b).abs().mean() > 1e-4
    assert not torch.allclose(a[0], a[1])  # tasks differ


@pytest.mark.parametrize("case", ["shape", "empty", "2d", "no_model", "unpaired"])
def test_bad_inputs_give_one_clear_error(workspace, run_cli, case):
    from mass_nnu.demo_data.writer import write_image

    root, raw = workspace["root"], workspace["raw"]
    image = raw / "imagesTr" / "phantom_tr000_0000.nii.gz"
    bad = root / "bad"
    model, ref, expect = workspace["model"], ["--ref", image, "--ref-mask", raw / "labelsTr" / "phantom_tr000.nii.gz"], ""
    if case == "shape":
        write_image(np.ones((32, 40, 38), np.uint8), PHANTOM_SPACING, bad / "small_mask.nii.gz", dtype=np.uint8)
        ref, expect = ["--ref", image, "--ref-mask", bad / "small_mask.nii.gz"], "differs from its image"
    elif case == "empty":
        write_image(np.zeros((32, 40, 40), np.uint8), PHANTOM_SPACING, bad / "empty.nii.gz", dtype=np.uint8)
        ref, expect = ["--ref", image, "--ref-mask", bad / "empty.nii.gz"], "empty reference mask"
    elif case == "2d":
        write_image(np.ones((40, 40), np.float32), PHANTOM_SPACING[:2], bad / "flat_0000.nii.gz")
        write_image(np.ones((40, 40), np.uint8), PHANTOM_SPACING[:2], bad / "flat.nii.gz", dtype=np.uint8)
        ref, expect = ["--ref", bad / "flat_0000.nii.gz", "--ref-mask", bad / "flat.nii.gz"], "2D image"
    elif case == "no_model":
        model, expect = root / "no_such_model", "not found"
    else:
        ref, expect = ref + ["--ref", image], "pair every image"
    result = run_cli("segment", "-m", model, *ref, "-i", raw / "imagesTs", "-o", root / "out_bad")
    assert result.exit_code == 1
    assert expect in result.output and "Traceback" not in result.output
    assert len([line for line in result.output.splitlines() if line.startswith("mass: error")]) == 1


def test_embed_files_dataset_and_random_init(workspace, run_cli):
    root, raw = workspace["root"], workspace["raw"]
    out = root / "features.npz"
    result = run_cli("embed", "-m", workspace["model"], "-i", raw / "imagesTr", "-o", out)
    assert result.exit_code == 0, result.output
    with np.load(out) as npz:
        features, ids, names = npz["features"], list(npz["case_ids"]), list(npz["feature_names"])
    # 3 deepest stages of (8, 16, 32, 32) channels, average + max
    assert features.shape == (4, 2 * (32 + 32 + 16)) and len(names) == features.shape[1]
    assert ids == [f"phantom_tr{i:03d}" for i in range(4)] and np.isfinite(features).all()
    assert np.abs(features[0] - features[1]).max() > 0  # cases differ
    # -d reads the raw images when there is no preprocessed data; same numbers as the files
    result = run_cli("embed", "-m", workspace["model"], "-d", 990, "-o", root / "features_d.npz")
    assert result.exit_code == 0, result.output
    with np.load(root / "features_d.npz") as npz:
        assert np.allclose(npz["features"], features, atol=1e-5)
    # with nnU-Net's preprocessed data (written by its preprocessor) -d reads that instead; same numbers
    from mass_nnu.adapter import inference

    plans = inference.plans_for(phantom_plans(), "3d_fullres")
    folder = root / "preprocessed" / "Dataset990_Phantom" / "nnUNetPlans_3d_fullres"
    folder.mkdir(parents=True)
    for i in (0, 2):
        case = f"phantom_tr{i:03d}"
        plans.configuration.preprocessor_class(verbose=False).run_case_save(
            str(folder / case), [str(raw / "imagesTr" / f"{case}_0000.nii.gz")], str(raw / "labelsTr" / f"{case}.nii.gz"),
            plans.manager, plans.configuration, str(raw / "dataset.json"))
    result = run_cli("embed", "-m", workspace["model"], "-d", "Dataset990_Phantom", "-o", root / "features_pp.npz")
    assert result.exit_code == 0 and "2 preprocessed cases" in result.output, result.output
    with np.load(root / "features_pp.npz") as npz:
        assert list(npz["case_ids"]) == ["phantom_tr000", "phantom_tr002"]
        assert np.allclose(npz["features"], features[[0, 2]], atol=1e-4)
    result = run_cli("embed", "-m", workspace["model"], "-i", raw / "imagesTr", "--random-init", "-o",
                     root / "features_random.npz", "--scales", 1)
    assert result.exit_code == 0, result.output
    with np.load(root / "features_random.npz") as npz:
        assert npz["features"].shape == (4, 64) and "random init" in str(npz["model"])
        assert not np.allclose(npz["features"], features[:, :64])
    assert run_cli("embed", "-m", workspace["model"], "-o", out).exit_code == 1


def planted_features(path, n=120, f=40, seed=0, shuffle=False):
    rng = np.random.default_rng(seed)
    y = rng.permutation(np.arange(n) % 2)
    features = rng.normal(size=(n, f)).astype(np.float32)
    features[:, :5] += 1.5 * y[:, None]  # class 1 shifted along 5 of the features
    if shuffle:
        y = rng.permutation(y)
    ids = [f"case{i:03d}" for i in range(n)]
    np.savez(path / "features.npz", features=features, case_ids=np.asarray(ids))
    (path / "labels.csv").write_text("case_id,label\n" + "".join(f"{c},{'ab'[v]}\n" for c, v in zip(ids, y)))
    return path / "features.npz", path / "labels.csv"


def test_probe_planted_signal_and_shuffled_labels(tmp_path, run_cli):
    from mass_nnu.incontext.probe import probe

    (tmp_path / "real").mkdir(), (tmp_path / "shuffled").mkdir()
    features, labels = planted_features(tmp_path / "real")
    result = run_cli("probe", features, labels, "--folds", 5, "-o", tmp_path / "probe.json")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "probe.json").read_text())["auc"] > 0.9 and "AUC" in result.output
    shuffled = probe(*planted_features(tmp_path / "shuffled", shuffle=True), folds=5)
    assert abs(shuffled["auc"] - 0.5) < 0.2
    # three classes: macro one-vs-rest AUC
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 90)
    x = rng.normal(size=(90, 10)) + np.eye(3)[y] @ rng.normal(size=(3, 10)) * 3
    np.savez(tmp_path / "multi.npz", features=x, case_ids=np.asarray([f"c{i}" for i in range(90)]))
    (tmp_path / "multi.csv").write_text("case_id,label\n" + "".join(f"c{i},{v}\n" for i, v in enumerate(y)))
    assert probe(tmp_path / "multi.npz", tmp_path / "multi.csv", folds=3)["auc"] > 0.9
    # ids that are not in the features -> one clear error
    (tmp_path / "bad.csv").write_text("case_id,label\nnope,a\ncase000,b\n")
    result = run_cli("probe", features, tmp_path / "bad.csv")
    assert result.exit_code == 1 and "not in" in result.output and "Traceback" not in result.output
    with pytest.raises(MassError, match="folds"):
        probe(features, labels, folds=100)


def test_scoring_a_class_without_reference_and_rotated_references(workspace):
    """A class no reference holds is an empty prediction (Dice 0 where the ground truth has it), as a fine-tuned
    model that never predicts it; rotated tokens (references of another class) predict something else."""
    import torch

    from mass_nnu.dice import class_means, summarise
    from mass_nnu.incontext.common import load_pretrained
    from mass_nnu.incontext.segment import load_reference, rotated, score_token_sets
    from mass_nnu.model.references import encode_tasks

    raw = workspace["raw"]
    pretrained = load_pretrained(workspace["model"])
    ref = load_reference(raw / "imagesTr" / "phantom_tr000_0000.nii.gz", raw / "labelsTr" / "phantom_tr000.nii.gz",
                         pretrained, [1, 2])
    tokens = encode_tasks(pretrained.model, pretrained.patch_size, [ref], [1, 2])
    scores = score_token_sets(pretrained, {"matched": (tokens, [1, 2]), "mismatched": (rotated(tokens), [1, 2])},
                              [raw / "imagesTr" / "phantom_tr001_0000.nii.gz"], raw / "labelsTr", [1, 2, 3])
    matched, mismatched = scores["matched"]["phantom_tr001"], scores["mismatched"]["phantom_tr001"]
    assert matched["3"] == 0.0 == mismatched["3"]  # the ground truth holds class 3; nothing predicts it
    rolled = rotated(tokens)
    assert all(torch.equal(r[:, 0], t[:, 1]) and torch.equal(r[:, 1], t[:, 0]) for r, t in zip(rolled.scales, tokens.scales))
    figures = summarise(class_means(scores["matched"]), "x")
    assert set(figures["per_structure"]) == {"1", "2", "3"} and figures["mean"] == pytest.approx(
        (matched["1"] + matched["2"]) / 3)
