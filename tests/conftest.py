"""Shared fixtures: isolated nnU-Net folders per test session, a CLI runner, fast settings."""
from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("nnUNet_n_proc_DA", "0")
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("MPLBACKEND", "Agg")


TINY_TRAINER = "nnUNetTrainerMASS_1epoch"  # one epoch of 2 iterations, no mirroring


@contextlib.contextmanager
def torch_threads(count: int):
    """Run with ``count`` torch threads, then restore. Runs compared bit for bit must share the count: nnU-Net's
    predictor changes the process's thread count, so an earlier test would otherwise set it."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture()
def one_torch_thread():
    """Tiny networks on a busy 2-core machine run faster on one thread."""
    with torch_threads(1):
        yield


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
    from mass_nnu.planning.plan import plan_datasets
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


@pytest.fixture()
def private_copy(experiment_env, tmp_path, monkeypatch):
    """A private copy of the pretraining dataset (raw + preprocessed) that a test may damage."""
    from mass_nnu.adapter.datasets import Dataset

    name = Dataset.resolve(experiment_env["pretrain"]).name
    for var in ("nnUNet_raw", "nnUNet_preprocessed"):
        src = experiment_env["env"][var]
        dst = tmp_path / var
        shutil.copytree(f"{src}/{name}", dst / name)
        monkeypatch.setenv(var, str(dst))
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    return {"name": name, "raw": tmp_path / "nnUNet_raw" / name, "pre": tmp_path / "nnUNet_preprocessed" / name,
            **experiment_env}


def write_weights(plans: dict, path: Path, channels: int = 1, seed: int = 0, configuration: str = "3d_fullres") -> dict:
    """A weights file with the keys 'mass pretrain' exports, from a randomly initialised network of ``plans``."""
    import torch

    from mass_nnu.adapter.networks import build_network
    from mass_nnu.io import architecture_fingerprint, save_checkpoint

    torch.manual_seed(seed)
    state = {k: v.detach().cpu().clone() for k, v in build_network(plans, configuration, channels, 1).state_dict().items()}
    save_checkpoint({"network_weights": state,
                     "nnssl_adaptation_plan": {"pretrain_plan": plans, "architecture_plans": {},
                                               "pretrain_num_input_channels": channels, "key_to_lpe": None},
                     "citations": [], "architecture_fingerprint": architecture_fingerprint(state),
                     "plans_identifier": plans["plans_name"], "configuration": configuration}, path)
    return state


@pytest.fixture()
def weights(experiment_env, tmp_path):
    from mass_nnu.adapter.datasets import Dataset

    plans = Dataset.resolve(experiment_env["pretrain"]).plans(experiment_env["plans"])
    path = tmp_path / "nnunet_pretrained_weights.pth"
    return path, write_weights(plans, path), plans


PRETRAIN_EPOCHS = 2


def pretrain_args(exp, out: Path, epochs: int = PRETRAIN_EPOCHS):
    """`mass pretrain` of the phantom experiment: tiny, seeded."""
    return ("pretrain", "-d", exp["pretrain"], "-p", exp["plans"], "--epochs", str(epochs), "--iters-per-epoch",
            "1", "--val-iters", "1", "--batch-size", "1", "-np", "0", "--seed", "3", "-o", str(out))


@pytest.fixture()
def uninterrupted(experiment_env):
    """One uninterrupted tiny `mass pretrain` run (a real MASS folder), made once per session and shared."""
    out = Path(experiment_env["env"]["nnUNet_results"]).parent / "pretrain_uninterrupted"
    if not (out / "checkpoint_final.pth").is_file():
        from typer.testing import CliRunner

        from mass_nnu.cli import app

        with torch_threads(1):  # the kill/resume test compares against this run bit for bit
            result = CliRunner().invoke(app, [str(a) for a in pretrain_args(experiment_env, out)])
        assert result.exit_code == 0, result.output
    return out
