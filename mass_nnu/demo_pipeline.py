"""`mass demo`: demo data → plan → propose → pretrain → finetune (MASS and scratch) → in-context → summary.

Each step runs the same `mass` command a user would type, in-process (the CLI hands its own command runner in), so
the demo is also a walkthrough.
The default preset fits 15 minutes on 2 CPU cores.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Callable

from mass_nnu.adapter.datasets import Dataset, raw_root
from mass_nnu.model.artifacts import pretrained_folder
from mass_nnu.workspace import NNUNET_FOLDERS, configure_environment

DEMO_PRETRAIN_ID, DEMO_DOWNSTREAM_ID = 501, 502
BASE_FEATURES = 8  # CPU preset: ResEnc M plans with 8..64 features instead of 32..256
PLANS, CONFIG = f"nnUNetResEncUNetMPlans_f{BASE_FEATURES}", "3d_fullres"

PRESETS = {
    "default": dict(pretrain_epochs=5, pretrain_iterations=12, finetune_epochs=10, finetune_iterations=12),
    "quick": dict(pretrain_epochs=1, pretrain_iterations=2, finetune_epochs=1, finetune_iterations=2,
                  num_pretrain=4, num_train=3, num_test=1),
}


def run_demo(run_command: Callable[[list[str]], None], workspace: str | None = None, seed: int = 0,
             device: str = "cpu", verbose: bool = False, pretrain_epochs: int = 6, pretrain_iterations: int = 15,
             finetune_epochs: int = 6, finetune_iterations: int = 15, finetune_batch_size: int = 2,
             num_labeled: int = 2, num_pretrain: int = 20, num_train: int = 10, num_test: int = 5) -> dict:
    """Run every stage with ``run_command(["plan", "-d", ...])`` (the CLI's own commands, in-process), then print
    the summary. A failing step stops the demo with its own error."""
    if workspace:
        for var in NNUNET_FOLDERS:
            os.environ.pop(var, None)
    configure_environment(Path(workspace) if workspace else None)
    os.environ.setdefault("nnUNet_n_proc_DA", str(os.cpu_count() or 2))  # nnU-Net's default (12) oversubscribes
    timings: dict[str, float] = {}

    def step(name, *args):
        start = time.time()
        print(f"\n$ mass {' '.join(map(str, args))}")
        run_command([str(a) for a in args])
        timings[name] = timings.get(name, 0.0) + time.time() - start

    if not list(raw_root().glob(f"Dataset{DEMO_DOWNSTREAM_ID}_*")):
        step("demo data", "demo-data", "--small", "--seed", seed, "--num-pretrain", num_pretrain,
             "--num-train", num_train, "--num-test", num_test)
    step("plan", "plan", "-d", DEMO_PRETRAIN_ID, "--target-dataset", DEMO_DOWNSTREAM_ID, "-np", 2,
         "--base-features", BASE_FEATURES, *(["--verbose"] if verbose else []))
    step("propose", "propose", "-d", DEMO_PRETRAIN_ID, "-np", 2)
    step("pretrain", "pretrain", "-d", DEMO_PRETRAIN_ID, "-p", PLANS, "-c", CONFIG, "--epochs", pretrain_epochs,
         "--iters-per-epoch", pretrain_iterations, "-device", device, "--seed", seed)
    pretrained = pretrained_folder(Dataset.resolve(DEMO_PRETRAIN_ID), PLANS, CONFIG)
    for tag, extra in (("finetune MASS", ("-w", pretrained)), ("finetune scratch", ("--scratch",))):
        step(tag, "finetune", "-d", DEMO_DOWNSTREAM_ID, "-p", PLANS, "-c", CONFIG, "--num-labeled", num_labeled,
             "--epochs", finetune_epochs, "--iters-per-epoch", finetune_iterations, "--batch-size",
             finetune_batch_size, "-device", device,
             "--seed", seed, *extra)
    downstream = Dataset.resolve(DEMO_DOWNSTREAM_ID)
    reference = sorted(downstream.cases())[0]
    out = downstream.results / "mass_incontext_demo"
    step("in-context", "segment", "-m", pretrained, "--ref", downstream.image_file(reference),
         "--ref-mask", downstream.label_file(reference), "-i", downstream.raw / "imagesTs", "-o", out,
         "--gt", downstream.raw / "labelsTs", "-device", device)
    print("\n" + summary(timings, downstream, out))
    return timings


def summary(timings: dict, downstream: Dataset, incontext_dir: Path) -> str:
    lines = ["mass demo summary", "", "| step | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.0f} |" for k, v in timings.items()]
    lines += [f"| total | {sum(timings.values()):.0f} |", "", "| method | mean Dice on imagesTs |", "|---|---|"]
    for path in sorted(downstream.results.glob("*/fold_*/mass_finetune_results.json")):
        results = json.loads(path.read_text())
        if "test" in results["dice"]:
            method = "from scratch" if results["scratch"] else "MASS fine-tuned"
            lines.append(f"| {method}, {results['num_training_cases']} labelled ({results['plans']}) | "
                         f"{100 * results['dice']['test']['mean']:.1f} |")
    incontext = incontext_dir / "summary.json"
    if incontext.is_file():
        per_label = [v for v in json.loads(incontext.read_text())["mean_dice"].values() if v == v]
        lines.append(f"| MASS in-context, 1 reference, no training | {100 * sum(per_label) / len(per_label):.1f} |")
    return "\n".join(lines)
