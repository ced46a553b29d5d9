"""Aggregate benchmark cells into results.csv / results.json, a Markdown table and a Dice-vs-labels plot."""
from __future__ import annotations

import csv
import io
from collections import defaultdict
from pathlib import Path

import matplotlib
import matplotlib.style  # matplotlib.style.context: "import matplotlib" alone does not load it
import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, NullLocator, ScalarFormatter

from mass_nnu.errors import MassError
from mass_nnu.io import atomic_path, save_json_atomic

METHOD_LABELS = {"mass": "MASS fine-tuned", "scratch": "nnU-Net from scratch",
                 "random-init": "MASS network from random weights", "incontext": "MASS in-context"}
PAIRED = (("mass", "scratch"), ("random-init", "scratch"))  # (a, b): a minus b, seed by seed


def _budget_key(budget) -> float:
    return float("inf") if budget == "all" else float(budget)


def figure(cell: dict, split: str) -> dict:
    """{"mean", "per_structure"} of a cell on ``split`` (cells written before the protocol: their one figure)."""
    if "dice" in cell:
        if split not in cell["dice"]:
            raise MassError(f"cell {cell['method']} n{cell['budget']} seed {cell['seed']}: no {split} Dice")
        return cell["dice"][split]
    return {"mean": cell["mean_dice"], "per_structure": cell["per_structure"]}


def _finite(values) -> list[float]:
    return [float(v) for v in values if v is not None and np.isfinite(v)]


def aggregate(cells: list[dict], split: str = "validation") -> list[dict]:
    """Mean ± sd over seeds of each (method, budget), the per-seed figures, and per-structure means over the seeds
    whose cell has the structure (a structure no seed has is listed under "absent"). No NaN reaches a mean."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for cell in cells:
        groups[(cell["method"], cell["budget"])].append(cell)
    rows = []
    order = list(METHOD_LABELS)  # mass, scratch, random-init, incontext; then others by name
    for (method, budget), group in sorted(groups.items(), key=lambda kv: (
            order.index(kv[0][0]) if kv[0][0] in order else len(order), kv[0][0], _budget_key(kv[0][1]))):
        group = sorted(group, key=lambda c: c["seed"])
        figures = [figure(c, split) for c in group]
        dice = np.array([f["mean"] for f in figures], dtype=float)
        if not np.all(np.isfinite(dice)):
            raise MassError(f"cells {method} n{budget}: a non-finite mean Dice {dice.tolist()}")
        structures = sorted({s for f in figures for s in f["per_structure"]}
                            | {s for f in figures for s in f.get("absent", [])})
        per_structure = {s: _finite(f["per_structure"].get(s) for f in figures) for s in structures}
        row = {
            "method": method, "budget": budget, "num_labeled": group[0]["num_labeled"], "seeds": len(group),
            "split": split, "dice_mean": float(dice.mean()),
            "dice_sd": float(dice.std(ddof=1)) if len(dice) > 1 else None,  # no sample sd from one seed
            "per_seed": {str(c["seed"]): float(d) for c, d in zip(group, dice)},
            "per_structure": {s: float(np.mean(v)) for s, v in per_structure.items() if v},
            "absent": [s for s, v in per_structure.items() if not v],
        }
        diagnostics = [c["diagnostics"][split] for c in group if split in c.get("diagnostics", {})]
        if diagnostics:
            row["diagnostics"] = _mean_diagnostics(diagnostics)
        rows.append(row)
    return rows


def _mean_diagnostics(diagnostics: list[dict]) -> dict:
    """In-context diagnostics averaged over seeds: pairing gap (and its parts), Dice per ensemble size K."""
    out = {}
    pairings = [d["pairing"] for d in diagnostics if d.get("pairing")]
    if pairings:
        out["pairing"] = {k: float(np.mean([p[k] for p in pairings])) for k in ("matched", "mismatched", "gap")}
        out["pairing"]["per_seed_gap"] = [float(p["gap"]) for p in pairings]
    alone = _finite(d.get("alone") for d in diagnostics)
    if alone:
        out["alone"] = float(np.mean(alone))
    ks = sorted({k for d in diagnostics for k in d.get("ensemble", {})}, key=int)
    out["ensemble"] = {k: float(np.mean(_finite(d["ensemble"].get(k) for d in diagnostics))) for k in ks
                       if _finite(d["ensemble"].get(k) for d in diagnostics)}
    return out


def paired(cells: list[dict], split: str = "validation") -> list[dict]:
    """Per budget and seed: MASS minus scratch (and random-init minus scratch when present), with the mean and
    range over the seeds both methods ran."""
    by_key = {(c["method"], c["budget"], c["seed"]): c for c in cells}
    budgets = sorted({(c["budget"], c["num_labeled"]) for c in cells}, key=lambda b: _budget_key(b[0]))
    out = []
    for a, b in PAIRED:
        for budget, num_labeled in budgets:
            seeds = sorted(s for (m, bu, s) in by_key if m == a and bu == budget and (b, budget, s) in by_key)
            if not seeds:
                continue
            diffs = {str(s): float(figure(by_key[(a, budget, s)], split)["mean"]
                                   - figure(by_key[(b, budget, s)], split)["mean"]) for s in seeds}
            values = list(diffs.values())
            out.append({"comparison": f"{a} - {b}", "a": a, "b": b, "budget": budget, "num_labeled": num_labeled,
                        "split": split, "seeds": len(values), "per_seed": diffs, "mean": float(np.mean(values)),
                        "min": float(min(values)), "max": float(max(values)),
                        "a_better_in": int(sum(v > 0 for v in values))})
    return out


def _points(value: float) -> str:
    return f"{100 * value:+.1f}"


def markdown_table(rows: list[dict], pairs: list[dict] | None = None) -> str:
    """The Dice table (mean ± sd, per seed, per structure), then the paired differences and the in-context
    diagnostics when there are any."""
    structures = sorted({s for r in rows for s in r["per_structure"]} | {s for r in rows for s in r["absent"]})
    head = ["method", "labelled cases", "seeds", "mean Dice", "per seed"] + structures
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [METHOD_LABELS.get(r["method"], r["method"]), str(r["num_labeled"]), str(r["seeds"]),
                 f"{100 * r['dice_mean']:.1f} ± {100 * r['dice_sd']:.1f}" if r["seeds"] > 1 else
                 f"{100 * r['dice_mean']:.1f} (1 seed)",
                 " / ".join(f"{100 * v:.1f}" for v in r["per_seed"].values())]
        cells += [f"{100 * r['per_structure'][s]:.1f}" if s in r["per_structure"] else
                  "absent" if s in r["absent"] else "–" for s in structures]
        lines.append("| " + " | ".join(cells) + " |")
    if pairs:
        lines += ["", "Paired difference, same budget and seed (Dice points):", "",
                  "| comparison | labelled cases | seeds | mean | range | per seed | better in |",
                  "|---|---|---|---|---|---|---|"]
        for p in pairs:
            lines.append(f"| {METHOD_LABELS.get(p['a'], p['a'])} − {METHOD_LABELS.get(p['b'], p['b'])} | "
                         f"{p['num_labeled']} | {p['seeds']} | {_points(p['mean'])} | {_points(p['min'])} to "
                         f"{_points(p['max'])} | {' / '.join(_points(v) for v in p['per_seed'].values())} | "
                         f"{p['a_better_in']} of {p['seeds']} |")
    diagnosed = [r for r in rows if r.get("diagnostics")]
    if diagnosed:
        ks = sorted({k for r in diagnosed for k in r["diagnostics"].get("ensemble", {})}, key=int)
        caption = ("In-context diagnostics (Dice %): pairing gap = matched references minus references of another "
                   "class (near 0: the reference is ignored); K = references per class, token average; each class "
                   "alone = every task's own sigmoid > 0.5 (no competition between classes for a voxel):")
        header = "| labelled cases | seeds | matched | other class | pairing gap | " + \
            " | ".join(f"K = {k}" for k in ks) + " | each class alone |"
        lines += ["", caption, "", header, "|---|---|---|---|---|" + "---|" * (len(ks) + 1)]
        for r in diagnosed:
            d = r["diagnostics"]
            pair = d.get("pairing")
            cols = [f"{100 * pair['matched']:.1f}", f"{100 * pair['mismatched']:.1f}", _points(pair["gap"])] \
                if pair else ["–", "–", "– (one class)"]
            cols += [f"{100 * d['ensemble'][k]:.1f}" if k in d.get("ensemble", {}) else "–" for k in ks]
            cols.append(f"{100 * d['alone']:.1f}" if "alone" in d else "–")
            lines.append(f"| {r['num_labeled']} | {r['seeds']} | " + " | ".join(cols) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str, split: str = "validation") -> None:

    budgets = sorted({r["num_labeled"] for r in rows})
    # matplotlib's own defaults: nnU-Net's progress plots (same process) change the global style and font scale
    with matplotlib.style.context("default"), matplotlib.rc_context({"font.size": 10}):
        fig = Figure(figsize=(6.4, 4.4))
        ax = fig.subplots()
        for method in sorted({r["method"] for r in rows}):
            mine = sorted((r for r in rows if r["method"] == method), key=lambda r: r["num_labeled"])
            ax.errorbar([r["num_labeled"] for r in mine], [100 * r["dice_mean"] for r in mine],
                        yerr=[100 * (r["dice_sd"] or 0.0) for r in mine], marker="o", capsize=4,
                        label=METHOD_LABELS.get(method, method))
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(FixedLocator(budgets))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.set_xlabel("labelled training cases")
        ax.set_ylabel("mean Dice on the held-out test set (%)" if split == "test" else
                      "mean Dice on the fold's validation cases (%)")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=9)
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=120)


def write_report(cells: list[dict], out_dir: Path, title: str, split: str = "validation") -> str:
    """Write results.csv, results.json, results.md and dice_vs_labels.png for ``split``; return the Markdown."""
    rows = aggregate(cells, split)
    pairs = paired(cells, split)
    save_json_atomic({"split": split, "cells": cells, "summary": rows, "paired": pairs}, out_dir / "results.json")
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["method", "budget", "num_labeled", "seed", "split", "mean_dice", "structure", "dice"])
    for c in cells:
        f = figure(c, split)
        for structure, dice in sorted(f["per_structure"].items()):
            writer.writerow([c["method"], c["budget"], c["num_labeled"], c["seed"], split, f"{f['mean']:.5f}",
                             structure, f"{dice:.5f}"])
    with atomic_path(out_dir / "results.csv") as tmp:
        tmp.write_text(buffer.getvalue())
    table = markdown_table(rows, pairs)
    with atomic_path(out_dir / "results.md") as tmp:
        tmp.write_text(f"# {title}\n\n{table}\n")
    plot(rows, out_dir / "dice_vs_labels.png", title, split)
    return table
