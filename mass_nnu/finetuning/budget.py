"""Label budgets: a deterministic, seeded subset of a fold's training cases (validation and test untouched)."""
from __future__ import annotations

import numpy as np

from mass_nnu.errors import MassError


def budget_size(available: int, num_labeled: int | None = None, fraction: float | None = None) -> int | None:
    """How many cases a budget keeps (None = all); MassError when it cannot be met."""
    if num_labeled is not None and fraction is not None:
        raise MassError("label budget: give --num-labeled or --fraction, not both")
    if num_labeled is not None:
        if num_labeled < 1:
            raise MassError(f"label budget: --num-labeled must be at least 1 (got {num_labeled})")
        if num_labeled > available:
            raise MassError(f"label budget: --num-labeled {num_labeled} is more than the {available} training "
                            f"cases of this fold")
        return int(num_labeled)
    if fraction is not None:
        if not 0 < fraction <= 1:
            raise MassError(f"label budget: --fraction must be in (0, 1] (got {fraction})")
        return max(1, int(round(fraction * available)))
    return None


def select_budget(train_cases, num_labeled: int | None = None, fraction: float | None = None,
                  seed: int = 0) -> list[str]:
    """Sorted subset of ``train_cases`` drawn with ``seed``; the same inputs always give the same subset, and a
    smaller budget with the same seed is a prefix-draw of the same permutation (budgets are nested)."""
    cases = sorted(str(c) for c in train_cases)
    size = budget_size(len(cases), num_labeled, fraction)
    if size is None:
        return cases
    order = np.random.default_rng(seed).permutation(len(cases))
    return sorted(cases[i] for i in order[:size])
