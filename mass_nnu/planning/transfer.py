"""Plans transfer: a target dataset's plans written into another dataset, so the same architecture (and patch
size) is built there, with that dataset's own name, reader and intensity normalisation. The transferred plans keep
the target's identifier, so ``-p`` names the same architecture in every dataset of an experiment."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from mass_nnu.adapter import planning as nnunet_planning
from mass_nnu.adapter.datasets import Dataset
from mass_nnu.errors import MassError
from mass_nnu.io import save_json_atomic
from mass_nnu.planning.otsu_labels import ensure_labels
from mass_nnu.planning.raw_checks import check_raw_dataset


def transferred_plans(plans: dict, dataset: Dataset, plans_identifier: str, reader_writer: str,
                      intensity: dict | None) -> dict:
    """A copy of ``plans`` for ``dataset``: same architecture, the dataset's name, reader and normalisation."""
    plans = json.loads(json.dumps(plans))  # deep copy
    source = plans.get("dataset_name")
    plans["dataset_name"] = dataset.name
    plans["plans_name"] = plans_identifier
    plans["image_reader_writer"] = reader_writer
    if source != dataset.name:
        plans["mass_transfer"] = {"architecture_from": plans.get("mass_transfer", {}).get("architecture_from", source)}
    if intensity is not None:
        plans["foreground_intensity_properties_per_channel"] = intensity["foreground_intensity_properties_per_channel"]
        for config in plans["configurations"].values():
            if "normalization_schemes" in config:
                config["normalization_schemes"] = intensity["normalization_schemes"]
                config["use_mask_for_norm"] = intensity["use_mask_for_norm"]
    return plans


def transfer_plans(plans: dict, dataset: Dataset, plans_identifier: str, num_processes: int = 2,
                   verify: bool = False, checked: bool = False) -> Path:
    """Write ``plans`` into ``dataset`` (its fingerprint is extracted if needed); dataset.json is copied beside
    them (nnU-Net issue 2560). Returns the plans file."""
    dataset = Dataset.resolve(dataset)
    if not checked and not nnunet_planning.has_fingerprint(dataset):
        check_raw_dataset(dataset)
    ensure_labels(dataset)
    if not nnunet_planning.has_fingerprint(dataset):
        nnunet_planning.extract_fingerprint(dataset, num_processes, verify)
    intensity = nnunet_planning.intensity_settings(dataset)
    channels_source = len(plans["foreground_intensity_properties_per_channel"])
    channels_here = len(intensity["foreground_intensity_properties_per_channel"])
    if channels_source != channels_here:
        raise MassError(f"{dataset.raw}: has {channels_here} input channel(s) but the plans from "
                        f"{plans.get('dataset_name')} expect {channels_source}")
    moved = transferred_plans(plans, dataset, plans_identifier, nnunet_planning.reader_writer_name(dataset), intensity)
    save_json_atomic(moved, dataset.plans_file(plans_identifier))
    shutil.copyfile(dataset.raw / "dataset.json", dataset.preprocessed / "dataset.json")
    return dataset.plans_file(plans_identifier)
