"""One worker of a study: ask for a trial, train its config, report, until the study has its trials.

A trial's objective is the metric on the validation split of its run (the best epoch's weights when early
stopping restores them), or with ``folds`` the mean of the metric on each fold's held-out rows over k runs
(``kiln train --folds``). The pruner sees the validation metric after each epoch (each evaluation of a
step-based run), or with folds the running mean after each fold, and stops a trial that does worse than the
others did at the same point.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kiln.api import train
from kiln.errors import KilnError
from kiln.training.trainer import TrainingDiverged
from kiln.tuning.space import Space
from kiln.tuning.study import heartbeat, optuna, recover_lost, worker_id

TRIALS_DIR = "trials"
LOGS_DIR = "logs"


@dataclass(frozen=True)
class Job:
    """What every trial of a study shares."""

    base: dict[str, Any]  # the resolved config the space's values are set in
    space: Space
    metric: str
    folds: int | None
    trials: int  # the study's total: complete, pruned and failed-by-error trials
    out: Path


def finished(t) -> bool:
    """A trial that counts towards the total: complete, pruned, or failed by its own error (not lost, not surplus)."""
    states = optuna().trial.TrialState
    return t.state in (states.COMPLETE, states.PRUNED) or (t.state == states.FAIL and "error" in t.user_attrs)


def pending(t) -> bool:
    states = optuna().trial.TrialState
    return t.state in (states.RUNNING, states.WAITING)


def work(study, job: Job, say=print) -> int:
    """Run trials until the study holds ``job.trials`` finished ones (counting those other workers are running);
    returns how many this worker ran."""
    op = optuna()
    me, ran = worker_id(), 0
    while True:
        for number in recover_lost(study):
            say(f"trial {number} was lost (its worker stopped); its parameters are queued again")
        trials = study.get_trials(deepcopy=False)
        running = sum(t.state == op.trial.TrialState.RUNNING for t in trials)
        if sum(map(finished, trials)) + running >= job.trials:
            return ran
        trial = study.ask()
        trial.set_user_attr("worker", me)
        trial.set_user_attr("heartbeat", time.time())
        ahead = [t for t in study.get_trials(deepcopy=False) if t.number < trial.number and (finished(t) or pending(t))]
        if len(ahead) >= job.trials:  # another worker took the last trial between the count and the ask
            trial.set_user_attr("surplus", True)
            study.tell(trial, state=op.trial.TrialState.FAIL)
            return ran
        run_one(study, trial, job, say)
        ran += 1


def run_one(study, trial, job: Job, say) -> None:
    op = optuna()
    states = op.trial.TrialState
    params = job.space.sample(trial)
    run_dir = job.out / TRIALS_DIR / f"trial_{trial.number:04d}"
    trial.set_user_attr("run", str(run_dir))
    log = job.out / LOGS_DIR / f"trial_{trial.number:04d}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    shown = "  ".join(f"{k}={_short(v)}" for k, v in params.items())
    try:
        with heartbeat(study, trial._trial_id), open(log, "a", encoding="utf-8") as f, \
                contextlib.redirect_stderr(f), contextlib.redirect_stdout(f):
            value = objective(trial, params, job, run_dir)
    except op.TrialPruned as e:
        study.tell(trial, state=states.PRUNED)
        say(f"trial {trial.number}: pruned {e}  {shown}")
        return
    except TrainingDiverged as e:
        fail(study, trial, str(e))
        say(f"trial {trial.number}: failed, the loss diverged  {shown}")
        return
    except KilnError as e:
        fail(study, trial, str(e))
        if not any(t.state == states.COMPLETE for t in study.get_trials(deepcopy=False)):
            raise KilnError(f"trial {trial.number} ({shown}) failed: {e}") from None  # likely the config itself
        say(f"trial {trial.number}: failed: {e}  {shown}")
        return
    except BaseException:  # interrupted: the trial is lost, its parameters are queued for the next run
        with contextlib.suppress(Exception):
            trial.set_user_attr("lost", "interrupted")
            study.tell(trial, state=states.FAIL)
            study.enqueue_trial(params, user_attrs={"retry_of": trial.number}, skip_if_exists=False)
        raise
    if not math.isfinite(value):
        fail(study, trial, f"{job.metric} is {value}")
        say(f"trial {trial.number}: failed, {job.metric} is {value}  {shown}")
        return
    study.tell(trial, value)
    best = study.best_trial
    say(f"trial {trial.number}: {job.metric} {value:.4f}  (best {best.value:.4f}, trial {best.number})  {shown}")


def fail(study, trial, message: str) -> None:
    trial.set_user_attr("error", message[:2000])
    study.tell(trial, state=optuna().trial.TrialState.FAIL)


def objective(trial, params: dict[str, Any], job: Job, run_dir: Path) -> float:
    op = optuna()
    if job.folds:
        values: list[float] = []
        for k in range(job.folds):
            run = train(job.base, {**params, "data.folds": job.folds, "data.fold": k}, out=run_dir / f"fold_{k}",
                        live=False)
            values.append(float(run.metrics["test"].get(job.metric, math.nan)))
            trial.set_user_attr("folds", values)
            trial.report(_mean(values), k)
            if k + 1 < job.folds and trial.should_prune():
                raise op.TrialPruned(f"after fold {k + 1} of {job.folds} ({job.metric} mean {_mean(values):.4f})")
        return _mean(values)

    def on_evaluation(record: dict[str, Any]) -> None:
        value = record.get(f"val_{job.metric}")
        if value is None or not math.isfinite(value):
            return
        step = record.get("epoch", record.get("step", 0))
        trial.report(float(value), step)
        if trial.should_prune():
            raise op.TrialPruned(f"at {'epoch' if 'epoch' in record else 'step'} {step} "
                                 f"(val {job.metric} {value:.4f})")

    run = train(job.base, params, out=run_dir, live=False, on_evaluation=on_evaluation)
    if not run.metrics.get("val"):
        raise KilnError("tuning without --folds scores each trial on its validation split, and this config has "
                        "none: set data.val_fraction above 0, or use --folds K")
    return float(run.metrics["val"].get(job.metric, math.nan))


def _mean(values: list[float]) -> float:
    return statistics.fmean(values) if all(math.isfinite(v) for v in values) else math.nan


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def stderr_say(prefix: str = ""):
    def say(line: str) -> None:
        print(prefix + line, file=sys.stderr, flush=True)

    return say
