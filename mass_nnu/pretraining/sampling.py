"""Pretraining data: proposals mapped onto nnU-Net's preprocessed grid, and in-context task sampling.

One sample = one image, up to ``max_tasks - 1`` of its proposals (weighted toward diverse sizes) plus the
all-ones "whole crop" task, and two views: a reference (weak augmentation) and a query (strong augmentation),
cropped independently around an anchor voxel inside one proposal so that both views contain it.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from tqdm import tqdm

from mass_nnu.adapter.augmentation import apply_view, view_transforms
from mass_nnu.adapter.datasets import Dataset
from mass_nnu.adapter.preprocessed import data_folder, load_case, raw_to_preprocessed, require_case_ids
from mass_nnu.errors import MassError
from mass_nnu.io import atomic_path
from mass_nnu.proposals.store import check_geometry, proposal_dir, proposal_path, read_proposals


@dataclass
class SamplerSettings:
    max_tasks: int = 13            # including the all-ones task
    context_fraction: float = 0.15  # extra context each side before augmentation (patch + 2·fraction·patch)
    shift_fraction: float = 0.25    # how far each view's centre may move from the anchor (fraction of patch)
    min_voxels: int = 8             # proposals smaller than this on the preprocessed grid are skipped


def proposals_folder(data_folder: Path) -> Path:
    return data_folder.parent / f"{data_folder.name}_proposals"


def prepare_proposals(dataset: Dataset, plans: dict, configuration: str,
                      min_voxels: int = 8) -> tuple[Path, list[str]]:
    """Map every case's raw proposals onto the preprocessed grid (once; existing files are kept). Returns the
    folder and the usable case ids. Refuses proposals made for another image."""
    dataset = Dataset.resolve(dataset)
    data_dir = data_folder(dataset, plans, configuration)
    raw_dir = proposal_dir(dataset)
    out_dir = proposals_folder(data_dir)
    cases = require_case_ids(data_dir)
    missing = [c for c in cases if not proposal_path(dataset, c).is_file()]
    if len(missing) == len(cases):
        raise MassError(f"{raw_dir}: no proposals found for {len(cases)} preprocessed cases; "
                        f"run 'mass propose -d {dataset}' first")
    if missing:
        warnings.warn(f"{raw_dir}: {len(missing)} case(s) without proposals are left out: {', '.join(missing[:5])}",
                      stacklevel=1)
    usable = []
    for case in tqdm([c for c in cases if c not in missing], desc="proposals → preprocessed", unit="case",
                     disable=None):
        target = out_dir / f"{case}.npz"
        if not target.is_file():
            layers, geometry = read_proposals(proposal_path(dataset, case))
            data, properties = load_case(data_dir, case)
            sitk_geometry = properties.get("sitk_stuff", {})
            check_geometry(geometry, {
                "shape": [properties["shape_before_cropping"][plans["transpose_backward"][i]] for i in range(3)],
                "spacing": list(properties["spacing"]),
                "origin": list(sitk_geometry.get("origin", geometry["origin"])),
                "direction": list(np.ravel(sitk_geometry.get("direction", geometry["direction"])))},
                proposal_path(dataset, case))
            mapped = raw_to_preprocessed(layers, properties, plans, data.shape[1:]) if len(layers) else \
                np.zeros((0, *data.shape[1:]), np.uint16)
            stats = proposal_stats(mapped, min_voxels)
            with atomic_path(target) as tmp:
                with open(tmp, "wb") as f:
                    np.savez_compressed(f, layers=mapped.astype(np.uint16), stats=stats)
        with np.load(target) as f:
            if len(f["stats"]):
                usable.append(case)
    if not usable:
        raise MassError(f"{raw_dir}: every case has zero usable proposals (≥ {min_voxels} voxels after "
                        f"preprocessing); check the images or run 'mass propose' with other settings")
    return out_dir, usable


def proposal_stats(layers: np.ndarray, min_voxels: int) -> np.ndarray:
    """One row per usable proposal: layer, label, size, bbox low (3), bbox high (3)."""
    rows = []
    for index, layer in enumerate(layers):
        sizes = np.bincount(layer.ravel())
        for label, box in enumerate(ndimage.find_objects(layer.astype(np.int64)), start=1):
            if box is None or sizes[label] < min_voxels:
                continue
            rows.append([index, label, sizes[label], *[s.start for s in box], *[s.stop for s in box]])
    return np.asarray(rows, np.int64).reshape(-1, 9)


@dataclass
class CaseSource:
    data_folder: Path
    proposals_folder: Path
    case_id: str


def pick_tasks(stats: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of ``count`` proposals, weighted so that every size octave is equally likely."""
    octave = np.floor(np.log2(np.maximum(stats[:, 2], 1))).astype(int)
    _, inverse, per_bin = np.unique(octave, return_inverse=True, return_counts=True)
    weights = 1.0 / per_bin[inverse]
    count = min(count, len(stats))
    return rng.choice(len(stats), size=count, replace=False, p=weights / weights.sum())


def crop(array: np.ndarray, center, size) -> np.ndarray:
    """(C, *S) crop of ``size`` centred at ``center``, zero-padded outside the array."""
    out = np.zeros((array.shape[0], *size), array.dtype)
    src, dst = [], []
    for c, n, dim in zip(center, size, array.shape[1:]):
        lo = int(c) - n // 2
        a, b = max(lo, 0), min(lo + n, dim)
        src.append(slice(a, b))
        dst.append(slice(a - lo, b - lo))
    out[(slice(None), *dst)] = array[(slice(None), *src)]
    return out


class TaskSampler:
    """Draws in-context samples from preprocessed cases with proposals."""
    def __init__(self, sources: list[CaseSource], patch_size, settings: SamplerSettings | None = None):
        if not sources:
            raise MassError("no cases with proposals to pretrain on")
        self.sources = sources
        self.patch_size = tuple(int(p) for p in patch_size)
        self.settings = settings or SamplerSettings()
        self.context = tuple(p + 2 * int(round(self.settings.context_fraction * p)) for p in self.patch_size)
        self.weak, self.strong = view_transforms(self.patch_size, False), view_transforms(self.patch_size, True)

    def _load(self, source: CaseSource):
        data, _ = load_case(source.data_folder, source.case_id)
        with np.load(source.proposals_folder / f"{source.case_id}.npz") as f:
            return data, f["layers"], f["stats"]

    def sample(self, rng: np.random.Generator) -> dict:
        source = self.sources[rng.integers(len(self.sources))]
        data, layers, stats = self._load(source)
        chosen = stats[pick_tasks(stats, self.settings.max_tasks - 1, rng)]
        primary = chosen[0]
        region = layers[primary[0]][tuple(slice(lo, hi) for lo, hi in zip(primary[3:6], primary[6:9]))]
        inside = np.argwhere(region == primary[1])
        anchor = inside[rng.integers(len(inside))] + primary[3:6]
        views = []
        for transform in (self.weak, self.strong):
            shift = [rng.integers(-int(self.settings.shift_fraction * p), int(self.settings.shift_fraction * p) + 1)
                     for p in self.patch_size]
            center = anchor + np.asarray(shift)
            masks = np.stack([layers[layer] == label for layer, label in chosen[:, :2]]).astype(np.uint8)
            image_crop = crop(data, center, self.context)
            mask_crop = crop(masks, center, self.context)
            image, mask = apply_view(transform, image_crop, mask_crop, int(rng.integers(2 ** 31)))
            views.append((image, torch.cat((mask, torch.ones((1, *mask.shape[1:]))))))  # + whole-crop task
        k = views[0][1].shape[0]
        pad = self.settings.max_tasks - k
        padded = [torch.cat((m, torch.zeros((pad, *m.shape[1:])))) for _, m in views]
        valid = torch.tensor([True] * k + [False] * pad)
        return {"ref_image": views[0][0], "ref_masks": padded[0], "query_image": views[1][0],
                "query_masks": padded[1], "valid": valid}

    def batch(self, rng: np.random.Generator, batch_size: int) -> dict:
        samples = [self.sample(rng) for _ in range(batch_size)]
        return {key: torch.stack([s[key] for s in samples]) for key in samples[0]}


class BatchStream:
    """An iterable of ``iterations`` batches per epoch, reproducible from (seed, rank, epoch, worker); usable
    with torch's DataLoader workers (``-np``), so data loading overlaps the training step."""
    def __init__(self, sampler: TaskSampler, batch_size: int, iterations: int, seed: int, rank: int = 0):
        self.sampler, self.batch_size, self.iterations = sampler, batch_size, iterations
        self.seed, self.rank, self.epoch = seed, rank, 0

    def loader(self, epoch: int, num_workers: int):
        self.epoch = epoch
        dataset = _StreamDataset(self)
        return torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=num_workers,
                                           persistent_workers=False, prefetch_factor=2 if num_workers else None)


class _StreamDataset(torch.utils.data.IterableDataset):
    def __init__(self, stream: BatchStream):
        self.stream = stream

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        s = self.stream
        rng = np.random.default_rng([s.seed, s.rank, s.epoch, worker])
        for i in range(worker, s.iterations, workers):
            yield s.sampler.batch(rng, s.batch_size)
