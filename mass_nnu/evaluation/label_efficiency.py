"""`mass benchmark`: Dice against the number of labelled cases, MASS-initialised vs the from-scratch twin and the
ablations (docs/benchmarks.md, "Protocol").

Every cell (method, budget, seed) trains with identical plans, schedule and labelled subset and is scored on the
fold's validation cases (nnU-Net's final validation; never a labelled case); with ``--split test`` also on the
held-out imagesTs/labelsTs, once. Cells are saved as they finish, so a rerun resumes, and a test run completes
the validation cells with their trained models.
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

from tqdm import tqdm

from mass_nnu.adapter.datasets import Dataset
from mass_nnu.adapter.training import fold_cases
from mass_nnu.dice import class_means, summarise
from mass_nnu.errors import MassError
from mass_nnu.evaluation.report import write_report
from mass_nnu.finetuning.budget import select_budget
from mass_nnu.finetuning.incontext_head import choose_head
from mass_nnu.finetuning.run import finetune_dataset
from mass_nnu.finetuning.settings import FinetuneSettings
from mass_nnu.incontext.common import load_pretrained
from mass_nnu.incontext.segment import load_reference, rotated, score_token_sets
from mass_nnu.io import save_json_atomic
from mass_nnu.model.artifacts import load_weights_file
from mass_nnu.model.references import encode_tasks
from mass_nnu.planning.plan import ensure_plans

METHODS = ("mass", "scratch", "random-init", "incontext")
FINETUNED = ("mass", "scratch", "random-init")
SPLITS = ("validation", "test")
ENSEMBLE_K = (1, 3)  # in-context diagnostics: references per class, token-level average


def check_methods(methods: Sequence[str]) -> list[str]:
    """Known, each once, in the order given."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise MassError(f"--methods {' '.join(unknown) or '(none)'}: choose from {', '.join(METHODS)}")
    return list(dict.fromkeys(methods))


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
              run_one: Callable[..., dict], settings: Callable[[str], dict], split: str = "validation") -> list[dict]:
    """Run every missing cell with ``run_one(method, num_labeled, seed, test, resume) -> {"dice": {split: {mean,
    per_structure, absent, cases}}, "train_cases": [...], ...}``. A saved cell is reused only when it was run with the
    same ``settings(method)``; with ``split == "test"`` a cell holding only the validation figure is completed
    (``resume``: its trained model is reused, the test set scored once). A cell that this folder started but did not
    finish (killed mid-training) resumes too, from its last checkpoint; its marker ``<cell>.started`` holds the
    settings, so another output folder never takes over a model it did not start."""
    if split not in SPLITS:
        raise MassError(f"--split {split}: choose {' or '.join(SPLITS)}")
    grid = [(m, b, n, s) for b, n in budgets for s in range(seeds) for m in methods]
    cells = []
    for method, budget, num_labeled, seed in tqdm(grid, desc="benchmark cells", unit="cell", disable=None):
        path = cell_path(out_dir, method, budget, seed)
        wanted = settings(method)
        saved = json.loads(path.read_text()) if path.is_file() else None
        if saved is not None and saved.get("settings") != wanted:
            raise MassError(f"{path}: run with other settings ({saved.get('settings')}, now {wanted}); "
                            f"choose another -o or delete the folder")
        if saved is not None and split in saved.get("dice", {}):
            cells.append(saved)
            continue
        started = path.with_suffix(".started")
        interrupted = saved is None and started.is_file() and json.loads(started.read_text()) == wanted
        if saved is None and not interrupted:
            save_json_atomic(wanted, started)
        start = time.time()
        result = run_one(method, num_labeled, seed, test=split == "test", resume=saved is not None or interrupted)
        leaked = sorted(set(result["dice"]["validation"]["cases"]) & set(result["train_cases"]))
        if leaked:
            raise MassError(f"{path}: labelled (training) case(s) {', '.join(leaked)} scored in the validation figure")
        cell = {"method": method, "budget": budget, "num_labeled": num_labeled, "seed": seed, "split": split,
                "mean_dice": float(result["dice"][split]["mean"]),
                "per_structure": dict(result["dice"][split]["per_structure"]), **result,
                "seconds": round(time.time() - start + (saved or {}).get("seconds", 0.0), 1), "settings": wanted}
        save_json_atomic(cell, path)
        started.unlink(missing_ok=True)
        cells.append(cell)
    return cells


def _finetune_cell(dataset: Dataset, weights, configuration, fold, device, settings: FinetuneSettings,
                   method_lr: dict[str, float], verbose: bool = False):
    def run_one(method: str, num_labeled: int, seed: int, test: bool, resume: bool) -> dict:
        cell_settings = replace(settings, num_labeled=num_labeled, seed=seed,
                                initial_lr=method_lr.get(method, settings.initial_lr),
                                random_init=True if method == "random-init" else None)
        results = finetune_dataset(dataset, cell_settings, weights=weights, scratch=method == "scratch",
                                   configuration=configuration, fold=fold, device=device, continue_training=resume,
                                   test=test, verbose=verbose)
        dice = {}
        for split in ("validation", "test") if test else ("validation",):
            if split not in results["dice"]:
                raise MassError(f"{results['model_folder']}: no {split} Dice"
                                + ("; the benchmark needs imagesTs and labelsTs" if split == "test" else ""))
            table = dict(results["dice"][split])
            mean = table.pop("mean")
            dice[split] = {"mean": mean, "per_structure": table, "absent": results["absent_classes"][split],
                           "cases": results["cases"][split]}
        return {"dice": dice, "train_cases": results["cases"]["train"], "model_folder": results["model_folder"],
                "plans": results["plans"]}

    return run_one


def _incontext_cell(dataset: Dataset, weights, device, train_cases: list[str], val_cases: list[str]):
    """In-context segmentation (no training) with the seed's labelled subset as references, scored under the same
    rule as the fine-tuned cells (every foreground class; one no reference holds is an empty prediction). Beside
    it the diagnostics: the pairing gap (matched references minus references of another class: tokens rotated by
    one class), K-reference ensembles (the first K of the seed's draw, K in ENSEMBLE_K), and each class scored
    alone (its task's own sigmoid > 0.5, as in pretraining; the label map gives a voxel to the highest class)."""
    folder = Path(weights)
    pretrained = load_pretrained(folder if folder.is_dir() else folder.parent, device=device)
    meta = dataset.dataset_json()
    names = {str(v): k for k, v in meta["labels"].items() if not isinstance(v, list) and v != 0}
    score_labels = sorted(int(v) for v in names)
    loaded: dict[str, object] = {}

    def tokens_of(cases: list[str]):
        for c in cases:
            if c not in loaded:
                loaded[c] = load_reference(dataset.image_file(c), dataset.label_file(c), pretrained, None)
        references = [loaded[c] for c in cases]
        labels = sorted({v for r in references for v in r.labels})
        return encode_tasks(pretrained.model, pretrained.patch_size, references, labels), labels

    def figures(per_case: dict, source: str, labels=None) -> dict:
        means = class_means(per_case, [str(v) for v in (labels or score_labels)])
        out = summarise({names.get(k, k): v for k, v in means.items()}, source)
        return {**out, "cases": sorted(per_case)}

    def run_one(method: str, num_labeled: int, seed: int, test: bool, resume: bool) -> dict:
        refs = select_budget(train_cases, num_labeled, None, seed)
        tokens, labels = tokens_of(refs)
        sets = {"matched": (tokens, labels)}
        if len(labels) >= 2:
            sets["mismatched"] = (rotated(tokens), labels)
        ensemble = {k: select_budget(train_cases, min(k, len(train_cases)), None, seed) for k in ENSEMBLE_K}
        for k, cases in ensemble.items():
            if cases != refs:
                sets[f"k{k}"] = tokens_of(cases)
        dice, diagnostics = {}, {}
        queries = {"validation": ([dataset.image_file(c) for c in val_cases], dataset.raw / "labelsTr")}
        if test:
            queries["test"] = ([dataset.raw / "imagesTs"], dataset.raw / "labelsTs")
        for split, (images, gt) in queries.items():
            scores = score_token_sets(pretrained, sets, images, gt, score_labels, alone=("matched",))
            source = f"in-context {split} (n{num_labeled}, seed {seed})"
            dice[split] = figures(scores["matched"], source)
            gap = None
            if "mismatched" in scores:
                matched = figures(scores["matched"], source, labels)["mean"]
                mismatched = figures(scores["mismatched"], source, labels)["mean"]
                gap = {"matched": matched, "mismatched": mismatched, "gap": matched - mismatched}
            diagnostics[split] = {
                "pairing": gap,
                "alone": figures(scores["matched_alone"], source)["mean"],
                "ensemble": {str(k): figures(scores["matched" if cases == refs else f"k{k}"], source)["mean"]
                             for k, cases in ensemble.items()}}
        return {"dice": dice, "train_cases": refs, "diagnostics": diagnostics,
                "references": {"cell": refs, **{f"k{k}": cases for k, cases in ensemble.items()}}}

    return run_one


def parse_method_lr(pairs: Sequence[str]) -> dict[str, float]:
    """'scratch=0.03' (repeatable) -> {"scratch": 0.03}: a fine-tuned method's own initial learning rate."""
    rates = {}
    for pair in pairs:
        method, _, value = pair.partition("=")
        try:
            rate = float(value)
        except ValueError:
            rate = -1.0
        if method not in FINETUNED or rate <= 0 or method in rates:
            raise MassError(f"--method-lr '{pair}': expected METHOD=LR once per method, METHOD one of "
                            f"{', '.join(FINETUNED)} and LR > 0")
        rates[method] = rate
    return rates


def run_benchmark(dataset, weights, budgets: Sequence[str], seeds: int, schedule: FinetuneSettings,
                  configuration: str = "3d_fullres", fold: str = "0", methods: Sequence[str] = ("mass", "scratch"),
                  device: str = "cpu", out: str | None = None, split: str = "validation",
                  method_lr: dict[str, float] | None = None, verbose: bool = False) -> str:
    """All cells, then results.csv/json, results.md and dice_vs_labels.png. Returns the Markdown table.
    ``schedule`` is every fine-tuned cell's training (the budget and seed are the cell's); ``method_lr`` overrides
    its learning rate per method (each tuned on validation). ``split``: the figure reported, "validation" (the
    fold's validation cases; for every choice) or "test" (imagesTs, scored once). ``verbose``: nnU-Net's output on
    screen (else in each cell's ``fold_k/mass_finetune_log.txt``)."""
    dataset = Dataset.resolve(dataset)
    methods = check_methods(methods)
    method_lr = dict(method_lr or {})
    if split not in SPLITS:
        raise MassError(f"--split {split}: choose {' or '.join(SPLITS)}")
    if fold == "all":
        raise MassError("-f all: the benchmark's validation figure needs a fold's held-out validation cases")
    if split == "test" and not (dataset.raw / "labelsTs").is_dir():
        raise MassError(f"{dataset.raw}: no labelsTs; --split test scores the held-out imagesTs/labelsTs")
    weights_path, checkpoint = load_weights_file(weights)
    plans = ensure_plans(dataset, checkpoint["plans_identifier"], configuration,
                         checkpoint["nnssl_adaptation_plan"]["pretrain_plan"], 2)
    train_cases, val_cases = fold_cases(dataset, plans, configuration, int(fold))
    out_dir = Path(out) if out else dataset.results / "mass_benchmark"
    parsed = parse_budgets(list(budgets), len(train_cases))
    head, _ = choose_head(schedule.head or "auto", weights_path)
    if "random-init" in methods and head != "incontext":
        raise MassError(f"{weights_path}: --methods random-init is the in-context head from random weights; it needs "
                        f"the full MASS checkpoint of a 'mass pretrain' folder (head here: {head})")
    schedule = replace(schedule, head=head)
    common = {"configuration": configuration, "fold": str(fold)}
    trained = {**common, "epochs": schedule.num_epochs, "iterations_per_epoch": schedule.num_iterations_per_epoch,
               "batch_size": schedule.batch_size, "mirroring": bool(schedule.mirroring)}

    def lr_of(method: str) -> dict:
        return {"learning_rate": method_lr.get(method, schedule.initial_lr)}

    # scratch never reads the weights, only the plans they were trained with
    per_method = {
        "mass": {**trained, **lr_of("mass"), "weights": str(weights_path), "method": "mass", "head": head},
        "scratch": {**trained, **lr_of("scratch"), "plans": checkpoint["plans_identifier"], "method": "scratch",
                    "head": "nnunet"},
        "random-init": {**trained, **lr_of("random-init"), "weights": str(weights_path), "method": "random-init",
                        "head": "incontext", "random_init": True},
        "incontext": {**common, "weights": str(weights_path), "method": "incontext", "references": "the cell's labelled cases",
                      "ensemble_k": list(ENSEMBLE_K), "pairing": "tokens rotated by one class"},
    }
    cells = []
    finetuned = [m for m in methods if m in FINETUNED]
    if finetuned:
        finetune = _finetune_cell(dataset, weights_path, configuration, fold, device, schedule, method_lr, verbose)
        cells += run_cells(out_dir, parsed, seeds, finetuned, finetune, per_method.get, split)
    if "incontext" in methods:
        run_ic = _incontext_cell(dataset, weights_path, device, train_cases, val_cases)
        cells += run_cells(out_dir, parsed, seeds, ("incontext",), run_ic, per_method.get, split)
    title = (f"{dataset}: {' vs '.join(methods)} ({schedule.num_epochs} epochs × "
             f"{schedule.num_iterations_per_epoch} iterations, {seeds} seed(s), {split} Dice)")
    return write_report(cells, out_dir, title, split)
