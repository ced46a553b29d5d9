"""The pretraining loop: AdamW + OneCycle (5 % warm-up), gradient clipping, an EMA of the weights (exported),
bf16 autocast on CUDA, optional torch.compile, nnU-Net-style logs and progress.png, atomic checkpoints, exact
``--c`` resume, and torch.distributed (torchrun; NCCL on CUDA, gloo on CPU)."""
from __future__ import annotations

import contextlib
import copy
import os
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from tqdm import tqdm

from mass_nnu.adapter.datasets import Dataset
from mass_nnu.adapter.preprocessed import data_folder
from mass_nnu.devices import check_device
from mass_nnu.errors import MassError
from mass_nnu.io import (
    architecture_fingerprint,
    atomic_path,
    ensure_writable,
    load_checkpoint,
    save_checkpoint,
    save_json_atomic,
)
from mass_nnu.model.artifacts import (
    CHECKPOINT_FINAL,
    CHECKPOINT_LATEST,
    PRETRAINER_NAME,
    WEIGHTS_FILE,
    export_backbone,
    pretrained_folder,
)
from mass_nnu.model.loss import InContextLoss, dice_per_task
from mass_nnu.model.mass_model import build_mass_model
from mass_nnu.pretraining.memory import available_memory, check_memory, estimate_memory
from mass_nnu.pretraining.sampling import (
    BatchStream,
    CaseSource,
    SamplerSettings,
    TaskSampler,
    prepare_proposals,
    unpack_batch,
)


@dataclass
class PretrainSettings:
    """What a `mass pretrain` run trains with; stored in its checkpoints (``settings``)."""
    epochs: int = 50
    iterations_per_epoch: int = 50
    val_iterations: int = 4         # fixed held-out batches scored after every epoch
    batch_size: int = 2
    lr: float = 1e-3                # OneCycle peak
    weight_decay: float = 1e-2
    warmup_fraction: float = 0.05   # OneCycle's rising part
    grad_clip: float = 1.0          # gradient-norm clipping
    ema_decay: float = 0.99         # the exported weights are this EMA
    optimizer: str = "adamw"
    seed: int = 0
    num_workers: int = 0
    compile: bool = False
    # the reference's encoder pass recomputed in backward (less memory, one more encoder forward); None: only when
    # the memory check finds that the step fits with it and not without
    activation_checkpointing: bool | None = None
    max_tasks: int = 13
    mass_config: dict = field(default_factory=dict)
    memory_check: bool = True       # estimate the step's peak memory first and refuse one that cannot fit


class Distributed:
    """torchrun's environment, if any: one process per device, rank 0 writes.

    ``device`` is this rank's device (cuda:LOCAL_RANK on CUDA, else cpu) and every collective hands over tensors on
    it: NCCL refuses CPU tensors, gloo takes CPU ones."""

    def __init__(self, device: str | torch.device = "cpu"):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        cuda = torch.device(device).type == "cuda"
        self.device = torch.device("cuda", self.local_rank) if cuda else torch.device(torch.device(device).type)
        self.backend = "nccl" if cuda else "gloo"
        if self.world > 1 and not torch.distributed.is_initialized():
            if cuda:
                torch.cuda.set_device(self.local_rank)
            torch.distributed.init_process_group(self.backend)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def mean(self, value: float) -> float:
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return float(t.item() / self.world)

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier(device_ids=[self.device.index] if self.backend == "nccl" else None)

    @contextlib.contextmanager
    def main_first(self):
        """Rank 0 runs the block, then the others (e.g. files that rank 0 writes once and the others read)."""
        if not self.main:
            self.barrier()
        yield
        if self.main:
            self.barrier()

    def close(self) -> None:
        if self.world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


class MASSPretrainer:
    def __init__(self, datasets: list, plans_identifier: str, configuration: str, settings: PretrainSettings,
                 device: str = "cpu", output: Path | None = None):
        check_device(device)
        self.datasets = [Dataset.resolve(d) for d in datasets]
        self.names = [d.name for d in self.datasets]
        self.settings, self.configuration = settings, configuration
        self.plans = self.datasets[0].plans(plans_identifier)
        self.dataset_json = self.datasets[0].dataset_json()
        self.dist = Distributed(device)
        self.device = self.dist.device
        self.output = Path(output) if output else pretrained_folder(self.datasets[0], plans_identifier, configuration)
        self.num_channels = len(self.dataset_json["channel_names"])
        torch.manual_seed(settings.seed)
        self.model = build_mass_model(self.plans, configuration, self.num_channels, **settings.mass_config)
        self.model.checkpoint_reference = bool(settings.activation_checkpointing)
        self.fingerprint = architecture_fingerprint(self.model.backbone.state_dict())
        self._check_datasets(plans_identifier)
        self.model.to(self.device)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed patch and batch: as nnU-Net's training
        self.ema = copy.deepcopy(self.model).requires_grad_(False)
        params = [p for p in self.model.parameters() if p.requires_grad]
        if settings.optimizer != "adamw":
            raise MassError(f"--optimizer '{settings.optimizer}': only adamw is available")
        self.optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
        total = settings.epochs * settings.iterations_per_epoch
        self.scheduler = torch.optim.lr_scheduler.OneCycleLR(
            self.optimizer, max_lr=settings.lr, total_steps=max(total, 2), pct_start=settings.warmup_fraction,
            anneal_strategy="cos", div_factor=25.0, final_div_factor=1e3)
        self.train_model = self.model
        if self.dist.world > 1:
            self.train_model = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        # CUDA only, as nnU-Net's _do_i_compile: inductor's CPU code for these 3D networks ran 8× slower than eager
        self.compiled = settings.compile and self.device.type == "cuda"
        if self.compiled:
            self.train_model = torch.compile(self.train_model)
        self.loss = InContextLoss()
        self.epoch = 0
        self.history: dict[str, list[float]] = {"train_loss": [], "val_loss": [], "val_dice": [], "lr": [],
                                                "epoch_time": [], "data_wait": []}
        self.log_file = None

    # -- setup -------------------------------------------------------------------------------------------------
    def _check_datasets(self, plans_identifier: str) -> None:
        for name in self.datasets[1:]:
            plans = name.plans(plans_identifier)
            channels = len(name.dataset_json()["channel_names"])
            if channels != self.num_channels:
                raise MassError(f"{name}: has {channels} input channel(s), {self.names[0]} has {self.num_channels}; "
                                f"datasets pretrained together need the same channel count")
            other = build_mass_model(plans, self.configuration, channels, **self.settings.mass_config)
            if architecture_fingerprint(other.backbone.state_dict()) != self.fingerprint:
                raise MassError(f"{name}: its plans '{plans_identifier}' build another network than {self.names[0]}'s; "
                                f"plan them together: mass plan -d <IDs> --target-dataset <downstream ID>")

    def build_data(self):
        sources = []
        for name in self.datasets:
            plans = name.plans(self.plans["plans_name"])
            with self.dist.main_first():  # rank 0 maps the proposals once, the other ranks then read them
                folder, cases = prepare_proposals(name, plans, self.configuration)
            data_dir = data_folder(name, plans, self.configuration)
            sources += [CaseSource(data_dir, folder, c) for c in cases]
        # hold out cases for in-context validation (every 10th, at least one when there are ≥ 3)
        held = sources[::10] if len(sources) >= 3 else []
        train = [s for s in sources if s not in held] or sources
        patch = self.plans["configurations"][self.configuration]["patch_size"]
        settings = SamplerSettings(max_tasks=self.settings.max_tasks)
        self.train_stream = BatchStream(TaskSampler(train, patch, settings), self.settings.batch_size,
                                        self.settings.iterations_per_epoch, self.settings.seed, self.dist.rank)
        val_rng = np.random.default_rng([self.settings.seed, 10_000])
        val_sampler = TaskSampler(held or train, patch, settings)
        self.val_batches = [val_sampler.batch(val_rng, self.settings.batch_size)
                            for _ in range(self.settings.val_iterations)]
        self.log(f"pretraining on {len(train)} case(s) of {', '.join(self.names)}; {len(held)} held out for "
                 f"in-context validation; patch {patch}, batch {self.settings.batch_size}, ≤ {settings.max_tasks} tasks")

    def check_memory(self) -> None:
        """Before the first step: the step's estimated peak (memory.py) against the memory available on this
        device; one MassError line with the estimate and the ways out when it cannot fit. With
        ``activation_checkpointing`` None (the default) checkpointing is turned on when only it makes the step fit
        (it changes no result, only memory and time)."""
        s = self.settings
        if not s.memory_check:
            s.activation_checkpointing = bool(s.activation_checkpointing)
            return

        def estimate(checkpointing: bool):
            return estimate_memory(self.plans, self.configuration, self.num_channels, self.model.mass_config(),
                                   s.batch_size, s.max_tasks, self.device.type, checkpoint_reference=checkpointing)

        available = available_memory(self.device)
        checkpointing = bool(s.activation_checkpointing)
        peak = estimate(checkpointing)
        if s.activation_checkpointing is None and peak.total > available:
            lean = estimate(True)
            if lean.total <= available:
                self.log(f"memory: the step needs about {peak.total / 2 ** 30:.1f} GiB without activation "
                         f"checkpointing; turning it on (--no-activation-checkpointing to refuse instead)")
            checkpointing, peak = True, lean  # if even this does not fit, the refusal gives the checkpointed estimate
        s.activation_checkpointing = checkpointing
        self.model.checkpoint_reference = checkpointing
        patch = self.plans["configurations"][self.configuration]["patch_size"]
        self.log(f"memory: estimated peak {peak.total / 2 ** 30:.1f} GiB, available "
                 f"{available / 2 ** 30:.1f} GiB ({self.device.type})"
                 f"{', reference encoder checkpointed' if checkpointing else ''}")
        check_memory(peak, available, self.device, s.batch_size, patch, checkpointing)

    # -- logging -----------------------------------------------------------------------------------------------
    def log(self, *parts) -> None:
        if not self.dist.main:
            return
        line = f"{datetime.now():%Y-%m-%d %H:%M:%S.%f}: {' '.join(str(p) for p in parts)}"
        print(line, flush=True)
        if self.log_file is None:
            self.output.mkdir(parents=True, exist_ok=True)
            self.log_file = self.output / f"training_log_{datetime.now():%Y_%m_%d_%H_%M_%S}.txt"
        with open(self.log_file, "a") as f:
            f.write(line + "\n")

    def plot_progress(self) -> None:
        h = self.history
        epochs = range(len(h["train_loss"]))
        fig = Figure(figsize=(9, 10))
        axes = fig.subplots(3, 1)
        axes[0].plot(epochs, h["train_loss"], "b-", label="train loss")
        axes[0].plot(epochs, h["val_loss"], "r-", label="val loss (held-out, EMA)")
        ax2 = axes[0].twinx()
        ax2.plot(epochs, h["val_dice"], "g:", label="in-context val Dice")
        ax2.set_ylabel("Dice")
        axes[0].set_xlabel("epoch")
        axes[0].legend(loc="upper left")
        ax2.legend(loc="upper right")
        axes[1].plot(epochs, h["epoch_time"], "b-", label="epoch time (s)")
        axes[1].plot(epochs, h["data_wait"], "r-", label="waiting for data (s)")
        axes[1].legend()
        axes[2].plot(epochs, h["lr"], "b-", label="learning rate")
        axes[2].legend()
        fig.tight_layout()
        with atomic_path(self.output / "progress.png") as tmp:
            fig.savefig(tmp, format="png")

    # -- steps -------------------------------------------------------------------------------------------------
    def _autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return torch.autocast("cpu", enabled=False)

    def train_step(self, batch: dict) -> float:
        batch = unpack_batch({k: v.to(self.device, non_blocking=True) for k, v in batch.items()})
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            outputs = self.train_model(batch["ref_image"], batch["ref_masks"], batch["query_image"], batch["valid"])
        loss = self.loss(outputs, batch["query_masks"], batch["valid"])  # bf16 logits: float32 chunk by chunk
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.settings.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self._update_ema()
        return float(loss.detach())

    @torch.no_grad()
    def _update_ema(self) -> None:
        d = self.settings.ema_decay
        ema = [p for p in self.ema.state_dict().values() if p.dtype.is_floating_point]
        cur = [p for p in self.model.state_dict().values() if p.dtype.is_floating_point]
        torch._foreach_mul_(ema, d)
        torch._foreach_add_(ema, cur, alpha=1 - d)

    @torch.no_grad()
    def validate(self) -> tuple[float, float]:
        losses, dices = [], []
        for batch in self.val_batches:
            batch = unpack_batch({k: v.to(self.device, non_blocking=True) for k, v in batch.items()})
            with self._autocast():
                outputs = self.ema(batch["ref_image"], batch["ref_masks"], batch["query_image"], batch["valid"])
            outputs = [o.float() for o in outputs]
            losses.append(float(self.loss(outputs, batch["query_masks"], batch["valid"])))
            dice = dice_per_task(outputs[0], batch["query_masks"])  # NaN where target and prediction are empty
            # the all-ones task and padded slots say little about segmentation: score real proposals only
            real = batch["valid"].clone()
            real[torch.arange(len(real)), real.sum(1) - 1] = False
            dices.append(dice[real & ~dice.isnan()].cpu())
        dices = torch.cat(dices)
        return float(np.mean(losses)), float(dices.mean()) if len(dices) else float("nan")

    def run(self) -> Path:
        s = self.settings
        self.log(f"{PRETRAINER_NAME}: {s.epochs} epochs × {s.iterations_per_epoch} iterations, device {self.device}, "
                 f"world size {self.dist.world}, lr {s.lr}, EMA {s.ema_decay}"
                 f"{', torch.compile' if self.compiled else ''}"
                 f"{'; --compile is ignored on CPU (as in nnU-Net)' if s.compile and not self.compiled else ''}")
        # one loader for the whole run: its workers start once and its stream continues across epochs
        stream = iter(self.train_stream.loader(self.epoch, s.num_workers, pin_memory=self.device.type == "cuda"))
        while self.epoch < s.epochs:
            start = time.time()
            self.model.train()
            losses, wait = [], 0.0
            for _ in tqdm(range(s.iterations_per_epoch), desc=f"epoch {self.epoch}", unit="it",
                          disable=None if self.dist.main else True, leave=False):
                fetch = time.time()
                batch = next(stream)
                wait += time.time() - fetch
                losses.append(self.train_step(batch))
            train_loss = self.dist.mean(float(np.mean(losses)))
            val_loss, val_dice = self.validate()
            h = self.history
            h["train_loss"].append(train_loss)
            h["val_loss"].append(val_loss)
            h["val_dice"].append(val_dice)
            h["lr"].append(self.optimizer.param_groups[0]["lr"])
            h["epoch_time"].append(time.time() - start)
            h["data_wait"].append(wait)
            self.log(f"Epoch {self.epoch}: train_loss {train_loss:.4f}, val_loss {val_loss:.4f}, "
                     f"in-context val Dice {val_dice:.4f}, lr {h['lr'][-1]:.2e}, epoch time {h['epoch_time'][-1]:.1f} s "
                     f"(data wait {wait:.1f} s)")
            self.epoch += 1
            if self.dist.main:
                self.save(self.output / CHECKPOINT_LATEST, full=True)
                self.plot_progress()
        del stream  # stops the workers
        return self.finish()

    # -- checkpoints -------------------------------------------------------------------------------------------
    def _common(self) -> dict:
        return {"trainer_name": PRETRAINER_NAME, "plans": self.plans, "configuration": self.configuration,
                "dataset_json": self.dataset_json, "datasets": self.names, "mass_config": self.model.mass_config(),
                "architecture_fingerprint": self.fingerprint, "settings": asdict(self.settings),
                "history": self.history, "epoch": self.epoch}

    def save(self, path: Path, full: bool) -> None:
        checkpoint = {**self._common(), "network_weights": {k: v.cpu() for k, v in self.ema.state_dict().items()}}
        if full:
            checkpoint.update(model_weights={k: v.cpu() for k, v in self.model.state_dict().items()},
                              optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict(),
                              torch_rng=torch.get_rng_state())
        save_checkpoint(checkpoint, path)

    def resume(self) -> bool:
        """Continue from checkpoint_latest.pth (weights, EMA, optimiser, scheduler, epoch, history, RNG)."""
        path = self.output / CHECKPOINT_LATEST
        if not path.is_file():
            self.log(f"--c: no {path.name} in {self.output}; starting from scratch")
            return False
        checkpoint = load_checkpoint(path, expected_fingerprint=self.fingerprint)
        if checkpoint.get("settings", {}).get("epochs") != self.settings.epochs:
            self.log(f"--c: the checkpoint was written for {checkpoint['settings']['epochs']} epochs, "
                     f"continuing with {self.settings.epochs}")
        self.model.load_state_dict(checkpoint["model_weights"])
        self.ema.load_state_dict(checkpoint["network_weights"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        torch.set_rng_state(checkpoint["torch_rng"])
        self.epoch = int(checkpoint["epoch"])
        self.history = {k: list(v) for k, v in checkpoint["history"].items()}
        self.log(f"resumed from {path.name} at epoch {self.epoch}")
        return True

    def finish(self) -> Path:
        if self.dist.main:
            self.save(self.output / CHECKPOINT_FINAL, full=False)
            export_backbone(self.ema, self.plans, self.configuration, self.num_channels,
                            self.output / WEIGHTS_FILE)
            save_json_atomic(self.plans, self.output / "plans.json")
            save_json_atomic(self.dataset_json, self.output / "dataset.json")
            h = self.history
            self.log(f"done: in-context val Dice {h['val_dice'][0]:.4f} → {h['val_dice'][-1]:.4f}, val loss "
                     f"{h['val_loss'][0]:.4f} → {h['val_loss'][-1]:.4f}; weights in {self.output}")
        self.dist.close()
        return self.output


def pretrain(datasets: list, plans_identifier: str = "nnUNetResEncUNetMPlans", configuration: str = "3d_fullres",
             settings: PretrainSettings | None = None, device: str = "cpu", resume: bool = False,
             output: Path | None = None) -> Path:
    trainer = MASSPretrainer(datasets, plans_identifier, configuration, settings or PretrainSettings(), device, output)
    if trainer.dist.main:
        ensure_writable(trainer.output)  # before the first log line creates the folder
    trainer.check_memory()  # before any data preparation or step: one line if the step cannot fit
    if resume:
        trainer.resume()
    trainer.build_data()
    return trainer.run()
