"""Bad inputs through the CLI: each gives one `mass: error:` line naming the file and the problem, exit code 1,
no traceback, and leaves no partial output behind.

More kinds are covered beside the stage they belong to: proposals for another image, no proposals and unknown
plans (test_pretrain_data), weights of another architecture, a truncated weights file and N above the number of
cases (test_finetune), and bad in-context references (test_incontext)."""
from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SHAPE, SPACING = (16, 20, 20), (1.5, 1.5, 1.5)
CASE = "bad_tr000"


def assert_one_clear_error(result, *expected: str, root: Path | None = None) -> str:
    """Exit code 1, exactly one error line holding every ``expected`` text, no traceback, no temporary files."""
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = [line for line in result.stderr.splitlines() if line.startswith("mass: error:")]
    assert len(lines) == 1, result.stderr
    for text in expected:
        assert str(text) in lines[0], f"{text!r} not in {lines[0]!r}"
    assert "Traceback" not in result.output
    print(f"\n[observed] {lines[0]}")  # `pytest -s` lists every kind's message (docs/reliability.md)
    if root is not None:
        leftovers = [p for p in root.rglob("*") if p.name.endswith(".tmp") or ".tmp." in p.name]
        assert not leftovers, leftovers
    return lines[0]


# ---- a raw dataset that each test damages in one way ------------------------------------------------------------
@pytest.fixture()
def raw_dataset(nnunet_env):
    from mass_nnu.adapter.datasets import Dataset
    from mass_nnu.demo_data.phantom import write_phantom_dataset
    from mass_nnu.planning.raw_checks import check_raw_dataset

    folder = write_phantom_dataset(801, "Bad", 2, 0, shape=SHAPE, spacing=SPACING, seed=4)
    assert check_raw_dataset(Dataset.resolve(folder.name)) == 2  # intact, it passes
    return folder


def _write(array, path: Path, spacing=SPACING, origin=None, dtype=np.float32):
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.asarray(array, dtype))
    image.SetSpacing(tuple(float(s) for s in spacing[::-1]))
    if origin is not None:
        image.SetOrigin(origin)
    sitk.WriteImage(image, str(path))


def _image(folder):
    return folder / "imagesTr" / f"{CASE}_0000.nii.gz"


def _label(folder):
    return folder / "labelsTr" / f"{CASE}.nii.gz"


def _read(path):
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def no_dataset_json(folder):
    (folder / "dataset.json").unlink()
    return folder / "dataset.json", "missing"


def truncated_nifti(folder):
    data = _image(folder).read_bytes()
    _image(folder).write_bytes(data[: len(data) // 3])
    return _image(folder), "not a readable image"


def label_shape(folder):
    _write(np.zeros((16, 20, 18)), _label(folder), dtype=np.uint8)
    return _label(folder), "shape [18, 20, 16] differs"


def label_spacing(folder):
    _write(_read(_label(folder)), _label(folder), spacing=(1.5, 1.5, 2.0), dtype=np.uint8)
    return _label(folder), "spacing"


def label_origin(folder):
    _write(_read(_label(folder)), _label(folder), origin=(10.0, 0.0, 0.0), dtype=np.uint8)
    return _label(folder), "origin"


def label_values(folder):
    label = _read(_label(folder))
    label[0, 0, 0] = 9
    _write(label, _label(folder), dtype=np.uint8)
    return _label(folder), "label value(s) [9] are not in dataset.json"


def nan_intensities(folder):
    image = _read(_image(folder)).astype(np.float32)
    image[3, 4, 5] = np.nan
    _write(image, _image(folder))
    return _image(folder), "1 voxel(s) are NaN or infinite"


def infinite_intensities(folder):
    image = _read(_image(folder)).astype(np.float32)
    image[:2] = np.inf
    _write(image, _image(folder))
    return _image(folder), "NaN or infinite"


def constant_image(folder):
    _write(np.full(SHAPE, 7.0), _image(folder))
    return _image(folder), "constant image"


def image_2d(folder):
    _write(np.random.default_rng(0).normal(size=SHAPE[1:]), _image(folder), spacing=SPACING[1:])
    _write(np.zeros(SHAPE[1:]), _label(folder), spacing=SPACING[1:], dtype=np.uint8)
    return _image(folder), "2D"


def extra_channel(folder):
    extra = folder / "imagesTr" / f"{CASE}_0001.nii.gz"
    extra.write_bytes(_image(folder).read_bytes())
    return _image(folder), "dataset.json declares 1 channel"


RAW_DAMAGE = [no_dataset_json, truncated_nifti, label_shape, label_spacing, label_origin, label_values,
              nan_intensities, infinite_intensities, constant_image, image_2d, extra_channel]


@pytest.mark.parametrize("damage", RAW_DAMAGE, ids=[f.__name__ for f in RAW_DAMAGE])
def test_bad_raw_dataset_is_refused_before_planning(raw_dataset, run_cli, damage):
    named, problem = damage(raw_dataset)
    result = run_cli("plan", "-d", 801, "-np", 1, "--no-pp")
    assert_one_clear_error(result, named, problem, root=raw_dataset.parent.parent)
    preprocessed = Path(os.environ["nnUNet_preprocessed"])
    assert not (preprocessed / raw_dataset.name).exists(), "planning started on a bad dataset"
    assert not list((raw_dataset / "labelsTr").glob(".*"))


def test_unknown_dataset(nnunet_env, run_cli):
    assert_one_clear_error(run_cli("plan", "-d", 987), "unknown dataset '987'", "Dataset987_*")


def test_error_line_from_a_real_process(raw_dataset):
    """The installed entry point: one stderr line, exit 1, no traceback (not only in typer's test runner)."""
    constant_image(raw_dataset)
    proc = subprocess.run([sys.executable, "-m", "mass_nnu", "plan", "-d", "801", "--no-pp"], capture_output=True,
                          text=True, timeout=300, env={**os.environ})
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith(f"mass: error: {_image(raw_dataset)}: constant image")
    assert "Traceback" not in proc.stderr + proc.stdout
    assert [line for line in proc.stderr.splitlines() if line.startswith("mass:")][-1].startswith("mass: error:")


# ---- proposals and pretraining ---------------------------------------------------------------------------------
def test_zero_proposals_everywhere(private_copy, run_cli):
    from mass_nnu.proposals.store import read_proposals, write_proposals

    for folder in private_copy["pre"].glob("*_proposals"):
        for path in folder.iterdir():
            path.unlink()
    paths = sorted((private_copy["raw"] / "proposalsTr").glob("*.b2nd"))
    assert paths
    for path in paths:
        layers, geometry = read_proposals(path)
        write_proposals(path, np.zeros_like(layers), geometry, "test", {})
    result = run_cli("pretrain", "-d", private_copy["pretrain"], "-p", private_copy["plans"], "--epochs", 1,
                     "--iters-per-epoch", 1, "-np", 0)
    assert_one_clear_error(result, private_copy["raw"] / "proposalsTr", "zero usable proposals",
                           root=private_copy["raw"].parent.parent)
    assert not list(Path(os.environ["nnUNet_results"]).rglob("*.pth"))


def test_disk_full_while_writing_leaves_nothing(raw_dataset, run_cli, monkeypatch):
    """ENOSPC at flush time (simulated on fsync): the error names the file, no half-written proposals remain."""
    def disk_full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", disk_full)
    result = run_cli("propose", "-d", 801)
    assert_one_clear_error(result, "proposalsTr", "No space left on device", root=raw_dataset)
    assert not [p for p in (raw_dataset / "proposalsTr").iterdir() if p.name != "summary.json"]
    assert not list((raw_dataset / "proposalsTr").glob(".*.tmp*"))


def test_unwritable_output_folder(private_copy, run_cli, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    args = ("pretrain", "-d", private_copy["pretrain"], "-p", private_copy["plans"], "--epochs", 1,
            "--iters-per-epoch", 1, "-np", 0, "-o")
    assert_one_clear_error(run_cli(*args, blocker / "out"), blocker / "out", "cannot write output here")
    if os.geteuid() != 0:  # root ignores permissions
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        assert_one_clear_error(run_cli(*args, locked / "out"), locked / "out", "cannot write output here")


# ---- checkpoints and flags -------------------------------------------------------------------------------------
class RunsCodeWhenUnpickled:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_checkpoint_with_pickled_object_is_refused_without_running_it(weights, run_cli, tmp_path):
    import torch

    path, state, _ = weights
    marker = tmp_path / "code_ran"
    evil = tmp_path / "evil.pth"
    torch.save({"network_weights": state, "payload": RunsCodeWhenUnpickled(marker)}, evil)
    assert_one_clear_error(run_cli("finetune", "-d", 712, "-w", evil), evil, "refused",
                           "pickle code execution")
    assert not marker.exists(), "the pickled payload was executed"


def test_truncated_and_edited_checkpoints(weights, run_cli, tmp_path):
    import torch

    path, state, _ = weights
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert_one_clear_error(run_cli("finetune", "-d", 712, "-w", truncated), truncated, "truncated or corrupt")

    checkpoint = torch.load(path, weights_only=True)
    checkpoint["architecture_fingerprint"] = "0123456789abcdef"
    edited = tmp_path / "edited.pth"
    torch.save(checkpoint, edited)
    assert_one_clear_error(run_cli("finetune", "-d", 712, "-w", edited), edited, "does not match its weights")


def test_another_version_is_warned_not_refused(weights, tmp_path):
    import torch

    from mass_nnu.io import load_checkpoint

    path, _, _ = weights
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["mass_nnu_version"]
    checkpoint["mass_nnu_version"] = "0.0.1"
    torch.save(checkpoint, tmp_path / "old.pth")
    with pytest.warns(UserWarning, match="written by mass-nnu 0.0.1"):
        load_checkpoint(tmp_path / "old.pth")


@pytest.mark.parametrize("flags,problem", [
    (("--num-labeled", 2, "--fraction", 0.5), "give --num-labeled or --fraction, not both"),
    (("--fraction", 1.5), "--fraction must be in (0, 1]"),
    (("-device", "tpu"), "-device tpu"),
])
def test_conflicting_or_invalid_flags(weights, run_cli, flags, problem):
    path, _, _ = weights
    assert_one_clear_error(run_cli("finetune", "-d", 712, "-w", path, *flags), problem)
