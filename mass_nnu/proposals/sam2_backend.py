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
from mass_nnu.proposals.filtering import Deduplicator, FilterSettings, Proposal, foreground_mask, passes
from mass_nnu.proposals.resample import to_working_grid

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
    working_spacing_mm: float | None = 1.5   # the paper's 1.5 mm grid (never upsampled); None / 0: raw grid
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


def to_frames(volume: np.ndarray, axis: int, foreground: np.ndarray) -> np.ndarray:
    """(N, H, W) uint8 grey frames windowed to the foreground's 0.5–99.5 percentiles (RGB only per frame, on use)."""
    values = volume[foreground] if foreground.any() else volume.ravel()
    lo, hi = np.percentile(values, [0.5, 99.5])
    scale = np.float32(255 / max(hi - lo, 1e-6))
    grey = np.clip((volume - np.float32(lo)) * scale, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(np.moveaxis(grey, axis, 0))


def rgb(frame: np.ndarray) -> np.ndarray:
    return np.repeat(frame[..., None], 3, axis=-1)


class _Track:
    """One propagated object as 2D crops per frame: nothing of the size of the volume is allocated."""

    __slots__ = ("frames",)

    def __init__(self):
        self.frames: dict[int, tuple[int, int, np.ndarray]] = {}  # frame -> (row0, col0, bool crop)

    def set(self, frame_idx: int, mask2d: np.ndarray, rows_any: np.ndarray, cols_any: np.ndarray) -> None:
        rows, cols = np.flatnonzero(rows_any), np.flatnonzero(cols_any)
        if len(rows) == 0:
            self.frames.pop(frame_idx, None)
            return
        r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
        self.frames[frame_idx] = (int(r0), int(c0), mask2d[r0:r1, c0:c1].copy())

    def to_proposal(self, axis: int) -> Proposal | None:
        """The 3D bounding-box crop in (Z, Y, X) order (frames run along ``axis``)."""
        if not self.frames:
            return None
        f0, f1 = min(self.frames), max(self.frames) + 1
        r0 = min(r for r, _, _ in self.frames.values())
        c0 = min(c for _, c, _ in self.frames.values())
        r1 = max(r + m.shape[0] for r, _, m in self.frames.values())
        c1 = max(c + m.shape[1] for _, c, m in self.frames.values())
        crop = np.zeros((f1 - f0, r1 - r0, c1 - c0), bool)
        for f, (r, c, m) in self.frames.items():
            crop[f - f0, r - r0:r - r0 + m.shape[0], c - c0:c - c0 + m.shape[1]] = m
        box = [slice(f0, f1), slice(r0, r1), slice(c0, c1)]
        order = [1, 2]
        order.insert(axis, 0)  # frame axis back to its place in the volume
        crop = np.ascontiguousarray(np.moveaxis(crop, 0, axis))
        return Proposal(tuple(box[i] for i in order), int(np.count_nonzero(crop)), crop)


def propagate(models: Sam2Models, state, seed: int, masks: list[np.ndarray], axis: int) -> list[Proposal]:
    """Propagate the seed frame's masks forward and backward through an initialised video state; one cropped
    Proposal per non-empty object (the state is reset for the next seed)."""
    predictor = models.video_predictor
    tracks = [_Track() for _ in masks]
    for obj_id, mask in enumerate(masks):
        predictor.add_new_mask(state, frame_idx=seed, obj_id=obj_id, mask=mask)
    for reverse in (False, True):
        for frame_idx, obj_ids, logits in predictor.propagate_in_video(state, start_frame_idx=seed, reverse=reverse):
            logits = logits.detach().cpu().numpy() if hasattr(logits, "detach") else np.asarray(logits)
            inside = logits.reshape(len(obj_ids), *masks[0].shape) > 0   # all objects of the frame at once
            rows, cols = inside.any(2), inside.any(1)
            for k, obj_id in enumerate(obj_ids):
                tracks[int(obj_id)].set(int(frame_idx), inside[k], rows[k], cols[k])
    predictor.reset_state(state)
    return [p for p in (t.to_proposal(axis) for t in tracks) if p is not None]


def _overlaps_any(p: Proposal, layer: list[Proposal], lo: np.ndarray, hi: np.ndarray) -> bool:
    """Whether ``p`` shares a voxel with a mask of ``layer`` (boxes ``lo``/``hi``): boxes first, then voxels."""
    top, bottom = np.maximum(lo, p.lo), np.minimum(hi, p.hi)
    for j in np.flatnonzero((bottom > top).all(axis=1)):
        if (p.window(top[j], bottom[j]) & layer[j].window(top[j], bottom[j])).any():
            return True
    return False


def pack_proposals(proposals: list[Proposal], shape) -> np.ndarray:
    """Greedy packing of overlapping cropped masks into non-overlapping instance label maps, largest first
    -> uint16 (L, *shape). Layers are assigned from the crops alone (bounding-box test, then the voxels of the
    boxes' intersection), so the result is allocated once."""
    members: list[list[Proposal]] = []
    boxes: list[tuple[np.ndarray, np.ndarray]] = []
    placed: list[tuple[int, int, Proposal]] = []
    for p in sorted(proposals, key=lambda q: -q.size):
        for i, layer in enumerate(members):
            if not _overlaps_any(p, layer, *boxes[i]):
                break
        else:
            i = len(members)
            members.append([])
            boxes.append((np.zeros((0, 3), np.int64), np.zeros((0, 3), np.int64)))
        members[i].append(p)
        boxes[i] = (np.vstack([boxes[i][0], p.lo]), np.vstack([boxes[i][1], p.hi]))
        placed.append((i, len(members[i]), p))
    out = np.zeros((len(members), *shape), np.uint16)
    for i, label, p in placed:
        out[i][p.box][p.source] = label
    return out


def sam2_proposals(image: np.ndarray, spacing, models: Sam2Models, settings: Sam2Settings | None = None) -> np.ndarray:
    """Proposals for one (Z, Y, X) image -> uint16 (L, *S_w) on the working grid (``settings.working_spacing_mm``).

    Memory stays bounded: masks are kept as bounding-box crops, filtered (size, compactness, background) as soon as
    they are propagated, and de-duplicated incrementally against the kept ones (IoU ≥ ``filters.dedupe_iou``,
    bounding-box pre-filter), so duplicates from neighbouring seeds never accumulate."""
    s = settings or Sam2Settings()
    axis = slicing_axis(spacing)  # from the raw grid: the acquisition's finest in-plane resolution
    image, spacing = to_working_grid(np.nan_to_num(np.asarray(image, np.float32)), spacing, s.working_spacing_mm)
    foreground = foreground_mask(image)
    if foreground.sum() < 10:
        return np.zeros((0, *image.shape), np.uint16)
    frames = to_frames(image, axis, foreground)
    voxel_mm3, fg_volume = float(np.prod(spacing)), int(np.count_nonzero(foreground))
    dedup = Deduplicator(s.filters.dedupe_iou)
    with tempfile.TemporaryDirectory(prefix="mass_sam2_") as frame_dir:
        for i, frame in enumerate(frames):  # the video predictor reads a folder of JPEG frames
            Image.fromarray(rgb(frame)).save(Path(frame_dir) / f"{i:05d}.jpg", quality=95)
        state = models.video_predictor.init_state(video_path=frame_dir)  # frames loaded once, reset per seed
        for seed in seed_slices(foreground, axis, float(spacing[axis]), s.seed_every_mm, s.min_seeds):
            found = models.mask_generator.generate(rgb(frames[seed]))
            found = sorted(found, key=lambda m: -float(m.get("predicted_iou", 0)))[: s.max_masks_per_slice]
            masks = [np.asarray(m["segmentation"], bool) for m in found if np.asarray(m["segmentation"]).any()]
            if not masks:
                continue
            for p in propagate(models, state, seed, masks, axis):
                inside = int(np.count_nonzero(foreground[p.box][p.source]))
                if passes(p.size, inside, p.source.size, fg_volume, voxel_mm3, s.filters):
                    dedup.add(p)
        del state
    return pack_proposals(dedup.kept, image.shape)
