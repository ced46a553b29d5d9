"""A dataset resolved once, the nnU-Net way (``-d 17``, ``-d 017`` and ``-d Dataset017_BTCV`` all work).

``Dataset`` owns the name, the three nnU-Net folders, ``dataset.json``, raw file naming (``<case>_<XXXX><ending>``),
the raw case list, plans files and the ``<trainer>__<plans>__<configuration>`` results folder name. A command
resolves its dataset once and hands the value on, as nnU-Net's ``run_training`` converts the name once.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
from nnunetv2.utilities.file_path_utilities import convert_trainer_plans_config_to_identifier

from mass_nnu.errors import MassError


def raw_root() -> Path:
    return Path(os.environ["nnUNet_raw"])


def preprocessed_root() -> Path:
    return Path(os.environ["nnUNet_preprocessed"])


def results_root() -> Path:
    return Path(os.environ["nnUNet_results"])


def dataset_name(dataset: str | int) -> str:
    """Resolve an ID or name to ``DatasetXXX_Name``, or raise one clear error."""
    try:
        return str(maybe_convert_to_dataset_name(str(dataset)))  # nnU-Net may return numpy.str_
    except (RuntimeError, ValueError, AssertionError):
        shown = str(dataset).zfill(3) if str(dataset).isdigit() else dataset
        raise MassError(f"unknown dataset '{dataset}': no Dataset{shown}_* folder under nnUNet_raw ({raw_root()}), "
                        f"nnUNet_preprocessed or nnUNet_results") from None


def trainer_folder_name(trainer: str, plans_identifier: str, configuration: str) -> str:
    """``<trainer>__<plans>__<configuration>``, nnU-Net's results folder name (the one place it is built)."""
    return convert_trainer_plans_config_to_identifier(trainer, plans_identifier, configuration)


@dataclass(frozen=True)
class Dataset:
    name: str

    @classmethod
    def resolve(cls, dataset: "str | int | Dataset") -> "Dataset":
        return dataset if isinstance(dataset, Dataset) else cls(dataset_name(dataset))

    def __str__(self) -> str:
        return self.name

    @property
    def id(self) -> int:
        return int(self.name[len("Dataset"):len("Dataset") + 3])

    @property
    def raw(self) -> Path:
        return raw_root() / self.name

    @property
    def preprocessed(self) -> Path:
        return preprocessed_root() / self.name

    @property
    def results(self) -> Path:
        return results_root() / self.name

    def model_folder(self, trainer: str, plans_identifier: str, configuration: str) -> Path:
        """``$nnUNet_results/<Dataset>/<trainer>__<plans>__<configuration>``."""
        return self.results / trainer_folder_name(trainer, plans_identifier, configuration)

    # ---- dataset.json and raw file naming -------------------------------------------------------------------
    def dataset_json(self, raw_only: bool = False) -> dict:
        """dataset.json from the raw folder, else the copy nnU-Net keeps in the preprocessed folder."""
        for path in (self.raw / "dataset.json",) + (() if raw_only else (self.preprocessed / "dataset.json",)):
            if path.is_file():
                try:
                    return json.loads(path.read_text())
                except json.JSONDecodeError as e:
                    raise MassError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None
        raise MassError(f"{self.raw / 'dataset.json'}: missing; every nnU-Net raw dataset needs a dataset.json")

    @property
    def file_ending(self) -> str:
        return self.dataset_json().get("file_ending", ".nii.gz")

    def image_file(self, case: str, channel: int = 0, split: str = "Tr") -> Path:
        return self.raw / f"images{split}" / f"{case}_{channel:04d}{self.file_ending}"

    def label_file(self, case: str, split: str = "Tr") -> Path:
        return self.raw / f"labels{split}" / f"{case}{self.file_ending}"

    def cases(self, split: str = "Tr") -> dict[str, dict[int, Path]]:
        """case id -> {channel: file} of ``images<split>`` (nnU-Net naming); files of other endings are ignored.
        MassError for a file of the dataset's ending without the channel suffix."""
        ending = self.file_ending
        folder = self.raw / f"images{split}"
        pattern = re.compile(rf"^(.+)_(\d{{4}}){re.escape(ending)}$")
        cases: dict[str, dict[int, Path]] = {}
        for path in sorted(folder.iterdir()) if folder.is_dir() else []:
            if path.name.startswith(".") or not path.name.endswith(ending):
                continue
            match = pattern.match(path.name)
            if not match:
                raise MassError(f"{path}: not named <case>_<XXXX>{ending} (nnU-Net's channel suffix)")
            cases.setdefault(match.group(1), {})[int(match.group(2))] = path
        return cases

    # ---- plans ---------------------------------------------------------------------------------------------
    def plans_file(self, plans_identifier: str) -> Path:
        return self.preprocessed / f"{plans_identifier}.json"

    def plans(self, plans_identifier: str) -> dict:
        path = self.plans_file(plans_identifier)
        if not path.is_file():
            raise MassError(f"{path}: unknown plans '{plans_identifier}'; run 'mass plan -d {self.name}' first")
        return json.loads(path.read_text())
