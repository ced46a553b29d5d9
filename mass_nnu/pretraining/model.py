"""The MASS in-context segmentation model around the exact nnU-Net network of the plans.

``model.backbone`` is the network nnU-Net builds from the plans; its state dict is untouched by MASS.
Everything MASS adds lives beside it:

- ``task_encoder``: per token scale, a masked-average foreground token plus learned task tokens that
  cross-attend to reference features fused with the mask -> task tokens (B, K, T, D_s);
- ``conditioning``: before each of the deepest decoder up-sampling steps, two-way attention between the
  tokens and the query features (tokens -> image, image -> tokens), with token self-attention across tasks;
- ``head``: a dynamic classifier; an MLP maps each task's first token of every scale to one weight vector
  (+ bias) per decoder output, whose dot product with the decoder features gives one logit per task.

The decoder's own ``transpconvs`` and ``stages`` run the up-sampling path; see docs/method.md.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mass_nnu.adapter.networks import build_network, unet_parts
from mass_nnu.errors import MassError

DECODER_MODES = ("shared", "per_task")


@dataclass
class TaskTokens:
    """Task tokens of K tasks: ``scales[s]`` is (B, K, T, D_s), deepest scale first; ``valid`` is (B, K) bool."""
    scales: list[torch.Tensor]
    valid: torch.Tensor

    @property
    def num_tasks(self) -> int:
        return self.scales[0].shape[1]

    def to(self, device) -> "TaskTokens":
        return TaskTokens([s.to(device) for s in self.scales], self.valid.to(device))

    @staticmethod
    def average(token_sets: list["TaskTokens"]) -> "TaskTokens":
        """Several references of the same tasks averaged at the token level (in-context inference)."""
        scales = [torch.stack([t.scales[s] for t in token_sets]).mean(0) for s in range(len(token_sets[0].scales))]
        return TaskTokens(scales, torch.stack([t.valid for t in token_sets]).all(0))


def _heads(dim: int) -> int:
    return dim // 32 if dim % 32 == 0 else 1


class Attention(nn.Module):
    """Multi-head attention through ``F.scaled_dot_product_attention``; ``key_valid`` (B, Lk) masks keys."""

    def __init__(self, dim: int):
        super().__init__()
        self.heads = _heads(dim)
        self.q, self.k, self.v, self.out = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, q, k, v, key_valid: torch.Tensor | None = None):
        b, lq, d = q.shape
        split = lambda x: x.view(b, -1, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        mask = None
        if key_valid is not None:
            key_valid = key_valid | ~key_valid.any(1, keepdim=True)  # a row without valid keys attends to all
            mask = key_valid[:, None, None, :]
        x = F.scaled_dot_product_attention(split(self.q(q)), split(self.k(k)), split(self.v(v)), attn_mask=mask)
        return self.out(x.transpose(1, 2).reshape(b, lq, d))


class MLP(nn.Sequential):
    def __init__(self, dim: int, hidden: int, out: int | None = None):
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, out or dim))


class FourierPositions(nn.Module):
    """Learned projection of sin/cos features of normalised voxel coordinates (patch-relative)."""

    def __init__(self, conv_dim: int, dim: int, bands: int = 6):
        super().__init__()
        self.bands = bands
        self.proj = nn.Linear(conv_dim * 2 * bands, dim)

    def forward(self, spatial: tuple[int, ...], device, dtype) -> torch.Tensor:
        axes = [torch.linspace(-1, 1, n, device=device, dtype=torch.float32) for n in spatial]
        coords = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, len(spatial))
        freqs = (2.0 ** torch.arange(self.bands, device=device, dtype=torch.float32)) * math.pi
        angles = (coords[..., None] * freqs).flatten(1)
        return self.proj(torch.cat([angles.sin(), angles.cos()], -1).to(dtype))  # (N, D)


def _flatten(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(2).transpose(1, 2)  # (B, C, *S) -> (B, N, C)


class TaskEncoderScale(nn.Module):
    """Task tokens at one scale: [foreground token, learned tokens] cross-attend to mask-fused reference features."""

    def __init__(self, channels: int, dim: int, conv_dim: int, num_learned_tokens: int, num_blocks: int,
                 mask_subgrid: tuple[int, ...]):
        super().__init__()
        self.mask_subgrid = mask_subgrid
        self.in_proj = nn.Linear(channels, dim) if channels != dim else nn.Identity()
        self.mask_proj = nn.Linear(math.prod(mask_subgrid), dim)  # sub-voxel mask coverage -> feature offset
        self.positions = FourierPositions(conv_dim, dim)
        self.learned_tokens = nn.Parameter(torch.randn(num_learned_tokens, dim) * 0.02)
        self.norm_fg, self.norm_learned, self.norm_kv = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.blocks = nn.ModuleList(TokenBlock(dim) for _ in range(num_blocks))
        self.norm_out = nn.LayerNorm(dim)

    def mask_coverage(self, masks: torch.Tensor, spatial: tuple[int, ...]) -> torch.Tensor:
        """(B, K, *P) -> (B, K, N, prod(subgrid)): fraction of each sub-voxel of every feature voxel inside the mask."""
        b, k = masks.shape[:2]
        fine = [n * s for n, s in zip(spatial, self.mask_subgrid)]
        pool = F.adaptive_avg_pool3d if len(spatial) == 3 else F.adaptive_avg_pool2d
        cov = pool(masks.float(), fine)
        # space-to-depth: every feature voxel gets its subgrid of coverages as channels
        shape = [b, k]
        for n, s in zip(spatial, self.mask_subgrid):
            shape += [n, s]
        cov = cov.reshape(shape)
        d = len(spatial)
        order = [0, 1] + [2 + 2 * i for i in range(d)] + [3 + 2 * i for i in range(d)]
        return cov.permute(order).reshape(b, k, math.prod(spatial), math.prod(self.mask_subgrid))

    def forward(self, features: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        b, k = masks.shape[:2]
        spatial = tuple(features.shape[2:])
        feats = self.in_proj(_flatten(features))  # (B, N, D)
        coverage = self.mask_coverage(masks, spatial).to(feats.dtype)  # (B, K, N, S)
        fraction = coverage.mean(-1)  # (B, K, N)
        foreground = torch.einsum("bkn,bnd->bkd", fraction, feats) / fraction.sum(-1, keepdim=True).clamp_min(1e-6)
        kv = feats[:, None] + self.mask_proj(coverage) + self.positions(spatial, feats.device, feats.dtype)
        kv = self.norm_kv(kv.flatten(0, 1))  # (B*K, N, D)
        tokens = torch.cat([self.norm_fg(foreground).reshape(b * k, 1, -1),
                            self.norm_learned(self.learned_tokens).expand(b * k, -1, -1)], 1)
        for block in self.blocks:
            tokens = block(tokens, kv)
        return self.norm_out(tokens).view(b, k, tokens.shape[1], -1)


class TokenBlock(nn.Module):
    """Pre-norm tokens -> features cross-attention, token self-attention, MLP."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm_cross, self.norm_self, self.norm_mlp = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.cross, self.self_attn, self.mlp = Attention(dim), Attention(dim), MLP(dim, 4 * dim)

    def forward(self, tokens, kv):
        tokens = tokens + self.cross(self.norm_cross(tokens), kv, kv)
        t = self.norm_self(tokens)
        tokens = tokens + self.self_attn(t, t, t)
        return tokens + self.mlp(self.norm_mlp(tokens))


class TwoWayBlock(nn.Module):
    """SAM-style two-way block: token self-attention (across all K tasks of a sample), tokens -> image,
    token MLP, image -> tokens. Tokens are (B, K*T, D); the image is (B, N, D) in ``shared`` mode or
    (B*K, N, D) in ``per_task`` mode, where each task's tokens attend only to their own image copy."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm_self, self.norm_t2i, self.norm_mlp, self.norm_i2t = (nn.LayerNorm(dim) for _ in range(4))
        self.norm_image = nn.LayerNorm(dim)
        self.self_attn, self.t2i, self.i2t = Attention(dim), Attention(dim), Attention(dim)
        self.mlp = MLP(dim, 4 * dim)

    def forward(self, tokens, image, positions, token_valid, num_tasks):
        b = tokens.shape[0]
        t = self.norm_self(tokens)
        tokens = tokens + self.self_attn(t, t, t, token_valid)
        per_task = image.shape[0] != b
        grouped = tokens.reshape(b * num_tasks, -1, tokens.shape[-1]) if per_task else tokens
        img = self.norm_image(image)
        grouped = grouped + self.t2i(self.norm_t2i(grouped), img + positions, img)
        grouped = grouped + self.mlp(self.norm_mlp(grouped))
        t = self.norm_i2t(grouped)
        image = image + self.i2t(img + positions, t, t, None if per_task else token_valid)
        return grouped.reshape(tokens.shape), image


class ConditioningScale(nn.Module):
    """Conditions the query features before one decoder up-sampling step; returns features and updated tokens."""

    def __init__(self, channels: int, dim: int, conv_dim: int, num_blocks: int):
        super().__init__()
        self.in_proj = nn.Linear(channels, dim) if channels != dim else nn.Identity()
        self.out_proj = nn.Linear(dim, channels) if channels != dim else nn.Identity()
        self.positions = FourierPositions(conv_dim, dim)
        self.blocks = nn.ModuleList(TwoWayBlock(dim) for _ in range(num_blocks))
        self.norm_tokens = nn.LayerNorm(dim)

    def forward(self, features: torch.Tensor, tokens: torch.Tensor, valid: torch.Tensor):
        b, k, t, d = tokens.shape
        spatial = features.shape[2:]
        image0 = self.in_proj(_flatten(features))
        positions = self.positions(tuple(spatial), features.device, image0.dtype)
        token_valid = valid[:, :, None].expand(b, k, t).reshape(b, k * t)
        flat_tokens, image = tokens.reshape(b, k * t, d), image0
        for block in self.blocks:
            flat_tokens, image = block(flat_tokens, image, positions, token_valid, k)
        delta = self.out_proj(image - image0).transpose(1, 2).reshape(features.shape)
        return features + delta, self.norm_tokens(flat_tokens).view(b, k, t, d)


class DynamicHead(nn.Module):
    """MLP from the concatenated first tokens of all scales to per-output classifier weights and bias."""

    def __init__(self, token_dims: list[int], output_channels: list[int], hidden: int):
        super().__init__()
        self.output_channels = output_channels
        self.norm = nn.LayerNorm(sum(token_dims))
        self.trunk = MLP(sum(token_dims), hidden, hidden)
        self.act = nn.GELU()
        self.outputs = nn.ModuleList(nn.Linear(hidden, c + 1) for c in output_channels)

    def forward(self, first_tokens: list[torch.Tensor], features: list[torch.Tensor], num_tasks: int):
        """first_tokens: (B, K, D_s) per scale; features: (B or B*K, C_j, *S_j) per output -> (B, K, *S_j)."""
        h = self.act(self.trunk(self.norm(torch.cat(first_tokens, -1))))  # (B, K, H)
        b = h.shape[0]
        logits = []
        for feats, linear in zip(features, self.outputs):
            wb = linear(h)  # (B, K, C+1)
            w, bias = wb[..., :-1], wb[..., -1]
            if feats.shape[0] == b:  # shared decoder path: every task reads the same features
                out = torch.einsum("bkc,bc...->bk...", w, feats)
            else:  # per-task decoder paths
                out = torch.einsum("bkc,bkc...->bk...", w, feats.view(b, num_tasks, *feats.shape[1:]))
            logits.append(out + bias.view(*bias.shape, *([1] * (feats.ndim - 2))))
        return logits


class MASSModel(nn.Module):
    def __init__(self, backbone: nn.Module, num_token_scales: int = 3, num_learned_tokens: int = 10,
                 attention_dim_cap: int = 256, task_encoder_blocks: int = 2, conditioning_blocks: int = 2,
                 head_hidden: int = 256, decoder_mode: str = "shared", mask_subgrid: int = 2,
                 deep_supervision: bool = True):
        super().__init__()
        if decoder_mode not in DECODER_MODES:
            raise MassError(f"decoder_mode '{decoder_mode}': use one of {', '.join(DECODER_MODES)}")
        self.backbone = backbone
        parts = self._parts = unet_parts(backbone)
        n_stages = len(parts.output_channels)
        if n_stages < 2:
            raise MassError("network: MASS needs a U-Net with at least 2 stages")
        # never at full or half resolution: T×N attention there costs more than the backbone (shallow plans)
        self.num_token_scales = max(1, min(num_token_scales, n_stages - 2))
        self.decoder_mode = decoder_mode
        self.deep_supervision = deep_supervision
        self._config = dict(num_token_scales=num_token_scales, num_learned_tokens=num_learned_tokens,
                            attention_dim_cap=attention_dim_cap, task_encoder_blocks=task_encoder_blocks,
                            conditioning_blocks=conditioning_blocks, head_hidden=head_hidden,
                            decoder_mode=decoder_mode, mask_subgrid=mask_subgrid, deep_supervision=deep_supervision)
        # scale s (0 = deepest) lives at encoder stage n_stages-1-s and before decoder up-sampling step s
        channels = [parts.output_channels[-(s + 1)] for s in range(self.num_token_scales)]
        dims = [min(c, attention_dim_cap) for c in channels]
        cum = [[math.prod(st[a] for st in parts.strides[:n_stages - s]) for a in range(parts.conv_dim)]
               for s in range(self.num_token_scales)]
        self.task_encoder = nn.ModuleList(
            TaskEncoderScale(c, d, parts.conv_dim, num_learned_tokens, task_encoder_blocks,
                             tuple(min(mask_subgrid, f) for f in cum[s]))
            for s, (c, d) in enumerate(zip(channels, dims)))
        self.conditioning = nn.ModuleList(ConditioningScale(c, d, parts.conv_dim, conditioning_blocks)
                                          for c, d in zip(channels, dims))
        # decoder outputs, full resolution first; the lowest one (weight 0 in nnU-Net's loss) is not produced
        num_outputs = max(1, n_stages - 2)
        self.head = DynamicHead(dims, [parts.output_channels[i] for i in range(num_outputs)], head_hidden)
        self._init_added(self.task_encoder, self.conditioning, self.head)
        # seg_layers stay in the state dict (weight transfer) but are unused: freeze them for DDP and optimisers
        backbone.decoder.seg_layers.requires_grad_(False)
        self._has_batch_norm = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in backbone.modules())

    @staticmethod
    def _init_added(*modules):
        for module in modules:
            for m in module.modules():
                if isinstance(m, nn.Linear):
                    nn.init.xavier_uniform_(m.weight)
                    nn.init.zeros_(m.bias)

    def mass_config(self) -> dict:
        """Plain kwargs that rebuild this model with ``build_mass_model(plans, configuration, channels, **cfg)``."""
        return dict(self._config)

    @property
    def parts(self):
        """The backbone's encoder, decoder transpconvs and stages (plain references, not extra modules)."""
        return self._parts

    def encode_task(self, ref_image: torch.Tensor, ref_masks: torch.Tensor,
                    valid: torch.Tensor | None = None) -> TaskTokens:
        """ref_image (B, C, *P), ref_masks (B, K, *P) in {0, 1}; valid (B, K) marks real (not padded) tasks."""
        return self._tokens(self.parts.encoder(ref_image), ref_image, ref_masks, valid)

    def segment(self, query_image: torch.Tensor, tokens: TaskTokens,
                deep_supervision: bool | None = None) -> list[torch.Tensor]:
        """Logits (B, K, *S) per decoder output, full resolution first (only that one without deep supervision)."""
        return self._decode(self.parts.encoder(query_image), tokens, deep_supervision)

    def forward(self, ref_image, ref_masks, query_image, valid: torch.Tensor | None = None,
                deep_supervision: bool | None = None) -> list[torch.Tensor]:
        """encode_task + segment; reference and query share one encoder pass when their shapes agree (instance
        norm is per sample, so this equals two passes)."""
        if ref_image.shape != query_image.shape or self._has_batch_norm:
            return self.segment(query_image, self.encode_task(ref_image, ref_masks, valid), deep_supervision)
        b = ref_image.shape[0]
        skips = self.parts.encoder(torch.cat((ref_image, query_image)))
        tokens = self._tokens([x[:b] for x in skips], ref_image, ref_masks, valid)
        return self._decode([x[b:] for x in skips], tokens, deep_supervision)

    def _tokens(self, skips, ref_image, ref_masks, valid) -> TaskTokens:
        if ref_masks.shape[0] != ref_image.shape[0] or ref_masks.shape[2:] != ref_image.shape[2:]:
            raise ValueError(f"reference masks {tuple(ref_masks.shape)} do not match image {tuple(ref_image.shape)}")
        scales = [enc(skips[-(s + 1)], ref_masks) for s, enc in enumerate(self.task_encoder)]
        if valid is None:
            valid = torch.ones(ref_masks.shape[:2], dtype=torch.bool, device=ref_masks.device)
        return TaskTokens(scales, valid.bool())

    def _decode(self, skips, tokens: TaskTokens, deep_supervision: bool | None) -> list[torch.Tensor]:
        """Drives the nnU-Net decoder's own transpconvs and stages, conditioning before the deepest up-samplings."""
        deep_supervision = self.deep_supervision if deep_supervision is None else deep_supervision
        parts = self.parts
        k = tokens.num_tasks
        # per_task: every task gets its own decoder path from the bottleneck on (memory and time x K)
        expand = (lambda x: x.repeat_interleave(k, 0)) if self.decoder_mode == "per_task" else (lambda x: x)  # noqa: E731
        x = expand(skips[-1])
        first_tokens, features = [], []
        for s in range(len(parts.stages)):
            if s < self.num_token_scales:
                x, updated = self.conditioning[s](x, tokens.scales[s], tokens.valid)
                first_tokens.append(updated[:, :, 0])
            x = parts.stages[s](torch.cat((parts.transpconvs[s](x), expand(skips[-(s + 2)])), 1))
            features.append(x)
        # full resolution first; the head's zip uses only as many output layers as features given
        return self.head(first_tokens, features[::-1][:len(self.head.outputs) if deep_supervision else 1], k)


def build_mass_model(plans: dict, configuration: str, num_input_channels: int, **mass_kwargs) -> MASSModel:
    """MASS around the network nnU-Net builds for ``plans[configuration]`` (deep supervision on)."""
    backbone = build_network(plans, configuration, num_input_channels, num_output_channels=1, deep_supervision=True)
    return mass_model_around(backbone, **mass_kwargs)


def mass_model_around(backbone: nn.Module, **mass_kwargs) -> MASSModel:
    """MASS around an nnU-Net network built with one output channel and deep supervision on."""
    try:
        return MASSModel(backbone, **mass_kwargs)
    except TypeError as e:
        raise MassError(f"mass_config: {e}") from None


def load_mass_model(folder_or_checkpoint, device="cpu") -> tuple[MASSModel, dict]:
    """A MASS model from a pretrained folder (its checkpoint_final.pth) or a checkpoint file; info holds
    plans, configuration, dataset_json, mass_config, architecture_fingerprint and the other plain entries."""
    from mass_nnu.io import architecture_fingerprint, load_checkpoint

    path = Path(folder_or_checkpoint)
    if path.is_dir():
        path = path / "checkpoint_final.pth"
    checkpoint = load_checkpoint(path)
    missing = [key for key in ("plans", "configuration", "mass_config") if key not in checkpoint]
    if missing:
        raise MassError(f"{path}: not a MASS checkpoint (missing {', '.join(missing)})")
    weights = checkpoint["network_weights"]
    num_input_channels = int(weights[_first_conv_key(weights)].shape[1])
    model = build_mass_model(checkpoint["plans"], checkpoint["configuration"], num_input_channels,
                             **checkpoint["mass_config"])
    expected = checkpoint.get("architecture_fingerprint")
    found = architecture_fingerprint(model.backbone.state_dict())
    if expected is not None and expected != found:
        raise MassError(f"{path}: backbone fingerprint {expected} does not match the network its plans build ({found})")
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise MassError(f"{path}: weights do not fit the model ({str(e).splitlines()[0][:200]})") from None
    info = {key: value for key, value in checkpoint.items() if key != "network_weights"}
    return model.to(device), info


def _first_conv_key(weights: dict) -> str:
    """The first conv weight of the backbone (stem or first stage): its dim 1 is the input channel count."""
    for key, value in weights.items():
        if key.startswith("backbone.encoder.") and key.endswith(".weight") and value.ndim >= 4:
            return key
    raise MassError("checkpoint: no backbone encoder convolution in network_weights")
