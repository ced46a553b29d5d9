"""`mass segment`: in-context segmentation of new structures from K annotated references, with no fine-tuning.

1. References and queries go through the plans' preprocessor (spacing, normalisation), like nnU-Net's data.
2. Every label value of the reference masks is one task. For each (reference, label) the image is cropped to
   the patch size around the centre of the label's bounding box (zero-padded at the borders) and encoded into
   task tokens; with K references the tokens of a label are averaged over the references that contain it.
3. The query is predicted with nnU-Net's sliding window (Gaussian weighting, step 0.5) over the bounding box
   of its foreground (Otsu threshold of the first channel, plus a margin); everything outside is background.
4. Logits go back to the original grid through nnU-Net's export; a voxel gets the label whose sigmoid is
   highest if that is > 0.5. Optionally each label keeps its largest connected component.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from skimage.filters import threshold_otsu
from tqdm import tqdm

from mass_nnu.adapter import inference
from mass_nnu.dice import class_means
from mass_nnu.errors import MassError
from mass_nnu.incontext.common import Pretrained, case_from_file, image_cases
from mass_nnu.io import ensure_writable, save_json_atomic
from mass_nnu.model.mass_model import TaskTokens
from mass_nnu.model.references import Reference, encode_tasks

BACKGROUND_LOGIT = -30.0  # logit of voxels outside the predicted region (sigmoid ~ 1e-13)


def load_reference(image: Path, mask: Path, pretrained: Pretrained, wanted: list[int] | None) -> Reference:
    """Read and preprocess one reference; refuses masks that do not fit their image or hold no label."""
    plans = pretrained.plans
    case = case_from_file(Path(image), pretrained.num_channels, inference.supported_endings(plans))
    data, properties = inference.read_image(case.files, plans)
    seg = inference.read_segmentation(mask, plans)
    if seg.shape[1:] != data.shape[1:]:
        raise MassError(f"{mask}: mask shape {tuple(seg.shape[1:])} differs from its image {image} "
                        f"({tuple(data.shape[1:])})")
    if np.any(seg != np.round(seg)) or seg.min() < 0:
        raise MassError(f"{mask}: not a label map (values must be non-negative integers)")
    present = [int(v) for v in np.unique(seg) if v > 0]
    if not present:
        raise MassError(f"{mask}: empty reference mask (no labelled voxel)")
    labels = [v for v in present if wanted is None or v in wanted]
    data, seg, _ = inference.preprocess(data, seg.astype(np.int16), properties, plans, labels)
    vanished = [v for v in labels if not np.any(seg[0] == v)]
    if vanished:
        raise MassError(f"{mask}: label(s) {vanished} vanish when resampled to the model's spacing "
                        f"{list(plans.configuration.spacing)}")
    return Reference(str(image), data, seg[0], labels)


def foreground_box(data: np.ndarray, patch_size) -> tuple[slice, ...]:
    """Bounding box of the image's foreground (Otsu on the first channel, specks removed) plus 1/8 patch."""
    image = data[0]
    if np.ptp(image) == 0:
        return tuple(slice(0, s) for s in image.shape)
    foreground = ndimage.binary_opening(image > threshold_otsu(image))
    if not foreground.any():
        return tuple(slice(0, s) for s in image.shape)
    coords = np.argwhere(foreground)
    margin = [p // 8 for p in patch_size]
    return tuple(slice(max(int(lo) - m, 0), min(int(hi) + 1 + m, s))
                 for lo, hi, m, s in zip(coords.min(0), coords.max(0), margin, image.shape))


def predict_logits(pretrained: Pretrained, tokens, data: np.ndarray, step_size: float = 0.5,
                   region: tuple[slice, ...] | None = None, progress: bool = False):
    """(K, *S) logits on the preprocessed grid: Gaussian-weighted sliding window over ``region``."""
    device = next(pretrained.model.parameters()).device
    patch = pretrained.patch_size
    region = region or tuple(slice(0, s) for s in data.shape[1:])
    padded, unpad = inference.pad_to_patch(data[(slice(None), *region)], patch)
    image = torch.from_numpy(np.ascontiguousarray(padded, dtype=np.float32)).to(device)
    k = tokens.num_tasks
    summed = torch.zeros((k, *image.shape[1:]), dtype=torch.float32, device=device)
    weights = torch.zeros(image.shape[1:], dtype=torch.float32, device=device)
    gaussian = inference.gaussian_importance(patch, device)
    starts = inference.tile_starts(image.shape[1:], patch, step_size)
    with torch.no_grad():
        for start in tqdm(starts, desc="tiles", unit="tile", leave=False, disable=not progress):
            window = tuple(slice(s, s + p) for s, p in zip(start, patch))
            logits = pretrained.model.segment(image[(slice(None), *window)][None], tokens, deep_supervision=False)[0]
            summed[(slice(None), *window)] += logits[0].float() * gaussian
            weights[window] += gaussian
    logits = torch.full((k, *data.shape[1:]), BACKGROUND_LOGIT, dtype=torch.float32)
    logits[(slice(None), *region)] = (summed / weights)[(slice(None), *unpad[1:])].cpu()
    return logits


def to_label_map(logits, properties: dict, pretrained: Pretrained, labels: list[int],
                 largest_component: bool) -> np.ndarray:
    """Logits (K, *S') -> label map on the original grid: the label with the highest sigmoid if > 0.5."""
    with_background = torch.cat([torch.zeros_like(logits[:1]), logits]).numpy()  # logit 0 = sigmoid 0.5
    index = inference.logits_to_original(with_background, properties, pretrained.plans)
    label_map = np.asarray([0, *labels], dtype=np.uint16)[index]
    if largest_component:
        for label in labels:
            label_map = inference.keep_largest_component(label_map, label)
    return label_map


def segment_cases(pretrained: Pretrained, references: list[tuple[Path, Path]], queries, output_folder: Path,
                  labels: list[int] | None = None, step_size: float = 0.5, largest_component: bool = True,
                  whole_image: bool = False, gt_folder: Path | None = None) -> dict:
    """Segment every query from the references; writes OUT/<case>.nii.gz (and summary.json with --gt).
    Returns {case_id: {label: dice}} when ground truth is given, else {}."""
    if not 0 < step_size <= 1:
        raise MassError(f"--step-size {step_size}: must be in (0, 1]")
    plans = pretrained.plans
    endings = inference.supported_endings(plans)
    cases = image_cases(queries, pretrained.num_channels, endings)
    gt_files = _ground_truth_files(gt_folder, cases, endings) if gt_folder else {}
    loaded = [load_reference(image, mask, pretrained, labels) for image, mask in references]
    available = sorted({v for r in loaded for v in r.labels})
    missing = [v for v in (labels or []) if v not in available]
    if missing:
        raise MassError(f"--labels {missing}: not in any reference mask (they hold {available})")
    tokens = encode_tasks(pretrained.model, pretrained.patch_size, loaded, available)
    output_folder = ensure_writable(output_folder)
    results = {}
    for case in tqdm(cases, desc="in-context segmentation", unit="case", disable=None):
        data, properties = inference.read_image(case.files, plans)
        data, _, properties = inference.preprocess(data, None, properties, plans)
        region = None if whole_image else foreground_box(data, pretrained.patch_size)
        logits = predict_logits(pretrained, tokens, data, step_size, region, progress=True)
        label_map = to_label_map(logits, properties, pretrained, available, largest_component)
        inference.write_segmentation(label_map, output_folder / f"{case.case_id}.nii.gz", properties, plans)
        if case.case_id in gt_files:
            reference = inference.read_segmentation(gt_files[case.case_id], plans)[0]
            if reference.shape != label_map.shape:
                raise MassError(f"{gt_files[case.case_id]}: shape {reference.shape} differs from the query's "
                                f"{label_map.shape}")
            results[case.case_id] = {str(v): inference.dice(reference, label_map, v) for v in available}
    if gt_folder:
        summary = {"model": pretrained.source, "references": [[str(i), str(m)] for i, m in references],
                   "labels": available, "dice_per_case": results, "mean_dice": mean_dice(results)}
        save_json_atomic(summary, output_folder / "summary.json")
    return results


def rotated(tokens: TaskTokens) -> TaskTokens:
    """Task k gets the tokens of task k+1 (the last gets the first's): references of another class."""
    return TaskTokens([scale.roll(-1, dims=1) for scale in tokens.scales], tokens.valid.roll(-1, dims=1))


def score_token_sets(pretrained: Pretrained, token_sets: dict[str, tuple[TaskTokens, list[int]]], queries,
                     gt_folder: Path, score_labels: list[int], step_size: float = 0.5,
                     largest_component: bool = True,
                     alone: tuple[str, ...] = ()) -> dict[str, dict[str, dict[str, float]]]:
    """Dice of several token sets on the same queries, each query read and preprocessed once. ``token_sets``:
    {name: (tokens, the label each task predicts)}. Every label of ``score_labels`` is scored, also one no task
    predicts (an empty prediction: Dice 0 where the ground truth holds it, NaN where neither does), as a
    fine-tuned model that never predicts it is. The sets named in ``alone`` are also scored as ``<name>_alone``:
    each task on its own (sigmoid > 0.5, no competition with the other classes for a voxel). Returns
    {name: {case: {label: Dice}}}; nothing is written."""
    plans = pretrained.plans
    endings = inference.supported_endings(plans)
    cases = image_cases(queries, pretrained.num_channels, endings)
    gt_files = _ground_truth_files(gt_folder, cases, endings)
    names = [*token_sets, *(f"{name}_alone" for name in alone)]
    results: dict[str, dict[str, dict[str, float]]] = {name: {} for name in names}
    for case in tqdm(cases, desc="in-context scoring", unit="case", disable=None):
        data, properties = inference.read_image(case.files, plans)
        data, _, properties = inference.preprocess(data, None, properties, plans)
        region = foreground_box(data, pretrained.patch_size)
        reference = inference.read_segmentation(gt_files[case.case_id], plans)[0]
        for name, (tokens, labels) in token_sets.items():
            logits = predict_logits(pretrained, tokens, data, step_size, region)
            label_map = to_label_map(logits, properties, pretrained, labels, largest_component)
            if reference.shape != label_map.shape:
                raise MassError(f"{gt_files[case.case_id]}: shape {reference.shape} differs from the query's "
                                f"{label_map.shape}")
            results[name][case.case_id] = {str(v): inference.dice(reference, label_map, v) for v in score_labels}
            if name in alone:
                each = {v: to_label_map(logits[k:k + 1], properties, pretrained, [v], largest_component)
                        for k, v in enumerate(labels)}
                results[f"{name}_alone"][case.case_id] = {
                    str(v): inference.dice(reference, each.get(v, np.zeros_like(label_map)), v) for v in score_labels}
    return results


def _ground_truth_files(folder: Path, cases, endings) -> dict[str, Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise MassError(f"{folder}: ground-truth folder not found")
    found = {}
    for case in cases:
        candidates = [folder / f"{case.case_id}{e}" for e in endings if (folder / f"{case.case_id}{e}").is_file()]
        if not candidates:
            raise MassError(f"{folder}: no ground truth for case '{case.case_id}' ({case.case_id}{endings[0]})")
        found[case.case_id] = candidates[0]
    return found


def mean_dice(results: dict) -> dict[str, float]:
    """Mean Dice per label over cases, ignoring cases where the label is absent from both (``mass_nnu.dice``; NaN
    for a label absent from every case)."""
    return class_means(results, sorted({label for scores in results.values() for label in scores}, key=int))


def dice_table(results: dict) -> str:
    """Cases as rows, labels as columns, and the mean."""
    labels = sorted({label for scores in results.values() for label in scores}, key=int)
    width = max([len("case"), len("mean")] + [len(c) for c in results])
    lines = [f"{'case':<{width}}  " + "  ".join(f"{'label ' + l:>9}" for l in labels)]
    for case, scores in results.items():
        lines.append(f"{case:<{width}}  " + "  ".join(f"{scores.get(l, float('nan')):9.3f}" for l in labels))
    means = mean_dice(results)
    lines.append(f"{'mean':<{width}}  " + "  ".join(f"{means[l]:9.3f}" for l in labels))
    return "\n".join(lines)
