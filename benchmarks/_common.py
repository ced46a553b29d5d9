"""What the benchmark scripts share: an argument parser that names a planned dataset, its plans and configuration."""
from __future__ import annotations

import argparse


def plans_parser(description: str, dataset_help: str) -> argparse.ArgumentParser:
    """A parser with nnU-Net's -d DATASET -p PLANS -c CONFIGURATION; each script adds its own options."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-d", required=True, help=dataset_help)
    parser.add_argument("-p", default="nnUNetResEncUNetMPlans")
    parser.add_argument("-c", default="3d_fullres")
    return parser
