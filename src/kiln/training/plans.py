"""How a run's batches are drawn and when it is evaluated: the one thing in which epoch-based and step-based
training differ. The :class:`~kiln.training.trainer.Trainer` asks its plan; the kind of data chooses which
(``trains_by_steps``).

- :class:`Epochs` (images, tables): passes over the training samples in a seeded shuffled order, evaluated on
  the whole validation split after each; early stopping and ``train.hard_examples`` work on epochs.
- :class:`Steps` (text): ``train.steps`` batches drawn at random, evaluated every ``train.eval_every`` steps on
  ``train.eval_batches`` random batches of each split (as nanoGPT estimates its loss).

Either draws a batch as a function of (seed, epoch or step) alone, so a resumed run repeats it exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from kiln.errors import ConfigError
from kiln.training.checkpoint import save_weights
from kiln.training.ema import averaged
from kiln.training.metrics import HIGHER_IS_BETTER, TASK_METRICS, evaluate, metrics_line


def epoch_order(n: int, seed: int, epoch: int, device: torch.device) -> torch.Tensor:
    """The sample order of one epoch: a function of (seed, epoch) alone, so a resumed run repeats it."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=gen).to(device)


def member_batches(n: int, seed: int, epoch: int, members: int, batch_size: int,
                   device: torch.device) -> list[torch.Tensor]:
    """An epoch's batches when each member of an ensemble (``ensemble_mlp`` with ``batches: own``) has its own
    shuffled order: batch i is member 0's i-th batch, then member 1's, ... (members x batch_size samples), so
    every member passes over every training sample once an epoch in an order of its own."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return [b.to(device) for b in side_by_side(n, members, batch_size, gen)]


def side_by_side(n: int, members: int, batch_size: int, gen: torch.Generator) -> list[torch.Tensor]:
    """One pass over n samples in ``members`` shuffled orders at once: batch i holds each order's i-th
    ``batch_size`` samples, the first order's first; with one member, one shuffled order's batches."""
    orders = torch.stack([torch.randperm(n, generator=gen) for _ in range(members)])  # (k, n)
    return [chunk.flatten() for chunk in orders.split(batch_size, dim=1)]


def epoch_size(n: int, hard, epoch: int) -> int:
    """Samples that epoch `epoch` (from 0) trains on: all of them, or hard_examples' fraction once it applies."""
    return math.ceil(hard.fraction * n) if hard and epoch + 1 >= hard.from_epoch else n


def hard_subset(order: torch.Tensor, last_loss: torch.Tensor, size: int, select: str) -> torch.Tensor:
    """The epoch's `order` cut to `size` samples, in the same order: the ones with the highest last loss
    (ties by index, so the choice is deterministic), or for `random` the first `size` of the order."""
    if size >= len(order):
        return order
    if select == "random":
        return order[:size]
    chosen = torch.zeros(len(order), dtype=torch.bool, device=order.device)
    chosen[torch.argsort(last_loss, descending=True, stable=True)[:size]] = True
    return order[chosen[order]]


class Epochs:
    reset_each_log = False  # progress lines show the epoch's running mean
    local_batches = False  # True: a batch is already this rank's share (a stream), not a global batch to slice

    def __init__(self, trainer) -> None:
        self.tr, self.t = trainer, trainer.t
        n, hard = trainer.kind.samples(trainer.train_x), self.t.hard_examples
        self.total_steps = sum(math.ceil(epoch_size(n, hard, e) / self.t.batch_size) for e in range(self.t.epochs))
        self.eval_size = self.t.eval_batch_size
        self.periods = self.t.epochs

    def describe(self) -> str:
        data = self.tr.data
        return f"{len(data.train_x):,} train / {len(data.val_x):,} val samples"

    def begin(self) -> None:
        pass

    def done(self) -> bool:
        s = self.tr.state
        return s.epoch >= self.t.epochs or s.stopped_early

    def batches(self) -> Sequence[torch.Tensor]:
        s, t, tr = self.tr.state, self.t, self.tr
        if tr.privacy:
            return tr.privacy.batches()
        n = tr.kind.samples(tr.train_x)
        if tr.model.member_batches > 1:
            return member_batches(n, tr.cfg.seed, s.epoch, tr.model.member_batches, t.batch_size, tr.device)
        order = epoch_order(n, tr.cfg.seed, s.epoch, tr.device)
        size = epoch_size(n, t.hard_examples, s.epoch)
        if size < n:
            order = hard_subset(order, tr.last_loss, size, t.hard_examples.select)
            if s.step_in_epoch == 0:
                tr.display.log(f"epoch {s.epoch + 1}: training on {size:,} of {n:,} samples "
                               f"({t.hard_examples.select}, train.hard_examples)")
        return order.split(t.batch_size)

    def after_step(self, step: int) -> None:
        """Evaluations happen at the end of each epoch only."""

    def step_record(self) -> dict[str, Any]:
        return {"epoch": self.tr.state.epoch + 1}

    def end_period(self, train_loss: float, train_accuracy: float) -> None:
        """Evaluate the epoch on the validation split, keep the best epoch's weights, count towards early stopping."""
        s, tr = self.tr.state, self.tr
        with averaged(tr.ema):  # train.ema: evaluated, and kept as the best epoch's, with the averaged weights
            self._end_period(train_loss, train_accuracy)
        s.epoch += 1

    def _end_period(self, train_loss: float, train_accuracy: float) -> None:
        s, tr = self.tr.state, self.tr
        val = tr.evaluate("val") if len(tr.data.val_x) else {}  # data.val_fraction 0: no val split
        record = {"kind": "epoch", "epoch": s.epoch + 1, "step": s.global_step, "samples": s.seen,
                  "train_loss": train_loss, "train_accuracy": train_accuracy,
                  **{f"val_{k}": v for k, v in val.items() if k in TASK_METRICS[tr.kind.task]},
                  "lr": tr.scheduler.get_last_lr()[0]}
        s.history.append(record)
        tr.run_dir.append_metrics(record)
        tr.display.end_epoch(f"epoch {s.epoch + 1}/{self.t.epochs}  train loss {train_loss:.4f} "
                             f"acc {train_accuracy:.4f}" + (f"  val {metrics_line(val)}" if val else ""))
        self.track_best(record)
        tr.dist.agree([s.best_value if s.best_value is not None else math.nan, s.best_epoch or 0, s.bad_epochs,
                       s.stopped_early], "the best epoch and early stopping", tr.device)

    def track_best(self, record: dict[str, Any]) -> None:
        """Keep the best epoch's weights; count epochs without improvement for early stopping."""
        s, t, tr = self.tr.state, self.t, self.tr
        es = t.early_stopping
        monitor = es.monitor if es else ("val_loss" if len(tr.data.val_x) else "train_loss")
        value = record.get(monitor, math.nan)
        if math.isnan(value) or (t.hard_examples and monitor.startswith("train_")):
            return  # with hard_examples, train metrics of different epochs cover different samples
        sign = -1.0 if monitor.endswith(HIGHER_IS_BETTER) else 1.0
        min_delta = es.min_delta if es else 0.0
        if s.best_value is None or sign * (s.best_value - value) > min_delta:
            s.best_value, s.best_epoch, s.bad_epochs = value, s.epoch + 1, 0
            save_weights(tr.run_dir / tr.run_dir.BEST, tr.model, {"epoch": s.epoch + 1, monitor: value})
        else:
            s.bad_epochs += 1
        if es and s.bad_epochs >= es.patience:
            s.stopped_early = True

    def finish(self) -> dict[str, Any]:
        s = self.tr.state
        if s.stopped_early:
            self.tr.display.log(f"early stopping: no improvement for {self.t.early_stopping.patience} epochs")
        last = s.history[-1] if s.history else {}
        return {"train": {"loss": last.get("train_loss"), "accuracy": last.get("train_accuracy")},
                "epochs": s.epoch, "best_epoch": s.best_epoch, "stopped_early": s.stopped_early}


class StepBatches(Sequence):
    """The random batch of every step, drawn when asked for: step i's is a function of (seed, i) alone."""

    def __init__(self, trainer, steps: int) -> None:
        self.tr, self.steps = trainer, steps

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, step: int) -> torch.Tensor:
        tr = self.tr
        gen = torch.Generator().manual_seed(tr.cfg.seed * 1_000_003 + step)
        size = tr.t.batch_size * tr.model.member_batches  # ensemble_mlp's batches: own: one batch a member
        return torch.randint(tr.kind.samples(tr.train_x), (size,), generator=gen).to(tr.device)


class Steps:
    reset_each_log = True  # progress lines show the mean since the previous line
    local_batches = False

    def __init__(self, trainer) -> None:
        self.tr, self.t = trainer, trainer.t
        for field, what in (("hard_examples", "train.hard_examples"), ("early_stopping", "train.early_stopping")):
            if getattr(self.t, field):
                raise ConfigError(f"{what} applies to epochs over images or tables; {trainer.kind.description} data "
                                  "trains for train.steps on random batches")
        self.total_steps = self.t.steps
        self.eval_size = self.t.batch_size
        self.periods = 1

    def describe(self) -> str:
        return f"{self.t.steps} steps of {self.t.batch_size} samples of {self.tr.kind.input_shape[0]} tokens"

    def begin(self) -> None:
        if self.tr.state.global_step == 0:
            self.estimate()

    def done(self) -> bool:
        return self.tr.state.global_step >= self.t.steps

    def batches(self) -> Sequence[torch.Tensor]:
        return StepBatches(self.tr, self.t.steps)

    def after_step(self, step: int) -> None:
        if step % self.t.eval_every == 0:
            self.estimate()

    def step_record(self) -> dict[str, Any]:
        return {}

    def end_period(self, train_loss: float, train_accuracy: float) -> None:
        self.estimate()

    def estimate(self) -> None:
        """Metrics on ``eval_batches`` random batches of each split (the same batches at every evaluation)."""
        with averaged(self.tr.ema):  # train.ema: the averaged weights
            self._estimate()

    def _estimate(self) -> None:
        tr, t = self.tr, self.t
        record: dict[str, Any] = {"kind": "eval", "step": tr.state.global_step}
        for split, seed in (("train", tr.cfg.seed + 2), ("val", tr.cfg.seed + 1)):
            x, y = tr.device_split(split)
            if not len(x):
                continue
            gen = torch.Generator().manual_seed(seed)
            batches = [tr.kind.gather(x, y, torch.randint(tr.kind.samples(x), (t.batch_size,), generator=gen)
                                      .to(tr.device)) for _ in range(t.eval_batches)]
            metrics = evaluate(tr.model, tr.kind, batches, device=tr.device, precision=tr.inference,
                               exact=split == "val", share=tr.dist.eval_share(tr.device))
            record |= {f"{split}_{k}": v for k, v in metrics.items() if k not in ("tokens", "samples")}
        tr.state.history.append(record)
        tr.run_dir.append_metrics(record)
        shown = [k for k in ("train_loss", "val_loss", "val_perplexity", "val_token_accuracy", "val_exact_match")
                 if k in record]
        tr.display.log(f"step {tr.state.global_step}/{t.steps}  " + "  ".join(f"{k} {record[k]:.4f}" for k in shown))

    def finish(self) -> dict[str, Any]:
        last = self.tr.state.history[-1] if self.tr.state.history else {}
        # results.json's val and test are exact (every held-out token); the last estimate stands beside them
        estimate = {k: last[k] for k in ("train_loss", "val_loss") if k in last}
        return {"train": {"loss": last.get("train_loss")}, "steps": self.tr.state.global_step,
                "estimate": {**estimate, "batches": self.t.eval_batches, "batch_size": self.t.batch_size}}


def plan_for(trainer) -> Epochs | Steps:
    """The plan for a Trainer (each plan reads the trainer's settings, data and state)."""
    return Steps(trainer) if trainer.kind.trains_by_steps else Epochs(trainer)
