"""Run a proposal backend over a dataset: sharding, resume, progress, summary and recall evaluation."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from tqdm import tqdm

from mass_nnu.adapter.datasets import Dataset, raw_root
from mass_nnu.errors import MassError
from mass_nnu.io import read_image, save_json_atomic
from mass_nnu.proposals.evaluate import best_iou_per_structure
from mass_nnu.proposals.sam2_backend import Sam2Settings, load_sam2, sam2_proposals
from mass_nnu.proposals.store import (
    RESERVED_CASES,
    find_proposals,
    image_geometry,
    list_proposals,
    proposal_dir,
    proposal_path,
    read_proposals,
    write_proposals,
)
from mass_nnu.proposals.supervoxel import SupervoxelSettings, supervoxel_proposals

BACKENDS = ("supervoxel", "sam2")


def parse_shard(shard: str | None) -> tuple[int, int]:
    """'i/n' with 0 ≤ i < n (0-based, like SLURM_ARRAY_TASK_ID) -> (i, n)."""
    if not shard:
        return 0, 1
    try:
        i, n = (int(x) for x in shard.split("/"))
    except ValueError:
        raise MassError(f"--shard '{shard}': expected i/n, e.g. 0/4 (0-based)") from None
    if n < 1 or not 0 <= i < n:
        raise MassError(f"--shard '{shard}': need 0 ≤ i < n")
    return i, n


def shard_cases(cases: list[str], shard: tuple[int, int]) -> list[str]:
    i, n = shard
    return [c for k, c in enumerate(sorted(cases)) if k % n == i]


def output_dataset(source: Dataset, out_id) -> Dataset:
    """The dataset that receives the proposals. With ``out_id`` unknown so far, a new raw dataset
    Dataset<out_id>_<source name> is made from the source: dataset.json copied, imagesTr/labelsTr hard-linked
    (copied across file systems), so the source folder stays untouched and pretraining can use the new one."""
    if out_id is None:
        return source
    try:
        return Dataset.resolve(out_id)
    except MassError:
        pass
    digits = str(out_id).removeprefix("Dataset").split("_")[0]
    if not digits.isdigit() or not 0 < int(digits) < 1000:
        raise MassError(f"--out-id '{out_id}': expected a dataset ID between 1 and 999")
    target = raw_root() / f"Dataset{int(digits):03d}_{source.name.split('_', 1)[1]}"
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=raw_root()))
    try:
        shutil.copyfile(source.raw / "dataset.json", staging / "dataset.json")
        for sub in ("imagesTr", "labelsTr"):
            if (source.raw / sub).is_dir():
                shutil.copytree(source.raw / sub, staging / sub, copy_function=_link_or_copy)
        os.rename(staging, target)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not target.is_dir():  # another shard may have made it at the same time
            raise MassError(f"{target}: could not create the --out-id dataset") from None
    return Dataset(target.name)


def _link_or_copy(src, dst):
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def make_backend(backend: str, seed: int, sam2_checkpoint: str | None, sam2_config: str | None, device: str,
                 working_spacing_mm: float | None = 2.0, sam2_spacing_mm: float | None = 1.5,
                 half_splits: bool = True, core_depth_mm: float = 10.0):
    """A function (image array (Z, Y, X), spacing (z, y, x) mm) -> uint16 layers (L, *S_w) on the backend's working
    grid (same field of view as the image; ``store.write_proposals`` maps them to the raw grid). ``working_spacing_mm`` is the
    supervoxel backend's grid, ``sam2_spacing_mm`` the SAM 2 backend's (None / 0: the raw grid); ``half_splits`` and
    ``core_depth_mm`` are the supervoxel backend's two shape rules (docs/proposals.md). The supervoxel function also
    takes ``with_table=True`` and then returns the layers' raw-grid table with them (``supervoxel_proposals``)."""
    for name, value in (("--working-spacing", working_spacing_mm), ("--sam2-spacing", sam2_spacing_mm)):
        if value is not None and value < 0:
            raise MassError(f"{name} {value}: expected a spacing in mm > 0 (or 0 for the raw grid)")
    if core_depth_mm < 0:
        raise MassError(f"--core-depth {core_depth_mm}: expected a depth in mm > 0 (or 0 to turn the rule off)")
    if backend == "supervoxel":
        settings = SupervoxelSettings(seed=seed, working_spacing_mm=working_spacing_mm or None,
                                      half_splits=half_splits, core_depth_mm=core_depth_mm)
        return partial(supervoxel_proposals, settings=settings), settings.as_dict()
    if backend == "sam2":
        settings = Sam2Settings(working_spacing_mm=sam2_spacing_mm or None)
        models = load_sam2(sam2_checkpoint, sam2_config, device)
        return partial(sam2_proposals, models=models, settings=settings), settings.as_dict()
    raise MassError(f"--backend '{backend}': choose one of {', '.join(BACKENDS)}")


def propose_dataset(dataset, backend: str = "supervoxel", shard: str | None = None, seed: int = 0,
                    sam2_checkpoint: str | None = None, sam2_config: str | None = None, device: str = "cpu",
                    num_processes: int = 1, out_id=None, working_spacing_mm: float | None = 2.0,
                    sam2_spacing_mm: float | None = 1.5, half_splits: bool = True,
                    core_depth_mm: float = 10.0) -> dict:
    """Write proposals for every (sharded) case that has none yet, into ``out_id``'s raw folder if given (see
    ``output_dataset``). Returns a summary dict."""
    dataset = Dataset.resolve(dataset)
    cases = dataset.cases()
    if not cases:
        raise MassError(f"{dataset.raw / 'imagesTr'}: no images ending in {dataset.file_ending}")
    todo = shard_cases(list(cases), parse_shard(shard))
    clash = sorted(set(todo) & set(RESERVED_CASES))
    if clash:
        case = clash[0]
        raise MassError(f"{cases[case][0]}: the case id '{case}' is reserved (proposalsTr/{case}.json is the "
                        f"run summary); rename the case")
    run_one, params = make_backend(backend, seed, sam2_checkpoint, sam2_config, device, working_spacing_mm,
                                   sam2_spacing_mm, half_splits, core_depth_mm)
    out = output_dataset(dataset, out_id)
    pending = [(case, cases[case][0], proposal_path(out, case)) for case in todo
               if find_proposals(proposal_dir(out), case) is None]  # done: complete .b2nd + .json, or an old .npz
    skipped = len(todo) - len(pending)
    counts, seconds, empty = {}, {}, []
    jobs = [(run_one, image_path, path, backend, params) for _, image_path, path in pending]
    if num_processes > 1 and backend == "supervoxel" and len(jobs) > 1:
        pool = ProcessPoolExecutor(num_processes)
        results = pool.map(propose_case, jobs)
    else:
        pool, results = None, map(propose_case, jobs)
    try:
        for (case, image_path, _), (count, secs) in tqdm(zip(pending, results), total=len(pending),
                                                          desc=f"proposals ({backend})", unit="case", disable=None):
            counts[case], seconds[case] = count, secs
            if count == 0:
                empty.append(case)
                warnings.warn(f"{image_path}: zero proposals (empty or constant image?); the case is skipped in "
                              f"pretraining", stacklevel=1)
    finally:
        if pool is not None:
            pool.shutdown()
    summary = {"dataset": out.name, "backend": backend, "cases_done": len(counts), "cases_skipped": skipped,
               "cases_empty": empty, "proposals_per_case": float(np.mean(list(counts.values()))) if counts else 0.0,
               "seconds_per_case": float(np.mean(list(seconds.values()))) if seconds else 0.0,
               "per_case": {c: {"proposals": counts[c], "seconds": round(seconds[c], 2)} for c in counts}}
    _merge_summary(proposal_dir(out) / "summary.json", summary, params)
    return summary


def propose_case(job) -> tuple[int, float]:
    """One case, as ``mass propose`` runs it: read, propose, write atomically. ``job`` is (backend function of
    ``make_backend``, image path, output path, backend name, its params). Returns (number of proposals, seconds
    of the backend itself)."""
    run_one, image_path, out_path, backend, params = job
    image = read_image(image_path)
    array = sitk.GetArrayViewFromImage(image).astype(np.float32)
    if array.ndim != 3:
        raise MassError(f"{image_path}: image is {array.ndim}D; proposals need 3D volumes")
    start = time.time()
    if backend == "supervoxel":  # its table on the raw grid comes with the layers
        layers, table = run_one(array, image.GetSpacing()[::-1], with_table=True)
    else:
        layers, table = run_one(array, image.GetSpacing()[::-1]), None
    elapsed = time.time() - start
    del array
    table = write_proposals(out_path, layers, image_geometry(image), backend, params, table=table)  # raw grid
    return len(table), elapsed


def _merge_summary(path: Path, summary: dict, params: dict) -> None:
    """summary.json accumulates per-case figures across shards and reruns (last writer wins per case)."""
    previous = json.loads(path.read_text()) if path.is_file() else {"per_case": {}}
    per_case = {**previous.get("per_case", {}), **summary["per_case"]}
    save_json_atomic({"backend": summary["backend"], "params": params, "per_case": per_case,
                      "proposals_per_case": float(np.mean([v["proposals"] for v in per_case.values()])) if per_case else 0.0,
                      "seconds_per_case": float(np.mean([v["seconds"] for v in per_case.values()])) if per_case else 0.0},
                     path)


def evaluate_recall(dataset, labels_dir: str | Path, threshold: float = 0.5) -> dict:
    """Best IoU per ground-truth structure for every case with proposals; recall = fraction ≥ threshold."""
    dataset = Dataset.resolve(dataset)
    labels_dir = Path(labels_dir)
    if not labels_dir.is_dir():
        raise MassError(f"{labels_dir}: --eval-labels folder not found")
    ending = dataset.file_ending
    per_case, best_all = {}, []
    for case, path in list_proposals(proposal_dir(dataset)).items():
        label_path = labels_dir / f"{case}{ending}"
        if not label_path.is_file():
            raise MassError(f"{label_path}: no label for image {case} (needed by --eval-labels)")
        layers, geometry = read_proposals(path)
        label = sitk.GetArrayFromImage(read_image(label_path))
        if list(label.shape) != list(geometry["shape"]):
            raise MassError(f"{label_path}: shape {label.shape} differs from its image's {tuple(geometry['shape'])}")
        best = best_iou_per_structure(layers, label)
        per_case[case] = best
        best_all += list(best.values())
    if not per_case:
        raise MassError(f"{proposal_dir(dataset)}: no proposals to evaluate; run 'mass propose' first")
    structures = sorted({s for b in per_case.values() for s in b})
    return {"recall": float(np.mean(np.asarray(best_all) >= threshold)), "threshold": threshold,
            "mean_best_iou": float(np.mean(best_all)),
            "per_structure_mean_best_iou": {s: float(np.mean([b[s] for b in per_case.values() if s in b]))
                                            for s in structures},
            "per_case": per_case}
