"""P2: iteration time of nnUNetTrainerMASS against nnU-Net's nnUNetTrainer, same plans, data and batch.

    python benchmarks/finetune_iteration.py -d 502 -p nnUNetResEncUNetMPlans_f8 [-c 3d_fullres] [-w WEIGHTS]
           [--iterations 10] [--rounds 3] [-device cpu|cuda] [--heads new incontext]

Both trainers are built in one process on the dataset's fold 0 with nnU-Net's own data loaders and augmentation
(``nnUNet_n_proc_DA`` workers) and timed in alternating rounds, so machine load hits both alike. An iteration is
what nnU-Net's epoch loop does: fetch a batch from ``dataloader_train`` and ``train_step`` it. MASS loads the
weights file when given (``-w``), else starts from scratch; the per-iteration cost does not depend on it. When
``-w`` is a ``mass pretrain`` folder (full MASS checkpoint beside the weights), a third row times the in-context
head (``--head incontext``: the whole MASS model, one task per class), the default of ``mass finetune``.
"""
from __future__ import annotations

import os
import statistics
import tempfile
import time

from _common import plans_parser  # benchmarks/_common.py (the script's folder is on sys.path)


def build(trainer_class, dataset: str, plans_identifier: str, configuration: str, device: str, weights,
          mass_finetune: dict | None = None):
    from mass_nnu.adapter.datasets import Dataset
    from mass_nnu.adapter.training import build_trainer

    plans = Dataset.resolve(dataset).plans(plans_identifier)
    if mass_finetune:
        plans["mass_finetune"] = mass_finetune
    trainer = build_trainer(trainer_class, plans, configuration, 0, Dataset.resolve(dataset).dataset_json(), device, False)
    if hasattr(trainer, "pretrained_weights"):
        trainer.pretrained_weights = weights or "scratch"
    trainer.initialize()
    trainer.dataloader_train, trainer.dataloader_val = trainer.get_dataloaders()
    trainer.network.train()
    return trainer


def time_iterations(trainer, n: int) -> float:
    import torch

    start = time.perf_counter()
    for _ in range(n):
        trainer.train_step(next(trainer.dataloader_train))
    if trainer.device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / n


def main() -> None:
    parser = plans_parser(__doc__, "planned and preprocessed labelled dataset")
    parser.add_argument("-w", default=None, help="nnunet_pretrained_weights.pth (optional)")
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("-device", default="cpu")
    parser.add_argument("--heads", nargs="+", choices=("new", "incontext"), default=["new", "incontext"],
                        help="the MASS rows to time (under torch.compile each row compiles once, ~1 min on a GPU)")
    args = parser.parse_args()
    os.environ["nnUNet_results"] = tempfile.mkdtemp(prefix="mass_p2_")  # throw-away trainer outputs

    from mass_nnu.adapter.training import nnUNetTrainer
    from mass_nnu.finetuning.trainer import nnUNetTrainerMASS
    from mass_nnu.model.artifacts import find_mass_checkpoint, resolve_weights_path

    trainers = {"nnUNetTrainer": build(nnUNetTrainer, args.d, args.p, args.c, args.device, None)}
    if "new" in args.heads:
        trainers["nnUNetTrainerMASS"] = build(nnUNetTrainerMASS, args.d, args.p, args.c, args.device, args.w)
    full = find_mass_checkpoint(resolve_weights_path(args.w)) if args.w else None
    if full and "incontext" in args.heads:
        head = {"head": "incontext", "mass_config": full[1]["mass_config"]}
        trainers["nnUNetTrainerMASS incontext"] = build(nnUNetTrainerMASS, args.d, args.p, args.c, args.device,
                                                        args.w, head)
    for name, trainer in trainers.items():  # warm-up: first batches, allocator, autotuning, compilation
        start = time.perf_counter()
        time_iterations(trainer, 2)
        print(f"{name}: warm-up (2 iterations{', compiling' if trainer._do_i_compile() else ''}) "
              f"{time.perf_counter() - start:.1f} s", flush=True)
    times = {name: [] for name in trainers}
    for _ in range(args.rounds):
        for name, trainer in trainers.items():
            times[name].append(time_iterations(trainer, args.iterations))
    base = trainers["nnUNetTrainer"]
    print(f"dataset {args.d}, plans {args.p} {args.c}, patch {list(base.configuration_manager.patch_size)}, "
          f"batch {base.batch_size}, device {args.device}, nnUNet_n_proc_DA {os.environ.get('nnUNet_n_proc_DA')}, "
          f"{args.rounds} rounds × {args.iterations} iterations")
    print(f"{'trainer':30s}{'median s/it':>13s}{'rounds':>30s}")
    for name, values in times.items():
        print(f"{name:30s}{statistics.median(values):13.3f}{'  '.join(f'{v:.3f}' for v in values):>30s}")
    for name in list(trainers)[1:]:
        ratio = statistics.median(times[name]) / statistics.median(times["nnUNetTrainer"])
        print(f"P2 = {name} / nnUNetTrainer iteration time = {ratio:.2f}")


if __name__ == "__main__":
    main()
