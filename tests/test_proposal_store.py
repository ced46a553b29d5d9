"""Proposal storage read by crop: working grid -> raw grid, crops, the table, damaged files, the old .npz format."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

GEOMETRY = {"spacing": [2.0, 1.0, 1.5], "origin": [1.0, 2.0, 3.0], "direction": [1, 0, 0, 0, 1, 0, 0, 0, 1]}


def _blocks(rng, shape, count, labels=12):
    """Instance maps like supervoxels: random boxes painted over each other, some labels cut in pieces."""
    layers = np.zeros((count, *shape), np.uint16)
    for layer in layers:
        for label in range(1, labels + 1):
            low = rng.integers(0, np.asarray(shape) - 1)
            high = np.minimum(low + rng.integers(1, np.maximum(np.asarray(shape) // 2, 2)), shape)
            layer[tuple(slice(a, b) for a, b in zip(low, high))] = label
    return layers


def _table_by_hand(layers):
    rows = []
    for index, layer in enumerate(layers):
        for label in np.unique(layer[layer > 0]):
            where = np.argwhere(layer == label)
            rows.append([index, label, len(where), *where.min(0), *(where.max(0) + 1)])
    return np.asarray(rows, np.int64).reshape(-1, 9)


def _physical_nearest(layer, raw_shape):
    """The working voxel that holds each raw voxel's centre, in millimetres (same field of view)."""
    out = np.empty(raw_shape, layer.dtype)
    index = []
    for n_raw, n_w, spacing in zip(raw_shape, layer.shape, GEOMETRY["spacing"]):
        centres = (np.arange(n_raw) + 0.5) * spacing
        index.append(np.minimum(np.floor(centres / (n_raw * spacing / n_w)).astype(int), n_w - 1))
    for z, iz in enumerate(index[0]):
        for y, iy in enumerate(index[1]):
            out[z, y] = layer[iz, iy, index[2]]
    return out


def test_working_grid_round_trip_and_table(tmp_path):
    from mass_nnu.proposals.store import open_proposals, read_proposals, write_proposals

    rng = np.random.default_rng(0)
    working = _blocks(rng, (5, 6, 7), 3)
    raw_shape = [10, 18, 14]  # integer factors 2, 3, 2: nearest mapping is a repeat
    table = write_proposals(tmp_path / "a.b2nd", working, {"shape": raw_shape, **GEOMETRY}, "test", {"k": 1})
    expected = working.repeat(2, 1).repeat(3, 2).repeat(2, 3)
    layers, geometry = read_proposals(tmp_path / "a.b2nd")
    assert layers.dtype == np.uint16 and np.array_equal(layers, expected)
    assert geometry["shape"] == raw_shape and geometry["spacing"] == GEOMETRY["spacing"]
    assert geometry["backend"] == "test"
    store = open_proposals(tmp_path / "a.json")
    assert np.array_equal(store.table, table) and np.array_equal(table, _table_by_hand(expected))
    assert store.params == {"k": 1} and store.layers.chunks[0] == 1  # one layer per chunk

    raw_shape = [11, 13, 9]  # non-integer factors: the voxel holding each raw voxel centre
    write_proposals(tmp_path / "b.b2nd", working, {"shape": raw_shape, **GEOMETRY}, "test", {})
    store = open_proposals(tmp_path / "b.b2nd")
    assert all(np.array_equal(store.read(i), _physical_nearest(working[i], raw_shape)) for i in range(3))
    assert np.array_equal(store.table, _table_by_hand(read_proposals(tmp_path / "b.b2nd")[0]))

    same = _blocks(rng, (6, 5, 4), 2)  # the working grid is the raw grid: written as is
    write_proposals(tmp_path / "c.b2nd", same, {"shape": [6, 5, 4], **GEOMETRY}, "test", {})
    assert np.array_equal(read_proposals(tmp_path / "c.b2nd")[0], same)


def test_table_from_the_working_grid_equals_the_raw_table():
    """write_proposals computes the raw-grid table on the working grid (multiplicities, mapped boxes): the same rows
    as on the mapped layer, for any downsampling factors, also when counted inside the layers' occupied box only;
    an upsampled axis is not exact (write_proposals then counts the mapped layer)."""
    from mass_nnu.grids import resample_nearest
    from mass_nnu.proposals.store import RawGridTables, layer_table, occupied_box

    rng = np.random.default_rng(1)
    for working_shape, raw_shape in (((5, 6, 7), (10, 18, 14)), ((7, 9, 4), (13, 31, 11)), ((3, 3, 3), (3, 4, 5))):
        layer = _blocks(rng, working_shape, 1, labels=20)[0]
        expected = layer_table(resample_nearest(layer, raw_shape), 2)
        tables = RawGridTables(working_shape, raw_shape)
        assert tables.exact and np.array_equal(tables.table(layer, 2), expected)
    assert not RawGridTables((4, 4, 4), (4, 8, 2)).exact
    layers = np.zeros((2, 9, 8, 7), np.uint16)  # zero outside a box: the tables count inside it only
    layers[0, 2:5, 1:4, 3:6], layers[1, 3:7, 2:6, 4:5] = rng.integers(0, 5, (3, 3, 3)), 7
    tables = RawGridTables(layers.shape[1:], (20, 13, 15), occupied_box(layers))
    assert tables.region == (slice(2, 7), slice(1, 6), slice(3, 6))
    for i, layer in enumerate(layers):
        assert np.array_equal(tables.table(layer, i), layer_table(resample_nearest(layer, (20, 13, 15)), i))


def test_crops_equal_slices_of_the_full_array(tmp_path):
    from mass_nnu.proposals.store import chunk_shapes, open_proposals, write_proposals

    rng = np.random.default_rng(1)
    full = _blocks(rng, (20, 30, 26), 4)
    write_proposals(tmp_path / "c.b2nd", full, {"shape": [20, 30, 26], **GEOMETRY}, "t", {}, patch=(8, 8, 8))
    store = open_proposals(tmp_path / "c.b2nd")
    assert store.layers.blocks == (1, 8, 8, 8)  # a crop decompresses only the blocks it touches
    pad = 40
    padded = np.pad(full, ((0, 0), (pad, pad), (pad, pad), (pad, pad)))
    # inside, over the edges, outside
    boxes = [([2, 3, 4], [10, 20, 9]), ([-5, 25, -3], [9, 41, 30]), ([30, 0, 0], [35, 5, 5])]
    for low, high in boxes:
        for layers in ([0], [3, 1], [0, 1, 2, 3]):
            expected = padded[(layers, *[slice(a + pad, b + pad) for a, b in zip(low, high)])]
            assert np.array_equal(store.crop(layers, low, high), expected)
    assert np.array_equal(store.read(2, [-4, 5, 6], [7, 40, 8]), full[2, 0:7, 5:30, 6:8])  # clipped to the volume
    blocks, chunks = chunk_shapes((108, 256, 256))  # a CT: chunks of about a 128^3 patch, small blocks
    assert chunks == (1, 108, 128, 128) and np.prod(blocks) * 2 <= 64 * 1024 and blocks[0] == 1
    for shape in [(134, 170, 137), (300, 512, 512), (117, 149, 118)]:  # full-size MRI, CT
        blocks, chunks = chunk_shapes(shape)
        assert np.prod(chunks) * 2 <= 4 * 1024 ** 2 and blocks[0] == chunks[0] == 1
        for s, b, c in zip(shape, blocks[1:], chunks[1:]):  # no padding beyond whole blocks (128 on 134: 256)
            assert -(-s // c) * -(-c // b) * b == -(-s // b) * b


def test_damaged_files_give_one_line(tmp_path):
    from mass_nnu.errors import MassError
    from mass_nnu.proposals.store import open_proposals, read_proposals, write_proposals

    layers = _blocks(np.random.default_rng(2), (24, 24, 24), 2)
    path = tmp_path / "case.b2nd"
    write_proposals(path, layers, {"shape": [24, 24, 24], **GEOMETRY}, "t", {}, patch=(8, 8, 8))
    data = path.read_bytes()

    def error(fn):
        with pytest.raises(MassError) as caught:
            fn()
        message = str(caught.value)
        assert "\n" not in message
        return message

    path.write_bytes(data[: len(data) // 2])  # truncated
    assert error(lambda: open_proposals(path)).startswith(f"{path}: not a readable proposals file")
    broken = bytearray(data)
    broken[len(data) // 2: len(data) // 2 + 64] = b"\xff" * 64  # a damaged chunk: found when read
    path.write_bytes(bytes(broken))
    assert error(lambda: read_proposals(path)).startswith(f"{path}: corrupt or truncated proposals")
    table = tmp_path / "case.json"
    table.write_text(table.read_text()[:50])
    assert error(lambda: open_proposals(path)).startswith(f"{table}: not a readable proposals table")
    table.unlink()
    assert "table case.json is missing" in error(lambda: open_proposals(path))
    path.unlink()
    assert error(lambda: open_proposals(path)) == f"{path}: no proposals for this case; run 'mass propose' first"


def _write_old_npz(path, layers, geometry, backend="supervoxel"):
    np.savez_compressed(path, layers=layers, shape=np.asarray(geometry["shape"]),
                        spacing=np.asarray(geometry["spacing"], float), origin=np.asarray(geometry["origin"], float),
                        direction=np.asarray(geometry["direction"], float), backend=np.asarray(backend),
                        params_json=np.asarray(json.dumps({"old": True})))


def test_old_npz_is_read_and_replaced(tmp_path):
    from mass_nnu.errors import MassError
    from mass_nnu.proposals.store import find_proposals, list_proposals, open_proposals, read_proposals, write_proposals

    layers = _blocks(np.random.default_rng(3), (9, 10, 11), 2)
    geometry = {"shape": [9, 10, 11], **GEOMETRY}
    _write_old_npz(tmp_path / "old.npz", layers, geometry)
    assert find_proposals(tmp_path, "old") == tmp_path / "old.npz" and list(list_proposals(tmp_path)) == ["old"]
    store = open_proposals(tmp_path / "old.b2nd")  # the case's new name finds the old file
    assert np.array_equal(store.table, _table_by_hand(layers)) and store.params == {"old": True}
    assert np.array_equal(store.crop([1], [-1, 2, 3], [4, 8, 20])[0, 1:, :, :8], layers[1, 0:4, 2:8, 3:11])
    assert np.array_equal(read_proposals(tmp_path / "old.npz")[0], layers)
    write_proposals(tmp_path / "old.b2nd", layers, geometry, "supervoxel", {})  # rewriting replaces the old file
    assert not (tmp_path / "old.npz").exists() and find_proposals(tmp_path, "old") == tmp_path / "old.b2nd"
    np.savez_compressed(tmp_path / "pre.npz", layers=layers, stats=np.zeros((0, 9)))  # old preprocessed file
    with pytest.raises(MassError, match="old preprocessed proposals"):
        open_proposals(tmp_path / "pre.npz")


def test_old_format_end_to_end(private_copy):
    """Old raw .npz proposals are mapped by prepare_proposals exactly like the new format; an old preprocessed
    .npz is remade and removed; the sampler then draws from the result."""
    from mass_nnu.adapter.datasets import Dataset
    from mass_nnu.adapter.preprocessed import data_folder
    from mass_nnu.pretraining.sampling import CaseSource, TaskSampler, prepare_proposals
    from mass_nnu.proposals.store import case_paths, read_proposals

    plans = Dataset.resolve(private_copy["name"]).plans(private_copy["plans"])
    config = private_copy["configuration"]
    folder, cases = prepare_proposals(private_copy["name"], plans, config)
    mapped = {c: read_proposals(folder / f"{c}.b2nd")[0] for c in cases}
    shutil.rmtree(folder)
    for path in sorted((private_copy["raw"] / "proposalsTr").glob("*.b2nd")):
        layers, geometry = read_proposals(path)
        array, table, legacy = case_paths(path)
        _write_old_npz(legacy, layers, geometry)
        array.unlink(), table.unlink()
    folder.mkdir()
    np.savez_compressed(folder / f"{cases[0]}.npz", layers=np.zeros((1, 2, 2, 2), np.uint16), stats=np.zeros((0, 9)))
    again, cases_again = prepare_proposals(private_copy["name"], plans, config)
    assert again == folder and cases_again == cases and not (folder / f"{cases[0]}.npz").exists()
    assert all(np.array_equal(read_proposals(folder / f"{c}.b2nd")[0], mapped[c]) for c in cases)
    data_dir = data_folder(Dataset.resolve(private_copy["name"]), plans, config)
    sampler = TaskSampler([CaseSource(data_dir, folder, c) for c in cases], (12, 12, 12))
    drawn = sampler.draw(np.random.default_rng(0))
    assert drawn["views"][0][1][0].any()  # the anchor proposal is in the reference view


def test_reserved_case_id(nnunet_env):
    from mass_nnu.demo_data.writer import new_dataset, write_dataset_json, write_image
    from mass_nnu.errors import MassError
    from mass_nnu.proposals.run import propose_dataset

    with new_dataset(722, "Clash") as folder:
        write_image(np.zeros((4, 4, 4)), (1, 1, 1), path=folder / "imagesTr" / "summary_0000.nii.gz")
        write_dataset_json(folder, "CT", {"background": 0, "foreground": 1}, 1, "x", "Clash")
    with pytest.raises(MassError, match="'summary' is reserved"):
        propose_dataset(722)


def test_proposals_in_crop_counts_every_proposal_inside_the_box(tmp_path):
    """The sampler's in-crop counts (table counts for proposals wholly inside, reads for the ones the box cuts)
    equal counting each proposal's voxels in the zero-padded box by hand, for boxes inside, across and outside."""
    from mass_nnu.pretraining.sampling import proposals_in_crop
    from mass_nnu.proposals.store import open_proposals, write_proposals

    rng = np.random.default_rng(4)
    full = _blocks(rng, (20, 30, 26), 4, labels=20)
    write_proposals(tmp_path / "c.b2nd", full, {"shape": [20, 30, 26], **GEOMETRY}, "t", {}, patch=(8, 8, 8))
    store = open_proposals(tmp_path / "c.b2nd")
    stats = store.table
    boxes = [([0, 0, 0], [20, 30, 26]), ([2, 3, 4], [10, 20, 9]), ([-5, 25, -3], [9, 41, 30]), ([30, 0, 0], [35, 5, 5])]
    boxes += [(low, low + rng.integers(1, 16, 3)) for low in rng.integers(-6, 24, (20, 3))]
    whole = cut = 0
    for low, high in boxes:
        low, high = np.asarray(low), np.asarray(high)
        box = tuple(slice(max(a, 0), max(b, 0)) for a, b in zip(low, high))
        expected = [np.count_nonzero(full[(int(layer), *box)] == label) for layer, label in stats[:, :2]]
        assert np.array_equal(proposals_in_crop(store, stats, low, high), expected)
        inside = np.all((stats[:, 3:6] >= low) & (stats[:, 6:9] <= high), axis=1)
        whole, cut = whole + int(inside.sum()), cut + int((~inside & (np.asarray(expected) > 0)).sum())
    assert whole and cut  # both branches ran


def test_resample_nearest_equals_one_take_per_axis():
    """The row-gather mapping equals a nearest-index take along every changed axis (leading axes kept, any input
    layout, unchanged axes left alone)."""
    from mass_nnu.grids import nearest_indices, resample_nearest

    rng = np.random.default_rng(7)
    for _ in range(100):
        lead = int(rng.integers(0, 2))
        array = rng.integers(0, 100, tuple(rng.integers(1, 7, 3 + lead))).astype(np.uint16)[..., ::-1]
        shape = tuple(n if rng.random() < 0.3 else int(rng.integers(1, 13)) for n in array.shape[lead:])
        expected = array
        for axis, (n_in, n_out) in enumerate(zip(array.shape[lead:], shape)):
            expected = np.take(expected, nearest_indices(n_in, n_out), axis=lead + axis)
        assert np.array_equal(resample_nearest(array, shape), expected)
