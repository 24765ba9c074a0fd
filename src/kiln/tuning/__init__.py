"""``kiln tune``: search a config's hyperparameters with Optuna (TPE sampling, pruning of bad trials).

    kiln tune CONFIG --space SPACE.yaml --trials N [--storage URL] [--workers K] [--folds F]
        [--pruner median|hyperband|none] [--metric NAME] [--study NAME] [--out DIR]

The space (:mod:`kiln.tuning.space`) names config keys by their dotted paths; each trial trains the config with
one draw of them (:mod:`kiln.tuning.worker`); the study lives in a storage that several processes and machines
share, and the same command run again continues it up to N trials (:mod:`kiln.tuning.study`); the output folder
gets the best config, a trials table, importances and a plot (:mod:`kiln.tuning.outputs`).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from kiln.config import Config, load_config
from kiln.data.kind import open_kind
from kiln.errors import ConfigError, KilnError
from kiln.fsutil import atomic_write_text
from kiln.training.metrics import HIGHER_IS_BETTER, TASK_METRICS
from kiln.tuning.outputs import write_outputs
from kiln.tuning.space import check_space, read_space
from kiln.tuning.study import JOURNAL, describe_storage, open_storage, open_study, optuna
from kiln.tuning.worker import Job, stderr_say, work

PRUNERS = ("median", "hyperband", "none")
BASE = "base.yaml"  # the config the study tunes, as resolved (workers started with --workers read it)
SPACE = "space.yaml"
# The metric a trial is scored on when none is named, by task: the first one the task has.
DEFAULT_METRICS = ("roc_auc", "accuracy", "macro_f1", "rmse", "ndcg@10", "loss")


def tune(config: str | os.PathLike | dict | Config, space: str | os.PathLike | dict, trials: int, *,
         storage: str | None = None, workers: int = 1, folds: int | None = None, pruner: str = "median",
         metric: str = "auto", study: str | None = None, out: str | os.PathLike | None = None,
         overrides: dict[str, Any] | list[str] | None = None, seed: int | None = None, say=None) -> dict[str, Any]:
    """Tune ``config`` over ``space`` until the study has ``trials`` finished trials; returns the summary that is
    also written to ``out``/tune.json (best trial, its value and parameters, counts, importances).

    ``storage``: None (a journal file in ``out``), a journal file's path, or an RDB URL; ``workers`` processes
    (this one and workers - 1 more) share the study; ``folds``: score each trial by k-fold cross-validation
    (tables, time series); ``pruner``: median, hyperband or none; ``metric``: the metric to optimise (auto:
    ROC-AUC for binary tasks, accuracy for classes, RMSE for regression, ...); ``study``: its name (default:
    the config's name); ``out``: the output folder (default runs/<name>-tune); ``seed``: the sampler's seed."""
    say = say or stderr_say()
    if not isinstance(trials, int) or trials < 1:
        raise ConfigError(f"--trials must be a positive number of trials, not {trials!r}")
    if not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"--workers must be at least 1, not {workers!r}")
    if folds is not None and folds < 2:
        raise ConfigError(f"--folds needs K >= 2, not {folds}")
    if pruner not in PRUNERS:
        raise ConfigError(f"--pruner must be one of {', '.join(PRUNERS)}, not {pruner!r}")
    cfg = load_config(config, overrides)
    base = cfg.to_dict()
    sp = read_space(space if isinstance(space, dict) else str(space))
    check_space(sp, base)
    if folds is not None and any(p.key.startswith(("data.folds", "data.fold")) for p in sp.params):
        raise ConfigError("--folds sets data.folds and data.fold itself; leave them out of the space")
    metric = pick_metric(cfg, metric)
    out = Path(out or Path("runs") / f"{cfg.name}-tune")
    name = study or cfg.name
    op = optuna()
    direction = "maximize" if metric.endswith(HIGHER_IS_BETTER) else "minimize"
    settings = {"config": base, "space": sp.to_dict(), "metric": metric, "folds": folds}
    shown = describe_storage(storage, out)
    store = open_storage(storage, out)
    the_study = open_study(store, name, direction, settings, sampler(op, trials, seed), make_pruner(op, pruner, folds),
                           shown)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / BASE, cfg.to_yaml())
    atomic_write_text(out / SPACE, _yaml(sp.to_dict()))
    say(f"study {name!r} in {shown}: {trials} trials of {cfg.name}, {metric} ({direction}), "
        + (f"{folds}-fold cross-validation" if folds else "validation split") + f", pruner {pruner}"
        + (f", {workers} workers" if workers > 1 else ""))
    storage_arg = storage or str(out / JOURNAL)
    helpers = [_start_worker(out, trials, storage_arg, name, metric, folds, pruner, i) for i in range(1, workers)]
    job = Job(base, sp, metric, folds, trials, out)
    try:
        work(the_study, job, say)
    except BaseException:  # a setup error or an interrupt: the other workers stop too (their trials count as lost)
        for p in helpers:
            p.terminate()
        raise
    finally:
        codes = [p.wait() for p in helpers]
    if any(codes):
        raise KilnError(f"{sum(c != 0 for c in codes)} of the {len(helpers)} other workers failed (exit codes "
                        f"{codes}); their errors are printed above. Rerun the same command to continue the study")
    summary = write_outputs(the_study, out, base, [p.key for p in sp.params], metric,
                            {"study": name, "storage": shown, "config": cfg.name, "folds": folds, "pruner": pruner,
                             "target_trials": trials})
    return summary


def work_only(config: str, space: str, trials: int, *, storage: str, study: str, out: str, metric: str,
              folds: int | None, pruner: str) -> None:
    """A worker started by ``tune(workers=K)``: the same study, no outputs (the first process writes them)."""
    cfg = load_config(config)
    sp = read_space(space)
    base = cfg.to_dict()
    op = optuna()
    direction = "maximize" if metric.endswith(HIGHER_IS_BETTER) else "minimize"
    settings = {"config": base, "space": sp.to_dict(), "metric": metric, "folds": folds}
    the_study = open_study(open_storage(storage, Path(out)), study, direction, settings, sampler(op, trials, None),
                           make_pruner(op, pruner, folds), describe_storage(storage, Path(out)))
    work(the_study, Job(base, sp, metric, folds, trials, Path(out)), stderr_say(f"[worker {os.getpid()}] "))


def pick_metric(cfg: Config, metric: str) -> str:
    """The metric to optimise: checked against the task of the config's data (auto: the task's usual one)."""
    task = open_kind(cfg.data, cfg.seed).task
    known = TASK_METRICS[task]
    if metric == "auto":
        return next(m for m in DEFAULT_METRICS if m in known)
    if metric not in known:
        raise ConfigError(f"--metric {metric!r} is not a metric of this {task} task; choose one of {', '.join(known)}")
    return metric


def sampler(op, trials: int, seed: int | None):
    """TPE over the joint space (multivariate, grouped for conditional keys); with several workers, running
    trials count as likely-bad values (constant liar) so that workers do not crowd one point."""
    return op.samplers.TPESampler(n_startup_trials=min(10, max(2, trials // 3)), multivariate=True, group=True,
                                  constant_liar=True, seed=seed)


def make_pruner(op, name: str, folds: int | None):
    if name == "none":
        return op.pruners.NopPruner()
    if name == "hyperband":
        return op.pruners.HyperbandPruner(min_resource=1, max_resource="auto", reduction_factor=3)
    if folds:
        return fold_median_pruner(op)(n_startup_trials=5, n_warmup_steps=1)
    # Epochs: the first 3 are too noisy to judge.
    return op.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=3)


def fold_median_pruner(op):
    """The median rule for cross-validated trials. Optuna's MedianPruner compares a trial's best value over its
    steps, which suits a learning curve but not a running mean over folds: a first fold that happens to score
    high would shield the trial from then on. This compares the mean after fold k alone."""

    class FoldMedianPruner(op.pruners.BasePruner):
        def __init__(self, n_startup_trials: int, n_warmup_steps: int) -> None:
            self.n_startup_trials, self.n_warmup_steps = n_startup_trials, n_warmup_steps

        def prune(self, study, trial) -> bool:
            step = trial.last_step
            if step is None or step < self.n_warmup_steps:
                return False
            others = [t.intermediate_values[step] for t in study.get_trials(
                deepcopy=False, states=(op.trial.TrialState.COMPLETE,)) if step in t.intermediate_values]
            if len(others) < self.n_startup_trials:
                return False
            value, median = trial.intermediate_values[step], statistics.median(others)
            return value < median if study.direction == op.study.StudyDirection.MAXIMIZE else value > median

    return FoldMedianPruner


def _start_worker(out: Path, trials: int, storage: str, study: str, metric: str, folds: int | None, pruner: str,
                  index: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "kiln", "tune", str(out / BASE), "--space", str(out / SPACE), "--trials",
           str(trials), "--storage", storage, "--study", study, "--out", str(out), "--metric", metric, "--pruner",
           pruner, "--worker"]
    if folds:
        cmd += ["--folds", str(folds)]
    return subprocess.Popen(cmd)


def _yaml(data: dict) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False)
