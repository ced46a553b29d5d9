"""`mass finetune`: resolve the weights → prepare plans, data and the label budget → train with nnU-Net →
predict and evaluate the test set.

Each run trains under a derived plans identifier ``<plans>_<mass|scratch>[_n<N>s<seed>|_f<F>s<seed>][_e<E>][_i<I>]...``
(a copy of the plans with ``pretrain_info`` and ``mass_finetune`` entries, same architecture, same preprocessed
data), so budgets and the scratch twin get their own nnU-Net results folders and
``nnUNetv2_train/predict -p <derived plans>`` reproduce them.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from tqdm import tqdm

from mass_nnu.adapter import training
from mass_nnu.adapter.datasets import Dataset
from mass_nnu.adapter.networks import build_network
from mass_nnu.devices import check_device
from mass_nnu.dice import class_means, summarise
from mass_nnu.errors import MassError
from mass_nnu.finetuning.budget import budget_size, select_budget
from mass_nnu.finetuning.incontext_head import choose_head
from mass_nnu.finetuning.settings import FinetuneSettings
from mass_nnu.finetuning.trainer import SCRATCH, TRAINERS, architecture_mismatch, plan_hint
from mass_nnu.io import nnunet_output, save_json_atomic
from mass_nnu.model.artifacts import find_pretrained_weights, load_weights_file
from mass_nnu.planning.plan import ensure_plans

DEFAULT_TRAINER = "nnUNetTrainerMASS"
LOG_FILE = "mass_finetune_log.txt"  # nnU-Net's console output of a run, in its fold folder


@dataclass
class Weights:
    """The pretrained weights of a run (``path`` None: the from-scratch twin) and the plans they came with."""
    path: Path | None
    checkpoint: dict | None
    plans_identifier: str
    configuration: str

    @property
    def source_plans(self) -> dict | None:
        return self.checkpoint["nnssl_adaptation_plan"]["pretrain_plan"] if self.checkpoint else None


def resolve_weights(weights, scratch: bool, plans_identifier: str | None, configuration: str | None) -> Weights:
    """The weights file (given, else the only one under nnUNet_results) with its plans and configuration; the
    scratch twin without -w uses the given or default plans."""
    if weights is None and scratch:
        return Weights(None, None, plans_identifier or training.DEFAULT_PLANS, configuration or "3d_fullres")
    path, checkpoint = load_weights_file(weights if weights is not None else
                                         find_pretrained_weights(configuration or "3d_fullres", plans_identifier))
    trained_with = checkpoint.get("plans_identifier") or checkpoint["nnssl_adaptation_plan"]["pretrain_plan"]["plans_name"]
    if plans_identifier and plans_identifier != trained_with:
        raise MassError(f"{path}: trained with plans '{trained_with}', not '{plans_identifier}'; drop -p to use the "
                        f"weights' plans")
    return Weights(path, checkpoint, trained_with, configuration or checkpoint.get("configuration", "3d_fullres"))


def check_architecture(plans: dict, configuration: str, dataset_json: dict, weights: dict, source: Path) -> None:
    """One clear error when the dataset's plans build a network the weights do not fit."""
    channels = training.num_input_channels(plans, configuration, dataset_json)
    network = build_network(plans, configuration, channels, training.num_segmentation_heads(plans, dataset_json))
    problem = architecture_mismatch(network.state_dict(), weights, channels)
    if problem:
        raise MassError(f"{source}: weights are for another architecture than plans '{plans['plans_name']}' of "
                        f"{plans['dataset_name']} ({problem}); {plan_hint()}")


def derived_plans(plans: dict, weights: Path | None, source_fingerprint: str | None, settings: FinetuneSettings,
                  configuration: str) -> dict:
    """The run's own plans: same architecture and data, ``pretrain_info`` and ``mass_finetune`` added."""
    plans = json.loads(json.dumps(plans))
    plans["plans_name"] = f"{plans['plans_name']}_{settings.tag(scratch=weights is None)}"
    plans["pretrain_info"] = {"weights": str(weights) if weights else None, "scratch": weights is None,
                              "architecture_fingerprint": source_fingerprint}
    plans["mass_finetune"] = settings.to_plans()
    if settings.batch_size:  # same architecture and preprocessed data; only the sampler's batch changes
        plans["configurations"][configuration]["batch_size"] = int(settings.batch_size)
    return plans


def check_results_folder(model_dir: Path, pretrain_info: dict) -> None:
    """Refuse to resume or reuse a results folder that was trained from other pretrained weights (the derived
    plans name records the settings, not which weights file)."""
    plans_file = model_dir / "plans.json"
    if not plans_file.is_file():
        return
    before = (json.loads(plans_file.read_text()).get("pretrain_info") or {}).get("weights")
    if before != pretrain_info.get("weights"):
        raise MassError(f"{model_dir}: trained from other weights ({before or 'scratch'}); move or delete this folder "
                        f"to fine-tune from {pretrain_info.get('weights') or 'scratch'} with the same settings")


def summary_cases(summary: dict, file_ending: str) -> list[str]:
    """Case identifiers scored in an nnU-Net summary.json (from its prediction files)."""
    return sorted(Path(c["prediction_file"]).name[: -len(file_ending)] for c in summary["metric_per_case"])


def dice_summary(summary: dict, dataset_json: dict, source: str) -> dict:
    """nnU-Net's summary.json under the one averaging rule (``mass_nnu.dice``): {"mean", "per_structure",
    "absent"} by class name, recomputed from the per-case Dice (NaN pairs left out; no NaN in any mean)."""
    names = {str(v): k for k, v in dataset_json["labels"].items() if not isinstance(v, list)}
    per_case = {str(i): {names.get(str(label), str(label)): float(m["Dice"]) for label, m in c["metrics"].items()}
                for i, c in enumerate(summary["metric_per_case"])}
    classes = [names.get(str(label), str(label)) for label in summary["mean"]]
    return summarise(class_means(per_case, classes), source)


def dice_table(summary: dict, dataset_json: dict, source: str = "summary.json") -> dict[str, float]:
    """{class name: Dice} of the classes present somewhere, plus the foreground mean over them (absent classes,
    NaN in nnU-Net's summary, are left out: ``mass_nnu.dice``)."""
    figures = dice_summary(summary, dataset_json, source)
    return {**figures["per_structure"], "mean": figures["mean"]}


def format_table(tables: dict[str, dict[str, float]]) -> str:
    columns = list(tables)
    rows = list(dict.fromkeys(k for t in tables.values() for k in t))
    width = max(len(r) for r in rows + ["class"])
    lines = [f"{'class':<{width}}  " + "  ".join(f"{c:>10}" for c in columns)]
    for row in rows:
        lines.append(f"{row:<{width}}  " + "  ".join(f"{tables[c].get(row, float('nan')) * 100:10.2f}"
                                                     for c in columns))
    return "\n".join(lines)


def prepare_run(dataset: Dataset, weights: Weights, settings: FinetuneSettings, scratch: bool, fold,
                trainer_name: str, num_processes: int) -> tuple[dict, FinetuneSettings, list[str]]:
    """Plans and preprocessed data, the head, the label budget (shown before training) and the run's derived
    plans, saved where nnU-Net finds them. Returns (run plans, resolved settings, budget cases)."""
    plans = ensure_plans(dataset, weights.plans_identifier, weights.configuration, weights.source_plans, num_processes)
    if weights.checkpoint is not None:
        check_architecture(plans, weights.configuration, dataset.dataset_json(), weights.checkpoint["network_weights"],
                           weights.path)
    load_weights = None if scratch else weights.path
    head, mass_config = choose_head(settings.head or "auto", load_weights)  # the scratch twin is plain nnU-Net
    if settings.head in (None, "auto") and load_weights is not None:
        print(f"mass finetune: head {head} ("
              + ("the whole MASS model, one in-context task per class" if head == "incontext" else
                 "no full MASS checkpoint beside the weights: backbone only, new segmentation head") + ")")
    if head == "incontext" and settings.transfer not in (None, "all"):
        raise MassError(f"--transfer {settings.transfer}: applies to --head new (the in-context head uses the whole "
                        f"model)")
    if settings.random_init and (scratch or head != "incontext"):
        raise MassError(f"random init: the in-context head from random weights takes its architecture from a full "
                        f"MASS checkpoint (a 'mass pretrain' folder); {weights.path} gives head '{head}'"
                        + (" and --scratch is plain nnU-Net" if scratch else ""))
    settings = replace(settings, head=head, mass_config=mass_config)
    train_cases, val_cases = training.fold_cases(dataset, plans, weights.configuration, fold)
    subset = select_budget(train_cases, settings.num_labeled, settings.fraction, settings.seed or 0)
    if settings.label_budget:  # the trainer draws the same subset in do_split
        print(f"mass finetune: label budget {len(subset)} of {len(train_cases)} training cases of fold {fold} "
              f"(seed {settings.seed or 0}): {', '.join(subset)}; {len(val_cases)} validation cases untouched")
    fingerprint = weights.checkpoint.get("architecture_fingerprint") if weights.checkpoint else None
    run_plans = derived_plans(plans, load_weights, fingerprint, settings, weights.configuration)
    check_results_folder(dataset.model_folder(trainer_name, run_plans["plans_name"], weights.configuration),
                         run_plans["pretrain_info"])
    save_json_atomic(run_plans, dataset.plans_file(run_plans["plans_name"]))
    return run_plans, settings, subset


def train(dataset: Dataset, run_plans: dict, configuration: str, fold, trainer_name: str, device: str,
          continue_training: bool, save_npz: bool, screen=None, progress: bool = False):
    """nnU-Net's training and final validation of the run (resumed with ``continue_training``). ``screen``: where
    mass-nnu's own messages go (nnU-Net's may be sent to a log); ``progress``: a progress bar over the epochs."""
    trainer = training.build_trainer(TRAINERS[trainer_name], run_plans, configuration, fold, dataset.dataset_json(),
                                     device, continue_training)
    trainer.pretrained_weights = run_plans["pretrain_info"]["weights"] or SCRATCH
    if continue_training:
        resumed = training.resume_if_possible(trainer)
        print(f"mass finetune: {'resuming from ' + resumed if resumed else 'no checkpoint to resume; starting'}",
              file=screen)
    if progress:
        trainer.progress = tqdm(total=trainer.num_epochs, initial=trainer.current_epoch, desc="fine-tuning",
                                unit="epoch", leave=False, disable=None)
    try:
        training.train_and_validate(trainer, save_npz)
    finally:
        if trainer.progress is not None:
            trainer.progress.close()
            trainer.progress = None
    return trainer


def check_validation_cases(summary_file: Path, scored: list[str], val_cases: list[str],
                           train_cases: list[str]) -> None:
    """nnU-Net's final validation must score exactly the fold's validation cases, never a training case."""
    leaked = sorted(set(scored) & set(train_cases))
    if leaked:
        raise MassError(f"{summary_file}: training case(s) {', '.join(leaked)} scored as validation")
    missing = sorted(set(val_cases) - set(scored))
    if missing:
        raise MassError(f"{summary_file}: validation case(s) {', '.join(missing)} not scored")


def evaluate(dataset: Dataset, trainer, run_plans: dict, fold, device: str, mirroring: bool,
             train_cases: list[str], test: bool = True, verbose: bool = False) -> tuple[dict, dict]:
    """Dice of the fold's validation cases (nnU-Net's final validation; with ``-f all`` those are the training
    cases, so the table is called "training") and, with ``test``, of imagesTs when it has labels.
    Returns (tables {split: {class: Dice, "mean"}}, details {split: {"mean", "per_structure", "absent", "cases"}})."""
    fold_dir = Path(trainer.output_folder)
    dataset_json = dataset.dataset_json()
    ending = dataset_json["file_ending"]
    details = {}
    val_summary = fold_dir / "validation" / "summary.json"
    if val_summary.is_file():
        summary = json.loads(val_summary.read_text())
        scored = summary_cases(summary, ending)
        if fold == "all":
            split = "training"
        else:
            split = "validation"
            fold_train, val_cases = training.fold_cases(dataset, run_plans, trainer.configuration_name, fold)
            check_validation_cases(val_summary, scored, val_cases, sorted(set(fold_train) | set(train_cases)))
        details[split] = {**dice_summary(summary, dataset_json, str(val_summary)), "cases": scored}
    images_ts, labels_ts = dataset.raw / "imagesTs", dataset.raw / "labelsTs"
    predictions = fold_dir / "predictions_imagesTs"
    if test and images_ts.is_dir() and any(images_ts.iterdir()):
        training.predict_folder(Path(trainer.output_folder_base), fold, images_ts, predictions, device, mirroring,
                                tile_progress=verbose)
        if labels_ts.is_dir() and any(labels_ts.iterdir()):
            summary_file = fold_dir / "summary_imagesTs.json"
            training.evaluate_folder(labels_ts, predictions, run_plans, dataset_json, summary_file)
            summary = json.loads(summary_file.read_text())
            details["test"] = {**dice_summary(summary, dataset_json, str(summary_file)),
                               "cases": summary_cases(summary, ending)}
    tables = {split: {**d["per_structure"], "mean": d["mean"]} for split, d in details.items()}
    return tables, details


def finetune_dataset(dataset, settings: FinetuneSettings | None = None, weights=None, scratch: bool = False,
                     plans_identifier: str | None = None, configuration: str | None = None, fold="0",
                     trainer_name: str = DEFAULT_TRAINER, device: str = "cpu", continue_training: bool = False,
                     save_npz: bool = False, num_processes: int = 2, test: bool = True, verbose: bool = False) -> dict:
    """Fine-tune (or train the scratch twin) on ``dataset``; returns the results dict also written to
    ``<fold folder>/mass_finetune_results.json``. ``test=False``: validation only (imagesTs is not touched).
    nnU-Net's console output goes to ``<fold folder>/mass_finetune_log.txt`` (beside its own training log) unless
    ``verbose``; then a progress bar shows the epochs."""
    settings = settings or FinetuneSettings()
    dataset = Dataset.resolve(dataset)
    fold = fold if fold == "all" else int(fold)
    if trainer_name not in TRAINERS:
        raise MassError(f"unknown trainer '{trainer_name}'; choose one of {', '.join(TRAINERS)}")
    check_device(device)
    budget_size(10**9, settings.num_labeled, settings.fraction)  # argument errors before any work
    settings.check()

    resolved = resolve_weights(weights, scratch, plans_identifier, configuration)
    run_plans, settings, subset = prepare_run(dataset, resolved, settings, scratch, fold, trainer_name, num_processes)
    model_folder = dataset.model_folder(trainer_name, run_plans["plans_name"], resolved.configuration)
    with nnunet_output(model_folder / f"fold_{fold}" / LOG_FILE, verbose) as screen:
        trainer = train(dataset, run_plans, resolved.configuration, fold, trainer_name, device, continue_training,
                        save_npz, screen, progress=not verbose)
        tables, details = evaluate(dataset, trainer, run_plans, fold, device, settings.mirroring is not False,
                                   subset, test, verbose)

    fold_dir = Path(trainer.output_folder)
    load_weights = run_plans["pretrain_info"]["weights"]
    results = {"dataset": dataset.name, "trainer": trainer_name, "plans": run_plans["plans_name"],
               "configuration": resolved.configuration, "fold": fold, "weights": load_weights,
               "scratch": load_weights is None, "label_budget": settings.label_budget,
               "num_training_cases": len(subset), "epochs": trainer.num_epochs,
               "iterations_per_epoch": trainer.num_iterations_per_epoch,
               "model_folder": str(trainer.output_folder_base), "dice": tables,
               "absent_classes": {split: d["absent"] for split, d in details.items()},
               "cases": {"train": list(subset), **{split: d["cases"] for split, d in details.items()}},
               "random_init": bool(settings.random_init)}
    save_json_atomic(results, fold_dir / "mass_finetune_results.json")
    if tables:
        print(f"\nDice (%) of {trainer_name} / {run_plans['plans_name']} / fold {fold}:")
        print(format_table(tables))
    print(f"mass finetune: results in {fold_dir}")
    return results
