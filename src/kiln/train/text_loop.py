"""Training on text data (``text`` and ``text_pairs``): a number of steps on random batches, with a
held-out evaluation every ``eval_every`` steps, as nanoGPT trains.

The batch of each step is a function of (seed, step) alone and the checkpoint holds the RNG, so a
resumed run continues exactly. Checkpoints, optimisers, schedules, precision and the progress display
are the ones :mod:`kiln.train.loop` uses.
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import Any

import torch
import torch.nn.functional as F

from kiln.config import Config
from kiln.data.text import IGNORE, TextPairs, TokenData
from kiln.errors import RunDirError
from kiln.generate import check_left_to_right, translate_ids
from kiln.nn import KilnModel, build_model
from kiln.run import Run, RunDir
from kiln.train.checkpoint import load_checkpoint, save_checkpoint, save_weights
from kiln.train.optim import backward_and_step, make_optimizer, make_scheduler
from kiln.train.precision import Precision
from kiln.train.progress import TrainProgress


def text_metrics(loss_sum: float, tokens: int, correct: int, exact: int | None = None, rows: int = 0) -> dict:
    loss = loss_sum / max(tokens, 1)
    out = {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "token_accuracy": correct / max(tokens, 1),
           "tokens": tokens}
    if exact is not None:
        out |= {"exact_match": exact / max(rows, 1), "samples": rows}
    return out


class TextTrainer:
    def __init__(self, cfg: Config, run_dir: RunDir, dataset: TokenData, data, model: KilnModel,
                 device: torch.device, precision: Precision, display: TrainProgress) -> None:
        self.cfg, self.t, self.run_dir, self.dataset, self.data = cfg, cfg.train, run_dir, dataset, data
        self.model, self.device, self.precision, self.display = model, device, precision, display
        self.pairs = isinstance(dataset, TextPairs)
        self.splits = {name: tuple(part.to(device) for part in data.split(name)) for name in ("train", "val")}
        self.optimizer = make_optimizer(model, self.t.optimizer, device)
        self.scheduler = make_scheduler(self.optimizer, self.t.schedule, self.t.steps)
        self.scaler = precision.grad_scaler()
        self.step, self.train_seconds, self.history = 0, 0.0, []

    # ---- batches and loss ------------------------------------------------------------------------

    def batch(self, split: str, gen: torch.Generator, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.splits[split]
        if self.pairs:
            idx = torch.randint(len(x), (size,), generator=gen).to(self.device)
            return x[idx], y[idx]
        t = self.model.input_shape[0]
        start = torch.randint(len(x) - t, (size, 1), generator=gen).to(self.device)
        window = x[start + torch.arange(t + 1, device=self.device)]  # (B, T + 1): inputs and next tokens
        return window[:, :-1], window[:, 1:]

    def logits_loss(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return logits_loss(self.model, x, y, self.precision)

    def train_step(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + self.step)
        x, y = self.batch("train", gen, self.t.batch_size)
        logits, loss = self.logits_loss(x, y)
        backward_and_step(loss, self.model, self.optimizer, self.scheduler, self.scaler, self.t.grad_clip)
        return loss.detach(), logits.detach(), y

    # ---- evaluation ------------------------------------------------------------------------------

    def estimate(self) -> dict[str, Any]:
        """Metrics on ``eval_batches`` random batches of each split (the same batches at every evaluation)."""
        record: dict[str, Any] = {"kind": "eval", "step": self.step}
        for split in ("train", "val"):
            if not len(self.splits[split][0]):
                continue
            gen = torch.Generator().manual_seed(self.cfg.seed + (1 if split == "val" else 2))
            batches = [self.batch(split, gen, self.t.batch_size) for _ in range(self.t.eval_batches)]
            metrics = measure(self.model, self.dataset, batches, self.pairs and split == "val", self.precision)
            record |= {f"{split}_{k}": v for k, v in metrics.items() if k not in ("tokens", "samples")}
        return record

    def evaluate(self, split: str) -> dict[str, float]:
        x, y = self.data.split(split)
        return evaluate_split(self.model, self.dataset, x, y, self.t.batch_size, self.device, self.precision)

    # ---- checkpoints -----------------------------------------------------------------------------

    def save(self) -> None:
        save_checkpoint(self.run_dir / RunDir.LAST, model=self.model, optimizer=self.optimizer,
                        scheduler=self.scheduler, scaler=self.scaler, rng={"torch": torch.get_rng_state()},
                        progress={"step": self.step, "train_seconds": self.train_seconds, "history": self.history})

    def restore(self) -> None:
        rng, progress, _ = load_checkpoint(self.run_dir / RunDir.LAST, model=self.model, optimizer=self.optimizer,
                                           scheduler=self.scheduler, scaler=self.scaler)
        torch.set_rng_state(rng["torch"])
        self.step, self.train_seconds, self.history = progress["step"], progress["train_seconds"], progress["history"]
        self.run_dir.keep_metrics_until(self.step)

    # ---- the loop --------------------------------------------------------------------------------

    def log_eval(self) -> None:
        record = self.estimate()
        self.history.append(record)
        self.run_dir.append_metrics(record)
        shown = [k for k in ("train_loss", "val_loss", "val_perplexity", "val_token_accuracy", "val_exact_match")
                 if k in record]
        self.display.log(f"step {self.step}/{self.t.steps}  " + "  ".join(f"{k} {record[k]:.4f}" for k in shown))

    def fit(self) -> None:
        t = self.t
        self.model.train()
        self.display.start_epoch(0, t.steps, self.step)
        t0, samples = time.perf_counter(), 0
        if self.step == 0:
            self.log_eval()
        while self.step < t.steps:
            loss, logits, y = self.train_step()
            self.step += 1
            samples += len(y)
            if self.step % t.log_every == 0 or self.step == t.steps:
                accuracy = float(((logits.argmax(-1) == y) & (y != IGNORE)).sum() / (y != IGNORE).sum())
                rate = samples / max(time.perf_counter() - t0, 1e-9)
                self.display.update(0, self.step, t.steps, float(loss), accuracy, rate)
                self.run_dir.append_metrics({"kind": "step", "step": self.step, "loss": float(loss),
                                             "token_accuracy": accuracy, "lr": self.scheduler.get_last_lr()[0],
                                             "samples_per_s": rate})
            if self.step % t.eval_every == 0 or self.step == t.steps:
                self.log_eval()
            if self.step % t.checkpoint_every == 0 or self.step == t.steps:
                self.train_seconds += time.perf_counter() - t0
                t0, samples = time.perf_counter(), 0
                self.save()
        self.train_seconds += time.perf_counter() - t0
        self.display.close()


def logits_loss(model: KilnModel, x: torch.Tensor, y: torch.Tensor,
                precision: Precision | None) -> tuple[torch.Tensor, torch.Tensor]:
    with precision.autocast() if precision is not None else contextlib.nullcontext():
        logits = model(x)
    return logits, F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=IGNORE)


@torch.inference_mode()
def measure(model: KilnModel, dataset: TokenData, batches, exact: bool, precision: Precision | None = None) -> dict:
    """Loss, perplexity and token accuracy over (x, y) batches; with ``exact``, greedy exact match too."""
    was_training = model.training
    model.eval()
    loss_sum, tokens, correct, matches, rows = 0.0, 0, 0, 0, 0
    for x, y in batches:
        logits, loss = logits_loss(model, x, y, precision)
        keep = y != IGNORE
        n = int(keep.sum())
        loss_sum += float(loss) * n
        tokens += n
        correct += int(((logits.argmax(-1) == y) & keep).sum())
        if exact:
            matches += exact_matches(model, dataset, x, y)
            rows += len(x)
    model.train(was_training)
    return text_metrics(loss_sum, tokens, correct, matches if exact else None, rows)


def evaluate_split(model: KilnModel, dataset: TokenData, x: torch.Tensor, y: torch.Tensor, size: int,
                   device: torch.device, precision: Precision | None = None) -> dict[str, float]:
    """Metrics on a whole split: every pair, or the text cut into consecutive windows."""
    pairs = isinstance(dataset, TextPairs)
    if pairs:
        batches = [(x[i:i + size].to(device), y[i:i + size].to(device)) for i in range(0, len(x), size)]
    else:
        t = model.input_shape[0]
        n = (len(x) - 1) // t
        xs, ys = x[: n * t].view(n, t).to(device), x[1: n * t + 1].view(n, t).to(device)
        batches = [(xs[i:i + size], ys[i:i + size]) for i in range(0, n, size)]
    return measure(model, dataset, batches, pairs, precision)


def exact_matches(model: KilnModel, dataset: TextPairs, x: torch.Tensor, y: torch.Tensor) -> int:
    """How many rows' greedy translation equals their target exactly."""
    tok = dataset.tokenizer
    eos = tok.special("<eos>")
    predicted = translate_ids(model, x[:, : dataset.source_steps], tok.special("<bos>"), eos, dataset.target_steps)
    targets = [row[: row.index(eos)] for row in y.tolist()]
    return sum(p == t for p, t in zip(predicted, targets, strict=True))


def train_text(cfg: Config, run_dir: RunDir, resume: bool, live: bool | None) -> Run:
    """:func:`kiln.train` for text data sets."""
    from kiln.train.loop import check_run_dir, setup, start_run_dir

    cfg, dataset, device, precision = setup(cfg, run_dir, resume)
    check_left_to_right(cfg.blocks)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.blocks, dataset.input_shape).to(device)
    check_run_dir(run_dir, cfg, resume)
    display = TrainProgress(1, live=live)
    data = dataset.load(progress=display.log)
    manifest = start_run_dir(run_dir, cfg, dataset, data, device, precision, model,
                             {"fuse": [], "fuse_reason": "not used for text"}, resume, display)
    trainer = TextTrainer(cfg, run_dir, dataset, data, model, device, precision, display)
    if resume:
        trainer.restore()
        display.log(f"resuming {run_dir.path} at step {trainer.step}")
    display.log(f"training {cfg.name}: {manifest['parameters']:,} parameters, {cfg.train.steps} steps of "
                f"{cfg.train.batch_size} x {dataset.input_shape[0]} tokens, device {device}, precision {precision.name}")
    try:
        trainer.fit()
    except KeyboardInterrupt:
        display.close()
        raise RunDirError(f"interrupted; the last checkpoint is in {run_dir.path}. Continue with "
                          f"`kiln train {run_dir / RunDir.CONFIG} --out {run_dir.path} --resume`") from None

    save_weights(run_dir / RunDir.WEIGHTS, model, {"steps": trainer.step})
    val = trainer.evaluate("val") if len(data.val_x) else {}
    test = trainer.evaluate("test") if trainer.pairs else val  # a text's held-out tail serves as its test split
    last = trainer.history[-1]
    results = {"train": {"loss": last.get("train_loss")}, "val": val, "test": test, "task": dataset.task,
               "steps": trainer.step, "train_seconds": round(trainer.train_seconds, 3)}
    run_dir.write_json(RunDir.RESULTS, results)
    run_dir.append_metrics({"kind": "test", "step": trainer.step, **test})
    run_dir.write_json(RunDir.MANIFEST, {**manifest, "status": "completed"})
    display.log("test " + "  ".join(f"{k} {test[k]:.4f}" for k in ("loss", "perplexity", "exact_match") if k in test)
                + f"  ({run_dir.path})")
    return Run(run_dir, cfg, model.eval(), device, dataset)
