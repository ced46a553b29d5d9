"""`mass finetune`: plan/preprocess with the weights' plans, label budget, nnU-Net training, final validation,
test-set prediction and evaluation, Dice table.

Each run trains under a derived plans identifier ``<plans>_<mass|scratch>[_n<N>s<seed>|_f<F>s<seed>][_e<E>][_i<I>]``
(a copy of the plans with ``pretrain_info`` and ``mass_finetune`` entries, same architecture, same preprocessed
data), so budgets and the scratch twin get their own nnU-Net results folders and
``nnUNetv2_train/predict -p <derived plans>`` reproduce them.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from mass_nnu.adapter.datasets import dataset_name, preprocessed_dir, raw_dir, results_root
from mass_nnu.errors import MassError


def find_pretrained_weights(configuration: str, plans_identifier: str | None) -> Path:
    """The one ``MASSPretrainer`` weights file under nnUNet_results (MassError when none or several)."""
    pattern = f"Dataset*/MASSPretrainer__{plans_identifier or '*'}__{configuration}/nnunet_pretrained_weights.pth"
    found = sorted(results_root().glob(pattern))
    if not found:
        raise MassError(f"{results_root()}: no pretrained weights ({pattern}); run 'mass pretrain', pass -w, or "
                        f"train from scratch with --scratch")
    if len(found) > 1:
        raise MassError(f"{results_root()}: several pretrained models, choose one with -w: "
                        + ", ".join(str(p.parent) for p in found))
    return found[0]


def load_weights_file(path) -> tuple[Path, dict]:
    from mass_nnu.finetuning.trainer import resolve_weights_path
    from mass_nnu.io import load_checkpoint

    path = resolve_weights_path(path).resolve()  # absolute: recorded in the plans and compared on reruns
    checkpoint = load_checkpoint(path)
    plan = checkpoint.get("nnssl_adaptation_plan")
    if not isinstance(plan, dict) or not isinstance(plan.get("pretrain_plan"), dict):
        raise MassError(f"{path}: no 'nnssl_adaptation_plan.pretrain_plan' (not written by 'mass pretrain')")
    return path, checkpoint


def check_architecture(plans: dict, configuration: str, dataset_json: dict, weights: dict, source: Path) -> None:
    """One clear error when the dataset's plans build a network the weights do not fit."""
    from mass_nnu.adapter.networks import build_network
    from mass_nnu.adapter.training import num_input_channels, num_segmentation_heads
    from mass_nnu.finetuning.trainer import architecture_mismatch, plan_hint

    channels = num_input_channels(plans, configuration, dataset_json)
    network = build_network(plans, configuration, channels, num_segmentation_heads(plans, dataset_json))
    problem = architecture_mismatch(network.state_dict(), weights, channels)
    if problem:
        raise MassError(f"{source}: weights are for another architecture than plans '{plans['plans_name']}' of "
                        f"{plans['dataset_name']} ({problem}); {plan_hint()}")


def prepare_plans(name: str, plans_identifier: str, configuration: str, source_plans: dict | None,
                  num_processes: int) -> dict:
    """The dataset's plans (transferred from the weights' plans, or planned, when missing) and its preprocessed
    data (made when missing)."""
    from mass_nnu.adapter import planning as nnunet_planning
    from mass_nnu.adapter.training import preprocessed_cases

    plans_file = preprocessed_dir(name) / f"{plans_identifier}.json"
    if not plans_file.is_file():
        if source_plans is not None:
            from mass_nnu.planning import transfer_plans

            print(f"mass finetune: {name} has no plans '{plans_identifier}'; transferring the pretrained plans")
            transfer_plans(source_plans, name, plans_identifier, num_processes=num_processes)
        else:
            from mass_nnu.planning import plan_datasets

            planner = {v: k for k, v in nnunet_planning.PLANNERS.items()}.get(plans_identifier)
            if planner is None:
                raise MassError(f"{plans_file}: missing; plan it first with 'mass plan -d {name}'")
            plan_datasets([name], planner=planner, configurations=(configuration,), num_processes=num_processes,
                          preprocess=False)
    plans = nnunet_planning.load_plans_file(name, plans_identifier)
    if not preprocessed_cases(name, plans, configuration):
        print(f"mass finetune: preprocessing {name} ({plans_identifier}, {configuration})")
        nnunet_planning.preprocess(name, plans_identifier, [configuration], num_processes)
    return plans


def derived_plans(plans: dict, weights: Path | None, source_fingerprint: str | None, budget: dict | None,
                  options: dict, tag: str) -> dict:
    plans = json.loads(json.dumps(plans))
    plans["plans_name"] = f"{plans['plans_name']}_{tag}"
    plans["pretrain_info"] = {"weights": str(weights) if weights else None, "scratch": weights is None,
                              "architecture_fingerprint": source_fingerprint}
    plans["mass_finetune"] = {**{k: v for k, v in options.items() if v is not None}, "label_budget": budget}
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


def dice_table(summary: dict, dataset_json: dict) -> dict[str, float]:
    """{class name: Dice} from nnU-Net's summary.json, plus the foreground mean."""
    names = {str(v): k for k, v in dataset_json["labels"].items() if not isinstance(v, list)}
    table = {names.get(str(label), str(label)): float(metrics["Dice"]) for label, metrics in summary["mean"].items()}
    table["mean"] = float(summary["foreground_mean"]["Dice"])
    return table


def format_table(tables: dict[str, dict[str, float]]) -> str:
    columns = list(tables)
    rows = list(dict.fromkeys(k for t in tables.values() for k in t))
    width = max(len(r) for r in rows + ["class"])
    lines = [f"{'class':<{width}}  " + "  ".join(f"{c:>10}" for c in columns)]
    for row in rows:
        lines.append(f"{row:<{width}}  " + "  ".join(f"{tables[c].get(row, float('nan')) * 100:10.2f}"
                                                     for c in columns))
    return "\n".join(lines)


def finetune_dataset(dataset, configuration: str | None = None, fold="0", weights=None,
                     plans_identifier: str | None = None, num_labeled: int | None = None,
                     fraction: float | None = None, scratch: bool = False, epochs: int | None = None,
                     iterations_per_epoch: int | None = None, device: str = "cpu", continue_training: bool = False,
                     save_npz: bool = False, seed: int = 0, mirroring: bool = True,
                     trainer_name: str = "nnUNetTrainerMASS", num_processes: int = 2, batch_size: int | None = None,
                     learning_rate: float | None = None, transfer: str = "all", head: str = "auto") -> dict:
    """Fine-tune (or train the scratch twin) on ``dataset``; returns the results dict also written to
    ``<fold folder>/mass_finetune_results.json``."""
    from mass_nnu.adapter import training
    from mass_nnu.finetuning.budget import budget_size, budget_tag, select_budget
    from mass_nnu.finetuning.incontext_head import check_head, choose_head
    from mass_nnu.finetuning.trainer import SCRATCH, TRAINERS, check_transfer_mode
    from mass_nnu.io import save_json_atomic

    name = dataset_name(dataset)
    fold = fold if fold == "all" else int(fold)
    if trainer_name not in TRAINERS:
        raise MassError(f"unknown trainer '{trainer_name}'; choose one of {', '.join(TRAINERS)}")
    if device not in ("cpu", "cuda", "mps"):
        raise MassError(f"-device {device}: choose cpu, cuda or mps")
    budget_size(10**9, num_labeled, fraction)  # argument errors before any work
    check_transfer_mode(transfer)
    check_head(head)

    # weights and the plans they were trained on
    source_plans = checkpoint = weights_path = None
    if weights is not None or not scratch:
        weights_path, checkpoint = load_weights_file(
            weights if weights is not None else find_pretrained_weights(configuration or "3d_fullres",
                                                                        plans_identifier))
        source_plans = checkpoint["nnssl_adaptation_plan"]["pretrain_plan"]
        if plans_identifier and plans_identifier != checkpoint.get("plans_identifier", source_plans["plans_name"]):
            raise MassError(f"{weights_path}: trained with plans '{checkpoint.get('plans_identifier')}', not "
                            f"'{plans_identifier}'; drop -p to use the weights' plans")
        plans_identifier = checkpoint.get("plans_identifier") or source_plans["plans_name"]
        configuration = configuration or checkpoint.get("configuration", "3d_fullres")
    plans_identifier = plans_identifier or training.DEFAULT_PLANS
    configuration = configuration or "3d_fullres"
    plans = prepare_plans(name, plans_identifier, configuration, source_plans, num_processes)
    dataset_json = json.loads((preprocessed_dir(name) / "dataset.json").read_text())
    if checkpoint is not None:
        check_architecture(plans, configuration, dataset_json, checkpoint["network_weights"], weights_path)
    load_weights = None if scratch else weights_path
    chosen, mass_config = choose_head(head, load_weights)  # the scratch twin is plain nnU-Net
    if head == "auto" and load_weights is not None:
        print(f"mass finetune: head {chosen} ("
              + ("the whole MASS model, one in-context task per class" if chosen == "incontext" else
                 "no full MASS checkpoint beside the weights: backbone only, new segmentation head") + ")")
    head = chosen
    if head == "incontext" and transfer != "all":
        raise MassError(f"--transfer {transfer}: applies to --head new (the in-context head uses the whole model)")

    # label budget: checked and shown before training (the trainer draws the same subset in do_split)
    train_cases, val_cases = training.fold_cases(name, plans, configuration, fold)
    budget = None
    if num_labeled is not None or fraction is not None:
        budget = {"num_labeled": num_labeled, "fraction": fraction, "seed": seed}
        subset = select_budget(train_cases, num_labeled, fraction, seed)
        print(f"mass finetune: label budget {len(subset)} of {len(train_cases)} training cases of fold {fold} "
              f"(seed {seed}): {', '.join(subset)}; {len(val_cases)} validation cases untouched")
    tag = "_".join(t for t in ["scratch" if load_weights is None else "mass", budget_tag(num_labeled, fraction, seed),
                               f"e{epochs}" if epochs else "", f"i{iterations_per_epoch}" if iterations_per_epoch
                               else "", f"b{batch_size}" if batch_size else "",
                               f"lr{learning_rate:g}" if learning_rate else "",
                               "tenc" if transfer == "encoder" and load_weights else "",
                               "hic" if head == "incontext" else ""] if t)
    options = {"num_epochs": epochs, "num_iterations_per_epoch": iterations_per_epoch, "mirroring": mirroring,
               "initial_lr": learning_rate, "seed": seed, "transfer": transfer, "head": head,
               "mass_config": mass_config}
    run_plans = derived_plans(plans, load_weights, checkpoint.get("architecture_fingerprint") if checkpoint else None,
                              budget, options, tag)
    if batch_size:  # same architecture and preprocessed data; only the sampler's batch changes
        run_plans["configurations"][configuration]["batch_size"] = int(batch_size)
    check_results_folder(training.results_folder(name, trainer_name, run_plans["plans_name"], configuration),
                         run_plans["pretrain_info"])
    save_json_atomic(run_plans, preprocessed_dir(name) / f"{run_plans['plans_name']}.json")

    trainer = training.build_trainer(TRAINERS[trainer_name], run_plans, configuration, fold, dataset_json, device,
                                     continue_training)
    trainer.pretrained_weights = str(load_weights) if load_weights else SCRATCH
    if continue_training:
        resumed = training.resume_if_possible(trainer)
        print(f"mass finetune: {'resuming from ' + resumed if resumed else 'no checkpoint to resume; starting'}")
    training.train_and_validate(trainer, save_npz)

    fold_dir = Path(trainer.output_folder)
    model_dir = Path(trainer.output_folder_base)
    tables = {}
    val_summary = fold_dir / "validation" / "summary.json"
    if val_summary.is_file():
        tables["validation"] = dice_table(json.loads(val_summary.read_text()), dataset_json)
    images_ts, labels_ts = raw_dir(name) / "imagesTs", raw_dir(name) / "labelsTs"
    predictions = fold_dir / "predictions_imagesTs"
    if images_ts.is_dir() and any(images_ts.iterdir()):
        training.predict_folder(model_dir, fold, images_ts, predictions, device, mirroring)
        if labels_ts.is_dir() and any(labels_ts.iterdir()):
            training.evaluate_folder(labels_ts, predictions, run_plans, dataset_json,
                                     fold_dir / "summary_imagesTs.json")
            tables["test"] = dice_table(json.loads((fold_dir / "summary_imagesTs.json").read_text()), dataset_json)
    results = {"dataset": name, "trainer": trainer_name, "plans": run_plans["plans_name"],
               "configuration": configuration, "fold": fold, "weights": str(load_weights) if load_weights else None,
               "scratch": load_weights is None, "label_budget": budget,
               "num_training_cases": len(select_budget(train_cases, num_labeled, fraction, seed)),
               "epochs": trainer.num_epochs, "iterations_per_epoch": trainer.num_iterations_per_epoch,
               "model_folder": str(model_dir), "dice": tables}
    save_json_atomic(results, fold_dir / "mass_finetune_results.json")
    if tables:
        print(f"\nDice (%) of {trainer_name} / {run_plans['plans_name']} / fold {fold}:")
        print(format_table(tables))
    print(f"mass finetune: results in {fold_dir}")
    return results
