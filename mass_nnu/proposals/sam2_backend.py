"""The paper's proposals: SAM 2 automatic masks on seed slices, propagated through the volume with SAM 2's video
predictor in both directions, then size-filtered and de-duplicated. Needs ``pip install 'mass-nnu[sam2]'`` and a
local checkpoint; nothing is ever downloaded."""
from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from mass_nnu.errors import MassError
from mass_nnu.proposals.filtering import FilterSettings, finalize, foreground_mask

INSTALL_HINT = "pip install 'mass-nnu[sam2]'  (or: pip install sam2==1.1.0)"


@dataclass
class Sam2Settings:
    """Defaults from the paper (see docs/proposals.md)."""
    seed_every_mm: float = 30.0
    min_seeds: int = 10
    points_per_side: int = 32
    crop_n_layers: int = 2
    pred_iou_thresh: float = 0.4
    stability_score_thresh: float = 0.7
    max_masks_per_slice: int = 70
    filters: FilterSettings = field(default_factory=FilterSettings)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Sam2Models:
    mask_generator: object   # .generate(rgb HxWx3 uint8) -> [{"segmentation", "predicted_iou", ...}]
    video_predictor: object  # SAM2VideoPredictor: init_state / add_new_mask / propagate_in_video / reset_state


def load_sam2(checkpoint: str | None, config: str | None, device: str = "cpu",
              settings: Sam2Settings | None = None) -> Sam2Models:
    """Build SAM 2 from a user-supplied local checkpoint and its config name (e.g. configs/sam2.1/sam2.1_hiera_l.yaml)."""
    s = settings or Sam2Settings()
    if not checkpoint or not config:
        raise MassError("--backend sam2 needs --sam2-checkpoint (a local .pt file) and --sam2-config "
                        "(e.g. configs/sam2.1/sam2.1_hiera_l.yaml); weights are never downloaded")
    if not Path(checkpoint).is_file():
        raise MassError(f"{checkpoint}: SAM 2 checkpoint not found")
    try:  # an optional dependency: imported only when the backend is used
        from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator
        from sam2.build_sam import build_sam2, build_sam2_video_predictor
    except ImportError:
        raise MassError(f"the sam2 package is not installed; install it with: {INSTALL_HINT}") from None
    image_model = build_sam2(config, checkpoint, device=device)
    generator = SAM2AutomaticMaskGenerator(image_model, points_per_side=s.points_per_side,
                                           crop_n_layers=s.crop_n_layers, pred_iou_thresh=s.pred_iou_thresh,
                                           stability_score_thresh=s.stability_score_thresh)
    return Sam2Models(generator, build_sam2_video_predictor(config, checkpoint, device=device))


def slicing_axis(spacing) -> int:
    """Slice along the axis with the coarsest spacing, so slices have the finest in-plane resolution."""
    return int(np.argmax(spacing))


def seed_slices(foreground: np.ndarray, axis: int, spacing_mm: float, every_mm: float, min_seeds: int) -> list[int]:
    occupied = np.flatnonzero(foreground.any(axis=tuple(a for a in range(3) if a != axis)))
    if len(occupied) == 0:
        return []
    lo, hi = int(occupied[0]), int(occupied[-1])
    n = max(min_seeds, int(np.ceil((hi - lo + 1) * spacing_mm / every_mm)))
    return sorted({int(round(v)) for v in np.linspace(lo, hi, min(n, hi - lo + 1))})


def to_rgb_frames(volume: np.ndarray, axis: int, foreground: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) uint8 frames windowed to the foreground's 0.5–99.5 percentiles."""
    values = volume[foreground] if foreground.any() else volume.ravel()
    lo, hi = np.percentile(values, [0.5, 99.5])
    frames = np.moveaxis(np.clip((volume - lo) / max(hi - lo, 1e-6), 0, 1) * 255, axis, 0).astype(np.uint8)
    return np.repeat(frames[..., None], 3, axis=-1)


def pack_layers(masks: list[np.ndarray]) -> list[np.ndarray]:
    """Greedy packing of overlapping binary masks into instance label maps, largest first."""
    layers: list[np.ndarray] = []
    for mask in sorted(masks, key=lambda m: -int(m.sum())):
        for layer in layers:
            if not (layer[mask] > 0).any():
                layer[mask] = layer.max() + 1
                break
        else:
            layer = np.zeros(mask.shape, np.uint16)
            layer[mask] = 1
            layers.append(layer)
    return layers


def propagate(models: Sam2Models, frame_dir: str, seed: int, masks: list[np.ndarray], num_frames: int) -> list[np.ndarray]:
    """Propagate the seed frame's masks forward and backward; one (N, H, W) bool volume per mask."""
    predictor = models.video_predictor
    state = predictor.init_state(video_path=frame_dir)
    volumes = [np.zeros((num_frames, *m.shape), bool) for m in masks]
    for obj_id, mask in enumerate(masks):
        predictor.add_new_mask(state, frame_idx=seed, obj_id=obj_id, mask=mask)
    for reverse in (False, True):
        for frame_idx, obj_ids, logits in predictor.propagate_in_video(state, start_frame_idx=seed, reverse=reverse):
            logits = np.asarray(logits.detach().cpu() if hasattr(logits, "detach") else logits)
            for obj_id, logit in zip(obj_ids, logits):
                volumes[int(obj_id)][frame_idx] = logit.reshape(volumes[0].shape[1:]) > 0
    predictor.reset_state(state)
    return volumes


def sam2_proposals(image: np.ndarray, spacing, models: Sam2Models, settings: Sam2Settings | None = None) -> np.ndarray:
    """Proposals for one (Z, Y, X) image -> uint16 (L, Z, Y, X)."""
    s = settings or Sam2Settings()
    image = np.nan_to_num(image.astype(np.float32))
    foreground = foreground_mask(image)
    if foreground.sum() < 10:
        return np.zeros((0, *image.shape), np.uint16)
    axis = slicing_axis(spacing)
    frames = to_rgb_frames(image, axis, foreground)
    masks_3d: list[np.ndarray] = []
    with tempfile.TemporaryDirectory(prefix="mass_sam2_") as frame_dir:
        for i, frame in enumerate(frames):  # the video predictor reads a folder of JPEG frames
            Image.fromarray(frame).save(Path(frame_dir) / f"{i:05d}.jpg", quality=95)
        for seed in seed_slices(foreground, axis, float(spacing[axis]), s.seed_every_mm, s.min_seeds):
            found = models.mask_generator.generate(frames[seed])
            found = sorted(found, key=lambda m: -float(m.get("predicted_iou", 0)))[: s.max_masks_per_slice]
            masks = [np.asarray(m["segmentation"], bool) for m in found if np.asarray(m["segmentation"]).any()]
            if masks:
                masks_3d += [np.moveaxis(v, 0, axis) for v in propagate(models, frame_dir, seed, masks, len(frames))]
    return finalize(pack_layers(masks_3d), foreground, spacing, s.filters) if masks_3d else \
        np.zeros((0, *image.shape), np.uint16)
