"""`mass embed`: frozen-encoder features, one row per case, for linear probing.

Each preprocessed volume is covered by patch-size tiles (nnU-Net's tile rule, step 1.0 = least overlap,
zero-padded when smaller than the patch). The encoder's output at each of the deepest ``num_scales`` stages is
pooled per channel: global average (mean over tiles of the tile means) and global max (max over tiles). The
row is [stage_s avg, stage_s max for every scale s], deepest stage first.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from mass_nnu.adapter import inference
from mass_nnu.adapter.datasets import Dataset
from mass_nnu.adapter.preprocessed import load_case, preprocessed_case_ids
from mass_nnu.errors import MassError
from mass_nnu.incontext.common import Pretrained, image_cases
from mass_nnu.io import atomic_path


def encoder_features(pretrained: Pretrained, data: np.ndarray, num_scales: int) -> tuple[np.ndarray, list[str]]:
    """Pooled features of one preprocessed volume (C, *S) and their names (``stage{i}_{avg|max}_{channel}``)."""
    device = next(pretrained.model.parameters()).device
    encoder = pretrained.model.parts.encoder
    patch = pretrained.patch_size
    padded, _ = inference.pad_to_patch(data, patch)
    image = torch.from_numpy(np.ascontiguousarray(padded, dtype=np.float32)).to(device)
    starts = inference.tile_starts(image.shape[1:], patch, 1.0)
    sums, maxima = None, None
    with torch.no_grad():
        for start in starts:
            window = tuple(slice(s, s + p) for s, p in zip(start, patch))
            skips = encoder(image[(slice(None), *window)][None])
            stages = list(range(len(skips)))[::-1][:num_scales]
            means = [skips[i][0].flatten(1).mean(1) for i in stages]
            peaks = [skips[i][0].flatten(1).amax(1) for i in stages]
            sums = means if sums is None else [a + b for a, b in zip(sums, means)]
            maxima = peaks if maxima is None else [torch.maximum(a, b) for a, b in zip(maxima, peaks)]
    parts, names = [], []
    for stage, total, peak in zip(stages, sums, maxima):
        parts += [(total / len(starts)).cpu(), peak.cpu()]
        names += [f"stage{stage}_avg_{c}" for c in range(len(total))] + [f"stage{stage}_max_{c}" for c in range(len(peak))]
    return torch.cat(parts).numpy().astype(np.float32), names


def dataset_volumes(pretrained: Pretrained, dataset):
    """(case_id, preprocessed volume) of a dataset's training cases: nnU-Net's preprocessed data of the model's
    configuration if present, else imagesTr preprocessed here with the model's plans."""
    dataset = Dataset.resolve(dataset)
    folder = dataset.preprocessed / pretrained.plans.configuration.data_identifier
    cases = preprocessed_case_ids(folder)
    if cases:
        print(f"mass embed: {len(cases)} preprocessed cases from {folder}")
        return [(case, lambda case=case: load_case(folder, case)[0]) for case in cases]
    images = dataset.raw / "imagesTr"
    if not images.is_dir():
        raise MassError(f"{dataset}: neither preprocessed data ({folder}) nor raw images ({images})")
    print(f"mass embed: no preprocessed data at {folder}; preprocessing {images} with the model's plans")
    return file_volumes(pretrained, [images])


def file_volumes(pretrained: Pretrained, inputs):
    """(case_id, loader of the preprocessed volume) for image files and folders."""
    plans = pretrained.plans
    cases = image_cases(inputs, pretrained.num_channels, inference.supported_endings(plans))

    def load(case):
        data, properties = inference.read_image(case.files, plans)
        return inference.preprocess(data, None, properties, plans)[0]

    return [(case.case_id, lambda case=case: load(case)) for case in cases]


def embed(pretrained: Pretrained, volumes, output: Path, num_scales: int = 3) -> np.ndarray:
    """Features of every case -> ``output`` (npz: features, case_ids, feature_names, stages, model)."""
    if num_scales < 1:
        raise MassError(f"--scales {num_scales}: must be at least 1")
    if not volumes:
        raise MassError("mass embed: no cases to embed")
    output = Path(output)
    if not output.name.endswith(".npz"):
        raise MassError(f"{output}: the features file must end with .npz")
    rows, names = [], None
    for case_id, load in tqdm(volumes, desc="embedding", unit="case", disable=None):
        row, names = encoder_features(pretrained, load(), num_scales)
        rows.append(row)
    features = np.stack(rows)
    stages = np.asarray([int(n.split("_")[0][len("stage"):]) for n in names])
    with atomic_path(output) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, features=features, case_ids=np.asarray([c for c, _ in volumes]),
                     feature_names=np.asarray(names), stages=stages, model=np.asarray(pretrained.source))
    return features
