"""Shared fixtures: isolated nnU-Net folders per test session, a CLI runner, fast settings."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("nnUNet_n_proc_DA", "0")
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture()
def nnunet_env(tmp_path, monkeypatch):
    """Fresh nnUNet_raw/preprocessed/results folders under tmp_path, registered with the trainer shim."""
    from mass_nnu.workspace import NNUNET_FOLDERS, configure_environment

    for var, sub in NNUNET_FOLDERS.items():
        monkeypatch.setenv(var, str(tmp_path / sub))
    monkeypatch.delenv("nnUNet_extTrainer", raising=False)
    return configure_environment(quiet=True)


@pytest.fixture()
def run_cli():
    """Invoke `mass ...` in-process; returns typer's Result (exit_code, stdout, stderr)."""
    from typer.testing import CliRunner

    from mass_nnu.cli import app

    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(app, [str(a) for a in args], catch_exceptions=True)

    return invoke
