"""``FinetuneSettings``: what a fine-tuning run trains with, mirroring ``PretrainSettings``.

``mass finetune`` stores it as-is in ``plans["mass_finetune"]`` of the run's derived plans, and
``nnUNetTrainerMASS`` reads it back from there, so ``nnUNetv2_train/predict -p <derived plans>`` reproduce the run.
``None`` means the trainer's default.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from mass_nnu.errors import MassError

HEADS = ("new", "incontext")
TRANSFER_MODES = ("all", "encoder")  # "encoder": the decoder keeps nnU-Net's initialisation


@dataclass
class FinetuneSettings:
    num_epochs: int | None = None
    num_iterations_per_epoch: int | None = None
    num_val_iterations_per_epoch: int | None = None
    initial_lr: float | None = None
    warmup_epochs: int | None = None
    frozen_encoder_epochs: int | None = None
    batch_size: int | None = None
    mirroring: bool | None = None
    seed: int | None = None  # seeds the label budget and training
    transfer: str | None = None  # all | encoder (head "new" only)
    head: str | None = None  # auto | new | incontext; stored resolved
    num_labeled: int | None = None  # label budget: N training cases of the fold, or
    fraction: float | None = None   # a fraction of them
    mass_config: dict | None = None  # the MASS model's kwargs (head "incontext")
    random_init: bool | None = None  # head "incontext" from fresh random weights (the pretraining ablation)

    def check(self) -> None:
        if self.head not in (*HEADS, "auto", None):
            raise MassError(f"--head {self.head}: choose auto, {' or '.join(HEADS)}")
        if self.transfer not in (*TRANSFER_MODES, None):
            raise MassError(f"--transfer {self.transfer}: choose {' or '.join(TRANSFER_MODES)}")

    @property
    def label_budget(self) -> dict | None:
        if self.num_labeled is None and self.fraction is None:
            return None
        return {"num_labeled": self.num_labeled, "fraction": self.fraction, "seed": self.seed or 0}

    def tag(self, scratch: bool) -> str:
        """Suffix of the run's derived plans identifier: mass|scratch, the budget and every non-default knob."""
        seed = self.seed or 0
        budget = f"n{self.num_labeled}s{seed}" if self.num_labeled is not None else \
            f"f{self.fraction:g}s{seed}" if self.fraction is not None else ""
        parts = ["scratch" if scratch else "mass", budget,
                 f"e{self.num_epochs}" if self.num_epochs else "",
                 f"i{self.num_iterations_per_epoch}" if self.num_iterations_per_epoch else "",
                 f"b{self.batch_size}" if self.batch_size else "",
                 f"lr{self.initial_lr:g}" if self.initial_lr else "",
                 "tenc" if self.transfer == "encoder" and not scratch else "",
                 "hic" if self.head == "incontext" else "",
                 "rand" if self.random_init and not scratch else ""]
        return "_".join(p for p in parts if p)

    def to_plans(self) -> dict:
        return asdict(self)

    @classmethod
    def from_plans(cls, plans: dict) -> "FinetuneSettings":
        """The settings stored in ``plans["mass_finetune"]``; missing entries take the defaults."""
        stored = plans.get("mass_finetune") or {}
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in stored.items() if k in known}
        budget = stored.get("label_budget") or {}  # written by mass-nnu before FinetuneSettings
        for key in ("num_labeled", "fraction"):
            values.setdefault(key, budget.get(key))
        return cls(**values)
