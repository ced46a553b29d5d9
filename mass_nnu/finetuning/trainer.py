"""``nnUNetTrainerMASS``: nnU-Net's trainer that starts from MASS-pretrained weights.

Weights path, first found wins: the instance attribute ``pretrained_weights`` (set before ``initialize()``; the
string "scratch" disables), the environment variable ``MASS_PRETRAINED_WEIGHTS`` (a file or a pretrained folder;
"scratch" disables), then ``plans["pretrain_info"]["weights"]`` (written by ``mass finetune``; null = scratch).
Training options ``plans["mass_finetune"]`` (num_epochs, num_iterations_per_epoch, initial_lr, warmup_epochs,
frozen_encoder_epochs, mirroring, seed, transfer, head, mass_config, label_budget) override the class defaults, so
``nnUNetv2_train -p <plans>`` reproduces a ``mass finetune`` run (``FinetuneSettings``).
"""
from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch
from torch.optim.lr_scheduler import _LRScheduler

from mass_nnu.adapter.training import bare_network, last_epoch_figures, nnUNetTrainer, reading_preloaded_checkpoint
from mass_nnu.errors import MassError
from mass_nnu.finetuning.budget import select_budget
from mass_nnu.finetuning.incontext_head import build_incontext_network, class_tokens
from mass_nnu.finetuning.settings import FinetuneSettings
from mass_nnu.io import atomic_path, load_checkpoint, load_nnunet_checkpoint, remove_stale_temporaries, save_json_atomic
from mass_nnu.model.artifacts import resolve_mass_checkpoint, resolve_weights_path

WEIGHTS_ENV = "MASS_PRETRAINED_WEIGHTS"
SCRATCH = "scratch"
TUNABLE = ("num_epochs", "num_iterations_per_epoch", "num_val_iterations_per_epoch", "initial_lr", "warmup_epochs",
           "frozen_encoder_epochs", "mirroring", "seed", "transfer", "head", "random_init")
CASTS = {"initial_lr": float, "mirroring": bool, "transfer": str, "head": str, "random_init": bool}
MAX_TOKEN_CASES = 16  # in-context head: class tokens are averaged over at most this many labelled cases


class WarmupPolyLRScheduler(_LRScheduler):
    """Linear warm-up over ``warmup`` epochs (lr·(e+1)/(warmup+1)), then nnU-Net's poly decay over the rest."""
    def __init__(self, optimizer, initial_lr: float, max_steps: int, warmup: int, exponent: float = 0.9):
        self.initial_lr, self.max_steps, self.warmup, self.exponent = initial_lr, max_steps, warmup, exponent
        self.ctr = 0
        super().__init__(optimizer, -1)

    def lr_at(self, step: int) -> float:
        if step < self.warmup:
            return self.initial_lr * (step + 1) / (self.warmup + 1)
        progress = (step - self.warmup) / max(1, self.max_steps - self.warmup)
        return self.initial_lr * max(0.0, 1 - progress) ** self.exponent

    def step(self, current_step=None):
        if current_step is None or current_step == -1:
            current_step = self.ctr
            self.ctr += 1
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(current_step)
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]


def is_adaptable_input_projection(target: torch.Size, source: torch.Size, num_input_channels: int) -> bool:
    """A first-layer conv weight whose only difference is the number of input channels."""
    return (len(target) == len(source) >= 3 and target[0] == source[0] and target[2:] == source[2:]
            and target[1] == num_input_channels != source[1])


def plan_hint() -> str:
    return ("plan both datasets together with 'mass plan -d <pretrain IDs> --target-dataset <downstream ID>' and "
            "pretrain again, or fine-tune with the plans the weights were trained on ('mass finetune -w ...' "
            "transfers them)")


def architecture_mismatch(target: dict, weights: dict, num_input_channels: int) -> str | None:
    """Why ``weights`` cannot initialise a network with state dict ``target`` (None when they fit). The
    segmentation head and the input projection's channel count may differ."""
    missing = [k for k in target if k not in weights and ".seg_layers." not in k]
    unexpected = [k for k in weights if k not in target and ".seg_layers." not in k]
    if missing or unexpected:
        return (f"{len(missing)} tensors of this network missing, e.g. {(missing or ['-'])[0]}; "
                f"{len(unexpected)} unknown, e.g. {(unexpected or ['-'])[0]}")
    for key, value in target.items():
        if ".seg_layers." in key or weights[key].shape == value.shape:
            continue
        if not is_adaptable_input_projection(value.shape, weights[key].shape, num_input_channels):
            return f"{key} has shape {tuple(weights[key].shape)}, this network needs {tuple(value.shape)}"
    return None


def transfer_weights(network, weights: dict, source: str, log, num_input_channels: int,
                     encoder_only: bool = False) -> dict[str, list[str]]:
    """Copy every matching tensor of ``weights`` into ``network``; adapt the input projection when the input
    channel count differs (channel mean, repeated, rescaled to keep the activation scale); skip ``seg_layers``.
    Any other difference means another architecture: MassError."""
    target = bare_network(network).state_dict()
    problem = architecture_mismatch(target, weights, num_input_channels)
    if problem:
        raise MassError(f"{source}: weights are for another architecture ({problem}); {plan_hint()}")
    report = {"transferred": [], "adapted": [], "skipped": []}
    new_state = {}
    for key, value in target.items():
        src = weights.get(key)
        if src is None or ".seg_layers." in key:
            report["skipped"].append(key)
            log(f"MASS weights: skipped {key} (segmentation head, trained from scratch)")
        elif encoder_only and key.startswith("decoder.") and not key.startswith("decoder.encoder."):
            report["skipped"].append(key)
            log(f"MASS weights: skipped {key} (decoder; transfer=encoder)", also_print_to_console=False)
        elif src.shape == value.shape:
            new_state[key] = src.to(value.dtype)
            report["transferred"].append(key)
            log(f"MASS weights: transferred {key} {tuple(value.shape)}", also_print_to_console=False)
        else:
            mean = src.to(value.dtype).mean(dim=1, keepdim=True) * (src.shape[1] / value.shape[1])
            new_state[key] = mean.expand(-1, value.shape[1], *value.shape[2:]).clone()
            report["adapted"].append(key)
            log(f"MASS weights: adapted {key} from {src.shape[1]} to {value.shape[1]} input channels (mean)")
    bare_network(network).load_state_dict(new_state, strict=False)
    log(f"MASS weights from {source}: {len(report['transferred'])} tensors transferred, {len(report['adapted'])} "
        f"adapted, {len(report['skipped'])} skipped")
    return report


class nnUNetTrainerMASS(nnUNetTrainer):
    """nnU-Net's trainer, initialised from MASS-pretrained weights, with warm-up + poly and an optional
    frozen-encoder phase. Defaults (docs/finetuning.md): lr 1e-2, warm-up 5 % of the epochs, encoder not frozen,
    mirroring on."""
    default_num_epochs = 1000
    default_iterations = 250
    default_warmup_fraction = 0.05
    default_frozen_encoder_fraction = 0.0
    default_mirroring = True

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = self.default_num_epochs
        self.num_iterations_per_epoch = self.default_iterations
        self.num_val_iterations_per_epoch = None
        self.mirroring = self.default_mirroring
        self.warmup_epochs = self.frozen_encoder_epochs = None
        self.transfer = "all"  # "all": encoder and decoder; "encoder": decoder trained from scratch
        self.head = "new"  # "new": nnU-Net's seg_layers from scratch; "incontext": the pretrained MASS model
        self.seed: int | None = None  # seeds initialisation and (with nnUNet_n_proc_DA=0) sampling/augmentation
        self.random_init = False  # in-context head: keep the fresh (seeded) weights, do not load the MASS ones
        settings = FinetuneSettings.from_plans(self.plans_manager.plans)
        settings.check()
        for key in TUNABLE:
            if getattr(settings, key) is not None:
                setattr(self, key, CASTS.get(key, int)(getattr(settings, key)))
        if self.num_val_iterations_per_epoch is None:  # nnU-Net's 50 per 250 training iterations
            self.num_val_iterations_per_epoch = max(1, self.num_iterations_per_epoch // 5)
        if self.warmup_epochs is None:
            self.warmup_epochs = int(round(self.default_warmup_fraction * self.num_epochs))
        if self.frozen_encoder_epochs is None:
            self.frozen_encoder_epochs = int(round(self.default_frozen_encoder_fraction * self.num_epochs))
        self.save_every = max(1, min(self.save_every, self.num_epochs // 10))  # short runs stay resumable
        self.label_budget = settings.label_budget
        if self.head == "incontext" and self.label_manager.has_regions:
            raise MassError("--head incontext: region-based training (sigmoid outputs) is not supported; "
                            "use --head new")
        self.pretrained_weights: str | None = None
        self.weights_report: dict | None = None
        self.progress = None  # a tqdm bar over the epochs, set by mass finetune when nnU-Net's output is hidden

    # ---- weights -------------------------------------------------------------------------------------------
    def weights_source(self) -> Path | None:
        """Attribute, then environment variable, then the plans' pretrain_info; None = from scratch."""
        for value in (self.pretrained_weights, os.environ.get(WEIGHTS_ENV)):
            if value:
                return None if str(value) == SCRATCH else resolve_weights_path(value)
        recorded = (self.plans_manager.plans.get("pretrain_info") or {}).get("weights")
        return resolve_weights_path(recorded) if recorded else None

    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True):
        """nnU-Net's network, or with ``mass_finetune.head == "incontext"`` the whole MASS model (also at
        ``nnUNetv2_predict``, which calls this with the results folder's plans)."""
        settings = FinetuneSettings.from_plans(plans_manager.plans)
        if settings.head == "incontext":
            if not isinstance(settings.mass_config, dict):
                raise MassError(f"plans '{plans_manager.plans_name}': mass_finetune.head is 'incontext' but "
                                f"mass_finetune.mass_config is missing (written by 'mass finetune')")
            return build_incontext_network(configuration_manager, num_input_channels, num_output_channels,
                                           settings.mass_config, enable_deep_supervision)
        return nnUNetTrainer.build_network_architecture(plans_manager, configuration_manager, num_input_channels,
                                                        num_output_channels, enable_deep_supervision)

    def load_pretrained(self) -> None:
        source = self.weights_source()
        if source is None:
            if self.head == "incontext":
                raise MassError("--head incontext needs pretrained weights (it starts from the MASS model)")
            self.print_to_log_file("MASS weights: none (training from scratch, same plans and schedule)")
            self.weights_report = None
            return
        if self.head == "incontext":
            return self.load_incontext_head(source)
        checkpoint = load_checkpoint(source)
        weights = checkpoint["network_weights"]
        if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
            raise MassError(f"{source}: 'network_weights' is not a state dict of tensors")
        self.weights_report = transfer_weights(self.network, weights, str(source), self.print_to_log_file,
                                               self.num_input_channels, encoder_only=self.transfer == "encoder")

    def load_incontext_head(self, source: Path) -> None:
        """All MASS weights, then task tokens per class encoded from the labelled training cases. With
        ``random_init`` the MASS weights are not loaded: the same network keeps its fresh seeded initialisation and
        encodes the class tokens itself (the ablation "in-context head without pretraining")."""
        network = bare_network(self.network)
        if self.random_init:
            path = f"random initialisation (seed {self.seed or 0}; architecture of {source}, weights not loaded)"
        else:
            path, checkpoint = resolve_mass_checkpoint(source)
            try:
                network.mass.load_state_dict(checkpoint["network_weights"])
            except RuntimeError as e:
                raise MassError(f"{path}: MASS weights do not fit this network ({str(e).splitlines()[0][:200]}); "
                                f"{plan_hint()}") from None
        train_keys, _ = self.do_split()
        keys = list(train_keys)[:MAX_TOKEN_CASES]  # an average: more cases only cost memory and time
        dataset = self.dataset_class(self.preprocessed_dataset_folder, keys)
        cases = []
        for key in keys:
            data, seg, _, _ = dataset.load_case(key)
            cases.append((np.asarray(data[:], dtype=np.float32), np.asarray(seg[:])[0]))
        patch = tuple(int(p) for p in self.configuration_manager.patch_size)
        was_training = network.training
        tokens = class_tokens(network.mass.eval(), patch, cases, self.label_manager.num_segmentation_heads,
                              self.print_to_log_file)
        network.train(was_training)
        network.set_tokens(tokens.to(next(network.parameters()).device))
        self.weights_report = {"transferred": [] if self.random_init else list(network.mass.state_dict()),
                               "adapted": [], "skipped": [], "task_tokens_from": keys,
                               "random_init": self.random_init}
        self.print_to_log_file(f"MASS weights from {path}: whole MASS model (in-context head); task tokens of "
                               f"{network.num_tasks} classes encoded from {len(keys)} of {len(train_keys)} "
                               f"labelled case(s)")

    def initialize(self):
        if self.seed is not None:
            random.seed(self.seed)
            np.random.seed(self.seed)
            torch.manual_seed(self.seed)
        super().initialize()
        self.load_pretrained()

    def on_epoch_end(self):
        super().on_epoch_end()
        if self.progress is not None:  # mass finetune's bar (quiet mode); nnU-Net's own runs have none
            loss, dice = last_epoch_figures(self)
            self.progress.set_postfix(loss=f"{loss:.3f}", pseudo_dice=f"{dice:.3f}", refresh=False)
            self.progress.update(1)

    # ---- checkpoints: written atomically, read with weights_only=True ------------------------------------------
    def save_checkpoint(self, filename: str) -> None:
        if self.local_rank != 0 or self.disable_checkpointing:
            return super().save_checkpoint(filename)

        remove_stale_temporaries(filename)
        with atomic_path(filename) as tmp:
            super().save_checkpoint(str(tmp))

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        if not self.was_initialized:  # before torch.load is redirected: initialize() reads the pretrained files
            self.initialize()
        if isinstance(filename_or_checkpoint, dict):
            return super().load_checkpoint(filename_or_checkpoint)
        checkpoint = load_nnunet_checkpoint(filename_or_checkpoint)
        with reading_preloaded_checkpoint(checkpoint):
            super().load_checkpoint(str(filename_or_checkpoint))

    # ---- schedule ------------------------------------------------------------------------------------------
    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.network.parameters(), self.initial_lr, weight_decay=self.weight_decay,
                                    momentum=0.99, nesterov=True)
        return optimizer, WarmupPolyLRScheduler(optimizer, self.initial_lr, self.num_epochs, self.warmup_epochs)

    def encoder_parameters(self):
        return bare_network(self.network).encoder.parameters()

    def on_train_epoch_start(self):
        frozen = self.current_epoch < self.frozen_encoder_epochs
        for p in self.encoder_parameters():
            p.requires_grad_(not frozen)
        if self.frozen_encoder_epochs and self.current_epoch in (0, self.frozen_encoder_epochs):
            self.print_to_log_file(f"MASS: encoder {'frozen' if frozen else 'unfrozen'} at epoch {self.current_epoch}")
        super().on_train_epoch_start()

    # ---- mirroring -----------------------------------------------------------------------------------------
    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        rotation, dummy_2d, initial_patch_size, mirror_axes = \
            super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        if not self.mirroring:
            mirror_axes = None
            self.inference_allowed_mirroring_axes = None
        return rotation, dummy_2d, initial_patch_size, mirror_axes

    # ---- label budget --------------------------------------------------------------------------------------
    def do_split(self):
        tr_keys, val_keys = super().do_split()
        if not self.label_budget:
            return tr_keys, val_keys

        subset = select_budget(tr_keys, self.label_budget.get("num_labeled"), self.label_budget.get("fraction"),
                               int(self.label_budget.get("seed", 0)))
        self.print_to_log_file(f"MASS label budget: {len(subset)} of {len(tr_keys)} training cases "
                               f"(seed {self.label_budget.get('seed', 0)}): {', '.join(subset)}")
        save_json_atomic({"fold": self.fold, **self.label_budget, "available": len(tr_keys), "train": subset,
                          "val": list(val_keys)}, Path(self.output_folder) / "label_budget.json")
        return subset, val_keys


def _variant(name: str, **attributes) -> type:
    return type(name, (nnUNetTrainerMASS,), {"__doc__": f"nnUNetTrainerMASS with {attributes}", **attributes})


nnUNetTrainerMASS_50epochs = _variant("nnUNetTrainerMASS_50epochs", default_num_epochs=50)
nnUNetTrainerMASS_100epochs = _variant("nnUNetTrainerMASS_100epochs", default_num_epochs=100)
nnUNetTrainerMASS_250epochs = _variant("nnUNetTrainerMASS_250epochs", default_num_epochs=250)
nnUNetTrainerMASS_frozenEncoder = _variant("nnUNetTrainerMASS_frozenEncoder", default_frozen_encoder_fraction=0.1)
nnUNetTrainerMASS_noMirroring = _variant("nnUNetTrainerMASS_noMirroring", default_mirroring=False)
# tiny runs for tests and smoke checks: one epoch of 2 iterations, no mirroring
nnUNetTrainerMASS_1epoch = _variant("nnUNetTrainerMASS_1epoch", default_num_epochs=1, default_iterations=2,
                                    default_mirroring=False)
nnUNetTrainerMASS_2epochs = _variant("nnUNetTrainerMASS_2epochs", default_num_epochs=2, default_iterations=2,
                                     default_mirroring=False)

TRAINERS = {cls.__name__: cls for cls in (
    nnUNetTrainerMASS, nnUNetTrainerMASS_50epochs, nnUNetTrainerMASS_100epochs, nnUNetTrainerMASS_250epochs,
    nnUNetTrainerMASS_frozenEncoder, nnUNetTrainerMASS_noMirroring, nnUNetTrainerMASS_1epoch,
    nnUNetTrainerMASS_2epochs)}
