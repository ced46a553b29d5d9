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


@pytest.fixture(scope="session")
def phantom_experiment(tmp_path_factory):
    """A planned and proposed pair, shared by the pipeline tests (planning costs ~30 s):
    Dataset711 (unlabelled CT phantom, 4 cases, plans transferred from 712) and Dataset712 (labelled, 4 train +
    2 test). The nnU-Net folder variables point at it for the whole session unless a test overrides them."""
    from mass_nnu.workspace import NNUNET_FOLDERS, configure_environment

    root = tmp_path_factory.mktemp("phantom_experiment")
    for var, sub in NNUNET_FOLDERS.items():
        os.environ[var] = str(root / sub)
    configure_environment(quiet=True)
    from mass_nnu.demo_data.phantom import write_phantom_dataset
    from mass_nnu.planning import plan_datasets
    from mass_nnu.proposals.run import propose_dataset

    write_phantom_dataset(711, "PhantomPre", 4, 0, shape=(32, 40, 40), seed=1, labelled=False)
    write_phantom_dataset(712, "PhantomSeg", 4, 2, shape=(32, 40, 40), seed=2)
    plans = plan_datasets([711], target_dataset=712, num_processes=1, base_features=8)
    propose_dataset(711)
    return {"pretrain": 711, "downstream": 712, "plans": plans, "configuration": "3d_fullres",
            "env": {var: os.environ[var] for var in NNUNET_FOLDERS}}


@pytest.fixture()
def experiment_env(phantom_experiment, monkeypatch):
    """Point the nnU-Net variables at the shared phantom experiment for one test."""
    for var, value in phantom_experiment["env"].items():
        monkeypatch.setenv(var, value)
    return phantom_experiment
