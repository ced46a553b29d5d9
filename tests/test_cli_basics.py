import os
import subprocess
import sys

from mass_nnu import __version__


def test_version(run_cli):
    result = run_cli("--version")
    assert result.exit_code == 0
    assert __version__ in result.stdout


def test_help_lists_commands_and_is_lazy():
    code = "import sys; from mass_nnu.cli import app; print(int('torch' in sys.modules), int('nnunetv2' in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["0", "0"], "importing the CLI must not import torch or nnunetv2"


def test_workspace_defaults_said_once(tmp_path, monkeypatch):
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    env = {k: v for k, v in os.environ.items()}
    proc = subprocess.run([sys.executable, "-m", "mass_nnu", "env"], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("mass_workspace") == 1
    assert f'export nnUNet_raw="{tmp_path}/mass_workspace/raw"' in proc.stdout
    assert (tmp_path / "mass_workspace" / "results").is_dir()


def test_workspace_respects_set_variables(tmp_path, monkeypatch):
    env = dict(os.environ, nnUNet_raw=str(tmp_path / "r"), nnUNet_preprocessed=str(tmp_path / "p"),
               nnUNet_results=str(tmp_path / "x"))
    proc = subprocess.run([sys.executable, "-m", "mass_nnu", "env"], capture_output=True, text=True, env=env,
                          cwd=tmp_path)
    assert proc.returncode == 0
    assert "mass_workspace" not in proc.stderr + proc.stdout
    assert f'export nnUNet_results="{tmp_path / "x"}"' in proc.stdout
    assert "nnunet_trainers" in proc.stdout


def test_quick_demo_runs_every_stage_in_its_own_workspace(tmp_path):
    """`mass demo --quick --workspace W`: every stage through the CLI, MASS fine-tuned with the in-context head,
    nothing written to (or announced for) the default ./mass_workspace."""
    env = {k: v for k, v in os.environ.items() if k not in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    env.update(nnUNet_n_proc_DA="0", nnUNet_def_n_proc="1", OMP_NUM_THREADS="2")
    workspace = tmp_path / "ws"
    proc = subprocess.run([sys.executable, "-m", "mass_nnu", "demo", "--quick", "--workspace", str(workspace)],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "mass_workspace" not in proc.stderr and not (tmp_path / "mass_workspace").exists()
    summary = proc.stdout[proc.stdout.rindex("| step | seconds |"):]
    for step in ("plan", "propose", "pretrain", "finetune MASS", "finetune scratch", "in-context", "total"):
        assert f"| {step} |" in summary, step
    assert "_hic)" in summary and "from scratch" in summary and "in-context, 1 reference" in summary
    results = workspace / "results" / "Dataset502_MNISeg"
    assert len(list(results.glob("*_hic__3d_fullres/fold_0/predictions_imagesTs/*.nii.gz"))) == 1
