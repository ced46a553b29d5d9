"""What the benchmark scripts share: an argument parser that names a planned dataset, its plans and configuration,
and the pretraining sampler on that dataset."""
from __future__ import annotations

import argparse


def plans_parser(description: str, dataset_help: str) -> argparse.ArgumentParser:
    """A parser with nnU-Net's -d DATASET -p PLANS -c CONFIGURATION; each script adds its own options."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-d", required=True, help=dataset_help)
    parser.add_argument("-p", default="nnUNetResEncUNetMPlans")
    parser.add_argument("-c", default="3d_fullres")
    return parser


def build_sampler(args):
    """``mass pretrain``'s TaskSampler on dataset ``args.d`` (its proposals prepared once), at ``args.patch``
    (None or [0]: the plans' patch) with ``args.max_tasks`` tasks."""
    from mass_nnu.adapter.datasets import Dataset
    from mass_nnu.adapter.preprocessed import data_folder
    from mass_nnu.pretraining.sampling import CaseSource, SamplerSettings, TaskSampler, prepare_proposals

    dataset = Dataset.resolve(args.d)
    plans = dataset.plans(args.p)
    folder, cases = prepare_proposals(dataset, plans, args.c)
    sources = [CaseSource(data_folder(dataset, plans, args.c), folder, c) for c in cases]
    patch = args.patch if args.patch and args.patch != [0] else plans["configurations"][args.c]["patch_size"]
    return TaskSampler(sources, patch, SamplerSettings(max_tasks=args.max_tasks))
