"""Proposal storage, read by crop: per case a ``<case>.b2nd`` (blosc2 NDArray) and its table ``<case>.json``.

``<case>.b2nd`` holds uint16 (L, Z, Y, X) on one voxel grid (the raw image's in ``proposalsTr``, nnU-Net's
preprocessed one in ``<data_identifier>_proposals``): each layer an instance label map (0 = none). Masks in one
layer never overlap; masks of different layers (scales, methods) may. A proposal is (layer, label value). Chunks
hold one layer and about one patch (``chunk_shapes``, the idea of nnU-Net's ``comp_blosc2_params``), so a crop of
a few layers decompresses only the blocks it touches.

``<case>.json`` holds the table (one row per proposal: layer, label, voxels, bounding box [low, high) in array
order), the geometry (shape, spacing, origin, direction, to refuse proposals made for another image), the backend
and its parameters. The table is written last: a case is complete when both files exist.

Old ``<case>.npz`` files (``layers``, ``shape``, ``spacing``, ``origin``, ``direction``, ``backend``,
``params_json``) are still read, whole, with the table computed on opening.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import blosc2
import numpy as np
from scipy import ndimage

from mass_nnu.adapter.datasets import Dataset
from mass_nnu.errors import MassError
from mass_nnu.grids import nearest_indices, resample_nearest
from mass_nnu.io import atomic_path, remove_stale_temporaries

FOLDER = "proposalsTr"
ARRAY, TABLE, LEGACY = ".b2nd", ".json", ".npz"
FORMAT = "mass-nnu proposals b2nd 1"
COLUMNS = ("layer", "label", "voxels", "low_z", "low_y", "low_x", "high_z", "high_y", "high_x")
DEFAULT_PATCH = (128, 128, 128)  # raw grid: the patch is not known yet when proposing
RESERVED_CASES = ("summary",)  # proposalsTr/summary.json
# LZ4HC level 1: writes about 2× faster than level 5 at 2× the size; crops read alike (docs/benchmarks.md)
_CPARAMS = {"codec": blosc2.Codec.LZ4HC, "clevel": 1, "filters": [blosc2.Filter.SHUFFLE], "nthreads": 1}
_MMAP = {} if os.name == "nt" else {"mmap_mode": "r"}  # as nnU-Net: no mmap on Windows


def proposal_dir(dataset: Dataset) -> Path:
    return dataset.raw / FOLDER


def case_paths(path: str | os.PathLike) -> tuple[Path, Path, Path]:
    """(array ``.b2nd``, table ``.json``, old ``.npz``) of a case, from any of the three or the bare stem."""
    path = Path(path)
    name = path.name
    for suffix in (ARRAY, TABLE, LEGACY):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return tuple(path.with_name(name + suffix) for suffix in (ARRAY, TABLE, LEGACY))


def proposal_path(dataset: Dataset, case_id: str) -> Path:
    """The case's array file in ``proposalsTr`` (its table lies beside it)."""
    return proposal_dir(dataset) / f"{case_id}{ARRAY}"


def is_complete(folder: Path, case_id: str) -> bool:
    """Both files of the new format are there (the table is written last)."""
    array, table, _ = case_paths(Path(folder) / case_id)
    return array.is_file() and table.is_file()


def find_proposals(folder: Path, case_id: str) -> Path | None:
    """The case's proposals in ``folder``: the ``.b2nd`` when complete, else an old ``.npz``, else None."""
    array, _, legacy = case_paths(Path(folder) / case_id)
    if is_complete(folder, case_id):
        return array
    return legacy if legacy.is_file() else None


def list_proposals(folder: Path) -> dict[str, Path]:
    """case id -> proposals file (``find_proposals``) of every case in ``folder``, sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        return {}
    stems = {p.name[: -len(ARRAY)] for p in folder.glob(f"*{ARRAY}") if not p.name.startswith(".")}
    stems |= {p.name[: -len(LEGACY)] for p in folder.glob(f"*{LEGACY}") if not p.name.startswith(".")}
    found = {case: find_proposals(folder, case) for case in sorted(stems)}
    return {case: path for case, path in found.items() if path is not None}


def image_geometry(image) -> dict:
    """Geometry of a SimpleITK image, with spacing in array (z, y, x) order."""
    return {"shape": list(image.GetSize())[::-1], "spacing": list(image.GetSpacing())[::-1],
            "origin": list(image.GetOrigin()), "direction": list(image.GetDirection())}


def chunk_shapes(shape, patch=DEFAULT_PATCH, itemsize: int = 2, max_block_bytes: int = 64 * 1024,
                 max_chunk_bytes: int = 4 * 1024 ** 2) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Blosc2 (blocks, chunks) for an (L, *shape) stack read by crops of about ``patch``: one layer per chunk
    and block; blocks of powers of two following the patch's aspect, at most ``max_block_bytes`` (the unit a crop
    decompresses); chunks of at most ``max_chunk_bytes`` that tile the image with the least padding (blosc2
    compresses every chunk whole, and a 134-voxel axis in chunks of 128 is compressed as 256), then the fewest
    chunks, then the chunk nearest the patch (nnU-Net's ``comp_blosc2_params`` idea, for one channel of uint16)."""
    shape = [int(s) for s in shape]
    patch = [max(1, min(int(p), s)) for p, s in zip(patch, shape)]
    block = [min(1 << max(p - 1, 0).bit_length(), s) for p, s in zip(patch, shape)]
    while math.prod(block) * itemsize > max_block_bytes and max(block) > 1:
        axis = max((a for a in range(len(block)) if block[a] > 1), key=lambda a: (block[a] / patch[a], block[a]))
        block[axis] = max(1, block[axis] // 2)

    def options(s: int, b: int) -> dict[int, tuple[int, int]]:  # chunk edge -> (padded extent, chunks)
        edges = {min(s, -(-(-(-s // n)) // b) * b) for n in range(1, -(-s // b) + 1)}
        return {c: (-(-s // c) * (-(-c // b) * b), -(-s // c)) for c in edges}

    per_axis = [options(s, b) for s, b in zip(shape, block)]
    candidates = [c for c in itertools.product(*per_axis) if math.prod(c) * itemsize <= max_chunk_bytes] or [block]
    chunk = min(candidates, key=lambda c: (
        math.prod(per_axis[a].get(e, (-(-shape[a] // e) * e, 0))[0] for a, e in enumerate(c)),
        math.prod(-(-s // e) for s, e in zip(shape, c)),
        sum(abs(math.log(e / p)) for e, p in zip(c, patch))))
    return (1, *block), (1, *chunk)


def count_proposals(layers: np.ndarray) -> int:
    """How many (layer, label) proposals a stack of instance layers holds."""
    return sum(len(layer_table(layer, i)) for i, layer in enumerate(layers))


def layer_table(layer: np.ndarray, index: int) -> np.ndarray:
    """Rows (layer, label, voxels, bbox low (3), bbox high (3)) of the labels in one layer. Voxels are counted
    slab by slab, so no full-size int64 copy of the layer is made."""
    top = int(layer.max()) if layer.size else 0
    sizes = np.zeros(top + 1, np.int64)
    step = max(1, (1 << 20) // max(1, int(np.prod(layer.shape[1:]))))  # slabs of ~1M voxels: 8 MiB of int64
    for z in range(0, layer.shape[0], step):
        sizes += np.bincount(layer[z:z + step].ravel(), minlength=top + 1)
    rows = [[index, label, sizes[label], *[s.start for s in box], *[s.stop for s in box]]
            for label, box in enumerate(ndimage.find_objects(layer), start=1) if box is not None]
    return np.asarray(rows, np.int64).reshape(-1, len(COLUMNS))


class RawGridTables:
    """Tables on the raw grid ``shape`` of layers on a working grid, with what they share
    computed once: per axis the working voxel each raw voxel maps to (``grids.nearest_indices``), and per working
    voxel of ``region`` (a box outside which every layer is 0; the whole grid by default) the number of raw voxels
    mapped onto it (float64: the weighted counts are exact integers below 2**53 voxels). ``exact``: every working
    voxel has a raw voxel (no axis upsampled); only then are the tables exact."""

    def __init__(self, working_shape, shape, region: tuple[slice, ...] | None = None):
        working_shape, shape = tuple(int(n) for n in working_shape), tuple(int(n) for n in shape)
        self.sources = [nearest_indices(n_w, n) for n_w, n in zip(working_shape, shape)]
        multiplicity = [np.bincount(src, minlength=n_w) for src, n_w in zip(self.sources, working_shape)]
        self.exact = all(m.all() for m in multiplicity)
        self.region = region or tuple(slice(0, n) for n in working_shape)
        m_z, m_y, m_x = (m[sl].astype(np.float64) for m, sl in zip(multiplicity, self.region))
        self.weights = np.multiply.outer(m_z, np.multiply.outer(m_y, m_x)).ravel()

    def table(self, layer: np.ndarray, index: int) -> np.ndarray:
        """``layer_table(resample_nearest(layer, shape), index)``, computed on the working grid: a working voxel
        counts as many raw voxels as map onto it, a bounding box maps to the raw voxels whose source lies inside."""
        crop = layer[self.region]
        boxes = ndimage.find_objects(crop)
        sizes = np.bincount(np.ascontiguousarray(crop).ravel(), weights=self.weights, minlength=len(boxes) + 1)
        offset = [sl.start for sl in self.region]
        rows = [[index, label, int(round(sizes[label])), *[b.start + o for b, o in zip(box, offset)],
                 *[b.stop + o for b, o in zip(box, offset)]]
                for label, box in enumerate(boxes, start=1) if box is not None]
        return self.mapped(np.asarray(rows, np.int64).reshape(-1, len(COLUMNS)))

    def mapped(self, rows: np.ndarray) -> np.ndarray:
        """Table rows with working-grid boxes -> the same rows with the raw-grid boxes (the raw voxels whose source
        lies inside); the voxel counts are taken as they are (raw voxels already)."""
        rows = np.array(rows, np.int64).reshape(-1, len(COLUMNS))
        for axis, src in enumerate(self.sources):
            for column in (3 + axis, 6 + axis):
                rows[:, column] = np.searchsorted(src, rows[:, column])
        return rows


def occupied_box(layers: np.ndarray) -> tuple[slice, ...] | None:
    """The bounding box of the voxels where any of the (L, Z, Y, X) ``layers`` is non-zero (None: all zero)."""
    boxes = ndimage.find_objects(np.logical_or.reduce(layers, axis=0).view(np.uint8)) if len(layers) else []
    return boxes[0] if boxes else None


def write_layers(path: str | os.PathLike, count: int, shape, layer_of: Callable[[int], np.ndarray], meta: dict,
                 patch=None, table_of: Callable[[int], np.ndarray | None] | None = None) -> np.ndarray:
    """Write ``count`` layers of ``shape`` (``layer_of(i)``, called one at a time, so memory holds one layer) as
    ``<case>.b2nd`` chunked for crops of ``patch``, then ``<case>.json`` with ``meta`` and the table computed on
    the way (``table_of(i)`` when it gives layer i's rows, else from the written layer). Both go to temporary names
    first; the array is renamed, then the table (an old table is removed first, an old ``.npz`` last). Returns the
    table."""
    array_path, table_path, legacy = case_paths(path)
    shape = tuple(int(s) for s in shape)
    blocks, chunks = chunk_shapes(shape, patch or DEFAULT_PATCH)
    for stale in (array_path, table_path):
        remove_stale_temporaries(stale)
    table_path.unlink(missing_ok=True)  # incomplete until the new table is in place
    rows = []
    with atomic_path(table_path) as tmp_table, atomic_path(array_path) as tmp_array:
        out = blosc2.zeros((count, *shape), dtype=np.uint16, chunks=chunks, blocks=blocks, urlpath=str(tmp_array),
                           mode="w", cparams=_CPARAMS)
        for index in range(count):
            layer = np.asarray(layer_of(index))
            if tuple(layer.shape) != shape:
                raise ValueError(f"layer {index} has shape {layer.shape}, expected {shape}")
            if layer.dtype != np.uint16:
                if layer.size and (layer.min() < 0 or layer.max() > np.iinfo(np.uint16).max):
                    raise ValueError(f"layer {index}: labels outside 0..65535 do not fit uint16")
                layer = layer.astype(np.uint16)
            out[index] = np.ascontiguousarray(layer)
            known = table_of(index) if table_of is not None else None
            rows.append(layer_table(layer, index) if known is None else known)
            del layer
        del out  # closes the blosc2 frame before it is synced and renamed
        table = np.concatenate(rows) if rows else np.zeros((0, len(COLUMNS)), np.int64)
        tmp_table.write_text(json.dumps({"format": FORMAT, "layers": int(count), "shape": list(shape), **meta,
                                         "chunks": list(chunks), "blocks": list(blocks), "columns": list(COLUMNS),
                                         "table": table.tolist()}))
    legacy.unlink(missing_ok=True)
    return table


def write_proposals(path: str | os.PathLike, layers: np.ndarray, geometry: dict, backend: str, params: dict,
                    patch=None, table: np.ndarray | None = None) -> np.ndarray:
    """A backend's ``layers`` (L, *S_w) on its working grid (any shape over the image's field of view; S_w = the
    raw shape is written as is) mapped to the raw grid ``geometry["shape"]`` by nearest voxel-centre index
    mapping, one layer at a time, and written (``write_layers``). ``table``: the rows of the mapped layers when the
    backend already has them (``supervoxel_proposals(with_table=True)``; sorted by layer, then label), else they
    are counted here. Returns the table on the raw grid."""
    if layers.ndim != 4:
        raise ValueError(f"layers must be (L, Z, Y, X), got shape {layers.shape}")
    shape = tuple(int(s) for s in geometry["shape"])
    meta = {"geometry": {key: [float(v) if key != "shape" else int(v) for v in geometry[key]]
                         for key in ("shape", "spacing", "origin", "direction")},
            "backend": backend, "params": params, "working_shape": [int(s) for s in layers.shape[1:]]}
    table_of = None
    if table is not None:  # its rows of each layer
        table_of = np.split(table, np.searchsorted(table[:, 0], np.arange(1, len(layers)))).__getitem__
    elif tuple(layers.shape[1:]) != shape:  # else written as is, its table counted on the layer itself
        tables = RawGridTables(layers.shape[1:], shape, occupied_box(layers))
        table_of = (lambda i: tables.table(layers[i], i)) if tables.exact else None
    return write_layers(path, len(layers), shape, lambda i: resample_nearest(layers[i], shape), meta, patch, table_of)


@dataclass
class ProposalStore:
    """One case's proposals, opened lazily: ``layers`` is the blosc2 array (an in-memory array for an old
    ``.npz``); ``crop`` and ``read`` decompress only the blocks they touch."""
    path: Path
    layers: object
    geometry: dict
    backend: str
    params: dict
    _table: np.ndarray | None = None

    @property
    def table(self) -> np.ndarray:
        """(N, 9) int64: layer, label, voxels, bbox low (3), bbox high (3) (see ``COLUMNS``)."""
        if self._table is None:
            rows = [layer_table(self.read(i), i) for i in range(len(self))]
            self._table = np.concatenate(rows) if rows else np.zeros((0, len(COLUMNS)), np.int64)
        return self._table

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.layers.shape[1:])

    def __len__(self) -> int:
        return int(self.layers.shape[0])

    def read(self, layer: int, low=None, high=None) -> np.ndarray:
        """Layer ``layer`` inside the box [low, high) clipped to the volume (the whole layer by default)."""
        low = [0] * 3 if low is None else low
        high = self.shape if high is None else high
        box = tuple(slice(min(max(int(lo), 0), n), max(min(int(hi), n), 0)) for lo, hi, n in zip(low, high, self.shape))
        try:
            return np.asarray(self.layers[(int(layer), *box)])
        except (RuntimeError, ValueError, OSError) as e:
            raise MassError(f"{self.path}: corrupt or truncated proposals (layer {layer}: "
                            f"{str(e).strip()[:100] or type(e).__name__}); run 'mass propose' again") from None

    def crop(self, layers, low, high) -> np.ndarray:
        """(len(layers), *(high - low)) uint16 crop of the given layers, zero outside the volume."""
        low, high = np.asarray(low, np.int64), np.asarray(high, np.int64)
        out = np.zeros((len(layers), *(high - low)), np.uint16)
        a = np.clip(low, 0, self.shape)
        b = np.maximum(np.clip(high, 0, self.shape), a)
        if (b > a).all():
            dst = tuple(slice(int(x - lo), int(y - lo)) for x, y, lo in zip(a, b, low))
            for i, layer in enumerate(layers):
                out[(i, *dst)] = self.read(layer, a, b)
        return out


def open_proposals(path: str | os.PathLike) -> ProposalStore:
    """The case's proposals (``path``: its ``.b2nd``, ``.json``, old ``.npz`` or stem); one ``MassError`` line
    naming the file when they are missing, incomplete, corrupt or truncated."""
    array, table, legacy = case_paths(path)
    if array.is_file() and table.is_file():
        return _open_b2nd(array, table)
    if legacy.is_file():
        return _open_legacy(legacy)
    if array.is_file():
        raise MassError(f"{array}: its table {table.name} is missing (interrupted write); run 'mass propose' again")
    raise MassError(f"{array}: no proposals for this case; run 'mass propose' first")


def _open_b2nd(array_path: Path, table_path: Path) -> ProposalStore:
    try:
        meta = json.loads(table_path.read_text())
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise ValueError("not a mass-nnu proposals table")
        table = np.asarray(meta["table"], np.int64).reshape(-1, len(COLUMNS))
        expected = (int(meta["layers"]), *[int(s) for s in meta["shape"]])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise MassError(f"{table_path}: not a readable proposals table ({str(e)[:100]}); "
                        f"run 'mass propose' again") from None
    try:
        layers = blosc2.open(str(array_path), mode="r", dparams={"nthreads": 1}, **_MMAP)
    except (RuntimeError, OSError, ValueError) as e:
        raise MassError(f"{array_path}: not a readable proposals file, corrupt or truncated "
                        f"({str(e).strip()[:100] or type(e).__name__}); run 'mass propose' again") from None
    if tuple(layers.shape) != expected or layers.dtype != np.uint16:
        raise MassError(f"{array_path}: holds {layers.dtype} {tuple(layers.shape)} but its table says uint16 "
                        f"{expected}; run 'mass propose' again")
    geometry = {**meta.get("geometry", {"shape": expected[1:]}), "backend": meta.get("backend", "")}
    return ProposalStore(array_path, layers, geometry, meta.get("backend", ""), meta.get("params", {}), table)


def _open_legacy(path: Path) -> ProposalStore:
    """An old ``.npz`` of the raw grid (read whole)."""
    try:
        with np.load(path, allow_pickle=False) as f:
            if "stats" in f.files and "shape" not in f.files:
                raise MassError(f"{path}: old preprocessed proposals; delete the file, 'mass pretrain' remakes "
                                f"them from proposalsTr")
            layers = f["layers"]
            geometry = {"shape": f["shape"].tolist(), "spacing": f["spacing"].tolist(),
                        "origin": f["origin"].tolist(), "direction": f["direction"].tolist(),
                        "backend": str(f["backend"])}
            params = json.loads(str(f["params_json"]))
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise MassError(f"{path}: not a readable proposals file ({str(e)[:100]}); run 'mass propose' again") from None
    if layers.ndim != 4 or list(layers.shape[1:]) != list(geometry["shape"]):
        raise MassError(f"{path}: layers {layers.shape} do not match the shape {geometry['shape']} it records")
    return ProposalStore(path, layers, geometry, geometry["backend"], params)


def read_proposals(path: str | os.PathLike) -> tuple[np.ndarray, dict]:
    """(layers, geometry) of one case, whole (for small uses such as recall evaluation); a clear error for
    missing or damaged files."""
    store = open_proposals(path)
    return np.stack([store.read(i) for i in range(len(store))]) if len(store) else \
        np.zeros((0, *store.shape), np.uint16), store.geometry


def check_geometry(geometry: dict, image_geometry_: dict, path: Path) -> None:
    """Refuse proposals whose grid differs from the image's (made for another image or resampled)."""
    if list(geometry["shape"]) != list(image_geometry_["shape"]):
        raise MassError(f"{path}: proposals have shape {tuple(geometry['shape'])} but the image has "
                        f"{tuple(image_geometry_['shape'])}; they were made for another image")
    for key in ("spacing", "origin", "direction"):
        if not np.allclose(geometry[key], image_geometry_[key], atol=1e-3):
            raise MassError(f"{path}: proposals' {key} {np.round(geometry[key], 3).tolist()} differs from the "
                            f"image's {np.round(image_geometry_[key], 3).tolist()}; they were made for another image")
