"""k-fold cross-validation: one run per fold (test = that fold), then the mean and spread of every test metric."""

from __future__ import annotations

import math
import os
import statistics
from pathlib import Path
from typing import Any

from kiln.config import Config, load_config
from kiln.run import RunDir
from kiln.train.loop import train

CV_RESULTS = "cv_results.json"


def summarise(per_fold: list[dict[str, float]]) -> dict[str, dict[str, Any]]:
    """metric -> {mean, std (population, over folds), values}; NaN folds are left out of mean and std."""
    out: dict[str, dict[str, Any]] = {}
    for key in per_fold[0]:
        values = [m[key] for m in per_fold]
        finite = [v for v in values if isinstance(v, int | float) and not math.isnan(v)]
        if finite:
            out[key] = {"mean": statistics.fmean(finite), "std": statistics.pstdev(finite), "values": values}
    return out


def train_folds(config: str | os.PathLike | dict | Config, folds: int,
                overrides: dict[str, Any] | list[str] | None = None, *, out: str | os.PathLike | None = None,
                live: bool | None = None) -> dict[str, Any]:
    """Train ``folds`` runs on stratified folds of one data set, in ``out``/fold_<k>, and write cv_results.json."""
    cfg = load_config(config, overrides)
    root = RunDir(out or Path("runs") / cfg.name)
    root.check_new()
    runs = [train(cfg, {"data.folds": folds, "data.fold": k}, out=root.path / f"fold_{k}", live=live)
            for k in range(folds)]
    results = {"folds": folds, "runs": [str(r.path) for r in runs],
               "test": summarise([r.metrics["test"] for r in runs])}
    root.write_json(CV_RESULTS, results)
    return results
