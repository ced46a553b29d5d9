"""What segment and embed share: the pretrained model and input files -> cases."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from mass_nnu.adapter import inference
from mass_nnu.devices import check_device
from mass_nnu.errors import MassError
from mass_nnu.model.artifacts import load_mass_model
from mass_nnu.model.mass_model import build_mass_model


@dataclass
class Pretrained:
    model: object  # MASSModel, eval mode, on its device
    info: dict  # plans, configuration, dataset_json, mass_config, ...
    plans: inference.Plans
    num_channels: int
    source: str

    @property
    def patch_size(self) -> tuple[int, ...]:
        return self.plans.patch_size


def load_pretrained(path, device: str = "cpu", random_init: bool = False, seed: int = 0) -> Pretrained:
    """The MASS model of a pretrained folder or checkpoint. ``random_init``: the same architecture with fresh
    random weights (the "from scratch" baseline), seeded."""
    path = Path(path)
    if not path.exists():
        raise MassError(f"{path}: pretrained model folder or checkpoint not found")
    device = check_device(device)
    model, info = load_mass_model(path, device="cpu")
    num_channels = _input_channels(model)
    source = str(path)
    if random_init:
        torch.manual_seed(seed)
        model = build_mass_model(info["plans"], info["configuration"], num_channels, **info["mass_config"])
        source = f"random init (seed {seed}) of {path}"
    plans = inference.plans_for(info["plans"], info["configuration"])
    if len(plans.patch_size) != 3:
        raise MassError(f"{path}: configuration '{info['configuration']}' is 2D; in-context use needs a 3D model")
    return Pretrained(model.to(device).eval(), info, plans, num_channels, source)


def _input_channels(model) -> int:
    """In-channels of the backbone's first convolution (the stem)."""
    first = next(m for m in model.backbone.modules() if hasattr(m, "in_channels"))
    return int(first.in_channels)


@dataclass
class Case:
    case_id: str
    files: list[Path]  # one per input channel


def _split_ending(path: Path, endings) -> tuple[str, str] | None:
    for ending in endings:
        if path.name.endswith(ending):
            return path.name[: -len(ending)], ending
    return None


def case_from_file(path: Path, num_channels: int, endings) -> Case:
    """``case_0000.nii.gz`` -> case ``case`` with its channel files ``case_0000`` .. ``case_{C-1:04d}``;
    a single-channel file without the suffix is its own case."""
    split = _split_ending(path, endings)
    if split is None:
        raise MassError(f"{path}: unsupported file type (use one of {', '.join(endings)})")
    stem, ending = split
    match = re.fullmatch(r"(.+)_(\d{4})", stem)
    if match is None:
        if num_channels != 1:
            raise MassError(f"{path}: the model takes {num_channels} channels; name the first one CASE_0000{ending} "
                            f"and put its siblings _0001.. beside it")
        return Case(stem, [path])
    case_id = match.group(1)
    return Case(case_id, [path.with_name(f"{case_id}_{c:04d}{ending}") for c in range(num_channels)])


def image_cases(inputs, num_channels: int, endings) -> list[Case]:
    """Files and folders -> cases. A folder gives all ``*_0000<ending>`` files (nnU-Net's naming), else all
    images in it."""
    cases: list[Case] = []
    for item in map(Path, inputs):
        if item.is_dir():
            files = sorted(p for p in item.iterdir() if _split_ending(p, endings))
            first = [p for p in files if re.fullmatch(r".+_0000", _split_ending(p, endings)[0])]
            if not files:
                raise MassError(f"{item}: no images ({', '.join(endings)}) in this folder")
            cases += [case_from_file(p, num_channels, endings) for p in (first or files)]
        elif item.is_file():
            cases.append(case_from_file(item, num_channels, endings))
        else:
            raise MassError(f"{item}: image or folder not found")
    ids = [c.case_id for c in cases]
    duplicate = next((i for i in ids if ids.count(i) > 1), None)
    if duplicate:
        raise MassError(f"{duplicate}: case given twice among the inputs")
    return cases
