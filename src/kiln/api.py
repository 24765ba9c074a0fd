"""The Python API's entry points for training: ``kiln.train`` and k-fold cross-validation.

They read and validate the config, train through :mod:`kiln.training.session`, and hand back the finished
run as a :class:`kiln.run.Run`.
"""

from __future__ import annotations

import math
import os
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kiln.config import Config, load_config
from kiln.rundir import RunDir
from kiln.run import Run
from kiln.training.session import train_run

CV_RESULTS = "cv_results.json"


def train(config: str | os.PathLike | dict | Config, overrides: dict[str, Any] | list[str] | None = None, *,
          out: str | os.PathLike | None = None, resume: bool = False, live: bool | None = None,
          on_evaluation: Callable[[dict], None] | None = None) -> Run:
    """Train a model from a config and return the finished :class:`Run`.

    ``overrides`` set dotted keys (``{"train.epochs": 3}`` or ``["train.epochs=3"]``); ``out`` is the run
    directory (default ``runs/<name>``); ``resume`` continues the run there from its last checkpoint; ``live``
    forces the progress bar on or off (default: on a terminal). Everything is validated (config, model
    shapes, data files) before anything is written, so a failed start leaves existing files as they were.
    ``on_evaluation`` is called with each evaluation's record (an epoch's validation metrics); an exception it
    raises stops the training (kiln tune prunes trials so).
    """
    cfg = load_config(config, overrides)
    run_dir = RunDir(out or Path("runs") / cfg.name)
    saved = load_config(run_dir / RunDir.CONFIG).to_dict() if resume and run_dir.is_run() else None
    t = train_run(cfg, run_dir, resume, saved, live, on_evaluation)
    return Run(t.run_dir, t.cfg, t.model, t.device, t.kind)


def train_folds(config: str | os.PathLike | dict | Config, folds: int,
                overrides: dict[str, Any] | list[str] | None = None, *, out: str | os.PathLike | None = None,
                live: bool | None = None) -> dict[str, Any]:
    """Train ``folds`` runs on the folds the data's kind defines (stratified folds of a table, walk-forward blocks
    at the end of a time series), in ``out``/fold_<k>, and write cv_results.json."""
    cfg = load_config(config, overrides)
    root = RunDir(out or Path("runs") / cfg.name)
    root.check_new()
    runs = [train(cfg, {"data.folds": folds, "data.fold": k}, out=root.path / f"fold_{k}", live=live)
            for k in range(folds)]
    results = {"folds": folds, "runs": [str(r.path) for r in runs],
               "test": summarise([r.metrics["test"] for r in runs])}
    root.write_json(CV_RESULTS, results)
    return results


def summarise(per_fold: list[dict[str, float]]) -> dict[str, dict[str, Any]]:
    """metric -> {mean, std (population, over folds), values}; NaN folds are left out of mean and std."""
    out: dict[str, dict[str, Any]] = {}
    for key in per_fold[0]:
        values = [m[key] for m in per_fold]
        finite = [v for v in values if isinstance(v, int | float) and not math.isnan(v)]
        if finite:
            out[key] = {"mean": statistics.fmean(finite), "std": statistics.pstdev(finite), "values": values}
    return out
