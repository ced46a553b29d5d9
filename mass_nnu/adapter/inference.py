"""nnU-Net's inference machinery for single images: reading, preprocessing, sliding-window tiles, export, Dice.

Preprocessing runs the plans' preprocessor class (``DefaultPreprocessor.run_case_npy``: transpose, crop to
non-zero, normalise, resample to the plans' spacing), so a case looks exactly like nnU-Net's preprocessed data.
Export reverses it with ``convert_predicted_logits_to_segmentation_with_correct_shape`` and writes through the
plans' reader/writer (``SimpleITKIO``), so the header (spacing, origin, direction) is the input's.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from acvl_utils.cropping_and_padding.padding import pad_nd_image
from nnunetv2.evaluation.evaluate_predictions import compute_tp_fp_fn_tn
from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape
from nnunetv2.inference.sliding_window_prediction import compute_gaussian, compute_steps_for_sliding_window
from nnunetv2.postprocessing.remove_connected_components import remove_all_but_largest_component_from_segmentation
from nnunetv2.utilities.label_handling.label_handling import LabelManager
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from mass_nnu.adapter.networks import configuration_manager
from mass_nnu.errors import MassError
from mass_nnu.io import atomic_path


@dataclass
class Plans:
    """nnU-Net's managers for one configuration of a plans dict."""
    manager: object
    configuration: object

    @property
    def patch_size(self) -> tuple[int, ...]:
        return tuple(int(p) for p in self.configuration.patch_size)

    @property
    def reader_writer(self):
        return self.manager.image_reader_writer_class()


def plans_for(plans: dict, configuration: str) -> Plans:
    return Plans(PlansManager(plans), configuration_manager(plans, configuration))


def supported_endings(plans: Plans) -> tuple[str, ...]:
    return tuple(plans.reader_writer.supported_file_endings)


def _read(path_list, read, what: str):
    for path in path_list:
        if not Path(path).is_file():
            raise MassError(f"{path}: {what} not found")
    try:
        return read()
    except (RuntimeError, AssertionError, OSError) as e:
        raise MassError(f"{path_list[0]}: cannot read this {what} ({str(e).strip().splitlines()[0][:160] or 'unreadable'})") from None


def read_image(files: list[str], plans: Plans) -> tuple[np.ndarray, dict]:
    """(C, *S) float image and nnU-Net's properties; 2D images (and 2D-sized volumes) are refused."""
    rw = plans.reader_writer
    data, properties = _read([str(f) for f in files], lambda: rw.read_images([str(f) for f in files]), "image")
    if len(properties.get("sitk_stuff", {}).get("spacing", (0, 0, 0))) != 3 or min(data.shape[1:]) < 2:
        raise MassError(f"{files[0]}: is a 2D image (shape {tuple(data.shape[1:])}); in-context segmentation and "
                        f"embedding need 3D volumes")
    return data, properties


def read_segmentation(file: str, plans: Plans) -> np.ndarray:
    rw = plans.reader_writer
    seg, _ = _read([str(file)], lambda: rw.read_seg(str(file)), "mask")
    return seg


def preprocess(data: np.ndarray, seg: np.ndarray | None, properties: dict, plans: Plans,
               labels: list[int] | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """Run the plans' preprocessor on one case. Returns data (C, *S'), seg (1, *S'; -1 outside the non-zero
    crop when nnU-Net marks it) and the properties that export needs."""
    preprocessor = plans.configuration.preprocessor_class(verbose=False)
    # the label manager only decides which labels get sampled foreground locations
    dataset_json = {"labels": {"background": 0, **{f"label_{v}": int(v) for v in (labels or [])}}}
    return preprocessor.run_case_npy(data, seg, dict(properties), plans.manager, plans.configuration, dataset_json)


def preprocess_case_to_files(image_files: list[str], seg_file: str | None, output_truncated: str, plans: Plans,
                             dataset_json: dict) -> None:
    """One case as ``nnUNetv2_preprocess`` runs it: read, transpose, crop, normalise, resample, sample the
    foreground locations, write ``<output_truncated>.b2nd`` (+ ``_seg.b2nd``, ``.pkl``)."""
    preprocessor = plans.configuration.preprocessor_class(verbose=False)
    preprocessor.run_case_save(output_truncated, [str(f) for f in image_files], None if seg_file is None else
                               str(seg_file), plans.manager, plans.configuration, dataset_json)


def pad_to_patch(array, patch_size):
    """Pad (C, *S) with zeros (centred, like nnU-Net's predictor) to at least the patch size; returns the slicer back."""
    return pad_nd_image(array, tuple(patch_size), "constant", None, True)


def tile_starts(shape, patch_size, step_size: float) -> list[tuple[int, ...]]:
    """Start coordinates of the sliding-window tiles over ``shape`` (nnU-Net's step rule)."""
    steps = compute_steps_for_sliding_window(tuple(shape), tuple(patch_size), step_size)
    return list(itertools.product(*steps))


def gaussian_importance(patch_size, device):
    return compute_gaussian(tuple(patch_size), sigma_scale=1.0 / 8, value_scaling_factor=10, dtype=torch.float32,
                            device=torch.device(device))


def logits_to_original(logits, properties: dict, plans: Plans) -> np.ndarray:
    """(K+1, *S') logits on the preprocessed grid (channel 0 = background) -> argmax index map on the original
    image grid, through nnU-Net's export (resampling, un-cropping, un-transposing)."""
    labels = {"background": 0, **{f"task_{i}": i for i in range(1, logits.shape[0])}}
    label_manager = LabelManager(labels, regions_class_order=None)
    return convert_predicted_logits_to_segmentation_with_correct_shape(
        logits, plans.manager, plans.configuration, label_manager, properties, num_threads_torch=1)


def write_segmentation(seg: np.ndarray, path: Path, properties: dict, plans: Plans) -> None:
    """Write with the plans' reader/writer (same header as the image the properties were read from), atomically."""
    dtype = np.uint8 if seg.max(initial=0) < 256 else np.uint16
    with atomic_path(path) as tmp:
        plans.reader_writer.write_seg(seg.astype(dtype), str(tmp), properties)


def keep_largest_component(label_map: np.ndarray, label: int) -> np.ndarray:
    """nnU-Net's post-processing: all but the largest connected component of ``label`` become background."""
    if not np.any(label_map == label):
        return label_map
    return remove_all_but_largest_component_from_segmentation(label_map, label)


def dice(reference: np.ndarray, prediction: np.ndarray, label: int) -> float:
    """nnU-Net's Dice (NaN when the label is absent from both)."""
    tp, fp, fn, _ = compute_tp_fp_fn_tn(reference == label, prediction == label)
    return float(2 * tp / (2 * tp + fp + fn)) if tp + fp + fn > 0 else float("nan")
