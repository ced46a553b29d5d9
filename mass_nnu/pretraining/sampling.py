"""Pretraining data: proposals mapped onto nnU-Net's preprocessed grid, and in-context task sampling.

One sample (the MASS recipe, any patch size):

1. an image (uniform over the cases), an anchor proposal (size-octave weighted) and an anchor voxel inside it;
2. a reference and a query *context crop* (``context`` = patch + 2·context_fraction·patch per axis), each centred
   within ±shift_fraction·patch of the anchor, whose **overlap** is at least ``min_overlap`` (0.67). Overlap is
   ``|A ∩ B| / |A|`` of the two crops as index boxes (``crop_overlap``; both crops have the same size, so it also
   equals ``|A ∩ B| / |B|``, and it is the product over the axes of ``(context_i - |offset_i|) / context_i``).
   Zero-padding beyond the volume counts as crop volume;
3. the image and the proposal layers are cropped to the two context crops first; masks are made on the crops only;
4. tasks = the anchor proposal plus up to ``max_tasks - 2`` more of the proposals that the *reference* crop holds
   with at least ``min_voxels`` voxels (weighted toward diverse sizes), plus the all-ones "whole crop" task (the
   last real slot). A task whose proposal lies outside the query crop stays as an empty target;
5. reference = weak, query = strong augmentation, then the centre patch. Masks travel packed as bits (8 per
   byte) and are unpacked on the device (``unpack_batch``).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from mass_nnu.adapter.augmentation import apply_view, view_transforms
from mass_nnu.adapter.datasets import Dataset
from mass_nnu.adapter.preprocessed import (
    case_shape_and_properties,
    data_folder,
    open_case,
    raw_to_preprocessed,
    require_case_ids,
)
from mass_nnu.errors import MassError
from mass_nnu.proposals.store import (
    ARRAY,
    ProposalStore,
    check_geometry,
    find_proposals,
    is_complete,
    open_proposals,
    proposal_dir,
    write_layers,
)


WHOLE_CROP, EMPTY = -1, -2  # task slots that hold no proposal: the all-ones task, and padding


@dataclass
class SamplerSettings:
    max_tasks: int = 13             # including the all-ones task
    context_fraction: float = 0.15  # extra context each side before augmentation (patch + 2·fraction·patch)
    shift_fraction: float = 0.25    # how far each view's centre may move from the anchor (fraction of patch)
    min_overlap: float = 0.67       # the two context crops share at least this fraction of their volume
    min_voxels: int = 8             # proposals with fewer voxels on the grid, or inside the reference crop, are skipped


def proposals_folder(data_folder: Path) -> Path:
    return data_folder.parent / f"{data_folder.name}_proposals"


def context_size(patch_size, context_fraction: float) -> tuple[int, ...]:
    """The context crop: patch + 2·round(fraction·patch) per axis."""
    return tuple(int(p) + 2 * round(context_fraction * int(p)) for p in patch_size)


def prepare_proposals(dataset: Dataset, plans: dict, configuration: str,
                      min_voxels: int = 8) -> tuple[Path, list[str]]:
    """Map every case's raw proposals onto the preprocessed grid, one layer at a time, into
    ``<data_identifier>_proposals/<case>.b2nd`` + ``<case>.json`` (chunked for the configuration's context crop;
    the table computed once). Complete cases are kept; an old ``<case>.npz`` there is remade and removed. Returns
    the folder and the case ids with at least one proposal of ``min_voxels``. Refuses proposals made for another
    image."""
    dataset = Dataset.resolve(dataset)
    data_dir = data_folder(dataset, plans, configuration)
    raw_dir = proposal_dir(dataset)
    out_dir = proposals_folder(data_dir)
    cases = require_case_ids(data_dir)
    sources = {c: find_proposals(raw_dir, c) for c in cases}
    missing = [c for c in cases if sources[c] is None]
    if len(missing) == len(cases):
        raise MassError(f"{raw_dir}: no proposals found for {len(cases)} preprocessed cases; "
                        f"run 'mass propose -d {dataset}' first")
    if missing:
        warnings.warn(f"{raw_dir}: {len(missing)} case(s) without proposals are left out: {', '.join(missing[:5])}",
                      stacklevel=1)
    patch = plans["configurations"][configuration].get("patch_size")
    context = context_size(patch, SamplerSettings.context_fraction) if patch else None
    usable = []
    for case in tqdm([c for c in cases if c not in missing], desc="proposals → preprocessed", unit="case",
                     disable=None):
        target = out_dir / f"{case}{ARRAY}"
        if is_complete(out_dir, case):
            table = open_proposals(target).table
        else:
            table = _map_case(open_proposals(sources[case]), data_dir, case, plans, target, context)
        if (table[:, 2] >= min_voxels).any():
            usable.append(case)
    if not usable:
        raise MassError(f"{raw_dir}: every case has zero usable proposals (≥ {min_voxels} voxels after "
                        f"preprocessing); check the images or run 'mass propose' with other settings")
    return out_dir, usable


def _map_case(source: ProposalStore, data_dir: Path, case: str, plans: dict, target: Path, context) -> np.ndarray:
    """One case's raw proposals → the preprocessed grid (transpose, crop, nearest resampling), layer by layer."""
    shape, properties = case_shape_and_properties(data_dir, case)
    sitk_geometry = properties.get("sitk_stuff", {})
    geometry = source.geometry
    check_geometry(geometry, {
        "shape": [properties["shape_before_cropping"][plans["transpose_backward"][i]] for i in range(3)],
        "spacing": list(properties["spacing"]),
        "origin": list(sitk_geometry.get("origin", geometry["origin"])),
        "direction": list(np.ravel(sitk_geometry.get("direction", geometry["direction"])))},
        source.path)
    meta = {"geometry": {"shape": list(shape[1:])}, "grid": "preprocessed", "source": source.path.name,
            "backend": source.backend, "params": source.params}
    return write_layers(target, len(source), shape[1:],
                        lambda i: raw_to_preprocessed(source.read(i)[None], properties, plans, shape[1:])[0],
                        meta, patch=context)


@dataclass
class CaseSource:
    data_folder: Path
    proposals_folder: Path
    case_id: str


def pick_tasks(stats: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of ``count`` proposals, weighted so that every size octave is equally likely."""
    count = min(count, len(stats))
    if count <= 0:
        return np.zeros(0, np.int64)
    octave = np.floor(np.log2(np.maximum(stats[:, 2], 1))).astype(int)
    _, inverse, per_bin = np.unique(octave, return_inverse=True, return_counts=True)
    weights = 1.0 / per_bin[inverse]
    return rng.choice(len(stats), size=count, replace=False, p=weights / weights.sum())


def crop(array, center, size) -> np.ndarray:
    """(C, *S) crop of ``size`` centred at ``center`` (its voxel ``size // 2``), zero-padded outside the array.
    ``array`` may be a lazy array (blosc2, memory map): only the part inside the crop is read."""
    out = np.zeros((array.shape[0], *size), array.dtype)
    src, dst = [], []
    for c, n, dim in zip(center, size, array.shape[1:]):
        lo = int(c) - n // 2
        a, b = min(max(lo, 0), dim), max(min(lo + n, dim), 0)
        b = max(a, b)
        src.append(slice(a, b))
        dst.append(slice(a - lo, b - lo))
    if all(s.stop > s.start for s in src):
        out[(slice(None), *dst)] = array[(slice(None), *src)]
    return out


def crop_box(center, size) -> tuple[np.ndarray, np.ndarray]:
    """[low, high) voxel box of the crop that ``crop`` takes."""
    low = np.asarray(center, np.int64) - np.asarray(size, np.int64) // 2
    return low, low + np.asarray(size, np.int64)


def crop_overlap(a_center, b_center, size) -> float:
    """Overlap of two crops of the same ``size``: |A ∩ B| / |A| (= |A ∩ B| / |B|), as index boxes."""
    size = np.asarray(size, np.float64)
    offset = np.abs(np.asarray(a_center, np.float64) - np.asarray(b_center, np.float64))
    return float(np.prod(np.clip(size - offset, 0, None) / size))


def view_centres(anchor, patch_size, context, settings: SamplerSettings,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Reference and query crop centres: both within ±shift_fraction·patch of ``anchor`` (so both views hold it)
    and ``crop_overlap(ref, query, context) >= min_overlap``. A target overlap is drawn uniformly in
    [min_overlap, 1] and split over the axes with random shares; per-axis offsets are rounded toward zero."""
    anchor = np.asarray(anchor, np.int64)
    context = np.asarray(context, np.int64)
    shift = np.asarray([int(settings.shift_fraction * p) for p in patch_size], np.int64)
    target = rng.uniform(min(settings.min_overlap, 1.0), 1.0)
    shares = rng.dirichlet(np.ones(len(context)))
    size = np.floor(context * (1.0 - target ** shares)).astype(np.int64)
    size = np.clip(size, 0, 2 * shift)
    while crop_overlap(np.zeros_like(size), size, context) < settings.min_overlap and size.any():
        size[np.argmax(size)] -= 1  # float rounding: step back until the bound holds exactly
    offset = size * rng.choice(np.array([-1, 1]), size=len(size))
    # reference centre = anchor + e with |e| <= shift and |e + offset| <= shift (query centre = reference + offset)
    low, high = np.maximum(-shift, -shift - offset), np.minimum(shift, shift - offset)
    ref = anchor + rng.integers(low, high + 1)
    return ref, ref + offset


def proposals_in_crop(store: ProposalStore, stats: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """Voxels of every proposal (stats row) inside the box [low, high) of the store's layers. A row whose bounding
    box lies inside the box counts all its voxels (the table's count, nothing read); for the rows it cuts, a layer
    is read only over the union of their boxes inside the box; rows whose box misses it are 0."""
    counts = np.zeros(len(stats), np.int64)
    row_low, row_high = stats[:, 3:6], stats[:, 6:9]
    hits = np.all((row_low < high) & (row_high > low), axis=1)
    whole = hits & np.all((row_low >= low) & (row_high <= high), axis=1)
    counts[whole] = stats[whole, 2]
    cut = hits & ~whole
    for layer in np.unique(stats[cut, 0]):
        rows = np.flatnonzero(cut & (stats[:, 0] == layer))
        values = store.read(int(layer), np.maximum(row_low[rows].min(0), low), np.minimum(row_high[rows].max(0), high))
        found = np.bincount(values.ravel(), minlength=int(stats[rows, 1].max()) + 1)
        counts[rows] = found[stats[rows, 1]]
    return counts


class TaskSampler:
    """Draws in-context samples from preprocessed cases with proposals (see the module docstring)."""

    def __init__(self, sources: list[CaseSource], patch_size, settings: SamplerSettings | None = None):
        if not sources:
            raise MassError("no cases with proposals to pretrain on")
        self.sources = sources
        self.patch_size = tuple(int(p) for p in patch_size)
        self.settings = settings or SamplerSettings()
        self.context = context_size(self.patch_size, self.settings.context_fraction)
        self.weak, self.strong = view_transforms(self.patch_size, False), view_transforms(self.patch_size, True)

    def _load(self, source: CaseSource):
        """(image, proposals, usable table rows); both stay lazy (blosc2): a crop reads only its blocks."""
        data = open_case(source.data_folder, source.case_id)
        store = open_proposals(source.proposals_folder / f"{source.case_id}{ARRAY}")
        table = store.table
        return data, store, table[table[:, 2] >= self.settings.min_voxels]

    def draw(self, rng: np.random.Generator) -> dict:
        """The un-augmented parts of a sample: the two context crops (image, masks) and their geometry."""
        s = self.settings
        source = self.sources[rng.integers(len(self.sources))]
        data, store, stats = self._load(source)
        first = int(pick_tasks(stats, 1, rng)[0])
        primary = stats[first]
        region = store.read(int(primary[0]), primary[3:6], primary[6:9])
        inside = np.argwhere(region == primary[1])
        anchor = inside[rng.integers(len(inside))] + primary[3:6]
        ref_center, query_center = view_centres(anchor, self.patch_size, self.context, s, rng)
        counts = proposals_in_crop(store, stats, *crop_box(ref_center, self.patch_size))  # the reference view
        candidates = np.flatnonzero(counts >= s.min_voxels)
        candidates = candidates[candidates != first]
        in_crop = stats[candidates].copy()
        in_crop[:, 2] = counts[candidates]  # size octaves of what the reference crop holds
        others = candidates[pick_tasks(in_crop, s.max_tasks - 2, rng)]
        chosen = stats[np.concatenate(([first], others)).astype(np.int64)]
        used = np.unique(chosen[:, 0])  # crop only the layers the tasks come from, masks on the crops only
        slot = np.searchsorted(used, chosen[:, 0])
        views = []
        for center in (ref_center, query_center):
            layers = store.crop(used, *crop_box(center, self.context))
            masks = np.empty((len(chosen), *self.context), bool)
            for i, (j, label) in enumerate(zip(slot, chosen[:, 1])):  # no (K, *context) uint16 copy
                np.equal(layers[j], label, out=masks[i])
            views.append((crop(data, center, self.context).astype(np.float32, copy=False), masks))
        return {"views": views, "anchor": anchor, "centers": (ref_center, query_center), "tasks": chosen,
                "case": source.case_id}

    def sample(self, rng: np.random.Generator) -> dict:
        """One sample as it travels to the device: images (C, *P) float32; the masks of both views packed as bits,
        (ceil((max_tasks - 1) / 8), *P) uint8 in the drawn task order; ``slots`` (max_tasks,) int64, the mask of each
        task slot (kept tasks, then ``WHOLE_CROP``, then ``EMPTY`` padding); ``valid`` (max_tasks,) bool.
        ``unpack_batch`` makes the (B, max_tasks, *P) bool masks on the device."""
        drawn = self.draw(rng)
        (ref_image, ref_packed), (query_image, query_packed) = [
            apply_view(transform, image_crop, mask_crop, int(rng.integers(2 ** 31)))
            for transform, (image_crop, mask_crop) in zip((self.weak, self.strong), drawn["views"])]
        count = len(drawn["views"][0][1])
        # a task the augmented reference view lost would get a zero token: keep only masks with a voxel there
        present = np.bitwise_or.reduce(ref_packed.flatten(1).numpy(), axis=1)
        kept = [i for i in range(count) if present[i // 8] >> (i % 8) & 1]
        slots = torch.full((self.settings.max_tasks,), EMPTY, dtype=torch.int64)
        slots[:len(kept)] = torch.tensor(kept, dtype=torch.int64)
        slots[len(kept)] = WHOLE_CROP
        channels = (self.settings.max_tasks + 6) // 8  # room for max_tasks - 1 masks, so that samples stack
        ref_masks, query_masks = (torch.nn.functional.pad(p, (0, 0) * (p.ndim - 1) + (0, channels - len(p)))
                                  for p in (ref_packed, query_packed))
        return {"ref_image": ref_image, "ref_masks": ref_masks, "query_image": query_image,
                "query_masks": query_masks, "slots": slots, "valid": slots != EMPTY}

    def batch(self, rng: np.random.Generator, batch_size: int) -> dict:
        samples = [self.sample(rng) for _ in range(batch_size)]
        return {key: torch.stack([s[key] for s in samples]) for key in samples[0]}


def unpack_task_masks(packed: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """(B, C, *P) uint8 masks packed 8 per channel (``pack_masks``) and (B, T) ``slots`` -> (B, T, *P) bool: slot
    j of sample b holds packed mask ``slots[b, j]``, all ones (``WHOLE_CROP``) or nothing (``EMPTY``). Runs on the
    tensors' device."""
    b, t = slots.shape
    per_slot = (b, t, *[1] * (packed.ndim - 2))  # broadcasts a (B, T) value over the slot's voxels
    index = slots.clamp_min(0)
    channels = packed[torch.arange(b, device=packed.device)[:, None], index // 8]  # (B, T, *P)
    masks = torch.bitwise_and(torch.bitwise_right_shift(channels, (index % 8).to(torch.uint8).view(per_slot)), 1)
    return (masks.bool() & (slots >= 0).view(per_slot)) | (slots == WHOLE_CROP).view(per_slot)


def unpack_batch(batch: dict) -> dict:
    """A batch of ``TaskSampler.sample``s (on any device) with its masks unpacked to (B, max_tasks, *P) bool."""
    out = {key: value for key, value in batch.items() if key != "slots"}
    for key in ("ref_masks", "query_masks"):
        out[key] = unpack_task_masks(batch[key], batch["slots"])
    return out


class BatchStream:
    """An endless, reproducible stream of batches, ``iterations`` per epoch. Batch ``i`` of epoch ``e`` is drawn
    from a generator seeded by (seed, rank, e, i) only, so the stream is the same for any number of DataLoader
    workers (``-np``) and a run resumed at epoch ``e`` continues it exactly."""

    def __init__(self, sampler: TaskSampler, batch_size: int, iterations: int, seed: int, rank: int = 0):
        self.sampler, self.batch_size, self.iterations = sampler, batch_size, iterations
        self.seed, self.rank = seed, rank

    def rng(self, epoch: int, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.rank, epoch, index])

    def batch(self, epoch: int, index: int) -> dict:
        return self.sampler.batch(self.rng(epoch, index), self.batch_size)

    def loader(self, start_epoch: int = 0, num_workers: int = 0, pin_memory: bool = False):
        """One long-lived DataLoader over epochs ``start_epoch, start_epoch + 1, ...`` (no end: take
        ``iterations`` batches per epoch from one iterator). Its workers live as long as that iterator, so they
        start once per run, not once per epoch."""
        return torch.utils.data.DataLoader(_StreamDataset(self, start_epoch), batch_size=None,
                                           num_workers=num_workers, pin_memory=pin_memory,
                                           persistent_workers=num_workers > 0,
                                           prefetch_factor=2 if num_workers else None)


class _StreamDataset(torch.utils.data.IterableDataset):
    """Worker ``w`` of ``W`` yields stream items ``w, w + W, ...``: torch's DataLoader takes one item from each
    worker in turn, so the loader returns the items in stream order."""

    def __init__(self, stream: BatchStream, start_epoch: int):
        self.stream, self.start_epoch = stream, start_epoch

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        s = self.stream
        item = worker
        while True:
            epoch, index = divmod(item, s.iterations)
            yield s.batch(self.start_epoch + epoch, index)
            item += workers
