"""MASS pretraining step against nnU-Net's supervised step, on the same plans, patch and batch.

    python benchmarks/pretrain_step.py -d 711 [-p nnUNetResEncUNetMPlans] [-c 3d_fullres] [--batch-size 2]
           [--steps 4] [--warmup 1] [-np 2] [-device cpu|cuda] [--profile N]

The dataset must be planned (``mass plan``) and have proposals (``mass propose``); nnU-Net's trainer needs its
labels (Otsu labels from ``mass plan`` do). Each side runs in its own subprocess so that peak memory is its own:

- P1 = MASS compute time per step / nnUNetTrainer.train_step time (target ≤ 1.6);
- P3 = fraction of the MASS step spent waiting for the data loader with ``-np`` workers (target ≤ 5 %);
- P5 = MASS peak memory / nnU-Net peak memory during the steps (target ≤ 1.5). CPU: growth of the peak resident
  set over the resident set before the first step; CUDA: ``torch.cuda.max_memory_allocated``.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

from _common import plans_parser  # benchmarks/_common.py (the script's folder is on sys.path)

TARGETS = {"P1": 1.6, "P3": 0.05, "P5": 1.5}


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def memory_start(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2 ** 20
    return rss_mb()


def memory_peak(device, start: float) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2 ** 20 - start
    return peak_rss_mb() - start


def sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def profile_steps(step, args, device, part: str) -> None:
    """``--profile N``: N more steps under torch.profiler; the top operators by self time (device time on CUDA)
    go to ``<scratch>/profile_<part>.txt``, which the parent prints."""
    if not args.profile:
        return
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(args.profile):
            step()
        sync(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=args.profile_rows, max_name_column_width=60)
    with open(os.path.join(args.scratch, f"profile_{part}.txt"), "w") as f:
        f.write(f"{part}: {args.profile} profiled steps, sorted by {key}\n{table}\n")


def run_mass(args) -> dict:
    from mass_nnu.pretraining.trainer import MASSPretrainer, PretrainSettings

    settings = PretrainSettings(epochs=1, iterations_per_epoch=args.warmup + args.steps + args.profile,
                                val_iterations=1, batch_size=args.batch_size, num_workers=args.np, seed=0, compile=args.compile,
                                activation_checkpointing=args.activation_checkpointing,
                                memory_check=False)
    trainer = MASSPretrainer([args.d], args.p, args.c, settings, args.device,
                             output=args.export or os.path.join(args.scratch, "mass"))
    trainer.build_data()
    device = trainer.device
    pin = device.type == "cuda" and not args.no_pin  # as mass pretrain
    loader = iter(trainer.train_stream.loader(0, args.np, pin_memory=pin))
    warmup = time.perf_counter()
    for _ in range(args.warmup):
        trainer.train_step(next(loader))
    sync(device)
    warmup = time.perf_counter() - warmup
    start_mem = memory_start(device)
    compute = wait = 0.0
    for _ in range(args.steps):
        t0 = time.perf_counter()
        batch = next(loader)
        t1 = time.perf_counter()
        trainer.train_step(batch)
        sync(device)
        t2 = time.perf_counter()
        wait += t1 - t0
        compute += t2 - t1
    result = {"step_s": compute / args.steps, "wait_fraction": wait / (wait + compute),
              "peak_mb": memory_peak(device, start_mem), "patch": list(trainer.train_stream.sampler.patch_size),
              "warmup_s": warmup}
    profile_steps(lambda: trainer.train_step(next(loader)), args, device, "mass")
    if args.export:  # the trained steps as a mass pretrain folder, e.g. for finetune_iteration.py -w
        val_loss, val_dice = trainer.validate()
        trainer.history["val_loss"].append(val_loss)
        trainer.history["val_dice"].append(val_dice)
        trainer.finish()
    return result


def run_nnunet(args) -> dict:
    import torch

    from mass_nnu.adapter.datasets import Dataset
    from mass_nnu.adapter.networks import configuration_manager, deep_supervision_scales
    from mass_nnu.adapter.training import build_trainer, nnUNetTrainer

    os.environ["nnUNet_results"] = os.path.join(args.scratch, "nnunet_results")
    os.environ["nnUNet_compile"] = "true" if args.compile else "false"  # nnU-Net's own torch.compile switch
    plans = Dataset.resolve(args.d).plans(args.p)
    dataset_json = Dataset.resolve(args.d).dataset_json()
    trainer = build_trainer(nnUNetTrainer, plans, args.c, 0, dataset_json, args.device, False)
    trainer.initialize()
    device = trainer.device
    patch = [int(p) for p in configuration_manager(plans, args.c).patch_size]
    channels = len(dataset_json["channel_names"])
    num_labels = len(dataset_json["labels"])
    g = torch.Generator().manual_seed(0)
    data = torch.randn((args.batch_size, channels, *patch), generator=g)
    seg = torch.randint(0, num_labels, (args.batch_size, 1, *patch), generator=g).float()
    targets = [torch.nn.functional.interpolate(seg, scale_factor=s, mode="nearest-exact") if min(s) < 1 else seg
               for s in deep_supervision_scales(plans, args.c)]
    batch = {"data": data, "target": targets}
    warmup = time.perf_counter()
    for _ in range(args.warmup):
        trainer.train_step(batch)
    sync(device)
    warmup = time.perf_counter() - warmup
    start_mem = memory_start(device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        trainer.train_step(batch)
    sync(device)
    result = {"step_s": (time.perf_counter() - t0) / args.steps, "peak_mb": memory_peak(device, start_mem),
              "patch": patch, "warmup_s": warmup}
    profile_steps(lambda: trainer.train_step(batch), args, device, "nnunet")
    return result


def main() -> None:
    parser = plans_parser(__doc__, "planned dataset with proposals")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("-np", type=int, default=2, help="data-loading workers of the MASS side")
    parser.add_argument("-device", default="cpu")
    parser.add_argument("--activation-checkpointing", action="store_true",
                        help="MASS side: mass pretrain --activation-checkpointing (reference encoder recomputed)")
    parser.add_argument("--compile", action="store_true", help="torch.compile both sides (MASS: --compile; "
                                                                   "nnU-Net: nnUNet_compile=true)")
    parser.add_argument("--no-pin", action="store_true", help="MASS side on CUDA: pageable batches (mass pretrain "
                                                                   "pins them)")
    parser.add_argument("--export", default=None, metavar="DIR",
                        help="then write the MASS side's model as a mass pretrain folder (for finetune_iteration -w)")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="then N steps of each side under torch.profiler; prints the top operators")
    parser.add_argument("--profile-rows", type=int, default=25)
    parser.add_argument("--scratch", default=None, help="folder for the throw-away trainer outputs")
    parser.add_argument("--part", choices=("mass", "nnunet"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.part:
        import torch

        torch.manual_seed(0)
        result = run_mass(args) if args.part == "mass" else run_nnunet(args)
        print("RESULT " + json.dumps(result), flush=True)
        return
    import tempfile

    args.scratch = args.scratch or tempfile.mkdtemp(prefix="mass_bench_")
    results = {}
    for part in ("nnunet", "mass"):
        cmd = [sys.executable, __file__, *sys.argv[1:], "--part", part, "--scratch", args.scratch]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode or not lines:
            sys.exit(f"{part} side failed:\n{proc.stderr[-3000:]}")
        results[part] = json.loads(lines[-1][len("RESULT "):])
        print(f"{part}: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                      for k, v in results[part].items()), flush=True)  # if a later side times out
    mass, nnunet = results["mass"], results["nnunet"]
    figures = {"P1": mass["step_s"] / nnunet["step_s"], "P3": mass["wait_fraction"],
               "P5": mass["peak_mb"] / max(nnunet["peak_mb"], 1e-6)}
    print(f"device {args.device}{', compiled' if args.compile else ''}"
          f"{', MASS with activation checkpointing' if args.activation_checkpointing else ''}"
          f"{', pageable batches' if args.no_pin and args.device != 'cpu' else ''}, patch {mass['patch']}, batch {args.batch_size}, "
          f"{args.steps} timed steps "
          f"(+{args.warmup} warm-up), -np {args.np}")
    print(f"{'':28s}{'MASS':>12s}{'nnU-Net':>12s}")
    print(f"{'step time (s)':28s}{mass['step_s']:12.3f}{nnunet['step_s']:12.3f}")
    print(f"{'peak memory growth (MiB)':28s}{mass['peak_mb']:12.1f}{nnunet['peak_mb']:12.1f}")
    print(f"{'data wait (fraction)':28s}{mass['wait_fraction']:12.3f}{'-':>12s}")
    print(f"{'warm-up steps (s)':28s}{mass['warmup_s']:12.1f}{nnunet['warmup_s']:12.1f}"
          f"{'  (includes compilation)' if args.compile else ''}")
    print(f"{'figure':8s}{'value':>10s}{'target':>10s}  ok")
    for key, value in figures.items():
        print(f"{key:8s}{value:10.3f}{'≤ ' + str(TARGETS[key]):>10s}  {'yes' if value <= TARGETS[key] else 'NO'}")
    for part in ("mass", "nnunet") if args.profile else ():
        with open(os.path.join(args.scratch, f"profile_{part}.txt")) as f:
            print(f.read())


if __name__ == "__main__":
    main()
