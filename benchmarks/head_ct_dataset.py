"""A raw nnU-Net dataset from the real head CT in Debian's ``invesalius-examples`` (for P4 timing and memory).

    apt-get download invesalius-examples && dpkg-deb -x invesalius-examples_*.deb /tmp/inv
    python benchmarks/head_ct_dataset.py --inv3 /tmp/inv/usr/share/doc/invesalius-examples/examples/Cranium.inv3 \
        -d 901 [--mirror [--mirror-spacing 1.0 0.7 0.7]] [--zoom 2]

``Cranium.inv3`` is a gzip tar; its ``matrix.dat`` is raw int16 (108, 256, 256) in (z, y, x) order at
0.957 × 0.957 × 1.5 mm (x, y, z), HU −1024…2986 (../shared/README.md). Case ``headct_000`` is the volume as is;
``--mirror`` adds ``headct_001``, mirrored left-right; with ``--mirror-spacing Z Y X`` (mm) that copy is resampled
(linear) to another grid, as from a second scanner, so that nnU-Net's plans (the median spacing) resample both
cases, as in most real CT collections. ``--zoom F`` writes the volume upsampled F× per axis
(linear), e.g. F = 2 gives a 216 × 512 × 512 clinical-size grid at 0.48 × 0.48 × 0.75 mm for the memory check.
No labels: ``mass plan`` writes Otsu foreground masks for nnU-Net's fingerprint.
"""
from __future__ import annotations

import argparse
import os
import tarfile

import numpy as np
from scipy import ndimage

SHAPE = (108, 256, 256)
SPACING_ZYX = (1.5, 0.95703125, 0.95703125)


def read_inv3(path: str) -> np.ndarray:
    with tarfile.open(path, "r:gz") as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith("matrix.dat"))
        return np.frombuffer(tar.extractfile(member).read(), np.int16).reshape(SHAPE)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inv3", required=True)
    parser.add_argument("-d", type=int, default=901)
    parser.add_argument("--name", default="HeadCT")
    parser.add_argument("--mirror", action="store_true")
    parser.add_argument("--mirror-spacing", type=float, nargs=3, default=None, metavar=("Z", "Y", "X"))
    parser.add_argument("--zoom", type=float, default=1.0)
    args = parser.parse_args()

    from mass_nnu.demo_data.writer import new_dataset, write_dataset_json, write_image
    from mass_nnu.workspace import configure_environment

    configure_environment()
    volume = read_inv3(args.inv3).astype(np.float32)
    spacing = SPACING_ZYX
    if args.zoom != 1:
        volume = ndimage.zoom(volume, args.zoom, order=1)
        spacing = tuple(s * SHAPE[i] / volume.shape[i] for i, s in enumerate(SPACING_ZYX))
    cases = [(volume, spacing)]
    if args.mirror:
        mirror, mirror_spacing = volume[..., ::-1], spacing
        if args.mirror_spacing:
            mirror = ndimage.zoom(mirror, [s / t for s, t in zip(spacing, args.mirror_spacing)], order=1)
            mirror_spacing = tuple(s * n / m for s, n, m in zip(spacing, volume.shape, mirror.shape))
        cases.append((mirror, mirror_spacing))
    with new_dataset(args.d, args.name) as folder:
        for i, (array, grid) in enumerate(cases):
            write_image(array, grid, folder / "imagesTr" / f"headct_{i:03d}_0000.nii.gz", dtype=np.int16)
        write_dataset_json(folder, "CT", {"background": 0, "foreground": 1}, len(cases),
                           "real head CT from Debian's invesalius-examples (Cranium.inv3)", args.name)
    for i, (array, grid) in enumerate(cases):
        print(f"{os.environ['nnUNet_raw']}/Dataset{args.d:03d}_{args.name}: headct_{i:03d} shape {array.shape}, "
              f"spacing {tuple(round(s, 3) for s in grid)} mm")


if __name__ == "__main__":
    main()
