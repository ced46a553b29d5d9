"""Aggregate benchmark cells into results.csv / results.json, a Markdown table and a Dice-vs-labels plot."""
from __future__ import annotations

import csv
import io
from collections import defaultdict
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, NullLocator, ScalarFormatter

from mass_nnu.io import atomic_path, save_json_atomic

METHOD_LABELS = {"mass": "MASS fine-tuned", "scratch": "nnU-Net from scratch", "incontext": "MASS in-context"}


def _budget_key(budget) -> float:
    return float("inf") if budget == "all" else float(budget)


def aggregate(cells: list[dict]) -> list[dict]:
    """Mean ± sd over seeds of each (method, budget); per-structure means as well."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for cell in cells:
        groups[(cell["method"], cell["budget"])].append(cell)
    rows = []
    for (method, budget), group in sorted(groups.items(), key=lambda kv: (kv[0][0], _budget_key(kv[0][1]))):
        dice = np.array([c["mean_dice"] for c in group], dtype=float)
        structures = sorted({s for c in group for s in c["per_structure"]})
        rows.append({
            "method": method, "budget": budget, "num_labeled": group[0]["num_labeled"], "seeds": len(group),
            "dice_mean": float(dice.mean()), "dice_sd": float(dice.std(ddof=1)) if len(dice) > 1 else 0.0,
            "per_structure": {s: float(np.mean([c["per_structure"][s] for c in group if s in c["per_structure"]]))
                              for s in structures},
        })
    return rows


def markdown_table(rows: list[dict]) -> str:
    structures = sorted({s for r in rows for s in r["per_structure"]})
    head = ["method", "labelled cases", "seeds", "mean Dice"] + structures
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [METHOD_LABELS.get(r["method"], r["method"]), str(r["num_labeled"]), str(r["seeds"]),
                 f"{100 * r['dice_mean']:.1f} ± {100 * r['dice_sd']:.1f}"]
        cells += [f"{100 * r['per_structure'][s]:.1f}" if s in r["per_structure"] else "–" for s in structures]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> None:

    budgets = sorted({r["num_labeled"] for r in rows})
    # matplotlib's own defaults: nnU-Net's progress plots (same process) change the global style and font scale
    with matplotlib.style.context("default"), matplotlib.rc_context({"font.size": 10}):
        fig = Figure(figsize=(6.4, 4.4))
        ax = fig.subplots()
        for method in sorted({r["method"] for r in rows}):
            mine = sorted((r for r in rows if r["method"] == method), key=lambda r: r["num_labeled"])
            ax.errorbar([r["num_labeled"] for r in mine], [100 * r["dice_mean"] for r in mine],
                        yerr=[100 * r["dice_sd"] for r in mine], marker="o", capsize=4,
                        label=METHOD_LABELS.get(method, method))
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(FixedLocator(budgets))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.set_xlabel("labelled training cases")
        ax.set_ylabel("mean Dice on held-out test set (%)")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=9)
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=120)


def write_report(cells: list[dict], out_dir: Path, title: str) -> str:
    """Write results.csv, results.json, results.md and dice_vs_labels.png; return the Markdown table."""
    rows = aggregate(cells)
    save_json_atomic({"cells": cells, "summary": rows}, out_dir / "results.json")
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["method", "budget", "num_labeled", "seed", "mean_dice", "structure", "dice"])
    for c in cells:
        for structure, dice in sorted(c["per_structure"].items()):
            writer.writerow([c["method"], c["budget"], c["num_labeled"], c["seed"], f"{c['mean_dice']:.5f}",
                             structure, f"{dice:.5f}"])
    with atomic_path(out_dir / "results.csv") as tmp:
        tmp.write_text(buffer.getvalue())
    table = markdown_table(rows)
    with atomic_path(out_dir / "results.md") as tmp:
        tmp.write_text(f"# {title}\n\n{table}\n")
    plot(rows, out_dir / "dice_vs_labels.png", title)
    return table
