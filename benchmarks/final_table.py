"""The final table of docs/benchmarks.md: several `mass benchmark` output folders (one per dataset) side by side.

    python benchmarks/final_table.py NAME=OUT_DIR [NAME=OUT_DIR ...] [--split test|validation]

For each folder: every (method, budget) as mean ± sd over the seeds with the per-seed figures, the paired
differences (MASS − scratch, random-init − scratch: mean, range, seeds where the first is better) and the in-context
diagnostics (K = 1 and 3 references, pairing gap), all on one split, computed from the cells by
``mass_nnu.evaluation.report`` (the same figures as each folder's results.md). Nothing is trained or scored here;
a cell without the split is an error.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from mass_nnu.evaluation.report import METHOD_LABELS, aggregate, paired


def load(folder: Path) -> list[dict]:
    cells = [json.loads(p.read_text()) for p in sorted((folder / "cells").glob("*.json"))]
    if not cells:
        raise SystemExit(f"{folder}: no cells")
    return cells


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def _row_figure(row: dict) -> str:
    seeds = " / ".join(_pct(v) for v in row["per_seed"].values())
    if row["dice_sd"] is None:
        return f"{_pct(row['dice_mean'])} (1 seed)"
    return f"{_pct(row['dice_mean'])} ± {_pct(row['dice_sd'])} ({seeds})"


def _budget(cells: list[dict], n: int) -> str:
    """"8 (all)" for the budget of all training cases, else the number."""
    return f"{n} (all)" if any(c["budget"] == "all" and c["num_labeled"] == n for c in cells) else str(n)


def tables(runs: dict[str, list[dict]], split: str) -> str:
    names = list(runs)
    label = {n: _budget([c for cells in runs.values() for c in cells], n)
             for n in {c["num_labeled"] for cells in runs.values() for c in cells}}
    summaries = {n: {(r["method"], r["num_labeled"]): r for r in aggregate(cells, split)} for n, cells in runs.items()}
    pairs = {n: {(p["a"], p["num_labeled"]): p for p in paired(cells, split)} for n, cells in runs.items()}
    keys = sorted({k for s in summaries.values() for k in s},
                  key=lambda k: (list(METHOD_LABELS).index(k[0]) if k[0] in METHOD_LABELS else 99, k[1]))
    lines = [f"| method | labelled cases | {' | '.join(names)} |", "|---|---|" + "---|" * len(names)]
    for method, n in keys:
        figures = [_row_figure(summaries[name][(method, n)]) if (method, n) in summaries[name] else "–"
                   for name in names]
        lines.append(f"| {METHOD_LABELS.get(method, method)} | {label[n]} | {' | '.join(figures)} |")
    lines += ["", f"Paired differences ({split}, Dice points): mean (range), seeds where the first is better:", "",
              f"| comparison | labelled cases | {' | '.join(names)} |", "|---|---|" + "---|" * len(names)]
    for a, n in sorted({k for p in pairs.values() for k in p}, key=lambda k: (k[0] != "mass", k[1])):
        cols = []
        for name in names:
            p = pairs[name].get((a, n))
            cols.append("–" if p is None else f"{100 * p['mean']:+.1f} ({100 * p['min']:+.1f} to "
                                              f"{100 * p['max']:+.1f}), {p['a_better_in']} of {p['seeds']}")
        lines.append(f"| {METHOD_LABELS[a]} − scratch | {label[n]} | {' | '.join(cols)} |")
    lines += ["", f"In-context diagnostics ({split}, Dice %): K = 1 / K = 3 references per class; pairing gap = "
              "matched minus other-class references:", "",
              f"| labelled cases | {' | '.join(names)} |", "|---|" + "---|" * len(names)]
    for method, n in keys:
        if method != "incontext":
            continue
        cols = []
        for name in names:
            d = summaries[name].get((method, n), {}).get("diagnostics", {})
            ens, pair = d.get("ensemble", {}), d.get("pairing")
            cols.append(f"{_pct(ens.get('1'))} / {_pct(ens.get('3'))}; gap "
                        + ("–" if not pair else f"{100 * pair['gap']:+.1f}"))
        lines.append(f"| {label[n]} | {' | '.join(cols)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="NAME=OUT_DIR (a mass benchmark -o folder)")
    parser.add_argument("--split", default="test", choices=("test", "validation"))
    args = parser.parse_args()
    runs = {}
    for spec in args.runs:
        name, _, folder = spec.partition("=")
        runs[name] = load(Path(folder))
    print(tables(runs, args.split))


if __name__ == "__main__":
    main()
