"""`mass plan`: nnU-Net fingerprinting, ResEnc planning and preprocessing, with plans transferred from a target.

With a target (downstream) dataset, the target is planned normally and its plans decide the architecture and patch
size of every pretraining dataset, so pretrained weights fit the downstream network key for key. Each pretraining
dataset keeps its own intensity normalisation (CT target + MRI cohort works). ``ensure_plans`` is how later stages
get plans and preprocessed data: made when missing, else read.
"""
from __future__ import annotations

from typing import Iterable, Sequence

from mass_nnu.adapter import planning as nnunet_planning
from mass_nnu.adapter.datasets import Dataset
from mass_nnu.adapter.preprocessed import data_folder, preprocessed_case_ids
from mass_nnu.errors import MassError
from mass_nnu.io import nnunet_output
from mass_nnu.planning.otsu_labels import ensure_labels
from mass_nnu.planning.raw_checks import check_raw_dataset
from mass_nnu.planning.transfer import transfer_plans

LOG_FILE = "mass_plan_log.txt"  # nnU-Net's planning and preprocessing output, per dataset


def quiet(dataset: Dataset, verbose: bool):
    """nnU-Net's own output of work on ``dataset``: on screen with ``verbose``, else in its log file."""
    return nnunet_output(dataset.preprocessed / LOG_FILE, verbose)


def plan_datasets(datasets: Sequence, planner: str = "nnUNetPlannerResEncM",
                  configurations: Iterable[str] = ("3d_fullres",), num_processes: int = 2, target_dataset=None,
                  preprocess: bool = True, verify: bool = False, base_features: int | None = None,
                  verbose: bool = False) -> str:
    """Plan (and preprocess) datasets; with ``target_dataset`` all of them use the target's architecture.
    ``base_features`` shrinks the U-Net's widths (plans '<name>_f<N>'; a CPU preset). nnU-Net's own output goes
    to ``<preprocessed dataset>/mass_plan_log.txt`` unless ``verbose``. Returns the plans identifier."""
    configurations = tuple(configurations)
    resolved = [Dataset.resolve(d) for d in datasets]
    target = Dataset.resolve(target_dataset) if target_dataset is not None else None
    if planner not in nnunet_planning.PLANNERS:
        raise MassError(f"unknown planner '{planner}'; choose one of {', '.join(nnunet_planning.PLANNERS)}")
    for dataset in dict.fromkeys(resolved + ([target] if target else [])):
        check_raw_dataset(dataset)

    if target is None:
        identifier = nnunet_planning.plans_identifier_for(planner, base_features)
        for dataset in resolved:
            ensure_labels(dataset)
            with quiet(dataset, verbose):
                nnunet_planning.extract_fingerprint(dataset, num_processes, verify)
                identifier = nnunet_planning.plan_experiment(dataset, planner, base_features)
                if preprocess:
                    nnunet_planning.preprocess(dataset, identifier, configurations, num_processes)
        return identifier
    with quiet(target, verbose):
        nnunet_planning.extract_fingerprint(target, num_processes, verify)
        identifier = nnunet_planning.plan_experiment(target, planner, base_features)
        if preprocess:
            nnunet_planning.preprocess(target, identifier, configurations, num_processes)
    target_plans = target.plans(identifier)
    for dataset in resolved:
        if dataset == target:
            continue
        ensure_labels(dataset)  # its message belongs on screen
        with quiet(dataset, verbose):
            transfer_plans(target_plans, dataset, identifier, num_processes=num_processes, verify=verify,
                           checked=True)
            if preprocess:
                nnunet_planning.preprocess(dataset, identifier, configurations, num_processes)
    return identifier


def ensure_plans(dataset: Dataset, plans_identifier: str, configuration: str, source_plans: dict | None,
                 num_processes: int, verbose: bool = False) -> dict:
    """The dataset's plans and its preprocessed data for ``configuration``, made when missing: plans are
    transferred from ``source_plans`` (pretrained weights' plans) or planned with the planner they are named after."""
    if not dataset.plans_file(plans_identifier).is_file():
        if source_plans is not None:
            print(f"mass: {dataset} has no plans '{plans_identifier}'; transferring the pretrained plans")
            ensure_labels(dataset)
            with quiet(dataset, verbose):
                transfer_plans(source_plans, dataset, plans_identifier, num_processes=num_processes)
        else:
            planner = nnunet_planning.planner_of(plans_identifier)
            if planner is None:
                raise MassError(f"{dataset.plans_file(plans_identifier)}: missing; plan it first with "
                                f"'mass plan -d {dataset}'")
            plan_datasets([dataset], planner=planner, configurations=(configuration,), num_processes=num_processes,
                          preprocess=False, verbose=verbose)
    plans = dataset.plans(plans_identifier)
    if not preprocessed_case_ids(data_folder(dataset, plans, configuration)):
        print(f"mass: preprocessing {dataset} ({plans_identifier}, {configuration})")
        with quiet(dataset, verbose):
            nnunet_planning.preprocess(dataset, plans_identifier, [configuration], num_processes)
    return plans


def summary_table(datasets: Sequence, plans_identifier: str, configuration: str = "3d_fullres") -> str:
    rows = [nnunet_planning.configuration_summary(Dataset.resolve(d).plans(plans_identifier), configuration)
            for d in datasets]
    head = ["dataset", "spacing (mm)", "patch", "batch", "network", "stages", "features", "normalisation",
            "architecture from"]
    lines = [" | ".join(head)]
    for r in rows:
        lines.append(" | ".join([r["dataset"], "×".join(f"{s:g}" for s in r["spacing"]),
                                 "×".join(map(str, r["patch_size"])), str(r["batch_size"]), r["network"],
                                 str(r["stages"]), ",".join(map(str, r["features"])), ",".join(r["normalization"]),
                                 r["architecture_from"]]))
    return "\n".join(lines)
