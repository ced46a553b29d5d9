"""`mass probe`: a linear classifier (standardised logistic regression) on frozen features, cross-validated."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, roc_auc_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from mass_nnu.errors import MassError


def load_features(path: Path) -> tuple[np.ndarray, list[str]]:
    path = Path(path)
    if not path.is_file():
        raise MassError(f"{path}: features file not found")
    try:
        with np.load(path, allow_pickle=False) as npz:
            return np.asarray(npz["features"], dtype=np.float64), [str(c) for c in npz["case_ids"]]
    except (KeyError, ValueError, OSError) as e:
        raise MassError(f"{path}: not a 'mass embed' features file ({e})") from None


def load_labels(path: Path) -> dict[str, str]:
    """labels.csv with columns case_id,label."""
    path = Path(path)
    if not path.is_file():
        raise MassError(f"{path}: labels file not found")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"case_id", "label"} <= set(reader.fieldnames):
            raise MassError(f"{path}: needs the columns case_id,label (found {reader.fieldnames})")
        labels = {}
        for row in reader:
            if row["case_id"] in labels:
                raise MassError(f"{path}: case '{row['case_id']}' appears twice")
            labels[row["case_id"]] = row["label"].strip()
    return labels


def probe(features_file: Path, labels_file: Path, folds: int = 5, seed: int = 0) -> dict:
    """Out-of-fold accuracy and AUC (binary; macro one-vs-rest for more classes) with stratified k-fold."""
    features, case_ids = load_features(features_file)
    labels = load_labels(labels_file)
    unknown = [c for c in labels if c not in set(case_ids)]
    if unknown:
        raise MassError(f"{labels_file}: {len(unknown)} case id(s) not in {features_file}, e.g. {unknown[:3]}")
    keep = [i for i, c in enumerate(case_ids) if c in labels]
    x = features[keep]
    classes = sorted(set(labels.values()))
    y = np.asarray([classes.index(labels[case_ids[i]]) for i in keep])
    counts = np.bincount(y, minlength=len(classes))
    if len(classes) < 2:
        raise MassError(f"{labels_file}: needs at least two classes (found {classes})")
    if folds < 2 or counts.min() < folds:
        raise MassError(f"--folds {folds}: each class needs at least that many cases and folds must be >= 2 "
                        f"(class counts {dict(zip(classes, counts.tolist()))})")
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000))
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    probabilities = cross_val_predict(model, x, y, cv=splitter, method="predict_proba")
    fold_accuracy = [accuracy_score(y[test], probabilities[test].argmax(1)) for _, test in splitter.split(x, y)]
    auc = (roc_auc_score(y, probabilities[:, 1]) if len(classes) == 2
           else roc_auc_score(y, probabilities, multi_class="ovr", average="macro"))
    return {"cases": len(y), "unlabelled_cases_ignored": len(case_ids) - len(y), "features": int(x.shape[1]),
            "classes": {c: int(n) for c, n in zip(classes, counts)}, "folds": folds, "seed": seed,
            "accuracy": float(accuracy_score(y, probabilities.argmax(1))),
            "accuracy_fold_std": float(np.std(fold_accuracy)), "auc": float(auc),
            "chance_accuracy": float(counts.max() / counts.sum())}
