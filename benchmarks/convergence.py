"""Dice against fine-tuning iterations (issue 16, "converged baselines"), from `mass benchmark` output folders.

    python benchmarks/convergence.py OUT_DIR [OUT_DIR ...] -o docs/convergence_mni.png [--split validation test]
           [--title "..."] [--methods mass scratch] [--budgets 1 all]

Each folder is one `mass benchmark` run at one schedule (e.g. `--epochs 20`, `80`, `167` with
`--iters-per-epoch 12`: 240, 960, 2004 iterations, the same poly schedule shape, batch and patch); the cells'
settings give the iterations (epochs × iterations per epoch), so the folders may come in any order and may hold
other methods or budgets too. For every (method, budget) the plot shows the mean Dice over the seeds against
iterations (log scale), each seed as a dot, and the script prints the same as a Markdown table with the per-seed
figures. A method run at several learning rates (``--method-lr``) gives one series per lr. Cells without the
requested split are left out (say so); ``--methods`` and ``--budgets`` keep only those cells (default: mass and
scratch at 1 and all labels). Nothing is trained here.
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path


def load_points(folders: list[Path], split: str, methods=("mass", "scratch"),
                budgets=("1", "all")) -> tuple[dict, list[str]]:
    """{(method, budget, lr): {iterations: {seed: dice}}} of the cells of ``methods`` at ``budgets``, and the cells
    skipped for lack of ``split`` (lr None: the trainer's default)."""
    points: dict = defaultdict(lambda: defaultdict(dict))
    skipped, datasets = [], set()
    for folder in folders:
        for path in sorted((folder / "cells").glob("*.json")):
            cell = json.loads(path.read_text())
            settings = cell.get("settings", {})
            if cell["method"] not in methods or str(cell["budget"]) not in budgets or "epochs" not in settings:
                continue
            if split not in cell.get("dice", {}):
                skipped.append(str(path))
                continue
            datasets |= {p for p in Path(cell["model_folder"]).parts if p.startswith("Dataset")}
            if len(datasets) > 1:
                raise SystemExit(f"{path}: the folders hold cells of several datasets ({', '.join(sorted(datasets))})")
            iterations = int(settings["epochs"]) * int(settings["iterations_per_epoch"])
            key = (cell["method"], cell["budget"], settings.get("learning_rate"))
            points[key][iterations][int(cell["seed"])] = cell["dice"][split]["mean"]
    return points, skipped


def _name(method: str, lr) -> str:
    return method if lr is None else f"{method} (lr {lr:g})"


def _order(item):
    (method, budget, lr), _ = item
    return method, budget, -1.0 if lr is None else float(lr)


def markdown(points: dict, split: str) -> str:
    iterations = sorted({i for series in points.values() for i in series})
    lines = [f"| method | labelled cases | {' | '.join(f'{i} it.' for i in iterations)} |",
             "| --- | --- | " + " | ".join("---" for _ in iterations) + " |"]
    for (method, budget, lr), series in sorted(points.items(), key=_order):
        cells = []
        for i in iterations:
            seeds = series.get(i, {})
            if not seeds:
                cells.append("–")
                continue
            values = [100 * seeds[s] for s in sorted(seeds)]
            mean = sum(values) / len(values)
            cells.append(f"{mean:.1f} ({' / '.join(f'{v:.1f}' for v in values)})")
        lines.append(f"| {_name(method, lr)} | {budget} | {' | '.join(cells)} |")
    return f"{split} Dice (%), mean over seeds (per seed)\n\n" + "\n".join(lines)


def plot(points_by_split: dict, out: Path, title: str) -> None:
    """One panel per split ({split: points}), the same axes and styles."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5 * len(points_by_split), 4.5))
    axes = fig.subplots(1, len(points_by_split), sharey=True, squeeze=False)[0]
    styles = {"mass": "C0", "scratch": "C1", "random-init": "C2"}
    for ax, (split, points) in zip(axes, points_by_split.items()):
        for (method, budget, lr), series in sorted(points.items(), key=_order):
            xs = sorted(series)
            means = [100 * sum(series[x].values()) / len(series[x]) for x in xs]
            labels = "all labels" if budget == "all" else f"{budget} label{'' if str(budget) == '1' else 's'}"
            ax.plot(xs, means, marker="o", color=styles.get(method, "C3"), linestyle="-" if budget == "all" else "--",
                    label=f"{_name(method, lr)}, {labels}")
            for x in xs:
                ax.scatter([x] * len(series[x]), [100 * v for v in series[x].values()], s=10,
                           color=styles.get(method, "C3"), alpha=0.5)
        ax.set_xscale("log")
        ax.set_xlabel("fine-tuning iterations (batch 2)")
        ax.set_ylabel("Dice (%)")
        ax.set_title(f"{split} split")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("-o", type=Path, required=True, help="the PNG to write")
    parser.add_argument("--split", nargs="+", default=["validation"], choices=("validation", "test"),
                        help="one panel and one table per split")
    parser.add_argument("--title", default="Dice against fine-tuning iterations")
    parser.add_argument("--methods", nargs="+", default=["mass", "scratch"])
    parser.add_argument("--budgets", nargs="+", default=["1", "all"])
    args = parser.parse_args()
    points_by_split = {}
    for split in args.split:
        points, skipped = load_points(args.folders, split, args.methods, args.budgets)
        if not points:
            raise SystemExit(f"no fine-tuned cells with {split} Dice in {', '.join(map(str, args.folders))}")
        points_by_split[split] = points
        print(markdown(points, split) + "\n")
        if skipped:
            print(f"{len(skipped)} cell(s) without {split} Dice left out, e.g. {skipped[0]}\n")
    plot(points_by_split, args.o, args.title)
    print(f"\nwrote {args.o}")


if __name__ == "__main__":
    main()
