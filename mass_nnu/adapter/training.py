"""nnU-Net's training machinery: the trainer base class, trainer construction, splits, resume, prediction and
evaluation."""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path

import torch
from nnunetv2.configuration import default_num_processes
from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer  # noqa: F401  (base of nnUNetTrainerMASS)
from nnunetv2.utilities.crossval_split import generate_crossval_split
from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from mass_nnu.adapter.datasets import Dataset
from mass_nnu.adapter.preprocessed import data_folder, preprocessed_case_ids
from mass_nnu.errors import MassError
from mass_nnu.io import load_nnunet_checkpoint, save_json_atomic

DEFAULT_PLANS = "nnUNetResEncUNetMPlans"


def bare_network(network):
    """The plain nn.Module under torch.compile / DDP wrappers."""
    network = getattr(network, "module", network)
    return getattr(network, "_orig_mod", network)


def num_input_channels(plans: dict, configuration: str, dataset_json: dict) -> int:
    manager = PlansManager(plans)
    return determine_num_input_channels(manager, manager.get_configuration(configuration), dataset_json)


def num_segmentation_heads(plans: dict, dataset_json: dict) -> int:
    return PlansManager(plans).get_label_manager(dataset_json).num_segmentation_heads


def fold_cases(dataset: Dataset, plans: dict, configuration: str, fold) -> tuple[list[str], list[str]]:
    """(train, val) case identifiers of a fold, exactly as nnU-Net's ``do_split`` chooses them; writes nnU-Net's
    seeded 5-fold ``splits_final.json`` when it is missing, like the trainer would (with fewer than 5 cases,
    where nnU-Net would crash: one fold per case)."""
    dataset = Dataset.resolve(dataset)
    cases = preprocessed_case_ids(data_folder(dataset, plans, configuration))
    if fold == "all":
        return cases, cases
    splits_file = dataset.preprocessed / "splits_final.json"
    if not splits_file.is_file():
        if len(cases) < 2:
            raise MassError(f"{dataset.preprocessed}: {len(cases)} preprocessed case(s); a fold needs at least "
                            f"2 (or use -f all)")
        save_json_atomic(generate_crossval_split(cases, seed=12345, n_splits=min(5, len(cases))), splits_file)

    splits = json.loads(splits_file.read_text())
    if not 0 <= int(fold) < len(splits):
        raise MassError(f"{splits_file}: has {len(splits)} folds, fold {fold} does not exist (use 0-"
                        f"{len(splits) - 1} or 'all')")
    return list(splits[int(fold)]["train"]), list(splits[int(fold)]["val"])


def build_trainer(trainer_class, plans: dict, configuration: str, fold, dataset_json: dict, device: str,
                  continue_training: bool):
    """Construct a trainer the way ``nnUNetv2_train`` does (plans need the ``continue_training`` key)."""
    plans = {**plans, "continue_training": continue_training}
    return trainer_class(plans=plans, configuration=configuration, fold=fold, dataset_json=dataset_json,
                         device=torch.device(device))


@contextmanager
def reading_preloaded_checkpoint(checkpoint: dict):
    """Make nnU-Net's ``load_checkpoint(filename)`` use a checkpoint we already read with ``weights_only=True``:
    nnU-Net 2.8 reads files with ``weights_only=False`` and its dict branch fails ('checkpoint' unbound)."""
    original = torch.load
    torch.load = lambda *args, **kwargs: checkpoint
    try:
        yield
    finally:
        torch.load = original


def resume_if_possible(trainer) -> str | None:
    """nnU-Net's ``--c`` logic (final, else latest, else best checkpoint). Returns the checkpoint used, if any."""
    for name in ("checkpoint_final.pth", "checkpoint_latest.pth", "checkpoint_best.pth"):
        path = Path(trainer.output_folder) / name
        if path.is_file():
            trainer.load_checkpoint(str(path))
            return str(path)
    return None


def last_epoch_figures(trainer) -> tuple[float, float]:
    """(train loss, mean foreground pseudo Dice) of the epoch nnU-Net's logger recorded last."""
    return (float(trainer.logger.get_value("train_losses", step=None)[-1]),
            float(trainer.logger.get_value("mean_fg_dice", step=None)[-1]))


def train_and_validate(trainer, save_probabilities: bool) -> None:
    """``nnUNetv2_train``'s sequence: run_training (skipped when already finished), then final validation."""
    if trainer.current_epoch < trainer.num_epochs:
        trainer.run_training()
    elif not trainer.was_initialized:
        trainer.initialize()
    trainer.perform_actual_validation(save_probabilities)


def predict_folder(model_folder: Path, fold, input_folder: Path, output_folder: Path, device: str,
                   mirroring: bool, tile_progress: bool = True) -> None:
    """nnU-Net's predictor on every image of ``input_folder`` (sequential: no worker processes); ``tile_progress``:
    its progress bar over each case's sliding-window tiles."""
    load_nnunet_checkpoint(model_folder / f"fold_{fold}" / "checkpoint_final.pth")  # refuse pickles first
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=mirroring,
                                perform_everything_on_device=device != "cpu", device=torch.device(device),
                                verbose=False, verbose_preprocessing=False, allow_tqdm=tile_progress)
    predictor.initialize_from_trained_model_folder(str(model_folder), (fold,), "checkpoint_final.pth")
    output_folder.mkdir(parents=True, exist_ok=True)
    predictor.predict_from_files_sequential(str(input_folder), str(output_folder), save_probabilities=False,
                                            overwrite=True)


def evaluate_folder(reference_folder: Path, prediction_folder: Path, plans: dict, dataset_json: dict,
                    output_file: Path) -> dict:
    """nnU-Net's ``compute_metrics_on_folder`` with the plans' reader and the dataset's labels/regions. Every
    reference case needs its prediction: a missing one is an error, never a smaller test set."""
    ending = dataset_json["file_ending"]
    references = sorted(p.name for p in Path(reference_folder).iterdir() if p.name.endswith(ending))
    if not references:
        raise MassError(f"{reference_folder}: no reference segmentations (*{ending}) to evaluate against")
    missing = [name for name in references if not (Path(prediction_folder) / name).is_file()]
    if missing:
        raise MassError(f"{prediction_folder}: {len(missing)} of {len(references)} predictions missing "
                        f"({', '.join(missing)}); every case of {reference_folder} must be predicted")
    manager = PlansManager(plans)
    label_manager = manager.get_label_manager(dataset_json)
    return compute_metrics_on_folder(str(reference_folder), str(prediction_folder), str(output_file),
                                     manager.image_reader_writer_class(), dataset_json["file_ending"],
                                     label_manager.foreground_regions if label_manager.has_regions
                                     else label_manager.foreground_labels,
                                     label_manager.ignore_label, num_processes=default_processes(), chill=False)


def default_processes() -> int:
    return int(os.environ.get("nnUNet_def_n_proc", default_num_processes))
