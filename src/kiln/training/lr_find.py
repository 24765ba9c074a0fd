"""The learning-rate finder (L. Smith's range test, as fastai runs it): train for a few hundred steps while the
learning rate grows exponentially from ``start`` to ``end``, record the loss of each step, smooth it, and suggest
a rate. The model's weights, the random state and the optimiser are put back afterwards, so training after a
sweep is the training it would have been with the suggested rate given by hand.

Two suggestions are computed from the smoothed loss against log10(lr):

- ``min10``: a tenth of the rate at the minimum loss (a rate at the minimum itself is already too high); the
  default: on the seed model (Adam, MNIST) it gave 4.2e-3 where hand-tuned recipes use 1e-3 to 6e-3.
- ``steepest``: where the loss falls fastest (the most negative slope), before its minimum: noisier on a
  sweep of a few hundred steps (1.4e-2 on the same sweep).

The sweep stops early once the loss (an exponential moving average) rises above ``DIVERGE`` times its minimum, or a
loss is not finite. The curve that is plotted and read is a centred moving average of the losses: a running
average (fastai's, beta 0.98) trailed the step losses by up to a decade of rate on a 200-step sweep here, and
moved both suggestions up about 2x with it (seed model, 8,000 MNIST images: min10 7.4e-3 against 4.2e-3,
steepest 3.2e-2 against 1.4e-2).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import numpy as np
import torch

from kiln.data.kind import open_kind, resolve
from kiln.errors import KilnError
from kiln.fsutil import atomic_write_text
from kiln.nn import build_model
from kiln.nn.fuse import fuse
from kiln.rundir import RunDir
from kiln.training.charts import Series, line_chart, write_png
from kiln.training.optim import make_optimizer
from kiln.training.plans import side_by_side
from kiln.training.precision import pick_device, pick_fuse, pick_precision
from kiln.training.progress import TrainProgress
from kiln.training.threads import pick_threads
from kiln.training.trainer import Trainer, TrainingDiverged
from kiln.training.transfer import prepare

METHODS = ("min10", "steepest")
START, END, STEPS = 1e-7, 10.0, 200  # the sweep of `kiln lr-find` and of `lr: auto`
BETA = 0.9  # exponential smoothing of the loss while sweeping (bias-corrected), for the stopping rule
DIVERGE = 4.0  # stop once that smoothed loss exceeds this multiple of its minimum
SMOOTH = 1 / 30  # the curve that is plotted and read: a centred mean over this fraction of the steps (at least 5)
MIN_POINTS = 10


@dataclass
class Sweep:
    start: float
    end: float
    steps: int
    method: str
    lrs: list[float] = field(default_factory=list)  # the base rate (train.optimizer.lr) of each step
    losses: list[float] = field(default_factory=list)  # each step's training loss, before its update
    smoothed: list[float] = field(default_factory=list)  # centred moving average of the losses
    stopped: str = "reached the end of the sweep"
    steepest: float = math.nan
    min10: float = math.nan

    @property
    def suggestion(self) -> float:
        return getattr(self, self.method)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "suggestion": self.suggestion}

    def summary(self) -> dict[str, Any]:
        """What a run's manifest keeps of a sweep (the whole curve is in lr_find.json)."""
        return {"lr": self.suggestion, "method": self.method, "steepest": self.steepest, "min10": self.min10,
                "start": self.start, "end": self.end, "steps": len(self.lrs), "stopped": self.stopped}

    def suggest(self) -> None:
        s, x = np.array(self.smoothed), np.log10(np.array(self.lrs))
        low = int(np.argmin(s))
        self.min10 = self.lrs[low] / 10
        skip = max(1, len(s) // 20)  # the curve's ends average fewer losses
        slope = np.gradient(s, x)
        window = slope[skip:max(low, skip + 1)]
        self.steepest = self.lrs[skip + int(np.argmin(window))] if len(window) else self.min10

    def chart(self, title: str):
        s = self.smoothed
        low = int(np.argmin(s))
        top, bottom = max(s[:low + 1]), min(min(s), float(np.percentile(self.losses[:low + 1], 5)))
        ylim = (bottom, top + 0.25 * (top - bottom) + 1e-9)
        other = METHODS[1 - METHODS.index(self.method)]
        return line_chart([Series("loss per step", self.lrs, self.losses, color="#c7c7c7", width=1),
                           Series("smoothed loss", self.lrs, s)],
                          title=title, xlabel="learning rate (log scale)", ylabel="training loss", xlog=True,
                          ylim=ylim, legend="lower left",
                          marks=[(self.suggestion, f"suggested {self.suggestion:.2g} ({self.method})", "#2ca02c"),
                                 (getattr(self, other), f"{other} {getattr(self, other):.2g}", "#888888")])


def check_range(start: float, end: float, steps: int) -> None:
    if not (0 < start < end and math.isfinite(end)):
        raise KilnError(f"the sweep needs 0 < start < end (got start {start:g}, end {end:g})")
    if steps < 2 * MIN_POINTS:
        raise KilnError(f"the sweep needs at least {2 * MIN_POINTS} steps (got {steps})")


def _batches(trainer: Trainer, steps: int) -> list[torch.Tensor]:
    """Batches for the sweep: seeded shuffled passes over the training samples, as many as it needs."""
    n = trainer.kind.samples(trainer.train_x)
    size = min(trainer.t.batch_size, n)
    gen = torch.Generator().manual_seed(trainer.cfg.seed * 1_000_003 + 999_983)
    members = trainer.model.member_batches  # ensemble_mlp's batches: own: one batch a member, side by side
    out: list[torch.Tensor] = []
    while len(out) < steps:
        out += [b for b in side_by_side(n, members, size, gen) if len(b) == size * members]
    return [b.to(trainer.device) for b in out[:steps]]


def sweep(trainer: Trainer, start: float = START, end: float = END, steps: int = STEPS,
          method: str = "min10") -> Sweep:
    """Run the range test on the trainer's model and data with its own loss, optimiser kind and settings; leave
    the model's weights, the random state and the trainer's optimiser, schedule and counters as they were."""
    check_range(start, end, steps)
    model = trainer.model
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    rng, was_training = trainer.rng_state(), model.training
    kept = trainer.optimizer, trainer.scheduler, trainer.scaler, trainer.state.nonfinite_steps
    last_loss = trainer.last_loss.clone() if trainer.last_loss is not None else None
    ratio = end / start
    trainer.optimizer = make_optimizer(model, trainer.t.optimizer.model_copy(update={"lr": start}), trainer.device)
    trainer.scheduler = torch.optim.lr_scheduler.LambdaLR(trainer.optimizer,
                                                          lambda i: ratio ** (min(i, steps - 1) / (steps - 1)))
    trainer.scaler = trainer.precision.grad_scaler()
    result = Sweep(start, end, steps, method)
    avg, best = 0.0, math.inf
    model.train()
    try:
        for i, idx in enumerate(_batches(trainer, steps)):
            lr = start * ratio ** (i / (steps - 1))
            try:
                loss_sum, _, counted = trainer.step(idx)
            except TrainingDiverged:
                counted = 0
            if not int(counted):
                result.stopped = f"the loss was not finite at lr {lr:.3g}"
                break
            loss = float(loss_sum) / int(counted)
            avg = BETA * avg + (1 - BETA) * loss
            smooth = avg / (1 - BETA ** (i + 1))
            result.lrs.append(lr), result.losses.append(loss)
            best = min(best, smooth)
            if i >= steps // 10 and smooth > DIVERGE * best:
                result.stopped = f"the smoothed loss passed {DIVERGE:g}x its minimum at lr {lr:.3g}"
                break
    finally:
        model.load_state_dict(weights)
        trainer.optimizer, trainer.scheduler, trainer.scaler, trainer.state.nonfinite_steps = kept
        if last_loss is not None:
            trainer.last_loss.copy_(last_loss)
        torch.set_rng_state(rng["torch"])
        trainer.aug_gen.set_state(rng["augment"])
        if "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"], trainer.device)
        model.train(was_training)
    if len(result.lrs) < MIN_POINTS:
        raise KilnError(f"the learning-rate sweep stopped after {len(result.lrs)} steps ({result.stopped}); "
                        f"start it lower than {start:g}")
    result.smoothed = centred_mean(result.losses, max(5, round(steps * SMOOTH)))
    result.suggest()
    return result


def centred_mean(values: list[float], window: int) -> list[float]:
    """Each value replaced by the mean of the ``window`` values around it (fewer at the ends)."""
    v, half = np.asarray(values, dtype=np.float64), window // 2
    sums = np.concatenate([[0.0], np.cumsum(v)])
    lo = np.clip(np.arange(len(v)) - half, 0, len(v))
    hi = np.clip(np.arange(len(v)) + half + 1, 0, len(v))
    return ((sums[hi] - sums[lo]) / (hi - lo)).tolist()


def write_sweep(found: Sweep, png: Path, json_path: Path, title: str) -> None:
    """The sweep's plot (PNG) and its numbers (JSON), each written atomically."""
    write_png(png, found.chart(title))
    atomic_write_text(json_path, json.dumps(found.to_json(), indent=2) + "\n")


def with_lr(cfg, lr: float | str):
    """``cfg`` with train.optimizer.lr set (configs are frozen)."""
    opt = cfg.train.optimizer.model_copy(update={"lr": lr})
    return cfg.model_copy(update={"train": cfg.train.model_copy(update={"optimizer": opt})})


def started_lr(cfg, saved: dict | None):
    """A resumed run with ``lr: auto`` keeps the rate its start chose (``saved``: the config it was started with)."""
    if cfg.train.optimizer.lr == "auto" and saved is not None and isinstance(saved["train"]["optimizer"]["lr"],
                                                                              int | float):
        return with_lr(cfg, saved["train"]["optimizer"]["lr"])
    return cfg


def choose_lr(cfg, make_trainer: Callable[[Any], Trainer], log: Callable[[str], None]) -> tuple[Any, Sweep | None]:
    """``train.optimizer.lr: auto``: the config with the finder's suggestion, and the sweep; any other config as
    it is."""
    if cfg.train.optimizer.lr != "auto":
        return cfg, None
    log(f"train.optimizer.lr: auto: sweeping the learning rate from {START:g} to {END:g} over {STEPS} steps")
    found = sweep(make_trainer(with_lr(cfg, START)), START, END, STEPS)
    other = METHODS[1 - METHODS.index(found.method)]
    log(f"learning rate {found.suggestion:.3g} ({found.method}; {other} {getattr(found, other):.3g}; {found.stopped})")
    return with_lr(cfg, float(found.suggestion)), found


def sweep_config(cfg, start: float = START, end: float = END, steps: int = STEPS, method: str = "min10",
                 live: bool | None = None) -> Sweep:
    """``kiln lr-find``: the sweep for a validated config, on the model and data its training would start with
    (init_from and freeze applied), without writing a run."""
    check_range(start, end, steps)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(pick_threads(cfg.train.threads, None)[0])
        device = pick_device(cfg.train.device)
        precision = pick_precision(cfg.train.precision, device)
        kind = open_kind(cfg.data, cfg.seed)
        cfg = resolve(cfg, kind)
        kind.check_model(cfg.blocks)
        torch.manual_seed(cfg.seed)
        model = build_model(cfg.blocks, kind.input_shape).to(device)
        kind.fill_model(model)
        if pick_fuse(cfg.train.fuse, device)[0]:
            fuse(model)
        display = TrainProgress(1, live=live)
        report = prepare(cfg.train, model)
        for line in report.lines() if report else []:
            display.log(line)
        data = kind.load(progress=display.log)
        with TemporaryDirectory() as scratch:  # a trainer's run directory; the sweep writes nothing there
            trainer = Trainer(with_lr(cfg, start), RunDir(scratch), kind, data, model, device, precision, display)
            return sweep(trainer, start, end, steps, method)
    finally:
        torch.set_num_threads(before)
