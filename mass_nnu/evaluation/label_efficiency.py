"""`mass benchmark`: Dice against the number of labelled cases, MASS-initialised vs the from-scratch twin.

Every cell (method, budget, seed) fine-tunes with identical plans, schedule and labelled subset and is evaluated
on the held-out imagesTs/labelsTs with nnU-Net's evaluation. Cells are saved as they finish, so a rerun resumes.
"""
from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from tqdm import tqdm

from mass_nnu.adapter.datasets import Dataset
from mass_nnu.adapter.training import fold_cases
from mass_nnu.errors import MassError
from mass_nnu.evaluation.report import write_report
from mass_nnu.finetuning.budget import select_budget
from mass_nnu.finetuning.incontext_head import choose_head
from mass_nnu.finetuning.run import finetune_dataset
from mass_nnu.finetuning.settings import FinetuneSettings
from mass_nnu.incontext.common import load_pretrained
from mass_nnu.incontext.segment import mean_dice, segment_cases
from mass_nnu.io import save_json_atomic
from mass_nnu.model.artifacts import load_weights_file
from mass_nnu.planning.plan import ensure_plans

METHODS = ("mass", "scratch")


def parse_budgets(budgets: Sequence[str], num_available: int) -> list[tuple[str, int]]:
    """'1 2 5 all' -> [('1', 1), ('2', 2), ('5', 5), ('all', n)]; budgets above n are refused."""
    parsed = []
    for budget in budgets:
        if budget == "all":
            parsed.append(("all", num_available))
            continue
        if not budget.isdigit() or int(budget) < 1:
            raise MassError(f"--budgets: '{budget}' is not a positive number of cases or 'all'")
        if int(budget) > num_available:
            raise MassError(f"--budgets: {budget} labelled cases asked, but the fold has {num_available} training cases")
        parsed.append((budget, int(budget)))
    return parsed


def cell_path(out_dir: Path, method: str, budget: str, seed: int) -> Path:
    return out_dir / "cells" / f"{method}_n{budget}_seed{seed}.json"


def run_cells(out_dir: Path, budgets: list[tuple[str, int]], seeds: int, methods: Sequence[str],
              run_one: Callable[[str, int, int], dict], settings: dict | None = None) -> list[dict]:
    """Run every missing cell with ``run_one(method, num_labeled, seed) -> {mean_dice, per_structure}``. A saved
    cell is reused only when it was run with the same ``settings`` (schedule, weights, head, ...)."""
    grid = [(m, b, n, s) for b, n in budgets for s in range(seeds) for m in methods]
    cells = []
    for method, budget, num_labeled, seed in tqdm(grid, desc="benchmark cells", unit="cell", disable=None):
        path = cell_path(out_dir, method, budget, seed)
        if path.is_file():
            cell = json.loads(path.read_text())
            if cell.get("settings") != settings:
                raise MassError(f"{path}: run with other settings ({cell.get('settings')}, now {settings}); "
                                f"choose another -o or delete the folder")
            cells.append(cell)
            continue
        start = time.time()
        result = run_one(method, num_labeled, seed)
        cell = {"method": method, "budget": budget, "num_labeled": num_labeled, "seed": seed,
                "mean_dice": float(result["mean_dice"]),
                "per_structure": {k: float(v) for k, v in result["per_structure"].items()},
                "seconds": round(time.time() - start, 1), "settings": settings}
        save_json_atomic(cell, path)
        cells.append(cell)
    return cells


def _finetune_cell(dataset: Dataset, weights, configuration, fold, device, settings: FinetuneSettings):
    def run_one(method: str, num_labeled: int, seed: int) -> dict:
        results = finetune_dataset(dataset, replace(settings, num_labeled=num_labeled, seed=seed), weights=weights,
                                   scratch=method == "scratch", configuration=configuration, fold=fold,
                                   device=device)
        if "test" not in results["dice"]:
            raise MassError(f"{results['model_folder']}: no test Dice; the benchmark needs imagesTs and labelsTs")
        table = dict(results["dice"]["test"])
        mean = table.pop("mean")
        return {"mean_dice": mean, "per_structure": table}

    return run_one


def _incontext_cell(dataset: Dataset, weights, device, train_cases: list[str], out_dir: Path):
    """In-context segmentation of imagesTs with the first N of the seed's labelled subset as references."""
    folder = Path(weights)
    pretrained = load_pretrained(folder if folder.is_dir() else folder.parent, device=device)
    meta = dataset.dataset_json()
    names = {str(v): k for k, v in meta["labels"].items() if not isinstance(v, list) and v != 0}

    def run_one(method: str, num_labeled: int, seed: int) -> dict:
        refs = select_budget(train_cases, num_labeled, None, seed)
        references = [(dataset.image_file(c), dataset.label_file(c)) for c in refs]
        results = segment_cases(pretrained, references, [dataset.raw / "imagesTs"],
                                out_dir / f"n{num_labeled}_seed{seed}", gt_folder=dataset.raw / "labelsTs")
        per_label = mean_dice(results)
        per_structure = {names.get(str(k), str(k)): float(v) for k, v in per_label.items() if str(k) != "mean"}
        return {"mean_dice": float(np.nanmean(list(per_structure.values()))), "per_structure": per_structure}

    return run_one


def run_benchmark(dataset, weights, budgets: Sequence[str], seeds: int, schedule: FinetuneSettings,
                  configuration: str = "3d_fullres", fold: str = "0", incontext: bool = False, device: str = "cpu",
                  out: str | None = None) -> str:
    """All cells, then results.csv/json, results.md and dice_vs_labels.png. Returns the Markdown table.
    ``schedule`` is every cell's fine-tuning (the budget and seed are the cell's)."""
    dataset = Dataset.resolve(dataset)
    if not (dataset.raw / "labelsTs").is_dir():
        raise MassError(f"{dataset.raw}: no labelsTs; the benchmark evaluates on the held-out imagesTs/labelsTs")
    weights_path, checkpoint = load_weights_file(weights)
    plans = ensure_plans(dataset, checkpoint["plans_identifier"], configuration,
                         checkpoint["nnssl_adaptation_plan"]["pretrain_plan"], 2)
    train_cases, _ = fold_cases(dataset, plans, configuration, fold if fold == "all" else int(fold))
    out_dir = Path(out) if out else dataset.results / "mass_benchmark"
    parsed = parse_budgets(list(budgets), len(train_cases))
    head, _ = choose_head(schedule.head or "auto", weights_path)
    schedule = replace(schedule, head=head)
    settings = {"weights": str(weights_path), "configuration": configuration, "fold": str(fold),
                "epochs": schedule.num_epochs, "iterations_per_epoch": schedule.num_iterations_per_epoch,
                "batch_size": schedule.batch_size, "learning_rate": schedule.initial_lr,
                "mirroring": bool(schedule.mirroring), "head": head}
    finetune = _finetune_cell(dataset, weights_path, configuration, fold, device, schedule)
    cells = run_cells(out_dir, parsed, seeds, METHODS, finetune, settings)
    if incontext:
        run_ic = _incontext_cell(dataset, weights_path, device, train_cases, out_dir / "incontext")
        cells += run_cells(out_dir, parsed, seeds, ("incontext",), run_ic,
                           {k: settings[k] for k in ("weights", "configuration", "fold")})
    title = (f"{dataset}: MASS vs scratch ({schedule.num_epochs} epochs × {schedule.num_iterations_per_epoch} "
             f"iterations, {seeds} seed(s))")
    return write_report(cells, out_dir, title)
