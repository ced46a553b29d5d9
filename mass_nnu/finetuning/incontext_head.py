"""Fine-tuning with the in-context head: the whole pretrained MASS model becomes the nnU-Net network.

The plain transfer (``head="new"``) keeps only the backbone and gives it a fresh ``seg_layers`` head, so the task
encoder, the conditioning and the dynamic head, where the pretext task's skill lives, are thrown away. Here each
foreground class is one in-context task: its task tokens are encoded from the labelled training cases (as
``mass segment`` encodes references), then become trainable parameters, and nnU-Net fine-tunes everything.
Before the first step the network therefore predicts what in-context segmentation predicts.

Output for nnU-Net's softmax losses and predictor: (B, 1 + K, *S), background logit 0 and class k the MASS logit
of task k, so the argmax equals in-context inference's rule "the highest sigmoid if > 0.5".
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from mass_nnu.adapter.networks import build_from_configuration
from mass_nnu.errors import MassError
from mass_nnu.finetuning.settings import FinetuneSettings
from mass_nnu.model.artifacts import find_mass_checkpoint, resolve_mass_checkpoint
from mass_nnu.model.mass_model import MASSModel, TaskTokens, mass_model_around
from mass_nnu.model.references import Reference, encode_tasks


def choose_head(head: str, weights: Path | None) -> tuple[str, dict | None]:
    """The head a run uses ("new" or "incontext") and, for "incontext", the MASS config. No weights (the scratch
    twin) means "new"; "auto" means "incontext" when the full MASS checkpoint is found, else "new"."""
    FinetuneSettings(head=head).check()
    if weights is None or head == "new":
        return "new", None
    found = resolve_mass_checkpoint(weights) if head == "incontext" else find_mass_checkpoint(weights)
    return ("incontext", found[1]["mass_config"]) if found else ("new", None)


class InContextHeadNetwork(nn.Module):
    """A MASS model with one trainable set of task tokens per foreground class.

    The tokens are parameters here, so the MASS task encoder takes no part in the forward pass: it is frozen
    (``requires_grad=False``), else DDP waits for gradients that never come and fails on the second iteration."""

    def __init__(self, mass: MASSModel, num_classes: int):
        super().__init__()
        assert num_classes >= 2, f"the in-context head needs background and at least one class, got {num_classes}"
        self.mass = mass
        mass.task_encoder.requires_grad_(False)
        self.num_tasks = num_classes - 1
        self.task_tokens = nn.ParameterList(
            nn.Parameter(torch.zeros(1, self.num_tasks, 1 + enc.learned_tokens.shape[0], enc.learned_tokens.shape[1]))
            for enc in mass.task_encoder)

    @property
    def encoder(self):
        return self.mass.backbone.encoder

    @property
    def decoder(self):
        """The backbone's decoder: nnU-Net switches deep supervision through ``network.decoder.deep_supervision``."""
        return self.mass.backbone.decoder

    def set_tokens(self, tokens: TaskTokens) -> None:
        assert tokens.num_tasks == self.num_tasks, f"{tokens.num_tasks} task token sets for {self.num_tasks} classes"
        with torch.no_grad():
            for parameter, scale in zip(self.task_tokens, tokens.scales):
                parameter.copy_(scale[:1])

    def forward(self, x: torch.Tensor):
        b = x.shape[0]
        tokens = TaskTokens([t.expand(b, -1, -1, -1) for t in self.task_tokens],
                            torch.ones(b, self.num_tasks, dtype=torch.bool, device=x.device))
        deep_supervision = bool(self.decoder.deep_supervision)
        logits = self.mass.segment(x, tokens, deep_supervision=deep_supervision)
        outputs = [torch.cat((torch.zeros_like(out[:, :1]), out), 1) for out in logits]
        return outputs if deep_supervision else outputs[0]


def build_incontext_network(configuration_manager, num_input_channels: int, num_output_channels: int,
                            mass_config: dict, deep_supervision: bool) -> InContextHeadNetwork:
    backbone = build_from_configuration(configuration_manager, num_input_channels, 1, deep_supervision=True)
    network = InContextHeadNetwork(mass_model_around(backbone, **mass_config), num_output_channels)
    network.decoder.deep_supervision = deep_supervision
    return network


def class_tokens(model: MASSModel, patch_size, cases, num_classes: int, log) -> TaskTokens:
    """Task tokens of classes 1..num_classes-1 from labelled cases [(image (C, *S), seg (*S))], averaged over the
    cases holding the class. A class no case holds gets the mean of the others (it cannot be learned anyway)."""
    references = [Reference(f"case {i}", data, seg, [int(v) for v in np.unique(seg) if v > 0])
                  for i, (data, seg) in enumerate(cases)]
    wanted = list(range(1, num_classes))
    present = [c for c in wanted if any(c in r.labels for r in references)]
    if not present:
        raise MassError("in-context head: the labelled training cases hold no foreground voxel")
    tokens = encode_tasks(model, patch_size, references, present)
    absent = [c for c in wanted if c not in present]
    if absent:
        log(f"MASS in-context head: class(es) {absent} absent from the labelled cases; their tokens start as the "
            f"mean of the others")
    scales = []
    for scale in tokens.scales:
        fallback = scale.mean(1, keepdim=True)
        by_class = {c: scale[:, i:i + 1] for i, c in enumerate(present)}
        scales.append(torch.cat([by_class.get(c, fallback) for c in wanted], 1))
    return TaskTokens(scales, torch.ones(1, len(wanted), dtype=torch.bool))
