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

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from mass_nnu.adapter.networks import build_network, unet_parts
from mass_nnu.errors import MassError
from mass_nnu.model.building_blocks.attention import all_valid
from mass_nnu.model.building_blocks.conditioning import ConditioningScale
from mass_nnu.model.building_blocks.dynamic_head import DynamicHead
from mass_nnu.model.building_blocks.task_encoder import TaskEncoderScale

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
        # training option, not architecture: recompute the reference's encoder pass in backward instead of
        # keeping its activations (one more encoder forward per step; see docs/pretraining.md, memory)
        self.checkpoint_reference = False

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
        norm is per sample, so this equals two passes). With ``checkpoint_reference`` (while gradients are on) the
        reference's pass is checkpointed: its activations are recomputed in backward, not kept."""
        if self.checkpoint_reference and torch.is_grad_enabled():
            tokens = checkpoint(self.encode_task, ref_image, ref_masks, valid, use_reentrant=False)
            return self.segment(query_image, tokens, deep_supervision)
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
        valid = all_valid(tokens.valid)  # None when no slot is padded: attention without a mask (flash kernels)
        for s in range(len(parts.stages)):
            if s < self.num_token_scales:
                x, updated = self.conditioning[s](x, tokens.scales[s], valid)
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
