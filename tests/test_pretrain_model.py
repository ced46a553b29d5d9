"""MASS model and loss: backbone identity with nnU-Net, shapes, gradients, conditioning, loss, overfit, round trip."""
from __future__ import annotations

import copy

import pytest
import torch

from mass_nnu.errors import MassError
from mass_nnu.model.artifacts import load_mass_model
from mass_nnu.model.loss import InContextLoss, deep_supervision_weights, dice_per_task, downsample_target
from mass_nnu.model.mass_model import MASSModel, TaskTokens, build_mass_model

ARCHS = {
    "res": "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet",
    "plain": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
}


def tiny_plans(arch: str = "res", features=(8, 16, 32, 32), strides=None, dim: int = 3) -> dict:
    """A small but complete nnU-Net plans dict (the format nnU-Net's planners write)."""
    n = len(features)
    strides = strides or [[1] * dim] + [[2] * dim] * (n - 1)
    kwargs = dict(n_stages=n, features_per_stage=list(features), conv_op=f"torch.nn.modules.conv.Conv{dim}d",
                  kernel_sizes=[[3] * dim] * n, strides=strides, n_conv_per_stage_decoder=[1] * (n - 1),
                  conv_bias=True, norm_op=f"torch.nn.modules.instancenorm.InstanceNorm{dim}d",
                  norm_op_kwargs={"eps": 1e-5, "affine": True}, dropout_op=None, dropout_op_kwargs=None,
                  nonlin="torch.nn.LeakyReLU", nonlin_kwargs={"inplace": True})
    kwargs["n_blocks_per_stage" if arch == "res" else "n_conv_per_stage"] = [1] * n
    patch = [32] * dim
    return {
        "dataset_name": "Dataset990_Tiny", "plans_name": "nnUNetResEncUNetMPlans", "image_reader_writer": "SimpleITKIO",
        "original_median_spacing_after_transp": [1.0] * dim, "original_median_shape_after_transp": patch,
        "transpose_forward": list(range(dim)), "transpose_backward": list(range(dim)),
        "experiment_planner_used": "nnUNetPlannerResEncM", "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {},
        "configurations": {"3d_fullres": {
            "data_identifier": "nnUNetPlans_3d_fullres", "preprocessor_name": "DefaultPreprocessor",
            "batch_size": 2, "patch_size": patch, "median_image_size_in_voxels": patch, "spacing": [1.0] * dim,
            "normalization_schemes": ["ZScoreNormalization"], "use_mask_for_norm": [False],
            "resampling_fn_data": "resample_data_or_seg_to_shape", "resampling_fn_seg": "resample_data_or_seg_to_shape",
            "resampling_fn_probabilities": "resample_data_or_seg_to_shape", "resampling_fn_data_kwargs": {},
            "resampling_fn_seg_kwargs": {}, "resampling_fn_probabilities_kwargs": {}, "batch_dice": False,
            "pool_op_kernel_sizes": strides, "conv_kernel_sizes": [[3] * dim] * n,
            "architecture": {"network_class_name": ARCHS[arch], "arch_kwargs": kwargs,
                             "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]},
        }},
    }


def blobs(shape=(32, 32, 32), centers=((10, 10, 10), (22, 20, 16)), radius=5.0, values=(1.0, -1.0), seed=0):
    """An image with spheres of distinct intensity and their masks (K, *shape)."""
    g = torch.Generator().manual_seed(seed)
    grid = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in shape], indexing="ij"))
    masks = torch.stack([((grid - torch.tensor(c, dtype=torch.float32).view(3, 1, 1, 1)) ** 2).sum(0) <= radius ** 2
                         for c in centers]).float()
    image = 0.2 * torch.randn(shape, generator=g) + sum(v * m for v, m in zip(values, masks))
    return image[None], masks


@pytest.fixture(scope="module")
def plans():
    return tiny_plans("res")


@pytest.mark.parametrize("arch", ["res", "plain"])
def test_backbone_is_the_nnunet_network(arch):
    """Backbone keys and shapes equal the network nnU-Net's own builder makes; MASS adds nothing inside it."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans = tiny_plans(arch)
    cm = PlansManager(plans).get_configuration("3d_fullres")
    reference = get_network_from_plans(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                                       cm.network_arch_init_kwargs_req_import, 1, 1, deep_supervision=True)
    model = build_mass_model(plans, "3d_fullres", 1)
    ours = model.backbone.state_dict()
    theirs = reference.state_dict()
    assert type(model.backbone) is type(reference)
    assert list(ours) == list(theirs)
    assert all(ours[k].shape == theirs[k].shape for k in theirs)
    added = [k for k in model.state_dict() if not k.startswith("backbone.")]
    assert added and all(k.split(".")[0] in {"task_encoder", "conditioning", "head"} for k in added)
    # the mask never enters the stem: it still takes the image channels only
    stem = next(v for k, v in ours.items() if k.startswith("encoder.") and v.ndim == 5)
    assert stem.shape[1] == 1


@pytest.mark.parametrize("mode", ["shared", "per_task"])
@pytest.mark.parametrize("k", [1, 13])
def test_forward_shapes(plans, mode, k):
    torch.manual_seed(0)
    model = build_mass_model(plans, "3d_fullres", 1, decoder_mode=mode)
    image = torch.randn(2, 1, 32, 32, 32)
    masks = (torch.rand(2, k, 32, 32, 32) > 0.7).float()
    with torch.no_grad():
        tokens = model.encode_task(image, masks)
        outputs = model.segment(image, tokens)
        full_only = model.segment(image, tokens, deep_supervision=False)
    # 4 stages: tokens at the two deepest scales only (never at full or half resolution)
    assert [tuple(t.shape) for t in tokens.scales] == [(2, k, 11, 32), (2, k, 11, 32)]
    # 4 stages -> 3 decoder outputs in nnU-Net; the lowest (weight 0 there) is not produced
    assert [tuple(o.shape) for o in outputs] == [(2, k, 32, 32, 32), (2, k, 16, 16, 16)]
    assert len(full_only) == 1 and torch.allclose(full_only[0], outputs[0], atol=1e-5)
    assert all(torch.isfinite(o).all() for o in outputs)


def test_anisotropic_2d_plans_and_shallow_network():
    """Anisotropic strides (first axis not pooled) and a 2D configuration build and run."""
    aniso = tiny_plans("res", features=(8, 16, 16), strides=[[1, 1, 1], [1, 2, 2], [2, 2, 2]])
    out = build_mass_model(aniso, "3d_fullres", 2)(torch.randn(1, 2, 8, 32, 32), torch.ones(1, 2, 8, 32, 32),
                                                    torch.randn(1, 2, 8, 32, 32))
    assert tuple(out[0].shape) == (1, 2, 8, 32, 32)
    flat = tiny_plans("plain", features=(8, 16, 32), dim=2)
    out = build_mass_model(flat, "3d_fullres", 1)(torch.randn(2, 1, 32, 32), torch.ones(2, 3, 32, 32),
                                                  torch.randn(2, 1, 32, 32))
    assert tuple(out[0].shape) == (2, 3, 32, 32)


@pytest.mark.parametrize("mode", ["shared", "per_task"])
def test_gradients_reach_every_trainable_part(plans, mode):
    torch.manual_seed(0)
    model = build_mass_model(plans, "3d_fullres", 1, decoder_mode=mode)
    image, masks = blobs()
    out = model(image[None], masks[None], image[None])
    InContextLoss()(out, masks[None]).backward()
    # every trainable parameter takes part (what DDP needs); some are exactly 0 at nnU-Net's ResEnc init
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"no gradient for {missing[:5]}"
    added = [p for n, p in model.named_parameters() if not n.startswith("backbone.")]
    assert all(p.grad.any() for p in added)
    assert not any(p.requires_grad for p in model.backbone.decoder.seg_layers.parameters())
    for part in ("task_encoder", "conditioning", "head", "backbone.encoder", "backbone.decoder.stages"):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters()
                   if n.startswith(part)), part


def test_checkpointed_reference_gives_the_same_step_with_fewer_saved_activations(plans):
    """--activation-checkpointing: the same loss and gradients (the reference's encoder pass is recomputed in
    backward), and the memory estimate's saved activations drop by at least the reference encoder's."""
    from mass_nnu.pretraining.memory import estimate_memory

    torch.manual_seed(0)
    model = build_mass_model(plans, "3d_fullres", 1)
    image, masks = blobs()
    query = torch.roll(image, 3, dims=1)[None]
    grads = []
    for flag in (False, True):  # two encoder passes (reference, then query), without and with the checkpoint
        model.zero_grad()
        model.checkpoint_reference = flag
        out = model(image[None], masks[None], query) if flag else \
            model.segment(query, model.encode_task(image[None], masks[None]))
        loss = InContextLoss()(out, masks[None])
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (loss0, g0), (loss1, g1) = grads
    assert torch.allclose(loss0, loss1) and g0.keys() == g1.keys() and len(g0) > 50
    assert all(torch.allclose(g0[n], g1[n], rtol=1e-5, atol=1e-8) for n in g0)
    plain, lean = (estimate_memory(plans, "3d_fullres", 1, {}, 2, 4, checkpoint_reference=c) for c in (False, True))
    assert lean.activations < 0.85 * plain.activations and lean.state == plain.state


def test_output_depends_on_the_reference_mask(plans):
    torch.manual_seed(0)
    model = build_mass_model(plans, "3d_fullres", 1).eval()
    image, masks = blobs()
    with torch.no_grad():
        a = model(image[None], masks[None, :1], image[None])[0]
        b = model(image[None], masks[None, 1:], image[None])[0]
        a_again = model(image[None], masks[None, :1], image[None])[0]
    assert torch.equal(a, a_again)
    assert (a - b).abs().mean() > 1e-3 * a.abs().mean()


@pytest.mark.parametrize("mode", ["shared", "per_task"])
def test_padded_task_slots_do_not_change_real_tasks(plans, mode):
    """A padded slot (valid False, any mask, even empty) must not influence the real tasks' logits."""
    torch.manual_seed(0)
    model = build_mass_model(plans, "3d_fullres", 1, decoder_mode=mode).eval()
    image, masks = blobs()
    valid = torch.tensor([[True, False, False]])
    padding = torch.stack([masks[0], torch.rand_like(masks[0]), torch.zeros_like(masks[0])])
    with torch.no_grad():
        one = model(image[None], masks[None, :1], image[None])[0]
        padded = model(image[None], padding[None], image[None], valid)[0]
        # the joint encoder pass of forward() equals separate encode_task + segment
        separate = model.segment(image[None], model.encode_task(image[None], padding[None], valid))[0]
    assert torch.isfinite(padded).all()
    assert torch.allclose(separate, padded, atol=1e-5)
    assert torch.allclose(one[:, 0], padded[:, 0], atol=1e-5)


def test_token_averaging_of_several_references(plans):
    model = build_mass_model(plans, "3d_fullres", 1).eval()
    image, masks = blobs()
    with torch.no_grad():
        t1 = model.encode_task(image[None], masks[None])
        t2 = model.encode_task(image[None].flip(-1), masks[None].flip(-1))
    mean = TaskTokens.average([t1, t2])
    assert torch.allclose(mean.scales[0], (t1.scales[0] + t2.scales[0]) / 2)


def test_loss_perfect_wrong_and_empty_targets():
    loss = InContextLoss()
    _, masks = blobs()
    target = torch.stack([masks[0], torch.zeros_like(masks[0])])[None]  # second task: empty (outside the crop)
    perfect = [(target * 2 - 1) * 20, (downsample_target(target, (16, 16, 16)) * 2 - 1) * 20]
    assert loss(perfect, target) < 1e-3
    wrong = [-p for p in perfect]
    assert loss(wrong, target) > 5
    # an empty target still counts: predicting foreground there costs
    half_wrong = [torch.stack([p[0, 0], -p[0, 1]])[None] for p in perfect]
    assert loss(half_wrong, target) > 1
    per_task = loss.per_task(half_wrong[0], target)
    assert per_task[0, 0] < 1e-3 and per_task[0, 1] > 1
    # padded slots are ignored
    assert loss(half_wrong, target, valid=torch.tensor([[True, False]])) < 1e-3
    # the plain soft Dice gives the same ordering
    plain = InContextLoss(adaptive_fp_fn=False)
    assert plain(perfect, target) < 1e-3 < plain(wrong, target)


def reference_per_task(logits, target, adaptive: bool, smooth: float = 1.0):
    """The loss written with autograd on full-size float tensors: what the chunked ``_DiceBCE`` must equal."""
    x, t = logits.flatten(2), target.to(logits.dtype).flatten(2)
    probs = torch.sigmoid(x)
    tp = (probs * t).sum(-1)
    fp, fn = (probs.sum(-1) - tp).clamp_min(0), (t.sum(-1) - tp).clamp_min(0)
    if adaptive:
        alpha = (fp / (fp + fn).clamp_min(1e-6)).clamp(0.2, 0.8).detach()
        dice = (tp + smooth) / (tp + alpha * fp + (1 - alpha) * fn + smooth)
    else:
        dice = (2 * tp + smooth) / (2 * tp + fp + fn + smooth)
    return (1 - dice) + torch.nn.functional.binary_cross_entropy_with_logits(x, t, reduction="none").mean(-1)


@pytest.mark.parametrize("adaptive", [True, False])
def test_chunked_loss_equals_the_full_size_formula_in_value_and_gradient(monkeypatch, adaptive):
    """Values and gradients of the chunked loss equal autograd's on the full-size formula (float64), with chunks
    that split the task rows unevenly, empty and full targets, bool and float targets; bf16 logits get bf16
    gradients close to float32's."""
    from mass_nnu.model import loss as loss_module

    monkeypatch.setattr(loss_module, "CHUNK_VOXELS", 3 * 6 * 5 * 4)  # 3 rows per chunk, 8 rows
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(2, 4, 6, 5, 4, generator=g, dtype=torch.float64) * 3).requires_grad_()
    target = torch.rand(2, 4, 6, 5, 4, generator=g) > 0.6
    target[0, 1], target[1, 2] = False, True  # an empty and a full task
    upstream = torch.rand(2, 4, generator=g, dtype=torch.float64)
    loss = InContextLoss(adaptive_fp_fn=adaptive)
    for t in (target, target.double()):
        ours = loss.per_task(logits, t)
        ref = reference_per_task(logits, t, adaptive)
        assert torch.allclose(ours, ref, atol=1e-10)
        grad_ours, = torch.autograd.grad((ours * upstream).sum(), logits)
        grad_ref, = torch.autograd.grad((ref * upstream).sum(), logits)
        assert torch.allclose(grad_ours, grad_ref, atol=1e-10)
    low = logits.detach().float().bfloat16().requires_grad_()
    grad_low, = torch.autograd.grad((loss.per_task(low, target) * upstream.float()).sum(), low)
    assert grad_low.dtype == torch.bfloat16
    assert torch.allclose(grad_low.float(), grad_ref.float(), atol=2e-3, rtol=2e-2)


def test_deep_supervision_matches_nnunet():
    """Weights equal nnU-Net's for the outputs it trains; targets are downsampled like its DS transform."""
    import numpy as np
    from batchgeneratorsv2.transforms.utils.deep_supervision_downsampling import DownsampleSegForDSTransform

    nnunet = np.array([1 / 2 ** i for i in range(4)])
    nnunet[-1] = 0
    assert np.allclose(deep_supervision_weights(3), (nnunet / nnunet.sum())[:3])
    seg = (torch.rand(2, 20, 32, 24) > 0.5).to(torch.int16)
    theirs = DownsampleSegForDSTransform([[1, 1, 1], [1, 0.5, 0.5], [0.5, 0.25, 0.25]])(segmentation=seg)["segmentation"]
    ours = [downsample_target(seg[None], t.shape[1:])[0] for t in theirs]
    assert all(torch.equal(a.to(torch.int16), b) for a, b in zip(ours, theirs))


def test_dice_per_task():
    target = torch.zeros(1, 4, 8, 8, 8)
    target[0, 0, :4] = 1
    target[0, 1, :4] = 1
    logits = torch.full_like(target, -5.0)
    logits[0, 0, :4] = 5  # perfect
    logits[0, 1, :2] = 5  # half
    logits[0, 2, 0, 0, 0] = 5  # one false positive on an empty target
    dice = dice_per_task(logits, target)
    # an empty target predicted non-empty scores 0; both empty is not scored (NaN, skipped by averages), not 1
    assert torch.allclose(dice[:, :3], torch.tensor([[1.0, 2 / 3, 0.0]])) and bool(dice[0, 3].isnan())


def test_short_overfit_on_a_fixed_in_context_task(plans):
    """Two tasks on the same query (two blobs); only the reference masks tell them apart. Training must learn it."""
    torch.manual_seed(0)
    model = build_mass_model(plans, "3d_fullres", 1, head_hidden=64)
    ref_image, ref_masks = blobs(centers=((10, 10, 10), (22, 20, 16)), seed=1)
    query, target = blobs(centers=((20, 12, 22), (9, 22, 10)), seed=2)
    batch = (ref_image[None], ref_masks[None], query[None])
    loss_fn = InContextLoss()
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    with torch.no_grad():
        model.eval()
        start = model(*batch)
        start_loss, start_dice = loss_fn(start, target[None]).item(), dice_per_task(start[0], target[None]).mean()
    model.train()
    for _ in range(25):
        optim.zero_grad()
        loss = loss_fn(model(*batch), target[None])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
    with torch.no_grad():
        model.eval()
        end = model(*batch)
        end_loss, end_dice = loss_fn(end, target[None]).item(), dice_per_task(end[0], target[None])
    assert end_loss < 0.2 * start_loss, (start_loss, end_loss)
    assert end_dice.min() > 0.8 and end_dice.mean() > start_dice + 0.5, (start_dice, end_dice)


def test_load_mass_model_round_trip(tmp_path, plans):
    from mass_nnu.io import architecture_fingerprint, save_checkpoint

    torch.manual_seed(0)
    model = build_mass_model(plans, "3d_fullres", 1, num_learned_tokens=4, decoder_mode="per_task")
    checkpoint = {"network_weights": model.state_dict(), "plans": plans, "configuration": "3d_fullres",
                  "dataset_json": {"channel_names": {"0": "CT"}}, "mass_config": model.mass_config(),
                  "architecture_fingerprint": architecture_fingerprint(model.backbone.state_dict())}
    folder = tmp_path / "MASSPretrainer__p__3d_fullres"
    save_checkpoint(checkpoint, folder / "checkpoint_final.pth")
    assert set(torch.load(folder / "checkpoint_final.pth", weights_only=True)) >= set(checkpoint)
    loaded, info = load_mass_model(folder)
    assert isinstance(loaded, MASSModel) and loaded.mass_config() == model.mass_config()
    assert info["configuration"] == "3d_fullres" and "network_weights" not in info
    image, masks = blobs()
    with torch.no_grad():
        assert torch.equal(model(image[None], masks[None], image[None])[0],
                           loaded(image[None], masks[None], image[None])[0])
    # a deep copy (an EMA model) drives its own backbone, not the original's
    ema = copy.deepcopy(loaded)
    assert ema.parts.encoder is ema.backbone.encoder and ema.parts.stages is ema.backbone.decoder.stages
    with torch.no_grad():
        for p in ema.parameters():
            p.zero_()
        assert not torch.equal(ema(image[None], masks[None], image[None])[0],
                               loaded(image[None], masks[None], image[None])[0])
    # a checkpoint of another architecture is refused with one clear error
    save_checkpoint({**checkpoint, "architecture_fingerprint": "0" * 16}, tmp_path / "bad.pth")
    with pytest.raises(MassError, match="fingerprint"):
        load_mass_model(tmp_path / "bad.pth")
    save_checkpoint({"network_weights": {}}, tmp_path / "plain.pth")
    with pytest.raises(MassError, match="not a MASS checkpoint"):
        load_mass_model(tmp_path / "plain.pth")
    with pytest.raises(MassError, match="mass_config"):
        build_mass_model(plans, "3d_fullres", 1, no_such_option=1)
    with pytest.raises(MassError, match="no configuration"):
        build_mass_model(plans, "2d", 1)


def test_model_on_plans_from_mass_plan(nnunet_env, run_cli):
    """Plans that `mass plan` writes (nnU-Net's ResEnc M planner) build the same backbone as nnU-Net's trainer."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from mass_nnu.adapter.datasets import Dataset
    from mass_nnu.demo_data.phantom import write_phantom_dataset

    write_phantom_dataset(981, "MassModelPhantom", num_train=3, shape=(24, 32, 32))
    result = run_cli("plan", "-d", "981", "-np", "1", "--no-pp")
    assert result.exit_code == 0, result.output
    plans = Dataset.resolve(981).plans("nnUNetResEncUNetMPlans")
    pm = PlansManager(plans)
    cm = pm.get_configuration("3d_fullres")
    trainer_net = nnUNetTrainer.build_network_architecture(pm, cm, 1, 7, True)
    model = build_mass_model(plans, "3d_fullres", 1, decoder_mode="per_task")
    ours, theirs = model.backbone.state_dict(), trainer_net.state_dict()
    assert [(k, v.shape) for k, v in ours.items() if ".seg_layers." not in k] == \
        [(k, v.shape) for k, v in theirs.items() if ".seg_layers." not in k]
    patch = cm.patch_size
    masks = torch.zeros(1, 2, *patch)
    masks[:, 0, : patch[0] // 2] = 1
    masks[:, 1] = 1  # the whole-crop task
    with torch.no_grad():
        out = model(torch.randn(1, 1, *patch), masks, torch.randn(1, 1, *patch))
    assert tuple(out[0].shape) == (1, 2, *patch) and len(out) == len(cm.pool_op_kernel_sizes) - 2


def test_memory_check_keeps_headroom_above_the_summed_estimate():
    """The summed tensors are not the run's peak (the head CT's batch 2 fitted by the sum and was OOM-killed):
    a run whose sum fits but not with the headroom is refused, before the first step."""
    from mass_nnu.pretraining.memory import GIB, MARGIN, MemoryEstimate, check_memory

    estimate = MemoryEstimate(parameters=GIB // 2, state=2 * GIB, activations=8 * GIB, batch=0)
    assert MARGIN >= 1.2 and estimate.total == int(MARGIN * 10 * GIB)
    check_memory(estimate, estimate.total, torch.device("cpu"), 2, (80, 192, 160))
    with pytest.raises(MassError, match="--batch-size 1"):
        check_memory(estimate, 11 * GIB, torch.device("cpu"), 2, (80, 192, 160))


def test_forward_traces_as_one_graph_for_torch_compile(plans):
    """torch.compile sees the whole forward as one graph (a graph break, e.g. a host sync on the ``valid`` mask,
    splits compilation and costs a sync per step), with padded slots and without."""
    model = build_mass_model(plans, "3d_fullres", 1)
    image, masks = torch.randn(1, 1, 32, 32, 32), torch.rand(1, 4, 32, 32, 32) > 0.5
    for valid in (torch.tensor([[True, True, False, True]]), torch.ones(1, 4, dtype=torch.bool)):
        torch._dynamo.reset()
        explained = torch._dynamo.explain(model)(image, masks, image.clone(), valid)
        assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
