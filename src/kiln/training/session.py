"""A training run from start to finish, readable top to bottom: config -> kind of data + model -> trainer ->
run directory. One path for every kind of data.

Everything is validated (config, model shapes, data files) before anything is written, so a failed start
leaves existing files as they were.
"""

from __future__ import annotations

import platform
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import torch
import yaml

from kiln.data.kind import DataKind, resolve
from kiln.data.splits import Splits
from kiln.errors import ConfigError, RunDirError
from kiln.fsutil import atomic_write_text
from kiln.nn import KilnModel, build_model
from kiln.nn.fuse import fuse
from kiln.rundir import RunDir
from kiln.training.checkpoint import load_weights, save_weights
from kiln.training.lr_find import choose_lr, started_lr, write_sweep
from kiln.training.distributed import Dist, QuietProgress, QuietRunDir, is_writer, restarted
from kiln.training.metrics import TASK_METRICS, choose_threshold, expected_cost, metrics_line, probabilities
from kiln.training.plots import write_precision_recall
from kiln.training.precision import Precision, pick_device, pick_fuse, pick_precision
from kiln.training.privacy import fuse_choice
from kiln.training.progress import TrainProgress
from kiln.training.shared_data import shared_kind
from kiln.training.threads import pick_threads
from kiln.training.trainer import Trainer, TrainingDiverged
from kiln.training.transfer import prepare
from kiln.version import __version__


@dataclass
class Trained:
    """What a finished training hands to ``kiln.Run``: everything is also in the run directory."""

    run_dir: RunDir
    cfg: Any
    model: KilnModel
    device: torch.device
    kind: DataKind


def train_run(cfg, run_dir: RunDir, resume: bool = False, saved: dict | None = None,
              live: bool | None = None, on_evaluation: Callable[[dict], None] | None = None) -> Trained:
    """Train ``cfg`` (a validated Config) into ``run_dir``; with ``resume``, continue it from its last checkpoint
    (``saved``: the config it was started with, as a dict). ``train.threads`` holds for this training only: the
    calling process gets its own thread count back. ``on_evaluation`` is called with each evaluation's record
    (:attr:`Trainer.on_evaluation`)."""
    before = torch.get_num_threads()
    try:
        return _train_run(cfg, run_dir, resume, saved, live, on_evaluation)
    finally:
        torch.set_num_threads(before)


def _train_run(cfg, run_dir: RunDir, resume: bool, saved: dict | None, live: bool | None,
               on_evaluation: Callable[[dict], None] | None) -> Trained:
    dist = Dist(cfg.train.parallel)  # one process, or one of torchrun's workers (kiln.training.distributed)
    resume = resume or (restarted() and run_dir.is_run())  # torchrun --max-restarts started this worker again
    started = run_dir.read_json(RunDir.MANIFEST).get("threads") if resume and run_dir.is_run() else None
    threads, threads_reason = dist.threads(*pick_threads(cfg.train.threads, started))
    torch.set_num_threads(threads)
    device = dist.device(pick_device(cfg.train.device))
    dist.start(device, cfg.train.parallel)
    if not dist.writes:
        run_dir = QuietRunDir(run_dir.path)
    precision = pick_precision(cfg.train.precision, device)
    kind = shared_kind(cfg.data, cfg.seed, run_dir.path if resume else None, dist, device)  # fitted once
    cfg = resolve(cfg, kind)
    check_task_settings(cfg.train, kind.task)
    kind.check_model(cfg.blocks)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.blocks, kind.input_shape).to(device)
    kind.fill_model(model)
    use_fuse, fuse_reason = fuse_choice(cfg.train.fuse) if cfg.train.privacy else pick_fuse(cfg.train.fuse, device)
    if dist.fsdp:
        use_fuse, fuse_reason = False, "off under train.parallel: fsdp (the fused kernels read whole parameters)"
    execution = {"fuse": fuse(model) if use_fuse else [], "fuse_reason": fuse_reason}
    transfer = prepare(cfg.train, model)  # train.init_from and train.freeze
    # A run stopped before its first checkpoint holds no training yet: resuming it starts from the beginning.
    restart = resume and not (run_dir / RunDir.LAST).is_file()
    if resume:
        cfg = started_lr(cfg, saved)  # lr: auto keeps the rate it chose
        check_resumable(run_dir, cfg, saved)
        dist.check_resume(run_dir)
        run_dir.remove_leftovers()
    else:
        run_dir.check_new()
    display = TrainProgress(cfg.train.epochs if not kind.trains_by_steps else 1, live=live)
    display = display if dist.writes else QuietProgress()
    data = kind.load(progress=display.log)
    if len(data.train_x) == 0:
        raise ConfigError("data: the training split is empty; lower data.val_fraction or raise data.limit_train")
    cfg, found = choose_lr(cfg, lambda c: Trainer(c, run_dir, kind, data, model, device, precision, display),
                           display.log)  # train.optimizer.lr: auto
    dist.check(cfg.train, kind.samples(data.train_x))
    trainer = Trainer(cfg, run_dir, kind, data, model, device, precision, display, dist)
    trainer.on_evaluation = on_evaluation
    if not resume:
        run_dir.create()
        if dist.writes:
            kind.save(run_dir.path)
            if transfer:
                run_dir.write_json(RunDir.TRANSFER, transfer.to_json())
            if found:
                write_sweep(found, run_dir / RunDir.LR_FIND_PLOT, run_dir / RunDir.LR_FIND,
                            f"{cfg.name}: learning-rate sweep")
    if dist.writes:
        atomic_write_text(run_dir / RunDir.CONFIG, cfg.to_yaml())  # on resume: the epochs or steps may have changed
    for line in [*kind.report(), *filter(None, [trainer.weights_note, dist.note]),
                 *(transfer.lines() if transfer else [])]:
        display.log(line)
    manifest = run_manifest(cfg, data, device, precision, model, execution) | {"threads_reason": threads_reason,
                                                                            "distributed": dist.manifest()}
    manifest |= (transfer.manifest() if transfer else {}) | ({"lr_find": found.summary()} if found else {})
    if trainer.privacy:
        manifest["privacy"] = trainer.privacy.summary()
    run_dir.write_json(RunDir.MANIFEST, manifest)
    if restart:
        run_dir.clear_metrics()
        display.log(f"resuming {run_dir.path}: it stopped before its first checkpoint, so it starts from the beginning")
    elif resume:
        trainer.restore()
        display.log(f"resuming {run_dir.path} at step {trainer.state.global_step}")
    display.log(f"training {cfg.name}: {manifest['parameters']:,} parameters, {trainer.plan.describe()}, "
                f"device {device}, precision {precision.name} ({precision.reason}), {threads} threads "
                f"({threads_reason})")
    for line in execution["fuse"]:
        display.log(f"fused {line} ({fuse_reason})")
    try:
        trainer.fit()
    except KeyboardInterrupt:
        # No checkpoint here: the interrupted step may be half applied. The last one is consistent.
        display.close()
        raise RunDirError(f"interrupted; the last checkpoint is in {run_dir.path}. Continue with "
                          f"`{run_dir.resume_hint()}`") from None
    except TrainingDiverged as e:
        display.close()
        run_dir.write_json(RunDir.MANIFEST, {**manifest, "status": "failed", "error": str(e)})
        raise
    except Exception as e:  # stopped by a callback (a pruned tuning trial) or a bug: the manifest says so
        display.close()
        run_dir.write_json(RunDir.MANIFEST, {**manifest, "status": "stopped", "error": f"{type(e).__name__}: {e}"})
        raise
    finish_run(cfg, trainer, manifest)
    if dist.active:  # the finished model, whole on every rank (FSDP held shards), then the process group ends
        model = dist.finish(model, lambda: build_model(cfg.blocks, kind.input_shape).to(device), run_dir)
    return Trained(RunDir(run_dir.path), cfg, model.eval(), device, kind)


def finish_run(cfg, trainer: Trainer, manifest: dict) -> None:
    """Final weights, the threshold of a binary task, metrics on validation and test, results.json."""
    run_dir, data, model, s = trainer.run_dir, trainer.data, trainer.model, trainer.state
    summary = trainer.plan.finish()
    if trainer.ema:  # train.ema: the averaged weights are the model (the best epoch's were saved averaged)
        trainer.ema.apply()
    es = cfg.train.early_stopping
    if es and es.restore_best and (run_dir / RunDir.BEST).is_file():
        load_weights(run_dir / RunDir.BEST, model)
    save_weights(run_dir / RunDir.WEIGHTS, model, {"steps": s.global_step, "epochs": s.epoch})
    threshold = 0.5
    costs = (cfg.train.costs.false_positive, cfg.train.costs.false_negative) if cfg.train.costs else None
    if cfg.train.threshold_metric and len(data.val_x):
        threshold = choose_threshold(*trainer.outputs("val"), cfg.train.threshold_metric, costs)
    val = trainer.evaluate("val", threshold) if len(data.val_x) else {}
    test = val if data.test_x is data.val_x else trainer.evaluate("test", threshold)  # a text's held-out tail
    if trainer.kind.task == "binary":
        _binary_extras(cfg, trainer, threshold, costs, val, test)
    results = {**summary, "val": val, "test": test, "task": trainer.kind.task, "threshold": threshold,
               "train_seconds": round(s.train_seconds, 3)}
    if trainer.privacy:
        results["privacy"] = manifest["privacy"] = trainer.privacy.summary()
    run_dir.write_json(RunDir.RESULTS, results)
    run_dir.append_metrics({"kind": "test", "step": s.global_step, **test})
    run_dir.write_json(RunDir.MANIFEST, {**manifest, "status": "completed"})
    trainer.display.log(f"test {metrics_line(test) or '(no held-out data)'}  ({run_dir.path})")


def _binary_extras(cfg, trainer: Trainer, threshold: float, costs: tuple[float, float] | None, val: dict,
                   test: dict) -> None:
    """A binary run's precision-recall plot of its test split (else validation), and with train.costs the mean
    cost per row of its decisions on each split."""
    split = "test" if len(trainer.data.test_x) else "val"
    outputs, y = trainer.outputs(split)
    if len(y) and is_writer():
        write_precision_recall(trainer.run_dir / RunDir.PR_CURVE, probabilities(outputs)[:, 1].double().numpy(),
                               y.numpy(), threshold, f"{cfg.name}: precision and recall on the {split} split")
    if costs:
        for name, metrics in (("val", val), ("test", test)):
            if metrics and len(trainer.data.split(name)[1]):
                metrics["cost"] = expected_cost(*trainer.outputs(name), threshold, costs)


def check_task_settings(t, task: str) -> None:
    """Settings that only some tasks have, refused before anything is written."""
    es = t.early_stopping
    if es and es.monitor.startswith("val_") and es.monitor[4:] not in TASK_METRICS[task]:
        raise ConfigError(f"train.early_stopping.monitor: {es.monitor} is not a metric of a {task} task; "
                          f"choose one of {', '.join('val_' + m for m in TASK_METRICS[task])}")
    if (t.threshold_metric or t.costs) and task != "binary":
        raise ConfigError(f"train.threshold_metric applies to binary classification; this task is {task}")
    classification = task in ("binary", "multiclass")
    for name, value in (("class_weights", t.class_weights), ("label_smoothing", t.label_smoothing)):
        if value and not classification:
            raise ConfigError(f"train.{name} applies to classification; this task is {task}")
    if t.hard_examples and es and es.monitor.startswith("train_"):
        raise ConfigError(f"train.early_stopping.monitor: {es.monitor} is measured on the hard examples alone from "
                          f"epoch {t.hard_examples.from_epoch} (train.hard_examples); monitor a val_ metric")


def check_resumable(run_dir: RunDir, cfg, saved: dict | None) -> None:
    """A run continues only from its own checkpoint and with its own config (but for its length)."""
    if not run_dir.is_run():
        raise RunDirError(f"--resume: {run_dir.path} is not a kiln run directory")
    saved = saved if saved is not None else yaml.safe_load((run_dir / RunDir.CONFIG).read_text())
    new = cfg.to_dict()
    for d in (saved, new):
        d["train"].pop("epochs"), d["train"].pop("steps")
    if saved != new:
        diff = [k for k in new if new[k] != saved.get(k)]
        raise ConfigError(f"--resume: the config differs from the one {run_dir.path} was trained with "
                          f"(sections: {', '.join(diff)}); only train.epochs and train.steps may change on resume")


def run_manifest(cfg, data: Splits, device: torch.device, precision: Precision, model: KilnModel,
              execution: dict) -> dict:
    return {
        "kiln": __version__,
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
