"""Peak memory and time of a proposal backend on one real-size volume (no dataset or plans needed).

    python benchmarks/proposals_memory.py --backend sam2 [--image FILE.nii.gz] [--shape 200 512 512
        --spacing 2.5 0.8 0.8] [--sam2-spacing 1.5] [--max-masks 70]
    python benchmarks/proposals_memory.py --backend supervoxel --shape 300 512 512 --spacing 1.0 0.8 0.8
        [--working-spacing 2.0]

``supervoxel`` runs the real backend. For ``sam2``:
No SAM / SAM 2 weights are reachable here (../shared/README.md), so the models are stand-ins with the real call
sequence and output sizes: the mask generator returns connected components of each frame at several intensity
levels (nested, overlapping, multi-granular masks, at most ``--max-masks`` per seed slice, as SAM's generator
does), and the video predictor tracks each mask to the neighbouring frames by intensity and overlap and yields
full-frame float32 logits for every object on every frame, as ``SAM2VideoPredictor.propagate_in_video`` does.
What is measured is therefore everything around SAM 2 (resampling to the working grid, frames, seeds, mask
crops, filtering, de-duplication, packing), not SAM 2's own compute or memory (its frame tensors are
1024² × 3 float32 per frame on the device, 12 MiB each).

Without ``--image`` a synthetic CT-like volume is made: a body ellipsoid with 40 random organ-like ellipsoids
(seeded). Prints peak RSS (VmHWM after reset, Linux), seconds, masks propagated / kept, layers.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from PIL import Image
from scipy import ndimage

from mass_nnu.proposals.resample import working_grid
from mass_nnu.proposals.sam2_backend import Sam2Models, Sam2Settings, sam2_proposals
from mass_nnu.proposals.store import count_proposals
from mass_nnu.proposals.supervoxel import SupervoxelSettings, supervoxel_proposals


def synthetic_ct(shape, spacing, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = np.full(shape, -1000, np.float32)
    extent = np.multiply(shape, spacing)
    centre = extent / 2
    _ellipsoid(image, centre, extent * np.array([0.45, 0.35, 0.42]), spacing, 40.0)
    for _ in range(40):
        c = centre + (rng.random(3) - 0.5) * extent * np.array([0.6, 0.4, 0.5])
        _ellipsoid(image, c, rng.uniform(12, 50, 3), spacing, float(rng.uniform(80, 600)))
    image += rng.normal(0, 10, shape).astype(np.float32)
    return image


def _ellipsoid(image, centre_mm, radii_mm, spacing, value) -> None:
    lo = np.maximum(((centre_mm - radii_mm) / spacing).astype(int), 0)
    hi = np.minimum(((centre_mm + radii_mm) / spacing).astype(int) + 1, image.shape)
    grids = np.ogrid[tuple(slice(a, b) for a, b in zip(lo, hi))]
    r = sum(((g + 0.5) * s - c) ** 2 / rr ** 2 for g, s, c, rr in zip(grids, spacing, centre_mm, radii_mm))
    image[tuple(slice(a, b) for a, b in zip(lo, hi))][r <= 1] = value


class LevelMaskGenerator:
    """Stands in for SAM2AutomaticMaskGenerator: components of the frame above several intensity levels."""

    def __init__(self, levels=(100, 140, 180, 220)):
        self.levels = levels

    def generate(self, rgb):
        grey = rgb[..., 0]
        out = []
        for level in self.levels:
            labels, _ = ndimage.label(grey >= level)
            sizes = np.bincount(labels.ravel())
            for i in np.flatnonzero(sizes[1:] >= 30) + 1:
                out.append({"segmentation": labels == i, "predicted_iou": 0.5 + 0.5 * level / 255})
        return out


class TrackingVideoPredictor:
    """Stands in for SAM2VideoPredictor: each object grows / shrinks by one pixel per frame within the pixels at
    least as bright as its seed mask's darkest pixel; full-frame logits for every object on every frame."""

    added = 0  # masks given to the predictor (all seeds)

    def init_state(self, video_path):
        frames = np.stack([np.asarray(Image.open(p))[..., 0] for p in sorted(Path(video_path).glob("*.jpg"))])
        return {"frames": frames, "masks": {}}

    def add_new_mask(self, state, frame_idx, obj_id, mask):
        self.added += 1
        state["masks"][obj_id] = (mask, int(state["frames"][frame_idx][mask].min()))

    def propagate_in_video(self, state, start_frame_idx, reverse=False):
        frames = state["frames"]
        ids = sorted(state["masks"])
        current = {k: state["masks"][k][0] for k in ids}
        order = range(start_frame_idx, -1, -1) if reverse else range(start_frame_idx, len(frames))
        for f in order:
            logits = np.full((len(ids), 1, *frames.shape[1:]), -1.0, np.float32)
            for j, k in enumerate(ids):
                m = current[k]
                if f != start_frame_idx and m.any():
                    m = ndimage.binary_dilation(m) & (frames[f] >= state["masks"][k][1])
                    current[k] = m
                logits[j, 0][m] = 1.0
            yield f, ids, logits

    def reset_state(self, state):
        state["masks"] = {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=("sam2", "supervoxel"), default="sam2")
    parser.add_argument("--working-spacing", type=float, default=2.0, help="supervoxel working grid (mm); 0 = raw")
    parser.add_argument("--image", help="a NIfTI volume (default: synthetic)")
    parser.add_argument("--shape", type=int, nargs=3, default=(200, 512, 512))
    parser.add_argument("--spacing", type=float, nargs=3, default=(2.5, 0.8, 0.8))
    parser.add_argument("--sam2-spacing", type=float, default=1.5)
    parser.add_argument("--max-masks", type=int, default=70)
    parser.add_argument("--levels", type=int, default=4, help="stand-in generator: intensity levels per slice "
                        "(more levels: more nested masks per seed, up to --max-masks)")
    args = parser.parse_args()

    if args.image:
        itk = sitk.ReadImage(args.image)
        image, spacing = sitk.GetArrayFromImage(itk).astype(np.float32), itk.GetSpacing()[::-1]
    else:
        image, spacing = synthetic_ct(tuple(args.shape), np.asarray(args.spacing)), tuple(args.spacing)
    if args.backend == "sam2":
        settings = Sam2Settings(working_spacing_mm=args.sam2_spacing or None, max_masks_per_slice=args.max_masks)
    else:
        settings = SupervoxelSettings(working_spacing_mm=args.working_spacing or None)
    grid = working_grid(image.shape, spacing, settings.working_spacing_mm)[0]
    print(f"image {'×'.join(map(str, image.shape))} at {tuple(round(s, 3) for s in spacing)} mm "
          f"({image.nbytes / 2**20:.0f} MiB float32), working grid {'×'.join(map(str, grid))}")
    base = rss_mib()
    reset_peak()
    t0 = time.perf_counter()
    predictor = TrackingVideoPredictor()
    if args.backend == "sam2":
        generator = LevelMaskGenerator(tuple(np.linspace(100, 220, args.levels)))
        layers = sam2_proposals(image, spacing, Sam2Models(generator, predictor), settings)
    else:
        layers = supervoxel_proposals(image, spacing, settings)
    seconds = time.perf_counter() - t0
    print(f"{args.backend}: seconds {seconds:.1f}; peak RSS {peak_mib():.0f} MiB (before the call: {base:.0f} MiB, "
          f"input included); " + (f"masks propagated {predictor.added}, " if args.backend == "sam2" else "") +
          f"proposals kept (filtered, de-duplicated) {count_proposals(layers)} in "
          f"{layers.shape[0]} layers ({layers.nbytes / 2**20:.0f} MiB)")


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _status(key: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key)) / 1024


def rss_mib() -> float:
    return _status("VmRSS")


def peak_mib() -> float:
    return _status("VmHWM")


if __name__ == "__main__":
    main()
