"""batchgeneratorsv2 transforms for the two MASS views. The same sampled parameters apply to the image and to
all masks of a view (masks travel as the 'segmentation' channels)."""
from __future__ import annotations

import numpy as np
import torch
from batchgeneratorsv2.helpers.scalar_type import RandomScalar  # noqa: F401
from batchgeneratorsv2.transforms.intensity.brightness import MultiplicativeBrightnessTransform
from batchgeneratorsv2.transforms.intensity.contrast import BGContrast, ContrastTransform
from batchgeneratorsv2.transforms.intensity.gamma import GammaTransform
from batchgeneratorsv2.transforms.intensity.gaussian_noise import GaussianNoiseTransform
from batchgeneratorsv2.transforms.noise.gaussian_blur import GaussianBlurTransform
from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from batchgeneratorsv2.transforms.utils.random import RandomTransform


def view_transforms(patch_size, strong: bool):
    """Reference view = weak (affine p 0.5, mild intensity); query view = strong (affine p 0.8 with stronger
    brightness, gamma, contrast, blur and noise). Rotation ±30°, scaling ±30 % (the paper's settings)."""
    p_affine = 0.8 if strong else 0.5
    angle = np.deg2rad(30)
    transforms = [SpatialTransform(
        tuple(int(p) for p in patch_size), patch_center_dist_from_border=0, random_crop=False, p_elastic_deform=0,
        p_rotation=p_affine, rotation=(-angle, angle), p_scaling=p_affine, scaling=(0.7, 1.3),
        p_synchronize_scaling_across_axes=1, mode_seg="nearest", border_mode_seg="zeros")]
    s = 1.0 if strong else 0.5  # intensity strength
    transforms += [
        RandomTransform(MultiplicativeBrightnessTransform(BGContrast((1 - 0.25 * s, 1 + 0.25 * s)),
                                                          synchronize_channels=False, p_per_channel=1),
                        apply_probability=0.3 * s + 0.1),
        RandomTransform(ContrastTransform(BGContrast((1 - 0.25 * s, 1 + 0.25 * s)), preserve_range=True,
                                          synchronize_channels=False, p_per_channel=1),
                        apply_probability=0.3 * s + 0.1),
        RandomTransform(GammaTransform(BGContrast((1 - 0.3 * s, 1 + 0.5 * s)), p_invert_image=0,
                                       synchronize_channels=False, p_per_channel=1, p_retain_stats=1),
                        apply_probability=0.3 * s),
    ]
    if strong:
        transforms += [
            RandomTransform(GaussianBlurTransform(blur_sigma=(0.5, 1.0), synchronize_channels=False,
                                                  synchronize_axes=False, p_per_channel=0.5),
                            apply_probability=0.2),
            RandomTransform(GaussianNoiseTransform(noise_variance=(0, 0.1), p_per_channel=1,
                                                   synchronize_channels=True),
                            apply_probability=0.2),
        ]
    return ComposeTransforms(transforms)


def pack_masks(masks: np.ndarray) -> np.ndarray:
    """(K, *S) bool/0-1 masks -> (ceil(K/8), *S) int16 channels holding 8 masks each as bits (mask i: bit i % 8 of
    channel i // 8; like ``np.packbits(axis=0, bitorder='little')``, but one pass per mask instead of a strided one)."""
    masks = np.asarray(masks)
    out = np.zeros(((len(masks) + 7) // 8, *masks.shape[1:]), np.uint8)
    bit = np.empty(masks.shape[1:], np.uint8)
    for i, mask in enumerate(masks):
        np.left_shift(mask.view(np.uint8) if mask.dtype == bool else mask.astype(np.uint8, copy=False), i % 8, out=bit)
        np.bitwise_or(out[i // 8], bit, out=out[i // 8])
    return out.astype(np.int16)


def apply_view(transform, image: np.ndarray, masks: np.ndarray, seed: int):
    """image (C, *S) float, masks (K, *S) uint8/bool -> torch tensors (C, *P) float32 and (ceil(K/8), *P) uint8, the
    K masks still packed as bits (``pack_masks``; ``sampling.unpack_task_masks`` undoes it), with one spatial draw
    for both.
    The masks travel through the transform packed, 8 per segmentation channel: the segmentation is resampled
    nearest-neighbour, which moves every bit pattern unchanged (values ≤ 255 are exact in float32), so the result
    equals resampling each mask on its own at an eighth of the channels (13 masks: 2 channels instead of 13; the
    spatial transform was 85 % of a 128³ sample's augmentation). They stay packed until the device: an eighth of
    bool's bytes in workers, pinned memory and transfers, and no unpacking on the CPU.
    batchgeneratorsv2 draws from numpy's and torch's global generators: ``seed`` drives them here and their
    previous states come back afterwards, so a sample depends on its seed only (exact resume, any -np)."""
    numpy_state = np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            np.random.seed(seed)
            torch.manual_seed(seed)
            out = transform(image=torch.from_numpy(np.ascontiguousarray(image)),
                            segmentation=torch.from_numpy(pack_masks(masks)))
    finally:
        np.random.set_state(numpy_state)
    return out["image"].float(), out["segmentation"].to(torch.uint8)
