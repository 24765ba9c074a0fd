"""The one training loop, for every kind of data: steps, progress, checkpoints and resume.

How batches are drawn and when to evaluate is the plan's business (:mod:`kiln.training.plans`); what a
batch is (images, table rows, token windows) the kind of data's; what the loss is the task's
(:mod:`kiln.training.objectives`). Everything else happens here once.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from kiln.data.kind import DataKind
from kiln.data.splits import Splits
from kiln.errors import ConfigError, KilnError
from kiln.nn import KilnModel
from kiln.rundir import RunDir
from kiln.training.checkpoint import load_checkpoint, save_checkpoint
from kiln.training.distributed import Dist, load_sharded, prune_sharded, save_sharded
from kiln.training.ema import Ema
from kiln.training.fairness import sample_weights
from kiln.training.metrics import evaluate, model_outputs
from kiln.training.objectives import Objective
from kiln.training.optim import backward_and_step, make_optimizer, make_scheduler
from kiln.training.plans import plan_for
from kiln.training.precision import Precision
from kiln.training.privacy import Privacy
from kiln.training.progress import TrainProgress
from kiln.training.stream_plan import stream_plan


class TrainingDiverged(KilnError):
    """The loss became NaN or infinite more often than ``train.max_nonfinite_steps`` allows."""


@dataclass
class TrainState:
    """Where training stands; saved in every checkpoint."""

    epoch: int = 0  # epochs completed (epoch plans)
    step_in_epoch: int = 0  # steps done of the current period (an epoch, or all steps)
    global_step: int = 0
    loss_sum: float = 0.0  # since the period began (or the last progress line, for step plans)
    correct: int = 0
    counted: int = 0  # what loss_sum and correct are over: samples, or target tokens
    seen: int = 0  # samples trained on in the current period
    best_value: float | None = None
    best_epoch: int | None = None
    bad_epochs: int = 0  # epochs since the monitored metric last improved
    stopped_early: bool = False
    train_seconds: float = 0.0
    nonfinite_steps: int = 0  # steps skipped because their loss was NaN or infinite
    history: list[dict[str, Any]] = field(default_factory=list)  # per-epoch or per-evaluation metrics
    privacy: dict[str, Any] | None = None  # train.privacy: the noise and the accountant's history


class Trainer:
    on_evaluation: Callable[[dict[str, Any]], None] | None = None  # called with each evaluation's record (kiln tune
    # reports them to Optuna, whose pruner may stop the run by raising)

    def __init__(self, cfg, run_dir: RunDir, kind: DataKind, data: Splits, model: KilnModel, device: torch.device,
                 precision: Precision, display: TrainProgress, dist: Dist | None = None) -> None:
        self.cfg, self.t = cfg, cfg.train
        self.run_dir, self.kind, self.data, self.model, self.device = run_dir, kind, data, model, device
        self.precision, self.inference = precision, precision.for_inference()
        self.display = display
        self.train_x, self.train_y = data.train_x.to(device), data.train_y.to(device)
        self._on_device = {"train": (self.train_x, self.train_y)}
        if kind.streams and self.t.privacy:
            raise ConfigError("train.privacy samples every training row with its own probability (Poisson "
                              "sampling), which needs the rows in memory: use data.stream: false, or drop privacy")
        self.dist = dist or Dist()
        if model.member_batches > 1 and (kind.streams or self.t.privacy or self.t.hard_examples):
            what = "data.stream" if kind.streams else "train.privacy" if self.t.privacy else "train.hard_examples"
            raise ConfigError(f"ensemble_mlp's batches: own draws each member's batches from the whole training "
                              f"split in an order of its own, which {what} does not: use batches: shared, or drop "
                              f"{what}")
        self.plan = stream_plan(self) if kind.streams else plan_for(self)
        if self.t.privacy and self.dist.world > 1:
            raise ConfigError("train.privacy trains in one process (its accountant and per-sample gradients are "
                              "not shared between processes): drop --nproc, or drop privacy")
        self.privacy = Privacy(self) if self.t.privacy else None  # swaps recurrent layers: before the optimiser
        self.net = self.dist.wrap(model, device)  # what training steps call: under DDP, FSDP2, or the model
        self.optimizer = make_optimizer(model, self.t.optimizer, device)
        if self.privacy:
            self.optimizer = self.privacy.wrap(self.optimizer)
        self.scheduler = make_scheduler(self.optimizer, self.t.schedule, self.plan.total_steps)
        self.ema = Ema(model, self.t.ema, self.dist.fsdp) if self.t.ema else None  # train.ema: evaluations use it
        hard = self.t.hard_examples
        # Each sample's loss when last trained on (inf: not yet seen), for hard_examples' choice.
        n = kind.samples(self.train_x)
        self.last_loss = torch.full((n,), math.inf, device=device) if hard and hard.select == "hardest" else None
        self.scaler = precision.grad_scaler()
        self.aug_gen = torch.Generator(device=device).manual_seed(cfg.seed + 1)
        self.state = TrainState()
        self._reported = 0  # history records handed to on_evaluation
        # Penalties apply to weight matrices and kernels, not to biases or normalisation scales.
        self.penalised = [p for p in model.parameters() if p.dim() > 1]
        weight = class_weights(self.t.class_weights, data.train_y, kind).to(device) if self.t.class_weights else None
        self.objective = Objective(kind.task, weight, self.t.label_smoothing)
        self.sample_weight, self.weights_note = sample_weights(self.t.fairness, kind, data.train_y, device)

    def device_split(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        if split not in self._on_device:
            self._on_device[split] = tuple(t.to(self.device) for t in self.data.split(split))
        return self._on_device[split]

    # ---- checkpoints ---------------------------------------------------------------------------

    def rng_state(self) -> dict[str, torch.Tensor]:
        rng = {"torch": torch.get_rng_state(), "augment": self.aug_gen.get_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return rng

    def save(self) -> None:
        tracked = {"last_loss": self.last_loss} if self.last_loss is not None else None
        if self.ema:
            tracked = (tracked or {}) | self.ema.state()
        if self.dist.fsdp:  # model and optimizer state: sharded by every rank (torch.distributed.checkpoint)
            save_sharded(self.run_dir, self.model, self.optimizer, self.state.global_step)
        sharded = self.dist.fsdp
        save_checkpoint(self.run_dir / RunDir.LAST, model=None if sharded else self.model,
                        optimizer=None if sharded else self.optimizer,
                        scheduler=self.scheduler, scaler=self.scaler, rng=self.rng_state(),
                        progress=self.state.__dict__, tracked=tracked)
        if sharded:
            prune_sharded(self.run_dir, self.state.global_step)

    def restore(self) -> None:
        sharded = self.dist.fsdp
        rng, progress, tracked = load_checkpoint(self.run_dir / RunDir.LAST, model=None if sharded else self.model,
                                                 optimizer=None if sharded else self.optimizer,
                                                 scheduler=self.scheduler, scaler=self.scaler)
        self.state = TrainState(**progress)
        if self.privacy:
            self.privacy.restore(self.state.privacy)
        if sharded:
            load_sharded(self.run_dir, self.model, self.optimizer, self.state.global_step)
        if self.last_loss is not None:
            self.last_loss.copy_(tracked["last_loss"])
        if self.ema:
            self.ema.restore(tracked)
        torch.set_rng_state(rng["torch"])
        self.aug_gen.set_state(rng["augment"])
        if "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"], self.device)
        self.run_dir.keep_metrics_until(self.state.global_step)

    # ---- one step ------------------------------------------------------------------------------

    def penalty(self) -> torch.Tensor | float:
        total: torch.Tensor | float = 0.0
        if self.t.l1:
            total = total + self.t.l1 * sum(p.abs().sum() for p in self.penalised)
        if self.t.l2:
            total = total + self.t.l2 * sum(p.square().sum() for p in self.penalised)
        return total

    def step(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | int]:
        """One optimiser step on the samples ``idx``; returns (summed loss, right answers, how many counted)."""
        if self.privacy and not len(idx):  # a Poisson batch can be empty
            return self.privacy.empty_step()
        x, y = self.kind.gather(self.train_x, self.train_y, idx)
        x = self.kind.augment(self.kind.to_input(x), self.aug_gen)
        share = True
        if self.dist.active and not self.plan.local_batches:  # this rank's slice of the global batch
            k = self.model.member_batches  # members' own batches side by side: the same slice of each
            a, b = self.dist.local(len(idx) // k)
            share = b > a  # a last batch smaller than the process count leaves some ranks none: they step on
            a = a if share else b - 1  # one sample whose loss counts 0, so that every rank joins the gradient sum
            idx, x, y = (t.view(k, -1, *t.shape[1:])[:, a:b].flatten(0, 1) for t in (idx, x, y))
        with self.precision.autocast():
            logits = self.net(x)
        logits = logits.float()
        loss = self.objective.loss(logits, y, None if self.sample_weight is None else self.sample_weight[idx])
        correct, counted = self.objective.counts(logits.detach(), y)
        scale = None
        if self.dist.active:  # the batch's totals over the ranks, and this rank's share of its mean loss
            mass = self.objective.mass(y, None if self.sample_weight is None else self.sample_weight[idx])
            loss_value, correct, counted, scale = self.dist.global_counts(loss, correct, counted, mass, share)
        else:
            loss_value = loss
        if not torch.isfinite(loss_value):  # one read per step: on a CPU the value is there already
            return self.skip_nonfinite(loss_value)
        if self.last_loss is not None:
            self.last_loss[idx] = self.objective.sample_losses(logits.detach(), y)
        backward_and_step((loss + self.penalty()) * (1.0 if scale is None else scale), self.model, self.optimizer,
                          self.scheduler, self.scaler, self.t.grad_clip)
        if self.ema:
            self.ema.update()
        return loss_value.detach() * counted, correct, counted

    def skip_nonfinite(self, loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """A step whose loss is NaN or infinite is not applied (the schedule still advances); past
        ``train.max_nonfinite_steps`` of them training stops, naming the step and what to try."""
        s, t = self.state, self.t
        s.nonfinite_steps += 1
        if s.nonfinite_steps > t.max_nonfinite_steps:
            where = f"step {s.global_step + 1}" + ("" if self.kind.trains_by_steps else f" (epoch {s.epoch + 1})")
            last = self.run_dir / RunDir.LAST
            raise TrainingDiverged(
                f"the loss became {float(loss.detach())} at {where}, after {s.nonfinite_steps - 1} such steps were "
                f"skipped (train.max_nonfinite_steps: {t.max_nonfinite_steps}); training stopped and the run is "
                "marked failed" + (f" (its last checkpoint, {last}, is from before)" if last.is_file() else "")
                + f". Try a lower train.optimizer.lr (it was {self.scheduler.get_last_lr()[0]:.3g} at this step), "
                "train.grad_clip (e.g. 1.0)" + (", train.precision: fp32" if self.precision.name != "fp32" else "")
                + ", or look for extreme values in the data")
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        zero = torch.zeros((), device=self.device)
        return zero, zero.long(), 0

    # ---- the loop ------------------------------------------------------------------------------

    def fit(self) -> None:
        s, t, plan = self.state, self.t, self.plan
        self.model.train()
        plan.begin()
        while not plan.done():
            batches = plan.batches()
            # Sums stay on the device; reading them forces a sync, so only every log_every steps.
            loss_sum = torch.tensor(s.loss_sum, device=self.device)
            correct = torch.tensor(s.correct, device=self.device)
            counted = torch.tensor(s.counted, device=self.device)
            self.display.start_epoch(s.epoch, len(batches), s.step_in_epoch)
            t0, seen0 = time.perf_counter(), s.seen
            for i in range(s.step_in_epoch, len(batches)):
                step_loss, step_correct, step_counted = self.step(batches[i])
                loss_sum += step_loss
                correct += step_correct
                counted += step_counted
                # a stream's batches are per rank; members' own batches (ensemble_mlp) hold each sample k times
                s.seen += len(batches[i]) * (self.dist.world if plan.local_batches else 1) // self.model.member_batches
                s.step_in_epoch, s.global_step = i + 1, s.global_step + 1
                last = i + 1 == len(batches)
                if s.global_step % t.log_every == 0 or last:
                    s.loss_sum, s.correct, s.counted = loss_sum.item(), int(correct.item()), int(counted.item())
                    loss, accuracy = s.loss_sum / max(s.counted, 1), s.correct / max(s.counted, 1)
                    rate = (s.seen - seen0) / max(time.perf_counter() - t0, 1e-9)
                    self.display.update(s.epoch, i + 1, len(batches), loss, accuracy, rate)
                    self.run_dir.append_metrics({"kind": "step", **plan.step_record(), "step": s.global_step,
                                                 "loss": loss, "accuracy": accuracy,
                                                 "lr": self.scheduler.get_last_lr()[0], "samples_per_s": rate})
                    if plan.reset_each_log and not last:
                        loss_sum.zero_(), correct.zero_(), counted.zero_()
                        s.loss_sum, s.correct, s.counted = 0.0, 0, 0
                if not last:
                    plan.after_step(s.global_step)
                    self.report_evaluations()
                if s.global_step % t.checkpoint_every == 0 and not last:
                    s.loss_sum, s.correct, s.counted = loss_sum.item(), int(correct.item()), int(counted.item())
                    s.train_seconds += time.perf_counter() - t0
                    t0, seen0 = time.perf_counter(), s.seen
                    self.save()
            s.train_seconds += time.perf_counter() - t0
            plan.end_period(s.loss_sum / max(s.counted, 1), s.correct / max(s.counted, 1))
            self.report_evaluations()
            s.step_in_epoch, s.loss_sum, s.correct, s.counted, s.seen = 0, 0.0, 0, 0, 0
            self.save()
        if self.privacy:
            self.privacy.release()
        self.display.close()

    def report_evaluations(self) -> None:
        """Hand the evaluation records the plan added since the last call to ``on_evaluation``."""
        while self.on_evaluation is not None and self._reported < len(self.state.history):
            self._reported += 1
            self.on_evaluation(self.state.history[self._reported - 1])

    # ---- evaluation ----------------------------------------------------------------------------

    def evaluate(self, split: str, threshold: float = 0.5) -> dict[str, float]:
        """The task's metrics on a whole split, in the precision inference uses."""
        x, y = self.data.split(split)
        return evaluate(self.model, self.kind, self.kind.eval_batches(x, y, self.plan.eval_size), device=self.device,
                        precision=self.inference, threshold=threshold, share=self.dist.eval_share(self.device))

    def outputs(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.data.split(split)
        return model_outputs(self.model, x, self.kind.to_input, batch_size=self.t.eval_batch_size,
                             device=self.device, precision=self.inference, share=self.dist.eval_share(self.device)), y


def class_weights(setting: str | list[float], train_y: torch.Tensor, kind: DataKind) -> torch.Tensor:
    """Per-class loss weights: as given, or ``auto``: inverse class frequency in the training split (mean 1)."""
    classes = len(kind.class_names)
    if setting == "auto":
        counts = torch.bincount(train_y, minlength=classes).to(torch.float32)
        return torch.where(counts > 0, len(train_y) / (classes * counts.clamp(min=1)), torch.zeros_like(counts))
    if len(setting) != classes:
        raise ConfigError(f"train.class_weights has {len(setting)} weights but the data set has {classes} classes "
                          f"({', '.join(kind.class_names)})")
    return torch.tensor(setting, dtype=torch.float32)
