"""The one rule for averaging Dice, the same for fine-tuned models (nnU-Net's summary.json) and in-context cells.

- nnU-Net's Dice of a (case, class) pair is NaN when the class is absent from both reference and prediction: that
  pair is left out of the class's mean over cases (a prediction of a class the reference lacks scores 0, and so does
  a class the reference holds but the prediction misses, e.g. an in-context class no reference holds).
- A class that is NaN in every case (absent from all references and predictions) has no mean: it is left out of
  the mean over classes and reported as absent.
- With no class left there is no Dice at all: MassError (never a NaN mean).
"""
from __future__ import annotations

import math
from collections.abc import Mapping

from mass_nnu.errors import MassError


def finite(value) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def class_means(per_case: Mapping[str, Mapping[str, float]], classes=None) -> dict[str, float]:
    """{class: mean Dice over the cases where it is defined}, NaN for a class defined in no case."""
    classes = list(classes) if classes is not None else list(dict.fromkeys(k for s in per_case.values() for k in s))
    means = {}
    for cls in classes:
        values = [float(s[cls]) for s in per_case.values() if cls in s and finite(float(s[cls]))]
        means[cls] = sum(values) / len(values) if values else float("nan")
    return means


def summarise(means: Mapping[str, float], source: str) -> dict:
    """{"mean": mean over the classes with a mean, "per_structure": those classes, "absent": the others}."""
    present = {k: float(v) for k, v in means.items() if finite(float(v))}
    absent = [k for k, v in means.items() if not finite(float(v))]
    if not present:
        raise MassError(f"{source}: no class is present in any reference or prediction; Dice is undefined")
    return {"mean": sum(present.values()) / len(present), "per_structure": present, "absent": absent}
