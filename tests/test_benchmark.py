import json
import math
from pathlib import Path

import pytest


def _cell(method, seed, val, test=None, budget="1"):
    """A hand-made cell: validation (and test) Dice with liver, spleen, and 'cyst' absent everywhere."""
    dice = {"validation": {"mean": val, "per_structure": {"liver": val, "spleen": val / 2}, "absent": ["cyst"]}}
    if test is not None:
        dice["test"] = {"mean": test, "per_structure": {"liver": test}, "absent": ["cyst"]}
    return {"method": method, "budget": budget, "num_labeled": int(budget), "seed": seed,
            "split": "test" if test is not None else "validation", "dice": dice}


def test_report_aggregates_seeds_and_pairs_them(tmp_path):
    from mass_nnu.evaluation.report import aggregate, paired, write_report

    cells = [_cell(m, s, d, t) for m, s, d, t in [
        ("mass", 0, 0.6, 0.5), ("mass", 1, 0.8, 0.7), ("mass", 2, 0.7, 0.9),
        ("scratch", 0, 0.2, 0.1), ("scratch", 1, 0.4, 0.3), ("scratch", 2, 0.3, 0.5),
        ("random-init", 0, 0.3, 0.2), ("random-init", 1, 0.3, 0.2)]]  # random-init: seed 2 missing
    rows = {r["method"]: r for r in aggregate(cells)}
    assert rows["mass"]["dice_mean"] == pytest.approx(0.7) and rows["mass"]["dice_sd"] == pytest.approx(0.1)
    single = aggregate([c for c in cells if c["seed"] == 0])[0]
    assert single["seeds"] == 1 and single["dice_sd"] is None  # no sample sd from one seed (not 0)
    assert rows["mass"]["per_seed"] == {"0": 0.6, "1": 0.8, "2": 0.7}
    assert rows["scratch"]["per_structure"]["spleen"] == pytest.approx(0.15)
    assert rows["mass"]["absent"] == ["cyst"] and "cyst" not in rows["mass"]["per_structure"]
    assert all(math.isfinite(v) for r in rows.values() for v in [r["dice_mean"], *r["per_structure"].values()])
    test_rows = {r["method"]: r for r in aggregate(cells, "test")}
    assert test_rows["mass"]["dice_mean"] == pytest.approx(0.7) and test_rows["mass"]["split"] == "test"
    assert test_rows["mass"]["absent"] == ["cyst"] and set(test_rows["mass"]["per_structure"]) == {"liver"}

    pairs = {p["comparison"]: p for p in paired(cells)}
    mass = pairs["mass - scratch"]
    assert mass["per_seed"] == pytest.approx({"0": 0.4, "1": 0.4, "2": 0.4}) and mass["mean"] == pytest.approx(0.4)
    rand = pairs["random-init - scratch"]
    assert rand["seeds"] == 2 and rand["per_seed"] == pytest.approx({"0": 0.1, "1": -0.1})  # only the shared seeds
    assert (rand["min"], rand["max"], rand["a_better_in"]) == pytest.approx((-0.1, 0.1, 1))
    test_pair = {p["comparison"]: p for p in paired(cells, "test")}["mass - scratch"]
    assert (test_pair["min"], test_pair["max"]) == pytest.approx((0.4, 0.4))

    table = write_report(cells, tmp_path, "t")
    assert "70.0 ± 10.0" in table and "60.0 / 80.0 / 70.0" in table and "absent" in table
    assert "+40.0 to +40.0" in table and "-10.0 to +10.0" in table and "1 of 2" in table
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["split"] == "validation" and len(data["paired"]) == 2
    assert (tmp_path / "dice_vs_labels.png").stat().st_size > 1000
    assert len((tmp_path / "results.csv").read_text().splitlines()) == 1 + 2 * 8
    with pytest.raises(Exception, match="no test Dice"):
        aggregate(cells + [_cell("incontext", 0, 0.2)], "test")


def test_dice_rule_leaves_out_absent_pairs_and_classes():
    import math

    from mass_nnu.dice import class_means, summarise
    from mass_nnu.errors import MassError
    from mass_nnu.finetuning.run import dice_summary, dice_table

    nan = float("nan")
    means = class_means({"a": {"1": 0.5, "2": nan, "3": nan}, "b": {"1": 1.0, "2": 0.0, "3": nan}})
    assert means["1"] == 0.75 and means["2"] == 0.0 and math.isnan(means["3"])
    assert summarise(means, "x") == {"mean": 0.375, "per_structure": {"1": 0.75, "2": 0.0}, "absent": ["3"]}
    with pytest.raises(MassError, match="x: no class is present"):
        summarise({"1": nan}, "x")
    # nnU-Net's summary.json: its own foreground mean is NaN with a class absent everywhere
    summary = {"metric_per_case": [
        {"prediction_file": "/p/c1.nii.gz", "metrics": {"1": {"Dice": 0.8}, "2": {"Dice": nan}}},
        {"prediction_file": "/p/c2.nii.gz", "metrics": {"1": {"Dice": 0.6}, "2": {"Dice": nan}}}],
        "mean": {"1": {"Dice": 0.7}, "2": {"Dice": nan}}, "foreground_mean": {"Dice": nan}}
    dataset_json = {"labels": {"background": 0, "liver": 1, "cyst": 2}}
    assert dice_table(summary, dataset_json) == pytest.approx({"liver": 0.7, "mean": 0.7})
    assert dice_summary(summary, dataset_json, "s")["absent"] == ["cyst"]


def test_missing_prediction_is_an_error(experiment_env, tmp_path):
    import shutil

    from mass_nnu.adapter.datasets import Dataset
    from mass_nnu.adapter.training import evaluate_folder
    from mass_nnu.errors import MassError

    dataset = Dataset.resolve(experiment_env["downstream"])
    plans, dataset_json = dataset.plans(experiment_env["plans"]), dataset.dataset_json()
    references = sorted((dataset.raw / "labelsTs").iterdir())
    predictions = tmp_path / "pred"
    predictions.mkdir()
    shutil.copy(references[0], predictions / references[0].name)
    with pytest.raises(MassError) as error:
        evaluate_folder(dataset.raw / "labelsTs", predictions, plans, dataset_json, tmp_path / "summary.json")
    assert references[1].name in str(error.value) and "1 of 2 predictions missing" in str(error.value)
    assert not (tmp_path / "summary.json").exists()
    shutil.copy(references[1], predictions / references[1].name)
    result = evaluate_folder(dataset.raw / "labelsTs", predictions, plans, dataset_json, tmp_path / "summary.json")
    assert len(result["metric_per_case"]) == 2 and result["foreground_mean"]["Dice"] == pytest.approx(1.0)


def test_method_learning_rates_are_checked():
    from mass_nnu.errors import MassError
    from mass_nnu.evaluation.label_efficiency import parse_method_lr

    assert parse_method_lr(["scratch=0.03", "mass=1e-3"]) == {"scratch": 0.03, "mass": 0.001}
    for bad in (["scratch"], ["scratch=x"], ["scratch=-1"], ["incontext=0.1"], ["mass=0.1", "mass=0.2"]):
        with pytest.raises(MassError, match="--method-lr"):
            parse_method_lr(bad)


def test_budgets_are_checked():
    from mass_nnu.errors import MassError
    from mass_nnu.evaluation.label_efficiency import parse_budgets

    assert parse_budgets(["1", "all"], 3) == [("1", 1), ("all", 3)]
    for bad in (["4"], ["0"], ["x"]):
        with pytest.raises(MassError):
            parse_budgets(bad, 3)


def test_interrupted_cell_resumes_only_in_its_own_folder(tmp_path):
    """A cell killed mid-training resumes from its checkpoint on the rerun of the same folder; another output
    folder, or other settings, start afresh."""
    from mass_nnu.evaluation.label_efficiency import run_cells

    calls = []

    def run_one(method, num_labeled, seed, test, resume):
        calls.append(resume)
        if len(calls) == 1:
            raise KeyboardInterrupt  # killed mid-training
        return {"dice": {"validation": {"mean": 50.0, "per_structure": {"a": 50.0}, "absent": [], "cases": ["v"]}},
                "train_cases": ["t"]}

    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        run_cells(out, [("1", 1)], 1, ["mass"], run_one, lambda m: {"lr": 0.01})
    run_cells(out, [("1", 1)], 1, ["mass"], run_one, lambda m: {"lr": 0.01})
    assert calls == [False, True]
    assert not list((out / "cells").glob("*.started")) and (out / "cells" / "mass_n1_seed0.json").is_file()
    run_cells(tmp_path / "other", [("1", 1)], 1, ["mass"], run_one, lambda m: {"lr": 0.01})
    assert calls[-1] is False
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        run_cells(tmp_path / "third", [("1", 1)], 1, ["mass"], run_one, lambda m: {"lr": 0.01})
    run_cells(tmp_path / "third", [("1", 1)], 1, ["mass"], run_one, lambda m: {"lr": 0.03})
    assert calls == [False, False]


def test_benchmark_methods_splits_and_resume(uninterrupted, experiment_env, run_cli, tmp_path):
    """Every method once (1 epoch × 1 iteration), validation first, then the test split completes the cells with
    their trained models; no labelled case is ever scored in the validation figure."""
    out = tmp_path / "bench"
    base = ("benchmark", "-d", experiment_env["downstream"], "-w", uninterrupted, "--budgets", "1", "--seeds", "1",
            "--epochs", "1", "--iters-per-epoch", "1")
    args = (*base, "--methods", "mass", "--methods", "scratch", "--methods", "random-init", "--incontext",
            "--method-lr", "scratch=0.02", "-o", out)
    result = run_cli(*args)
    assert result.exit_code == 0, result.output
    assert "Epoch 0" not in result.output, "quiet by default: nnU-Net's output goes to each cell's log"
    data = json.loads((out / "results.json").read_text())
    cells = {c["method"]: c for c in data["cells"]}
    assert set(cells) == {"mass", "scratch", "random-init", "incontext"} and data["split"] == "validation"
    for method, cell in cells.items():
        assert cell["settings"]["method"] == method and cell["split"] == "validation" and set(cell["dice"]) == {"validation"}
        assert 0.0 <= cell["mean_dice"] <= 1.0 and "liver" in cell["per_structure"]
    assert cells["mass"]["settings"]["head"] == "incontext" and cells["random-init"]["settings"]["random_init"]
    assert cells["scratch"]["settings"]["learning_rate"] == 0.02 and "_lr0.02" in cells["scratch"]["plans"]
    assert cells["mass"]["settings"]["learning_rate"] is None and "_lr" not in cells["mass"]["plans"]
    assert "weights" not in cells["scratch"]["settings"] and cells["scratch"]["settings"]["plans"]
    assert cells["random-init"]["plans"].endswith("_rand") and cells["random-init"]["plans"] != cells["mass"]["plans"]
    assert not (Path(cells["mass"]["model_folder"]) / "fold_0" / "predictions_imagesTs").exists(), "test set untouched"
    for method in ("mass", "scratch", "random-init"):  # nnU-Net's own validation summary against the budget
        fold = Path(cells[method]["model_folder"]) / "fold_0"
        budget = json.loads((fold / "label_budget.json").read_text())
        scored = {Path(c["reference_file"]).name.split(".")[0]
                  for c in json.loads((fold / "validation" / "summary.json").read_text())["metric_per_case"]}
        assert scored == set(budget["val"]) and not scored & set(budget["train"])
        assert cells[method]["dice"]["validation"]["cases"] == sorted(budget["val"])
        assert "Epoch 0" in (fold / "mass_finetune_log.txt").read_text()  # nnU-Net's output, kept per cell
    logs = {m: "".join(p.read_text() for p in (Path(cells[m]["model_folder"]) / "fold_0").glob("training_log_*.txt"))
            for m in ("mass", "random-init")}
    assert "random initialisation" in logs["random-init"] and "random initialisation" not in logs["mass"]
    ic = cells["incontext"]
    assert not set(ic["dice"]["validation"]["cases"]) & set(ic["train_cases"])
    diag = ic["diagnostics"]["validation"]
    assert set(diag["ensemble"]) == {"1", "3"} and all(0 <= v <= 1 for v in diag["ensemble"].values())
    assert all(math.isfinite(diag["pairing"][k]) for k in ("matched", "mismatched", "gap"))
    assert 0 <= diag["alone"] <= 1 and "each class alone" in result.stdout
    assert len(ic["references"]["k3"]) == 3 and ic["references"]["k1"] == ic["references"]["cell"]
    assert "pairing gap" in result.stdout and "K = 3" in result.stdout and "−" in result.stdout  # paired table
    assert {p["comparison"] for p in data["paired"]} == {"mass - scratch", "random-init - scratch"}
    assert (out / "dice_vs_labels.png").stat().st_size > 1000

    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "cells").iterdir()}
    again = run_cli(*args)
    assert again.exit_code == 0
    assert {p.name: p.stat().st_mtime_ns for p in (out / "cells").iterdir()} == stamps, "finished cells must be reused"
    other = run_cli(*args[:-2], "--lr", "0.001", "-o", out)
    assert other.exit_code == 1 and "run with other settings" in other.output

    final = run_cli(*base, "--methods", "mass", "--methods", "incontext", "--split", "test", "-o", out, "--verbose")
    assert final.exit_code == 0, final.output  # the test set, once, with the trained models
    tested = {c["method"]: c for c in json.loads((out / "results.json").read_text())["cells"]}
    assert set(tested) == {"mass", "incontext"}
    for method, cell in tested.items():
        assert cell["split"] == "test" and set(cell["dice"]) == {"validation", "test"}
        assert cell["dice"]["validation"] == cells[method]["dice"]["validation"]  # the same trained model
        assert len(cell["dice"]["test"]["cases"]) == 2
    assert "Epoch 0" not in final.output, "the test split must reuse the trained models, not train again"
