"""A second labelled MNI demo set with real anatomical labels: the HarvardOxford cortical and JHU white-matter
atlases from Debian's ``mricron-data`` package, grouped into lobes and tracts, resampled onto nilearn's MNI152 2009c
template by world coordinates, under much larger variation than the pretraining cohort, in T1 or a T2-like contrast.

Only two files of that package are read (ATLAS_FILES); nothing else from it is used or kept in the cache.
Without the package, the dataset falls back to the tissue labels of Dataset502 (same warps and contrasts).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

import nibabel
import numpy as np
import SimpleITK as sitk

from mass_nnu.demo_data import mni
from mass_nnu.demo_data.writer import dataset_folder, new_dataset, write_dataset_json, write_image
from mass_nnu.errors import MassError

PACKAGE = "mricron-data"
TEMPLATES_DIR = Path("usr/share/mricron/templates")  # inside the package
ATLAS_FILES = {"cortex": "HarvardOxford-cort-maxprob-thr0-1mm.nii.gz", "tracts": "JHU-WhiteMatter-labels-1mm.nii.gz"}
TRACT_NAMES_FILE = "JHU-WhiteMatter-labels-1mm.nii.txt"  # "value<TAB>name" lines
# HarvardOxford cortical regions in the order of FSL's HarvardOxford-Cortical.xml: image value = position + 1
# (mricron-data ships no names file for this atlas)
CORTEX_NAMES = (
    "Frontal Pole", "Insular Cortex", "Superior Frontal Gyrus", "Middle Frontal Gyrus",
    "Inferior Frontal Gyrus, pars triangularis", "Inferior Frontal Gyrus, pars opercularis", "Precentral Gyrus",
    "Temporal Pole", "Superior Temporal Gyrus, anterior division", "Superior Temporal Gyrus, posterior division",
    "Middle Temporal Gyrus, anterior division", "Middle Temporal Gyrus, posterior division",
    "Middle Temporal Gyrus, temporooccipital part", "Inferior Temporal Gyrus, anterior division",
    "Inferior Temporal Gyrus, posterior division", "Inferior Temporal Gyrus, temporooccipital part",
    "Postcentral Gyrus", "Superior Parietal Lobule", "Supramarginal Gyrus, anterior division",
    "Supramarginal Gyrus, posterior division", "Angular Gyrus", "Lateral Occipital Cortex, superior division",
    "Lateral Occipital Cortex, inferior division", "Intracalcarine Cortex", "Frontal Medial Cortex",
    "Juxtapositional Lobule Cortex", "Subcallosal Cortex", "Paracingulate Gyrus",
    "Cingulate Gyrus, anterior division", "Cingulate Gyrus, posterior division", "Precuneous Cortex",
    "Cuneal Cortex", "Frontal Orbital Cortex", "Parahippocampal Gyrus, anterior division",
    "Parahippocampal Gyrus, posterior division", "Lingual Gyrus", "Temporal Fusiform Cortex, anterior division",
    "Temporal Fusiform Cortex, posterior division", "Temporal Occipital Fusiform Cortex", "Occipital Fusiform Gyrus",
    "Frontal Operculum Cortex", "Central Opercular Cortex", "Parietal Operculum Cortex", "Planum Polare",
    "Heschl's Gyrus", "Planum Temporale", "Supracalcarine Cortex", "Occipital Pole",
)
# label groups: cortical groups (labelled where the warped template is grey matter) by HarvardOxford names,
# tract groups (labelled where it is white matter) by JHU names; left and right together (the atlases are
# symmetric groups, so no left-right convention of the files matters)
CORTEX_GROUPS = {
    "frontal": ("Frontal Pole", "Superior Frontal Gyrus", "Middle Frontal Gyrus",
                "Inferior Frontal Gyrus, pars triangularis", "Inferior Frontal Gyrus, pars opercularis",
                "Precentral Gyrus", "Frontal Medial Cortex", "Juxtapositional Lobule Cortex", "Frontal Orbital Cortex"),
    "temporal": ("Temporal Pole", "Superior Temporal Gyrus, anterior division",
                 "Superior Temporal Gyrus, posterior division", "Middle Temporal Gyrus, anterior division",
                 "Middle Temporal Gyrus, posterior division", "Middle Temporal Gyrus, temporooccipital part",
                 "Inferior Temporal Gyrus, anterior division", "Inferior Temporal Gyrus, posterior division",
                 "Inferior Temporal Gyrus, temporooccipital part", "Parahippocampal Gyrus, anterior division",
                 "Parahippocampal Gyrus, posterior division", "Temporal Fusiform Cortex, anterior division",
                 "Temporal Fusiform Cortex, posterior division", "Planum Polare", "Heschl's Gyrus",
                 "Planum Temporale"),
    "parietal": ("Postcentral Gyrus", "Superior Parietal Lobule", "Supramarginal Gyrus, anterior division",
                 "Supramarginal Gyrus, posterior division", "Angular Gyrus", "Precuneous Cortex"),
    "occipital": ("Lateral Occipital Cortex, superior division", "Lateral Occipital Cortex, inferior division",
                  "Intracalcarine Cortex", "Cuneal Cortex", "Lingual Gyrus", "Temporal Occipital Fusiform Cortex",
                  "Occipital Fusiform Gyrus", "Supracalcarine Cortex", "Occipital Pole"),
    "cingulate": ("Subcallosal Cortex", "Paracingulate Gyrus", "Cingulate Gyrus, anterior division",
                  "Cingulate Gyrus, posterior division"),
    "insula_operculum": ("Insular Cortex", "Frontal Operculum Cortex", "Central Opercular Cortex",
                         "Parietal Operculum Cortex"),
}
TRACT_GROUPS = {
    "corpus_callosum": ("Genu_of_corpus_callosum", "Body_of_corpus_callosum", "Splenium_of_corpus_callosum"),
    "internal_capsule": tuple(f"{part}_of_internal_capsule_{side}" for part in
                              ("Anterior_limb", "Posterior_limb", "Retrolenticular_part") for side in "RL"),
}
ATLAS_LABELS = {"background": 0, **{name: i + 1 for i, name in enumerate([*CORTEX_GROUPS, *TRACT_GROUPS])}}
GROUP_CHANNELS = tuple(f"atlas_{name}" for name in [*CORTEX_GROUPS, *TRACT_GROUPS])
CHANNEL_NAME = "MRI"  # one channel, T1 or T2-like per case (dataset.json "contrast")

ATLAS_ID, ATLAS_NAME = 503, "MNIAtlasSeg"
ATLAS_SEED_OFFSET = 104_729  # base seed = seed + this (501 uses seed, 502 seed + 7919)
ATLAS_WARP = mni.Warp(rotation_deg=12.0, scale=(0.85, 1.15), per_axis_scale=True, shift_mm=6.0, mesh_cells=3,
                      bspline_mm=7.0, ventricle_growth=0.4, grid_pad_mm=15.0)


def default_cache() -> Path:
    """Where the atlas files are unpacked: $MASS_CACHE/mricron-data, else ~/.cache/mass-nnu/mricron-data."""
    return Path(os.environ.get("MASS_CACHE") or Path.home() / ".cache" / "mass-nnu").expanduser() / PACKAGE


def atlas_folder(folder: Path) -> Path:
    """The folder holding ATLAS_FILES: ``folder`` itself or its usr/share/mricron/templates; else a MassError."""
    for candidate in (folder, folder / TEMPLATES_DIR):
        if all((candidate / name).is_file() for name in (*ATLAS_FILES.values(), TRACT_NAMES_FILE)):
            return candidate
    raise MassError(f"{folder / TEMPLATES_DIR}: no {ATLAS_FILES['cortex']} with the JHU atlas and its names")


def fetch_atlases(source: str | Path | None = None, cache: Path | None = None) -> Path:
    """The atlas folder, unpacking the package into ``cache`` (default_cache()) first if needed.
    ``source``: an unpacked folder (used in place), a downloaded .deb, or None (the cache, else
    `apt-get download mricron-data`). Only ATLAS_FILES and the JHU names are kept. MassError if impossible."""
    cache = Path(cache) if cache else default_cache()
    if source is not None and Path(source).is_dir():
        return atlas_folder(Path(source))
    if source is None:
        try:
            return atlas_folder(cache)
        except MassError:
            pass  # not (completely) cached: download
    cache.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache.parent, prefix=f".{PACKAGE}.") as tmp:
        deb = Path(source) if source is not None else _apt_download(Path(tmp))
        if not deb.is_file():
            raise MassError(f"{deb}: no such .deb file")
        unpacked = Path(tmp) / "unpacked"
        _run(["dpkg-deb", "-x", str(deb), str(unpacked)], what=f"dpkg-deb -x {deb}")
        kept = Path(tmp) / "kept" / TEMPLATES_DIR
        kept.mkdir(parents=True)
        for name in (*ATLAS_FILES.values(), TRACT_NAMES_FILE):
            if not (unpacked / TEMPLATES_DIR / name).is_file():
                raise MassError(f"{deb}: holds no {TEMPLATES_DIR / name}")
            shutil.copy2(unpacked / TEMPLATES_DIR / name, kept / name)
        shutil.rmtree(cache, ignore_errors=True)
        (Path(tmp) / "kept").rename(cache)
    return atlas_folder(cache)


def _apt_download(folder: Path) -> Path:
    _run(["apt-get", "download", PACKAGE], what=f"apt-get download {PACKAGE}", cwd=folder)
    debs = sorted(folder.glob(f"{PACKAGE}_*.deb"))
    if not debs:
        raise MassError(f"{folder}: apt-get download {PACKAGE} left no .deb")
    return debs[0]


def _run(command: list[str], what: str, cwd: Path | None = None) -> None:
    try:
        done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600, check=False)
    except FileNotFoundError:
        raise MassError(f"{command[0]}: not found (a Debian-based system is needed for {what})") from None
    except subprocess.TimeoutExpired:
        raise MassError(f"{what}: timed out after 600 s") from None
    if done.returncode:
        lines = (done.stderr or done.stdout).strip().splitlines() or ["no output"]
        raise MassError(f"{what}: failed ({lines[-1].strip()})")


def find_atlases(source: str | Path | None = None, fetch: bool = False,
                 cache: Path | None = None) -> tuple[Path | None, str | None]:
    """(atlas folder, None), or (None, one line saying why not and what the dataset falls back to). Without
    ``source`` and ``fetch``, only an existing cache is used (no download)."""
    cache = Path(cache) if cache else default_cache()
    try:
        if source is None and not fetch:
            try:
                return atlas_folder(cache), None
            except MassError:
                raise MassError(f"{cache}: no {PACKAGE} atlases cached (run `mass demo-data --fetch-atlases` "
                                f"or pass --atlas-deb FILE.deb)") from None
        return fetch_atlases(source, cache), None
    except MassError as error:
        return None, f"atlas labels unavailable: {error}; {ATLAS_NAME} gets the tissue labels of Dataset502 instead"


def read_label_image(path: Path):
    """A label NIfTI as a SimpleITK image placed by its sform (FSL's; both mricron-data atlases carry a qform that
    disagrees with it, the HarvardOxford one by 126 mm, and SimpleITK's reader would pick it), in ITK's LPS frame."""
    try:
        nifti = nibabel.load(str(path))
        affine, code = nifti.get_sform(coded=True)
        ras = affine if code else nifti.get_qform()
        data = np.asarray(nifti.dataobj)
    except (nibabel.filebasedimages.ImageFileError, OSError, ValueError, EOFError) as error:
        raise MassError(f"{path}: unreadable NIfTI ({error})") from None
    lps = np.diag([-1.0, -1.0, 1.0]) @ ras[:3]
    spacing = np.linalg.norm(lps[:, :3], axis=0)
    image = sitk.GetImageFromArray(np.ascontiguousarray(data.astype(np.uint8).transpose(2, 1, 0)))
    image.SetSpacing(spacing.tolist())
    image.SetOrigin(lps[:, 3].tolist())
    image.SetDirection((lps[:, :3] / spacing).ravel().tolist())
    return image


def _name_values(folder: Path) -> dict[str, dict[str, int]]:
    """Region name -> image value, per atlas."""
    tracts = {}
    for line in (folder / TRACT_NAMES_FILE).read_text().splitlines():
        value, _, name = line.strip().partition("\t")
        if value.isdigit():
            tracts[name.strip()] = int(value)
    return {"cortex": {name: i + 1 for i, name in enumerate(CORTEX_NAMES)}, "tracts": tracts}


def group_maps(folder: Path, reference) -> dict:
    """One 0/1 float32 image per label group (GROUP_CHANNELS), on ``reference``'s grid: each atlas resampled
    by world coordinates (nearest neighbour, identity transform between both images' physical spaces)."""
    values = _name_values(folder)
    maps = {}
    for atlas, groups in (("cortex", CORTEX_GROUPS), ("tracts", TRACT_GROUPS)):
        path = folder / ATLAS_FILES[atlas]
        resampled = sitk.GetArrayFromImage(sitk.Resample(read_label_image(path), reference, sitk.Transform(),
                                                         sitk.sitkNearestNeighbor, 0))
        for group, names in groups.items():
            missing = [n for n in names if n not in values[atlas]]
            if missing:
                raise MassError(f"{folder / TRACT_NAMES_FILE}: no region named {missing[0]!r}")
            region = np.isin(resampled, [values[atlas][n] for n in names])
            if not region.any():
                raise MassError(f"{path}: group {group} is empty on the MNI152 template grid")
            maps[f"atlas_{group}"] = sitk.GetImageFromArray(region.astype(np.float32))
            maps[f"atlas_{group}"].CopyInformation(reference)
    return maps


@lru_cache(maxsize=2)
def _atlas_stack(small: bool, folder: str):
    """Template CHANNELS plus GROUP_CHANNELS as one stack (cached, like mni._template_stack)."""
    template = mni.load_template()
    return mni.channel_stack({**{k: template[k] for k in mni.CHANNELS},
                              **group_maps(Path(folder), template["t1"])}, small)


def atlas_labels(channels: dict) -> np.ndarray:
    """Cortical groups where the warped template is grey matter, tract groups where it is white matter: the
    argmax of the warped group maps against 'none' (1 - their sum); everything else background."""
    tissue = mni.tissue_classes(channels)
    label = np.zeros(tissue.shape, np.uint8)
    for tissue_class, groups in ((2, CORTEX_GROUPS), (1, TRACT_GROUPS)):
        maps = np.stack([channels[f"atlas_{g}"] for g in groups])
        best = np.argmax(np.concatenate([1 - maps.sum(0, keepdims=True), maps]), axis=0)
        for i, group in enumerate(groups):
            label[(tissue == tissue_class) & (best == i + 1)] = ATLAS_LABELS[group]
    return label


def make_atlas_subject(seed: int, small: bool, t2: bool, atlas: Path | None):
    """One subject of the atlas set under ATLAS_WARP: (image, label, brain mask, grid), like mni.make_subject;
    labels are ATLAS_LABELS, or mni.LABELS when ``atlas`` is None."""
    if atlas is None:
        return mni.make_subject(seed=seed, small=small, warp=ATLAS_WARP, t2=t2)
    rng = np.random.default_rng(seed)
    channels, grid = mni.warp_template(_atlas_stack(small, str(atlas)), mni.CHANNELS + GROUP_CHANNELS, rng, small,
                                       ATLAS_WARP)
    image = mni.mr_image(mni.t2_like(channels) if t2 else channels["t1"], rng)
    return image, atlas_labels(channels), (channels["brain"] > 0.5).astype(np.uint8), grid


def write_atlas_dataset(dataset_id: int = ATLAS_ID, num_train: int = 10, num_test: int = 5, small: bool = False,
                        seed: int = 0, force: bool = False, atlas: Path | None = None) -> Path:
    """Write Dataset<dataset_id>_MNIAtlasSeg (imagesTr/labelsTr, imagesTs/labelsTs): subject k uses the seed
    mni.subject_seed(seed + ATLAS_SEED_OFFSET, k) and is T2-like when k is odd, T1 otherwise (dataset.json
    "contrast" lists each case). With ``atlas`` None the labels are Dataset502's tissue labels."""
    contrasts, k = {}, 0
    with new_dataset(dataset_id, ATLAS_NAME, force) as folder:
        for split, count in (("Tr", num_train), ("Ts", num_test)):
            for i in range(count):
                t2 = k % 2 == 1
                image, label, _, grid = make_atlas_subject(seed=mni.subject_seed(seed + ATLAS_SEED_OFFSET, k),
                                                           small=small, t2=t2, atlas=atlas)
                k += 1
                case = f"{ATLAS_NAME.lower()}_{split.lower()}{i:03d}"
                contrasts[case] = "T2" if t2 else "T1"
                geometry = dict(spacing_zyx=grid.GetSpacing()[::-1], origin_xyz=grid.GetOrigin(),
                                direction=grid.GetDirection())
                write_image(image, path=folder / f"images{split}" / f"{case}_0000.nii.gz", **geometry)
                write_image(label, dtype=np.uint8, path=folder / f"labels{split}" / f"{case}.nii.gz", **geometry)
        source = (f"HarvardOxford cortical and JHU white-matter atlases ({PACKAGE}), grouped"
                  if atlas is not None else f"fallback without {PACKAGE}: the tissue labels of Dataset502")
        description = (f"MNI152 2009c template (nilearn) under large deformations (per-axis scale, coarse strong "
                       f"B-spline, ventricle enlargement), T1 or T2-like per case (see 'contrast'); labels: {source}")
        write_dataset_json(folder, CHANNEL_NAME, ATLAS_LABELS if atlas is not None else mni.LABELS, num_train,
                           name=ATLAS_NAME, description=description, extra={"contrast": contrasts})
    return dataset_folder(dataset_id, ATLAS_NAME)
