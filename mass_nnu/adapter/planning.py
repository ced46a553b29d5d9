"""nnU-Net experiment planning: fingerprints, ResEnc planners, preprocessing, reader choice, plans summaries.

nnU-Net prints whole plans dicts while it plans; callers send its prints to a log file (``io.nnunet_output``).
"""
from __future__ import annotations

import os

from nnunetv2.experiment_planning.experiment_planners import default_experiment_planner
from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
from nnunetv2.experiment_planning.experiment_planners.residual_unets import residual_encoder_unet_planners
from nnunetv2.experiment_planning.plan_and_preprocess_api import (
    extract_fingerprint_dataset,
    plan_experiment_dataset,
    preprocess_dataset,
)
from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

from mass_nnu.adapter.datasets import Dataset
from mass_nnu.errors import MassError

PLANNERS = {
    "nnUNetPlannerResEncM": "nnUNetResEncUNetMPlans",
    "nnUNetPlannerResEncL": "nnUNetResEncUNetLPlans",
    "nnUNetPlannerResEncXL": "nnUNetResEncUNetXLPlans",
    "ExperimentPlanner": "nnUNetPlans",
}


def planner_class(name: str, base_features: int | None = None):
    """nnU-Net's planner class; with ``base_features`` a subclass whose U-Net starts with that many features
    (nnU-Net: 32) and caps at 10× it — the CPU preset of the demo."""
    for module in (residual_encoder_unet_planners, default_experiment_planner):
        if hasattr(module, name):
            base = getattr(module, name)
            if base_features is None:
                return base

            class FewerFeatures(base):
                def __init__(self, *args, **kwargs):
                    super().__init__(*args, **kwargs)
                    self.UNet_base_num_features = base_features
                    self.UNet_max_features_3d = self.UNet_max_features_2d = 10 * base_features

            FewerFeatures.__name__ = f"{name}_f{base_features}"
            return FewerFeatures
    raise MassError(f"unknown planner '{name}'; choose one of {', '.join(PLANNERS)}")


def plans_identifier_for(planner: str, base_features: int | None = None) -> str:
    return PLANNERS[planner] + (f"_f{base_features}" if base_features else "")


def extract_fingerprint(dataset: Dataset, num_processes: int, verify: bool = False) -> dict:
    try:
        return extract_fingerprint_dataset(dataset.id, num_processes=num_processes, check_dataset_integrity=verify,
                                           clean=True, verbose=False, show_progress_bar=True)
    except (AssertionError, RuntimeError) as e:
        raise MassError(f"{dataset.raw}: nnU-Net could not fingerprint the dataset: "
                        f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from None


def has_fingerprint(dataset: Dataset) -> bool:
    return (dataset.preprocessed / "dataset_fingerprint.json").is_file()


def plan_experiment(dataset: Dataset, planner: str, base_features: int | None = None) -> str:
    # nnU-Net's VRAM estimate calls torch.set_num_threads(nnUNet_n_proc_DA), which fails for 0 (our test setting)
    saved = os.environ.get("nnUNet_n_proc_DA")
    if saved is not None and int(saved) < 1:
        os.environ["nnUNet_n_proc_DA"] = "1"
    try:
        _, identifier = plan_experiment_dataset(
            dataset.id, planner_class(planner, base_features),
            overwrite_plans_name=plans_identifier_for(planner, base_features) if base_features else None)
    finally:
        if saved is not None:
            os.environ["nnUNet_n_proc_DA"] = saved
    return identifier


def intensity_settings(dataset: Dataset) -> dict:
    """The dataset's own normalisation schemes and foreground intensity statistics (from its fingerprint).
    Every nnU-Net planner inherits this rule from ``ExperimentPlanner``."""
    planner = ExperimentPlanner(dataset.id)
    schemes, use_mask = planner.determine_normalization_scheme_and_whether_mask_is_used_for_norm()
    return {"normalization_schemes": schemes, "use_mask_for_norm": use_mask,
            "foreground_intensity_properties_per_channel":
                planner.dataset_fingerprint["foreground_intensity_properties_per_channel"]}


def reader_writer_name(dataset: Dataset) -> str:
    """The image reader/writer nnU-Net picks for the dataset's files."""
    dataset_json = dataset.dataset_json(raw_only=True)
    files = get_filenames_of_train_images_and_targets(str(dataset.raw), dataset_json)
    example = next(iter(files.values()))["images"][0]
    return determine_reader_writer_from_dataset_json(dataset_json, example, allow_nonmatching_filename=True,
                                                     verbose=False).__name__


def preprocess(dataset: Dataset, plans_identifier: str, configurations, num_processes: int) -> None:
    preprocess_dataset(dataset.id, plans_identifier, tuple(configurations), [num_processes] * len(configurations),
                       verbose=False, show_progress_bar=True)


def configuration_summary(plans: dict, configuration: str) -> dict:
    config = PlansManager(plans).get_configuration(configuration)
    kwargs = config.network_arch_init_kwargs
    return {"dataset": plans["dataset_name"], "plans": plans["plans_name"], "configuration": configuration,
            "spacing": [round(float(s), 3) for s in config.spacing], "patch_size": list(config.patch_size),
            "batch_size": config.batch_size, "network": config.network_arch_class_name.split(".")[-1],
            "stages": kwargs.get("n_stages"), "features": list(kwargs.get("features_per_stage", [])),
            "normalization": config.normalization_schemes,
            "architecture_from": plans.get("mass_transfer", {}).get("architecture_from", plans["dataset_name"])}


def planner_of(plans_identifier: str) -> str | None:
    """The planner whose default plans identifier this is (None for derived or custom plans)."""
    return next((planner for planner, identifier in PLANNERS.items() if identifier == plans_identifier), None)
