"""A 1-case nnU-Net raw dataset from the real head CT of Debian's ``invesalius-examples`` (for real-size checks).

    apt-get download invesalius-examples && dpkg-deb -x invesalius-examples_*.deb deb
    python benchmarks/head_ct_dataset.py deb/usr/share/doc/invesalius-examples/examples/Cranium.inv3 [-d 720]

``Cranium.inv3`` is a gzip tar; its ``main.plist`` gives ``matrix.dat`` (raw int16, shape (z, y, x)) and the
spacing (x, y, z). The case is written as int16 HU with that spacing; its label file is the body mask
(HU > -500), because nnU-Net's fingerprinting needs one (pretraining never reads it).
"""
from __future__ import annotations

import argparse
import plistlib
import tarfile


def read_inv3(path: str):
    import numpy as np

    with tarfile.open(path, "r:gz") as tar:
        members = {m.name.rsplit("/", 1)[-1]: m for m in tar.getmembers() if m.isfile()}
        meta = plistlib.loads(tar.extractfile(members["main.plist"]).read())
        matrix = meta["matrix"]
        raw = tar.extractfile(members[matrix["filename"]]).read()
    array = np.frombuffer(raw, dtype=matrix["dtype"]).reshape(matrix["shape"])
    return array, tuple(float(s) for s in meta["spacing"]), meta.get("modality", "CT")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inv3", help="Cranium.inv3")
    parser.add_argument("-d", type=int, default=720, help="dataset ID (name HeadCT)")
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args()

    import numpy as np

    from mass_nnu.demo_data.writer import dataset_summary, new_dataset, write_dataset_json, write_image
    from mass_nnu.workspace import configure_environment

    configure_environment(quiet=True)
    image, spacing_xyz, modality = read_inv3(args.inv3)
    with new_dataset(args.d, "HeadCT", args.force) as folder:
        write_image(image, spacing_xyz[::-1], folder / "imagesTr" / "headct_000_0000.nii.gz", dtype=np.int16)
        write_image((image > -500).astype(np.uint8), spacing_xyz[::-1], folder / "labelsTr" / "headct_000.nii.gz",
                    dtype=np.uint8)
        write_dataset_json(folder, modality, {"background": 0, "foreground": 1}, 1, name="HeadCT",
                           description="Cranium.inv3 of Debian's invesalius-examples (a real head CT); labelsTr "
                                       "holds only the body mask, because nnU-Net's fingerprinting needs labels")
    print(dataset_summary(folder.parent / f"Dataset{args.d:03d}_HeadCT"))


if __name__ == "__main__":
    main()
