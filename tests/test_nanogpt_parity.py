"""kiln trains examples/shakespeare_char.yaml as nanoGPT trains its documented CPU configuration, in the parts that
benchmarks/nanogpt_steps.py does not cover step by step: the learning rate of every one of the 2000 steps, the
random training windows (offsets over the whole training split, never into the held-out tail), and the split and
vocabulary of the text. (The model, loss, weight-decay groups, clipping and AdamW are compared step by step on
the same weights and batches in tests/test_lm_recipe.py.)"""

import math
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from kiln.config import load_config
from kiln.data.kind import open_kind
from kiln.training.optim import make_scheduler
from kiln.training.plans import StepBatches

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "examples" / "shakespeare_char.yaml"


def nanogpt_lr(it: int, lr=1e-3, min_lr=1e-4, warmup=100, decay_iters=2000) -> float:
    """nanoGPT's train.py get_lr for its CPU command (learning_rate 1e-3, warmup_iters 100, lr_decay_iters 2000,
    min_lr 1e-4)."""
    if it < warmup:
        return lr * (it + 1) / (warmup + 1)
    if it > decay_iters:
        return min_lr
    ratio = (it - warmup) / (decay_iters - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


def test_every_steps_learning_rate_is_nanogpts():
    """The rate each of the 2000 optimiser steps uses (the scheduler advanced after every step, as kiln's
    backward_and_step does), from the first warm-up step to the last step at min_lr."""
    train = load_config(CONFIG).train
    weight = torch.nn.Parameter(torch.zeros(2, 2))
    opt = torch.optim.SGD([weight], lr=train.optimizer.lr)  # only the schedule is under test
    sched = make_scheduler(opt, train.schedule, train.steps)
    used = []
    for _ in range(train.steps):
        used.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    want = [nanogpt_lr(it) for it in range(train.steps)]
    assert max(abs(a - b) for a, b in zip(used, want)) < 1e-12
    assert used[0] == pytest.approx(1e-3 / 101) and used[99] == pytest.approx(1e-3 * 100 / 101)
    assert used[100] == pytest.approx(1e-3) and used[-1] == pytest.approx(1e-4, rel=1e-5)
    assert opt.param_groups[0]["lr"] == pytest.approx(nanogpt_lr(train.steps))  # after the last: min_lr


@pytest.fixture
def small_text(tmp_path):
    """A 3000-character text whose last character occurs only in the held-out tail."""
    gen = torch.Generator().manual_seed(0)
    body = "".join("abcdefgh \n"[i] for i in torch.randint(10, (2999,), generator=gen).tolist())
    path = tmp_path / "t.txt"
    path.write_text(body + "Z", encoding="utf-8")
    return path


def text_kind(path: Path, context: int = 16):
    cfg = load_config(CONFIG, {"data.path": str(path), "data.context": context})
    return open_kind(cfg.data, cfg.seed), cfg


def test_split_and_vocabulary_are_nanogpts(small_text):
    """prepare.py: the vocabulary is every character of the whole text, sorted; the first int(0.9 n) characters
    train and the rest are held out."""
    kind, _ = text_kind(small_text)
    data = kind.load()
    text = small_text.read_text(encoding="utf-8")
    assert kind.tokenizer.chars == "".join(sorted(set(text)))  # "Z" (only held out) is in the vocabulary
    n = int(len(text) * 0.9)
    assert len(data.train_x) == n and len(data.val_x) == len(text) - n
    assert kind.tokenizer.decode(data.train_x.tolist()) == text[:n]
    assert kind.tokenizer.decode(data.val_x.tolist()) == text[n:]


def test_training_windows_are_uniform_over_the_whole_training_split(small_text):
    """nanoGPT draws torch.randint(len(train) - block_size, (batch_size,)) fresh offsets every step. kiln's step
    batches do the same with a generator per (seed, step): every offset from 0 to len(train) - context - 1 is
    reached, uniformly (chi-square), consecutive steps are independent, and no target reaches the held-out tail."""
    kind, cfg = text_kind(small_text)
    data = kind.load()
    steps, batch, t = 2000, 12, 16
    trainer = SimpleNamespace(cfg=cfg, t=SimpleNamespace(batch_size=batch), kind=kind, train_x=data.train_x,
                              device=torch.device("cpu"), model=SimpleNamespace(member_batches=1))
    batches = StepBatches(trainer, steps)
    offsets = torch.stack([batches[s] for s in range(steps)])  # (steps, batch)
    n = len(data.train_x) - t
    assert kind.samples(data.train_x) == n
    assert offsets.min() == 0 and offsets.max() == n - 1
    counts = torch.bincount(offsets.flatten(), minlength=n).double()
    assert (counts > 0).float().mean() > 0.99  # 24000 draws over 2684 offsets: all but ~0.013% expected
    bins = counts.view(-1)[: n - n % 61].view(61, -1).sum(1)  # 61 equal bins of 44 offsets
    expected = bins.sum() / len(bins)
    chi2 = ((bins - expected) ** 2 / expected).sum().item()
    assert chi2 < 100  # 60 degrees of freedom: p < 0.001 above 99.6
    first = offsets[:, 0].double()
    assert abs(torch.corrcoef(torch.stack([first[:-1], first[1:]]))[0, 1].item()) < 0.08  # 3.5 sigma at 2000
    assert torch.equal(batches[7], StepBatches(trainer, steps)[7])  # a function of (seed, step)
    x, y = kind.gather(data.train_x, data.train_y, offsets.flatten())
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets: the window shifted by one
    last = offsets.max().item()
    assert last + t < len(data.train_x)  # the last target of the last window is still a training token


@pytest.mark.skipif(not (Path(os.environ.get("KILN_DATA", "/nonexistent")) / "tinyshakespeare" / "input.txt").is_file(),
                    reason="Tiny Shakespeare unavailable: set KILN_DATA to a folder holding tinyshakespeare/input.txt")
def test_tiny_shakespeare_split_is_nanogpts():
    """nanoGPT's prepare.py prints: vocab size 65, train has 1,003,854 tokens, val has 111,540 tokens."""
    cfg = load_config(CONFIG, {"data.root": os.environ["KILN_DATA"]})
    kind = open_kind(cfg.data, cfg.seed)
    data = kind.load()
    assert kind.tokenizer.vocab_size == 65
    assert (len(data.train_x), len(data.val_x)) == (1_003_854, 111_540)
