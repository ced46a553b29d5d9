import json

import pytest


def test_report_aggregates_seeds(tmp_path):
    from mass_nnu.evaluation.report import aggregate, write_report

    cells = [{"method": m, "budget": "1", "num_labeled": 1, "seed": s, "mean_dice": d,
              "per_structure": {"liver": d, "spleen": d / 2}}
             for m, s, d in [("mass", 0, 0.6), ("mass", 1, 0.8), ("scratch", 0, 0.2), ("scratch", 1, 0.4)]]
    rows = {r["method"]: r for r in aggregate(cells)}
    assert rows["mass"]["dice_mean"] == pytest.approx(0.7)
    assert rows["mass"]["dice_sd"] == pytest.approx(0.1414, abs=1e-3)
    assert rows["scratch"]["per_structure"]["spleen"] == pytest.approx(0.15)
    table = write_report(cells, tmp_path, "t")
    assert "70.0 ± 14.1" in table and "30.0 ± 14.1" in table
    assert (tmp_path / "dice_vs_labels.png").stat().st_size > 1000
    assert len((tmp_path / "results.csv").read_text().splitlines()) == 1 + 8


def test_budgets_are_checked():
    from mass_nnu.errors import MassError
    from mass_nnu.evaluation.label_efficiency import parse_budgets

    assert parse_budgets(["1", "all"], 3) == [("1", 1), ("all", 3)]
    for bad in (["4"], ["0"], ["x"]):
        with pytest.raises(MassError):
            parse_budgets(bad, 3)


def test_benchmark_end_to_end_and_resume(uninterrupted, experiment_env, run_cli, tmp_path):
    out = tmp_path / "bench"
    args = ("benchmark", "-d", experiment_env["downstream"], "-w", uninterrupted, "--budgets", "1", "--seeds", "1",
            "--epochs", "1", "--iters-per-epoch", "1", "-o", out)
    result = run_cli(*args)
    assert result.exit_code == 0, result.output
    data = json.loads((out / "results.json").read_text())
    methods = {c["method"] for c in data["cells"]}
    assert methods == {"mass", "scratch"}
    assert all(0.0 <= c["mean_dice"] <= 1.0 and "liver" in c["per_structure"] for c in data["cells"])
    assert (out / "dice_vs_labels.png").stat().st_size > 1000
    assert "MASS fine-tuned" in result.stdout and "nnU-Net from scratch" in result.stdout
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "cells").iterdir()}
    again = run_cli(*args)
    assert again.exit_code == 0
    assert {p.name: p.stat().st_mtime_ns for p in (out / "cells").iterdir()} == stamps, "finished cells must be reused"
    assert all(c["settings"]["head"] == "incontext" for c in data["cells"])  # auto: a full MASS folder
    other = run_cli(*args[:-2], "--lr", "0.001", "-o", out)
    assert other.exit_code == 1 and "run with other settings" in other.output
