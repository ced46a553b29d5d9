"""`mass plan`: nnU-Net fingerprinting, ResEnc planning and preprocessing, with plans transferred from a target.

With a target (downstream) dataset, the target is planned normally and its plans decide the architecture and patch
size of every pretraining dataset, so pretrained weights fit the downstream network key for key. Each pretraining
dataset keeps its own intensity normalisation (CT target + MRI cohort works). The transferred plans keep the
target's plans identifier, so `-p` names the same architecture in every dataset of the experiment.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

from mass_nnu.adapter import planning as nnunet_planning
from mass_nnu.adapter.datasets import dataset_name, raw_dir
from mass_nnu.dataset_checks import check_raw_dataset
from mass_nnu.errors import MassError


def ensure_labels(dataset) -> int:
    """nnU-Net's fingerprint needs a label per case. Write foreground masks (Otsu) for unlabelled cases.
    Returns how many were written."""
    import json

    import numpy as np
    import SimpleITK as sitk
    from skimage.filters import threshold_otsu

    from mass_nnu.io import atomic_path, save_json_atomic

    folder = raw_dir(dataset)
    meta = json.loads((folder / "dataset.json").read_text())
    ending = meta.get("file_ending", ".nii.gz")
    labels_dir = folder / "labelsTr"
    written = 0
    for image_path in sorted((folder / "imagesTr").glob(f"*_0000{ending}")):
        label_path = labels_dir / image_path.name.replace(f"_0000{ending}", ending)
        if label_path.exists():
            continue
        image = sitk.ReadImage(str(image_path))
        array = sitk.GetArrayFromImage(image).astype(np.float32)
        mask = (array > threshold_otsu(array)).astype(np.uint8) if np.ptp(array) > 0 else np.zeros_like(array, np.uint8)
        out = sitk.GetImageFromArray(mask)
        out.CopyInformation(image)
        with atomic_path(label_path) as tmp:
            sitk.WriteImage(out, str(tmp))
        written += 1
    if written:
        if "foreground" not in meta["labels"]:
            meta["labels"] = {"background": 0, "foreground": 1}
            save_json_atomic(meta, folder / "dataset.json")
        print(f"mass plan: {dataset_name(dataset)} had {written} images without labels; wrote Otsu foreground masks "
              f"to labelsTr (nnU-Net's fingerprint needs them; they are not used for pretraining)")
    return written


def plan_datasets(dataset_ids: Sequence, planner: str = "nnUNetPlannerResEncM",
                  configurations: Iterable[str] = ("3d_fullres",), num_processes: int = 2, target_dataset=None,
                  preprocess: bool = True, verify: bool = False, base_features: int | None = None) -> str:
    """Plan (and preprocess) datasets; with ``target_dataset`` all of them use the target's architecture.
    ``base_features`` shrinks the U-Net's widths (plans '<name>_f<N>'; a CPU preset). Returns the plans identifier."""
    configurations = tuple(configurations)
    names = [dataset_name(d) for d in dataset_ids]
    if planner not in nnunet_planning.PLANNERS:
        raise MassError(f"unknown planner '{planner}'; choose one of {', '.join(nnunet_planning.PLANNERS)}")
    for name in dict.fromkeys(names + ([dataset_name(target_dataset)] if target_dataset is not None else [])):
        check_raw_dataset(raw_dir(name))
    if target_dataset is None:
        identifier = nnunet_planning.plans_identifier_for(planner, base_features)
        for name in names:
            ensure_labels(name)
            nnunet_planning.extract_fingerprint(name, num_processes, verify)
            identifier = nnunet_planning.plan_experiment(name, planner, base_features)
            if preprocess:
                nnunet_planning.preprocess(name, identifier, configurations, num_processes)
        return identifier
    target = dataset_name(target_dataset)
    nnunet_planning.extract_fingerprint(target, num_processes, verify)
    identifier = nnunet_planning.plan_experiment(target, planner, base_features)
    target_plans = nnunet_planning.load_plans_file(target, identifier)
    if preprocess:
        nnunet_planning.preprocess(target, identifier, configurations, num_processes)
    for name in names:
        if name == target:
            continue
        transfer_plans(target_plans, name, identifier, num_processes=num_processes, verify=verify, checked=True)
        if preprocess:
            nnunet_planning.preprocess(name, identifier, configurations, num_processes)
    return identifier


def transfer_plans(plans: dict, dataset, plans_identifier: str, num_processes: int = 2,
                   verify: bool = False, checked: bool = False) -> Path:
    """Write ``plans`` into ``dataset`` so the same architecture is built there, with the dataset's own
    normalisation (its fingerprint is extracted if needed)."""
    from mass_nnu.adapter.datasets import preprocessed_dir

    if not checked and not (preprocessed_dir(dataset) / "dataset_fingerprint.json").is_file():
        check_raw_dataset(raw_dir(dataset))
    ensure_labels(dataset)
    if not (preprocessed_dir(dataset) / "dataset_fingerprint.json").is_file():
        nnunet_planning.extract_fingerprint(dataset, num_processes, verify)
    intensity = nnunet_planning.intensity_settings(dataset, "nnUNetPlannerResEncM")
    channels_source = len(plans["foreground_intensity_properties_per_channel"])
    channels_here = len(intensity["foreground_intensity_properties_per_channel"])
    if channels_source != channels_here:
        raise MassError(f"{raw_dir(dataset)}: has {channels_here} input channel(s) but the plans from "
                        f"{plans.get('dataset_name')} expect {channels_source}")
    return nnunet_planning.write_transferred_plans(plans, dataset, plans_identifier, intensity)


def summary_table(dataset_ids: Sequence, plans_identifier: str, configuration: str = "3d_fullres") -> str:
    rows = [nnunet_planning.configuration_summary(nnunet_planning.load_plans_file(d, plans_identifier), configuration)
            for d in dataset_ids]
    head = ["dataset", "spacing (mm)", "patch", "batch", "network", "stages", "features", "normalisation",
            "architecture from"]
    lines = [" | ".join(head)]
    for r in rows:
        lines.append(" | ".join([r["dataset"], "×".join(f"{s:g}" for s in r["spacing"]),
                                 "×".join(map(str, r["patch_size"])), str(r["batch_size"]), r["network"],
                                 str(r["stages"]), ",".join(map(str, r["features"])), ",".join(r["normalization"]),
                                 r["architecture_from"]]))
    return "\n".join(lines)
