"""The training loop, readable top to bottom: config -> data + model -> steps -> run directory."""

from __future__ import annotations

import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import kiln
from kiln.config import HIGHER_IS_BETTER, Config, HardExamplesConfig, load_config
from kiln.data.datasets import Dataset, Splits, open_dataset
from kiln.data.images import augment
from kiln.data.text import TEXT_DATASETS
from kiln.errors import ConfigError, RunDirError
from kiln.fsutil import atomic_write_text
from kiln.nn import KilnModel, build_model
from kiln.run import Run, RunDir
from kiln.train.checkpoint import load_checkpoint, load_weights, save_checkpoint, save_weights
from kiln.train.metrics import TASK_METRICS, choose_threshold, model_outputs, task_metrics
from kiln.train.optim import backward_and_step, make_optimizer, make_scheduler
from kiln.nn.fuse import fuse
from kiln.train.precision import Precision, pick_device, pick_fuse, pick_precision
from kiln.train.progress import TrainProgress


HEADS = {"classifier": ("binary", "multiclass"), "regressor": ("regression",)}


def resolve(cfg: Config, dataset: Dataset) -> Config:
    """Fill what the data decides (class count, a table's column layout) so the saved config is complete."""
    fill = dataset.block_fields()
    blocks = []
    for i, b in enumerate(cfg.model.blocks):
        if b.type in HEADS and dataset.task not in HEADS[b.type]:
            head = next(h for h, tasks in HEADS.items() if dataset.task in tasks)
            raise ConfigError(f"model.blocks.{i} ({b.type}): the task is {dataset.task}; end the model with `{head}`")
        unset = {k: v for k, v in fill.get(b.type, {}).items() if getattr(b, k) is None}
        blocks.append(b.model_copy(update=unset) if unset else b)
    return cfg.model_copy(update={"model": cfg.model.model_copy(update={"blocks": blocks})})


def epoch_order(n: int, seed: int, epoch: int, device: torch.device) -> torch.Tensor:
    """The sample order of one epoch: a function of (seed, epoch) alone, so a resumed run repeats it."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=gen).to(device)


def epoch_size(n: int, hard: HardExamplesConfig | None, epoch: int) -> int:
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


@dataclass
class TrainState:
    """Where training stands; saved in every checkpoint."""

    epoch: int = 0  # epochs completed
    step_in_epoch: int = 0  # steps done of the current epoch
    global_step: int = 0
    loss_sum: float = 0.0  # over the current epoch's samples so far
    correct: int = 0
    seen: int = 0
    best_value: float | None = None
    best_epoch: int | None = None
    bad_epochs: int = 0  # epochs since the monitored metric last improved
    stopped_early: bool = False
    train_seconds: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)  # per-epoch train/val metrics


class Trainer:
    def __init__(self, cfg: Config, run_dir: RunDir, dataset: Dataset, data: Splits, model: KilnModel,
                 device: torch.device, precision: Precision, progress_display: TrainProgress) -> None:
        self.cfg, self.t = cfg, cfg.train
        self.run_dir, self.dataset, self.data, self.model, self.device = run_dir, dataset, data, model, device
        self.precision = precision
        self.display = progress_display
        self.train_x, self.train_y = data.train_x.to(device), data.train_y.to(device)
        n, hard = len(self.train_x), self.t.hard_examples
        total_steps = sum(math.ceil(epoch_size(n, hard, e) / self.t.batch_size) for e in range(self.t.epochs))
        self.optimizer = make_optimizer(model, self.t.optimizer, device)
        self.scheduler = make_scheduler(self.optimizer, self.t.schedule, total_steps)
        # Each sample's loss when last trained on (inf: not yet seen), for hard_examples' choice.
        self.last_loss = torch.full((n,), math.inf, device=device) if hard and hard.select == "hardest" else None
        self.scaler = precision.grad_scaler()
        self.aug_gen = torch.Generator(device=device).manual_seed(cfg.seed + 1)
        self.state = TrainState()
        # Penalties apply to weight matrices and kernels, not to biases or normalisation scales.
        self.penalised = [p for p in model.parameters() if p.dim() > 1]
        self.class_weight = class_weights(self.t.class_weights, data.train_y, dataset).to(device) \
            if self.t.class_weights else None

    # ---- checkpoints ---------------------------------------------------------------------------

    def rng_state(self) -> dict[str, torch.Tensor]:
        rng = {"torch": torch.get_rng_state(), "augment": self.aug_gen.get_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return rng

    def save(self) -> None:
        tracked = {"last_loss": self.last_loss} if self.last_loss is not None else None
        save_checkpoint(self.run_dir / RunDir.LAST, model=self.model, optimizer=self.optimizer,
                        scheduler=self.scheduler, scaler=self.scaler, rng=self.rng_state(),
                        progress=self.state.__dict__, tracked=tracked)

    def restore(self) -> None:
        rng, progress, tracked = load_checkpoint(self.run_dir / RunDir.LAST, model=self.model,
                                                 optimizer=self.optimizer, scheduler=self.scheduler, scaler=self.scaler)
        self.state = TrainState(**progress)
        if self.last_loss is not None:
            self.last_loss.copy_(tracked["last_loss"])
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

    def step(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.dataset.to_input(self.train_x[idx])
        y = self.train_y[idx]
        aug = self.cfg.data.augment
        if aug.shift or aug.rotate or aug.scale:
            x = augment(x, aug.shift, aug.rotate, aug.scale, self.aug_gen)
        with self.precision.autocast():
            logits = self.model(x)
        if self.dataset.task == "regression":
            loss = F.mse_loss(logits.float()[:, 0], y)
            correct = torch.zeros((), device=self.device, dtype=torch.long)  # no accuracy for regression
        else:
            loss = F.cross_entropy(logits.float(), y, weight=self.class_weight, label_smoothing=self.t.label_smoothing)
            correct = (logits.detach().argmax(1) == y).sum()
        if self.last_loss is not None:
            self.last_loss[idx] = sample_losses(logits.detach().float(), y, self.dataset.task)
        backward_and_step(loss + self.penalty(), self.model, self.optimizer, self.scheduler, self.scaler,
                          self.t.grad_clip)
        return loss.detach() * len(idx), correct

    # ---- epochs --------------------------------------------------------------------------------

    def run_epoch(self) -> None:
        s, t = self.state, self.t
        order = epoch_order(len(self.train_x), self.cfg.seed, s.epoch, self.device)
        size = epoch_size(len(order), t.hard_examples, s.epoch)
        if size < len(order):
            order = hard_subset(order, self.last_loss, size, t.hard_examples.select)
            if s.step_in_epoch == 0:
                self.display.log(f"epoch {s.epoch + 1}: training on {size:,} of {len(self.train_x):,} samples "
                                 f"({t.hard_examples.select}, train.hard_examples)")
        batches = order.split(t.batch_size)
        # Sums stay on the device; reading them forces a sync, so only every log_every steps.
        loss_sum = torch.tensor(s.loss_sum, device=self.device)
        correct = torch.tensor(s.correct, device=self.device)
        self.display.start_epoch(s.epoch, len(batches), s.step_in_epoch)
        t0, seen0 = time.perf_counter(), s.seen
        for i in range(s.step_in_epoch, len(batches)):
            step_loss, step_correct = self.step(batches[i])
            loss_sum += step_loss
            correct += step_correct
            s.seen += len(batches[i])
            s.step_in_epoch, s.global_step = i + 1, s.global_step + 1
            if s.global_step % t.log_every == 0 or i + 1 == len(batches):
                s.loss_sum, s.correct = loss_sum.item(), int(correct.item())
                rate = (s.seen - seen0) / max(time.perf_counter() - t0, 1e-9)
                self.display.update(s.epoch, i + 1, len(batches), s.loss_sum / s.seen, s.correct / s.seen, rate)
                self.run_dir.append_metrics({"kind": "step", "epoch": s.epoch + 1, "step": s.global_step,
                                             "loss": s.loss_sum / s.seen, "accuracy": s.correct / s.seen,
                                             "lr": self.scheduler.get_last_lr()[0], "samples_per_s": rate})
            if s.global_step % t.checkpoint_every == 0 and i + 1 < len(batches):
                s.loss_sum, s.correct = loss_sum.item(), int(correct.item())
                s.train_seconds += time.perf_counter() - t0
                t0, seen0 = time.perf_counter(), s.seen
                self.save()
        s.train_seconds += time.perf_counter() - t0
        self.end_epoch(loss_sum.item() / s.seen, int(correct.item()) / s.seen)

    def outputs(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.data.split(split)
        return model_outputs(self.model, x, self.dataset.to_input, batch_size=self.t.eval_batch_size,
                             device=self.device, precision=self.precision), y

    def evaluate(self, split: str, threshold: float = 0.5) -> dict[str, float]:
        return task_metrics(self.dataset.task, *self.outputs(split), threshold=threshold,
                            target_scale=self.dataset.target_scale)

    def end_epoch(self, train_loss: float, train_acc: float) -> None:
        s = self.state
        val = self.evaluate("val") if len(self.data.val_x) else {}  # data.val_fraction 0: no val split
        record = {"kind": "epoch", "epoch": s.epoch + 1, "step": s.global_step, "samples": s.seen,
                  "train_loss": train_loss, "train_accuracy": train_acc,
                  **{f"val_{k}": v for k, v in val.items() if k in TASK_METRICS[self.dataset.task]},
                  "lr": self.scheduler.get_last_lr()[0]}
        s.history.append(record)
        self.run_dir.append_metrics(record)
        self.display.end_epoch(f"epoch {s.epoch + 1}/{self.t.epochs}  train loss {train_loss:.4f} acc {train_acc:.4f}"
                               + (f"  val {headline(val)}" if val else ""))
        self.track_best(record)
        s.epoch, s.step_in_epoch, s.loss_sum, s.correct, s.seen = s.epoch + 1, 0, 0.0, 0, 0
        self.save()

    def track_best(self, record: dict[str, Any]) -> None:
        """Keep the best epoch's weights; count epochs without improvement for early stopping."""
        s, es = self.state, self.t.early_stopping
        monitor = es.monitor if es else ("val_loss" if len(self.data.val_x) else "train_loss")
        value = record.get(monitor, math.nan)
        if math.isnan(value) or (self.t.hard_examples and monitor.startswith("train_")):
            return  # with hard_examples, train metrics of different epochs cover different samples
        sign = -1.0 if monitor.endswith(HIGHER_IS_BETTER) else 1.0
        min_delta = es.min_delta if es else 0.0
        if s.best_value is None or sign * (s.best_value - value) > min_delta:
            s.best_value, s.best_epoch, s.bad_epochs = value, s.epoch + 1, 0
            save_weights(self.run_dir / RunDir.BEST, self.model, {"epoch": s.epoch + 1, monitor: value})
        else:
            s.bad_epochs += 1
        if es and s.bad_epochs >= es.patience:
            s.stopped_early = True

    def fit(self) -> None:
        while self.state.epoch < self.t.epochs and not self.state.stopped_early:
            self.run_epoch()
        if self.state.stopped_early:
            self.display.log(f"early stopping: no improvement for {self.t.early_stopping.patience} epochs")
        self.display.close()


def sample_losses(logits: torch.Tensor, y: torch.Tensor, task: str) -> torch.Tensor:
    """Each sample's own loss (unweighted, unsmoothed): how hard the sample still is."""
    if task == "regression":
        return (logits[:, 0] - y).square()
    return F.cross_entropy(logits, y, reduction="none")


def class_weights(setting: str | list[float], train_y: torch.Tensor, dataset: Dataset) -> torch.Tensor:
    """Per-class loss weights: as given, or ``auto``: inverse class frequency in the training split (mean 1)."""
    classes = len(dataset.class_names)
    if setting == "auto":
        counts = torch.bincount(train_y, minlength=classes).to(torch.float32)
        return torch.where(counts > 0, len(train_y) / (classes * counts.clamp(min=1)), torch.zeros_like(counts))
    if len(setting) != classes:
        raise ConfigError(f"train.class_weights has {len(setting)} weights but the data set has {classes} classes "
                          f"({', '.join(dataset.class_names)})")
    return torch.tensor(setting, dtype=torch.float32)


def headline(metrics: dict[str, float]) -> str:
    """The few metrics a progress line shows."""
    keys = [k for k in ("loss", "accuracy", "roc_auc", "rmse", "r2") if k in metrics]
    return "  ".join(f"{k} {metrics[k]:.4f}" for k in keys)


def _manifest(cfg: Config, data: Splits, device: torch.device, precision: Precision, model: KilnModel,
              execution: dict) -> dict:
    return {
        "kiln": kiln.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "seed": cfg.seed,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "precision": precision.name,
        "precision_reason": precision.reason,
        "execution": execution,
        "parameters": sum(p.numel() for p in model.parameters()),
        "data_checksums": data.checksums,
        "samples": {"train": len(data.train_x), "val": len(data.val_x), "test": len(data.test_x)},
        "command": " ".join(sys.argv),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "status": "running",
    }


def _check_resumable(run_dir: RunDir, cfg: Config) -> None:
    if not run_dir.is_run():
        raise RunDirError(f"--resume: {run_dir.path} is not a kiln run directory")
    if not (run_dir / RunDir.LAST).is_file():
        raise RunDirError(f"--resume: {run_dir.path} has no checkpoint yet ({RunDir.LAST}); start it again instead")
    saved = load_config(run_dir / RunDir.CONFIG).to_dict()
    new = cfg.to_dict()
    saved["train"].pop("epochs")
    new["train"].pop("epochs")
    if saved != new:
        diff = [k for k in new if new[k] != saved.get(k)]
        raise ConfigError(f"--resume: the config differs from the one {run_dir.path} was trained with "
                          f"(sections: {', '.join(diff)}); only train.epochs may change on resume")


def setup(cfg: Config, run_dir: RunDir, resume: bool) -> tuple[Config, Dataset, torch.device, Precision]:
    """The start every training path shares: threads, device, precision, the data set, the resolved config."""
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    device = pick_device(cfg.train.device)
    precision = pick_precision(cfg.train.precision, device)
    dataset = open_dataset(cfg.data, cfg.seed, run_dir.path if resume else None)
    return resolve(cfg, dataset), dataset, device, precision


def check_run_dir(run_dir: RunDir, cfg: Config, resume: bool) -> None:
    """Before anything is written: a new run needs a free directory, a resumed one a matching config."""
    if resume:
        _check_resumable(run_dir, cfg)
    else:
        run_dir.check_new()


def start_run_dir(run_dir: RunDir, cfg: Config, dataset: Dataset, data, device: torch.device, precision: Precision,
                  model: KilnModel, execution: dict[str, Any], resume: bool, display: TrainProgress) -> dict:
    """Write what every run starts with (config and data set files when new, the manifest), log the data
    set's report, and return the manifest."""
    if not resume:
        run_dir.create()
        atomic_write_text(run_dir / RunDir.CONFIG, cfg.to_yaml())
        dataset.save(run_dir.path)
    for line in dataset.report():
        display.log(line)
    manifest = _manifest(cfg, data, device, precision, model, execution)
    run_dir.write_json(RunDir.MANIFEST, manifest)
    return manifest


def train(config: str | os.PathLike | dict | Config, overrides: dict[str, Any] | list[str] | None = None, *,
          out: str | os.PathLike | None = None, resume: bool = False, live: bool | None = None) -> Run:
    """Train a model from a config and return the finished :class:`Run`.

    Everything is validated (config, model shapes, data files) before anything is written, so a
    failed start leaves existing files as they were.
    """
    cfg = load_config(config, overrides)
    run_dir = RunDir(out or Path("runs") / cfg.name)
    if cfg.data.dataset in TEXT_DATASETS:  # step-based training on random batches
        from kiln.train.text_loop import train_text

        if cfg.train.hard_examples:
            raise ConfigError("train.hard_examples applies to epochs over images or tables; text data trains "
                              "for train.steps on random batches")

        return train_text(cfg, run_dir, resume, live)
    cfg, dataset, device, precision = setup(cfg, run_dir, resume)
    _check_task_settings(cfg, dataset)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.blocks, dataset.input_shape).to(device)
    use_fuse, fuse_reason = pick_fuse(cfg.train.fuse, device)
    execution = {"fuse": fuse(model) if use_fuse else [], "fuse_reason": fuse_reason}
    check_run_dir(run_dir, cfg, resume)
    display = TrainProgress(cfg.train.epochs, live=live)
    data = dataset.load(progress=display.log)
    if len(data.train_x) == 0:
        raise ConfigError("data: the training split is empty; lower data.val_fraction or raise data.limit_train")
    manifest = start_run_dir(run_dir, cfg, dataset, data, device, precision, model, execution, resume, display)
    trainer = Trainer(cfg, run_dir, dataset, data, model, device, precision, display)
    if resume:
        trainer.restore()
        atomic_write_text(run_dir / RunDir.CONFIG, cfg.to_yaml())
        display.log(f"resuming {run_dir.path} at epoch {trainer.state.epoch + 1}, step {trainer.state.global_step}")
    display.log(f"training {cfg.name}: {manifest['parameters']:,} parameters, {len(data.train_x):,} train / "
                f"{len(data.val_x):,} val samples, device {device}, precision {precision.name} ({precision.reason})")
    for line in execution["fuse"]:
        display.log(f"fused {line} ({fuse_reason})")
    try:
        trainer.fit()
    except KeyboardInterrupt:
        # No checkpoint here: the interrupted step may be half applied. The last one is consistent.
        trainer.display.close()
        raise RunDirError(f"interrupted; the last checkpoint is in {run_dir.path}. Continue with "
                          f"`kiln train {run_dir / RunDir.CONFIG} --out {run_dir.path} --resume`") from None

    es = cfg.train.early_stopping
    if es and es.restore_best and (run_dir / RunDir.BEST).is_file():
        load_weights(run_dir / RunDir.BEST, model)
    save_weights(run_dir / RunDir.WEIGHTS, model, {"epochs": trainer.state.epoch})
    threshold = 0.5
    if cfg.train.threshold_metric and len(data.val_x):
        threshold = choose_threshold(*trainer.outputs("val"), cfg.train.threshold_metric)
    test = trainer.evaluate("test", threshold)
    s = trainer.state
    last = s.history[-1] if s.history else {}
    results = {
        "train": {"loss": last.get("train_loss"), "accuracy": last.get("train_accuracy")},
        "val": trainer.evaluate("val", threshold),
        "test": test,
        "task": dataset.task,
        "threshold": threshold,
        "epochs": s.epoch,
        "best_epoch": s.best_epoch,
        "stopped_early": s.stopped_early,
        "train_seconds": round(s.train_seconds, 3),
    }
    run_dir.write_json(RunDir.RESULTS, results)
    run_dir.append_metrics({"kind": "test", "step": s.global_step, **test})
    run_dir.write_json(RunDir.MANIFEST, {**manifest, "status": "completed"})
    display.log(f"test {headline(test)}  ({run_dir.path})")
    return Run(run_dir, cfg, model.eval(), device, dataset)


def _check_task_settings(cfg: Config, dataset: Dataset) -> None:
    """Settings that only some tasks have, refused before anything is written."""
    es, task = cfg.train.early_stopping, dataset.task
    if es and es.monitor.startswith("val_") and es.monitor[4:] not in TASK_METRICS[task]:
        raise ConfigError(f"train.early_stopping.monitor: {es.monitor} is not a metric of a {task} task; "
                          f"choose one of {', '.join('val_' + m for m in TASK_METRICS[task])}")
    if cfg.train.threshold_metric and task != "binary":
        raise ConfigError(f"train.threshold_metric applies to binary classification; this task is {task}")
    if cfg.train.class_weights and task == "regression":
        raise ConfigError("train.class_weights applies to classification; this task is regression")
    if cfg.train.hard_examples and es and es.monitor.startswith("train_"):
        raise ConfigError(f"train.early_stopping.monitor: {es.monitor} is measured on the hard examples alone from "
                          f"epoch {cfg.train.hard_examples.from_epoch} (train.hard_examples); monitor a val_ metric")


