"""nnU-Net experiment planning: fingerprints, ResEnc planners, plan transfer between datasets, preprocessing."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from mass_nnu.adapter.datasets import dataset_id, dataset_name, preprocessed_root, raw_dir
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
    from nnunetv2.experiment_planning.experiment_planners import default_experiment_planner
    from nnunetv2.experiment_planning.experiment_planners.residual_unets import residual_encoder_unet_planners

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


def extract_fingerprint(dataset, num_processes: int, verify: bool = False) -> dict:
    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprint_dataset

    try:
        return extract_fingerprint_dataset(dataset_id(dataset_name(dataset)), num_processes=num_processes,
                                           check_dataset_integrity=verify, clean=True, verbose=False,
                                           show_progress_bar=True)
    except (AssertionError, RuntimeError) as e:
        raise MassError(f"{raw_dir(dataset)}: nnU-Net could not fingerprint the dataset: "
                        f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from None


def plans_identifier_for(planner: str, base_features: int | None = None) -> str:
    return PLANNERS[planner] + (f"_f{base_features}" if base_features else "")


def plan_experiment(dataset, planner: str, base_features: int | None = None) -> str:
    import os

    from nnunetv2.experiment_planning.plan_and_preprocess_api import plan_experiment_dataset

    # nnU-Net's VRAM estimate calls torch.set_num_threads(nnUNet_n_proc_DA), which fails for 0 (our test setting)
    saved = os.environ.get("nnUNet_n_proc_DA")
    if saved is not None and int(saved) < 1:
        os.environ["nnUNet_n_proc_DA"] = "1"
    try:
        _, identifier = plan_experiment_dataset(
            dataset_id(dataset_name(dataset)), planner_class(planner, base_features),
            overwrite_plans_name=plans_identifier_for(planner, base_features) if base_features else None)
    finally:
        if saved is not None:
            os.environ["nnUNet_n_proc_DA"] = saved
    return identifier


def intensity_settings(dataset, planner: str) -> dict:
    """The dataset's own normalisation schemes and foreground intensity statistics (from its fingerprint)."""
    planner_obj = planner_class(planner)(dataset_id(dataset_name(dataset)))
    schemes, use_mask = planner_obj.determine_normalization_scheme_and_whether_mask_is_used_for_norm()
    return {"normalization_schemes": schemes, "use_mask_for_norm": use_mask,
            "foreground_intensity_properties_per_channel":
                planner_obj.dataset_fingerprint["foreground_intensity_properties_per_channel"]}


def write_transferred_plans(plans: dict, dataset, plans_identifier: str, intensity: dict | None) -> Path:
    """Write ``plans`` (another dataset's) into ``dataset``: same architecture and patch size, the dataset's own
    name, reader and intensity normalisation; dataset.json copied beside it (nnU-Net issue 2560)."""
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

    name = dataset_name(dataset)
    dataset_json = json.loads((raw_dir(name) / "dataset.json").read_text())
    plans = json.loads(json.dumps(plans))  # deep copy
    source = plans.get("dataset_name")
    plans["dataset_name"] = name
    plans["plans_name"] = plans_identifier
    files = get_filenames_of_train_images_and_targets(str(raw_dir(name)), dataset_json)
    example = next(iter(files.values()))["images"][0]
    plans["image_reader_writer"] = determine_reader_writer_from_dataset_json(
        dataset_json, example, allow_nonmatching_filename=True, verbose=False).__name__
    if source != name:
        plans["mass_transfer"] = {"architecture_from": plans.get("mass_transfer", {}).get("architecture_from", source)}
    if intensity is not None:
        plans["foreground_intensity_properties_per_channel"] = intensity["foreground_intensity_properties_per_channel"]
        for config in plans["configurations"].values():
            if "normalization_schemes" in config:
                config["normalization_schemes"] = intensity["normalization_schemes"]
                config["use_mask_for_norm"] = intensity["use_mask_for_norm"]
    folder = preprocessed_root() / name
    folder.mkdir(parents=True, exist_ok=True)
    from mass_nnu.io import save_json_atomic

    save_json_atomic(plans, folder / f"{plans_identifier}.json")
    shutil.copyfile(raw_dir(name) / "dataset.json", folder / "dataset.json")
    return folder / f"{plans_identifier}.json"


def preprocess(dataset, plans_identifier: str, configurations, num_processes: int) -> None:
    from nnunetv2.experiment_planning.plan_and_preprocess_api import preprocess_dataset

    preprocess_dataset(dataset_id(dataset_name(dataset)), plans_identifier, tuple(configurations),
                       [num_processes] * len(configurations), verbose=False, show_progress_bar=True)


def load_plans_file(dataset, plans_identifier: str) -> dict:
    path = preprocessed_root() / dataset_name(dataset) / f"{plans_identifier}.json"
    if not path.is_file():
        raise MassError(f"{path}: unknown plans '{plans_identifier}'; run 'mass plan -d {dataset}' first")
    return json.loads(path.read_text())


def configuration_summary(plans: dict, configuration: str) -> dict:
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    config = PlansManager(plans).get_configuration(configuration)
    kwargs = config.network_arch_init_kwargs
    return {"dataset": plans["dataset_name"], "plans": plans["plans_name"], "configuration": configuration,
            "spacing": [round(float(s), 3) for s in config.spacing], "patch_size": list(config.patch_size),
            "batch_size": config.batch_size, "network": config.network_arch_class_name.split(".")[-1],
            "stages": kwargs.get("n_stages"), "features": list(kwargs.get("features_per_stage", [])),
            "normalization": config.normalization_schemes,
            "architecture_from": plans.get("mass_transfer", {}).get("architecture_from", plans["dataset_name"])}
