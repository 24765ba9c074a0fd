"""Streamed data (``tabular_stream``, ``text_stream``) trained by several processes (`kiln train --nproc N`,
torchrun, gloo on the CPU), and reader threads for streams (``data.workers``).

Each rank reads only its own shards (shards divided among ranks x readers) and trains on batch_size / N of its own
rows a step; all ranks take the same number of steps an epoch; rank 0 fits the preprocessing and sends it to the
others. A 2-process streamed run is not expected to equal a 1-process one step for step (each process draws its
rows from its own shards, so the global batches hold other rows), but it learns as well; a killed and restarted
2-process run repeats the uninterrupted one bit for bit.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml

import kiln
from kiln.config import load_config
from kiln.data.kind import open_kind
from kiln.errors import ConfigError
from kiln.training.stream_plan import Stream, StreamSteps, given
from kiln.training.trainer import TrainState

sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))
sys.path.insert(0, str(Path(__file__).parent))
from bench_streaming import make_shards
from test_distributed import (
    assert_close_losses,
    checkpoint_step,
    env,
    run_kiln,
    step_losses,
    weights,
    workers_of,
)
from test_streaming import text_config, text_shards

pytestmark = pytest.mark.usefixtures("one_thread")

# 10 shards of 800 rows: 8 training, 1 validation, 1 test. Two processes x two readers: two shards (1,600 rows) a
# reader, batches of 64 (32 a process): 50 batches a reader, 100 steps an epoch, all 6,400 training rows.
STEPS_PER_EPOCH = 100


def stream_config(path: Path, **train) -> dict:
    return {"name": "stream2", "seed": 0,
            "data": {"dataset": "tabular_stream", "path": str(path), "target": "y", "shuffle_rows": 500,
                     "workers": 2},
            "model": {"blocks": [{"type": "tabular_encoder"}, {"type": "dense", "units": 32, "activation": "relu"},
                                 {"type": "classifier"}]},
            "train": {"epochs": 2, "batch_size": 64, "threads": 1, "log_every": 1, "checkpoint_every": 10,
                      "optimizer": {"name": "adam", "lr": 0.003}, **train}}


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("shards")
    make_shards(folder, 8000, 10)
    return folder


@pytest.fixture(scope="module")
def two(shards, tmp_path_factory) -> dict[str, Path]:
    """The streamed config trained by 2 processes (DDP) without interruption."""
    folder = tmp_path_factory.mktemp("two")
    config = folder / "stream.yaml"
    config.write_text(yaml.safe_dump(stream_config(shards)))
    done = run_kiln("train", str(config), "--out", str(folder / "run"), "--nproc", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    return {"config": config, "run": folder / "run", "stderr": done.stderr}


def plan(shards: Path, rank: int, world: int, workers: int, step: int = 0, epoch: int = 0, batch_size: int = 64,
         **data) -> Stream:
    """The stream plan of rank ``rank`` of ``world`` as the trainer builds it (its state at ``step`` of
    ``epoch``)."""
    cfg = stream_config(shards, batch_size=batch_size)
    cfg["data"].update(workers=workers, **data)
    cfg = load_config(cfg)
    kind = open_kind(cfg.data, cfg.seed)
    trainer = SimpleNamespace(t=cfg.train, cfg=cfg, kind=kind, state=TrainState(epoch=epoch, step_in_epoch=step))
    return Stream(trainer, rank, world)


def epoch_rows(p: Stream) -> tuple[np.ndarray, np.ndarray]:
    batches = list(p.batches())
    assert all(len(b) == p.local_batch for b in batches)
    return np.concatenate([b.x.numpy() for b in batches]), np.concatenate([b.y.numpy() for b in batches])


# ---- training --------------------------------------------------------------------------------------------------

def test_two_processes_stream_their_own_shards_and_learn(two):
    run, err = two["run"], two["stderr"]
    assert "distributed: 2 processes, rank 0, backend gloo (CPU), train.parallel ddp" in err
    assert f"({STEPS_PER_EPOCH} steps an epoch, 2 readers a process)" in err
    results = json.loads((run / "results.json").read_text())
    assert results["test"]["accuracy"] > 0.86  # a logistic model of the generating rule gets about 0.9
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len([r for r in records if r["kind"] == "step"]) == 2 * STEPS_PER_EPOCH
    assert [r["samples"] for r in records if r["kind"] == "epoch"] == [6400, 6400]  # both ranks' rows counted
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["distributed"] == {"processes": 2, "parallel": "ddp", "backend": "gloo"}
    # An ordinary run: it reopens and evaluates from its own files.
    assert kiln.Run.load(run).evaluate("test")["accuracy"] == pytest.approx(results["test"]["accuracy"], abs=1e-9)


def test_ranks_read_disjoint_rows_that_together_cover_the_epoch(shards):
    everything = epoch_rows(plan(shards, 0, 1, 1))[0]
    assert len(everything) == 6400
    parts = [epoch_rows(plan(shards, rank, 2, 2)) for rank in range(2)]
    assert [len(x) for x, _ in parts] == [3200, 3200]
    both = np.concatenate([x for x, _ in parts])
    assert len(np.unique(both, axis=0)) == 6400  # no row twice
    assert np.array_equal(np.unique(both, axis=0), np.unique(everything, axis=0))  # every training row once
    # Each rank's rows are those of its own shards: rank 0's readers own shards 0 and 4, 1 and 5; rank 1's the rest.
    kind = plan(shards, 0, 2, 2).tr.kind
    for (x, _), own in zip(parts, ((0, 1, 4, 5), (2, 3, 6, 7)), strict=True):
        rows = np.concatenate([kind.transform(b)[0] for i in own
                               for b in kind.shard_set().batches(i, columns=kind.transform.columns)])
        assert np.array_equal(np.unique(x, axis=0), np.unique(rows, axis=0))


def test_uneven_shards_give_every_rank_the_same_steps(tmp_path):
    """Rank 0 holds 3 training shards and rank 1 two: both take the fewest whole batches either holds."""
    make_shards(tmp_path, 7 * 700, 7)  # 5 training shards of 700 rows
    p0, p1 = (plan(tmp_path, rank, 2, 1) for rank in range(2))
    assert p0.steps_per_epoch == p1.steps_per_epoch == 1400 // 32
    assert len(epoch_rows(p0)[0]) == len(epoch_rows(p1)[0]) == 1400 // 32 * 32


def test_readers_give_the_same_batches_in_the_same_order_whatever_their_timing(shards, monkeypatch):
    first = epoch_rows(plan(shards, 1, 2, 3, epoch=1))[0]
    slow = plan(shards, 1, 2, 3, epoch=1)
    stream, rng = slow.tr.kind.stream, random.Random(0)

    def jittered(**where):  # each reader sleeps a random while before each batch
        for batch in stream(**where):
            time.sleep(rng.random() * 0.004)
            yield batch

    monkeypatch.setattr(slow.tr.kind, "stream", jittered)
    assert np.array_equal(epoch_rows(slow)[0], first)
    # Resuming at step 7 restarts each reader at its own row: the same batches from there on.
    assert [given(7, w, 3) for w in range(3)] == [3, 2, 2]
    resumed = plan(shards, 1, 2, 3, step=7, epoch=1)
    rest = np.concatenate([b.x.numpy() for b in resumed.batches()])
    assert np.array_equal(rest, first[7 * 32:])
    # One reader reads the shards in another order: the order is a function of the seed and the readers.
    assert not np.array_equal(epoch_rows(plan(shards, 1, 2, 1, epoch=1))[0], first)


def test_text_readers_resume_at_their_own_windows(tmp_path):
    cfg = text_config(text_shards(tmp_path / "text", files=10), steps=300)  # 8 training files
    cfg["data"]["workers"] = 2
    cfg = load_config(cfg)
    kind = open_kind(cfg.data, cfg.seed)

    def steps_plan(step: int) -> StreamSteps:  # rank 1 of 2, as the trainer builds it at ``step``
        return StreamSteps(SimpleNamespace(t=cfg.train, cfg=cfg, kind=kind, state=TrainState(global_step=step)), 1, 2)

    assert steps_plan(0).pass_rows == [2 * (3999 // 16)] * 2  # 2 files of 4,000 characters a reader
    whole = steps_plan(0).batches()
    full = [whole[i].x.numpy() for i in range(300)]  # into a second pass: 498 windows, 124.5 batches a reader
    for start in (25, 251):
        later = steps_plan(start).batches()
        assert all(np.array_equal(later[i].x.numpy(), full[i]) for i in range(start, 300)), start


def kill_rank_mid_epoch(args: list[str], run: Path, after: int) -> tuple[subprocess.Popen, int, Path]:
    """Start `kiln train ARGS`; SIGKILL rank 1 once a checkpoint past step `after` is written."""
    log = run.parent / f"{run.name}.stderr"
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "kiln", "train", *args], env=env(), text=True,
                                stdout=subprocess.DEVNULL, stderr=err)
    deadline = time.monotonic() + 150
    while checkpoint_step(run) < after:
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.01)
    os.kill(workers_of(proc.pid)[1], signal.SIGKILL)
    return proc, checkpoint_step(run), log


def test_a_killed_worker_restarts_from_its_data_position_to_the_same_weights(two, tmp_path):
    """torchrun --max-restarts 1: rank 1 SIGKILLed mid-epoch brings the job down and back; every rank resumes its
    readers at their rows, and the run ends with the uninterrupted run's weights and losses, bit for bit."""
    run = tmp_path / "killed"
    proc, killed_at, log = kill_rank_mid_epoch([str(two["config"]), "--out", str(run), "--nproc", "2",
                                                "--max-restarts", "1"], run, after=STEPS_PER_EPOCH + 10)
    assert killed_at % STEPS_PER_EPOCH, "must be killed mid-epoch"
    proc.wait(timeout=180)
    err = log.read_text()
    assert proc.returncode == 0, err[-3000:]
    assert f"resuming {run} at step " in err
    a, b = weights(two["run"]), weights(run)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "the restarted run's weights differ from the uninterrupted run's"
    assert step_losses(run) == step_losses(two["run"])


@pytest.mark.slow
def test_fsdp_streams_the_same_batches_as_ddp(two, tmp_path):
    """FSDP2 over the streamed batches: the losses of the DDP run (the same rows on each rank) within 1e-4."""
    done = run_kiln("train", str(two["config"]), "--out", str(tmp_path / "fsdp"), "--nproc", "2", "--set",
                    "train.parallel=fsdp")
    assert done.returncode == 0, done.stderr[-3000:]
    assert_close_losses(step_losses(two["run"]), step_losses(tmp_path / "fsdp"), steps=2 * STEPS_PER_EPOCH)
    assert json.loads((tmp_path / "fsdp" / "results.json").read_text())["test"]["accuracy"] > 0.86


@pytest.fixture(scope="module")
def text_two(tmp_path_factory) -> dict[str, Path]:
    """A character model on streamed text files trained by 2 processes, 2 readers each."""
    folder = tmp_path_factory.mktemp("text_two")
    cfg = text_config(text_shards(folder / "text", files=8), steps=80, log_every=1, eval_every=40,
                      checkpoint_every=10)
    cfg["data"]["workers"] = 2
    config = folder / "lm.yaml"
    config.write_text(yaml.safe_dump(cfg))
    done = run_kiln("train", str(config), "--out", str(folder / "run"), "--nproc", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    return {"config": config, "run": folder / "run"}


def test_streamed_text_trains_on_two_processes(text_two):
    run = text_two["run"]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["kind"] == "eval"]
    assert len([r for r in records if r["kind"] == "step"]) == 80
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.5
    assert isinstance(kiln.Run.load(run).generate("First", 10, seed=1), str)


@pytest.mark.slow
def test_a_stopped_text_job_continues_with_resume_to_the_same_weights(text_two, tmp_path):
    """Without --max-restarts a killed worker ends the job; `--resume` continues every rank's readers at their
    windows, to the uninterrupted run's weights bit for bit."""
    run = tmp_path / "killed"
    args = [str(text_two["config"]), "--out", str(run), "--nproc", "2"]
    proc, killed_at, log = kill_rank_mid_epoch(args, run, after=20)
    proc.wait(timeout=120)
    assert proc.returncode == 2 and "--resume" in log.read_text()
    assert 20 <= killed_at < 80
    done = run_kiln("train", *args, "--resume")
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resuming {run} at step {killed_at}" in done.stderr
    a, b = weights(text_two["run"]), weights(run)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert step_losses(run) == step_losses(text_two["run"])


# ---- the preprocessing is rank 0's, on every rank ----------------------------------------------------------------

SHARE = """
import json, os, sys
from pathlib import Path
import torch
from kiln.config import load_config
from kiln.errors import KilnError
from kiln.training.distributed import Dist
from kiln.training.shared_data import shared_kind

cfg = load_config(json.loads(sys.argv[1]))
d = Dist()
d.start(torch.device("cpu"), "auto")
out = Path(sys.argv[2]) / os.environ["RANK"]
out.mkdir()
try:
    kind = shared_kind(cfg.data, cfg.seed, None, d, torch.device("cpu"))
except KilnError as e:
    print(f"error: {e}", file=sys.stderr)
    d.stop()  # a process that exits with gloo still up may abort in its teardown (SIGABRT instead of exit 2)
    sys.exit(2)
kind.save(out)
x = next(iter(kind.stream(seed=0, epoch=0, start=0, batch_size=50))).x
torch.save(x, out / "x.pt")
d.stop()
"""


def share(cfg: dict, folder: Path) -> list[subprocess.CompletedProcess]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, "-c", SHARE, json.dumps(cfg), str(folder)], text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env=env(RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                                      MASTER_PORT=str(port), KILN_DIST_TIMEOUT="60"))
             for r in range(2)]
    return [subprocess.CompletedProcess(p.args, p.wait(timeout=120), *p.communicate()) for p in procs]


def test_rank_0_fits_the_statistics_and_every_rank_uses_them(shards, tmp_path):
    cfg = stream_config(shards)
    cfg["data"]["numeric_encoding"] = "ple"  # quantiles of a sample: the edges too are rank 0's
    done = share(cfg, tmp_path)
    assert [d.returncode for d in done] == [0, 0], done[0].stderr[-2000:] + done[1].stderr[-2000:]
    a, b = ((tmp_path / r / "preprocessing.json").read_bytes() for r in ("0", "1"))
    assert a == b and json.loads(a)["columns"][0]["edges"]
    x0, x1 = (torch.load(tmp_path / r / "x.pt", weights_only=True) for r in ("0", "1"))
    assert torch.equal(x0, x1)  # the same shards through the same transform give the same model input


def test_data_rank_0_cannot_read_stops_every_rank_with_its_error(shards, tmp_path):
    cfg = stream_config(shards)
    cfg["data"]["target"] = "label"
    t0 = time.monotonic()
    done = share(cfg, tmp_path)
    assert [d.returncode for d in done] == [2, 2]
    for d in done:
        assert "error: data.target: the shards have no column 'label'" in d.stderr
    assert time.monotonic() - t0 < 60  # rank 1 did not wait for a broadcast that never came


# ---- bad input ---------------------------------------------------------------------------------------------------

def test_more_readers_than_shards_is_refused_naming_both(shards, tmp_path):
    with pytest.raises(ConfigError, match=r"data: 8 training shards cannot be shared among 3 processes x 3 readers "
                                          r"\(--nproc x data.workers\).* at most 2 processes with these readers"):
        plan(shards, 0, 3, 3, batch_size=60)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(stream_config(shards)))
    done = run_kiln("train", str(config), "--out", str(tmp_path / "r"), "--nproc", "3", "--set", "data.workers=3",
                    "--set", "train.batch_size=60")
    assert done.returncode == 2
    assert "error: data: 8 training shards cannot be shared among 3 processes x 3 readers" in done.stderr
    assert not (tmp_path / "r").exists()


def test_bad_stream_settings_are_named(shards):
    with pytest.raises(ConfigError, match="train.batch_size 64 must divide among 3 processes"):
        plan(shards, 0, 3, 1)
    with pytest.raises(ConfigError, match=r"a reader's training shards hold 1600 rows, fewer than its share of "
                                          r"train.batch_size \(2000 rows a step with 2 process\(es\)\)"):
        plan(shards, 0, 2, 2, batch_size=4000)
    with pytest.raises(ConfigError, match="data.workers"):
        load_config({**stream_config(shards), "data": {**stream_config(shards)["data"], "workers": 0}})


def test_numeric_embedding_auto_is_the_same_choice_on_every_rank(shards, tmp_path):
    """Rank 1 reopens the kind from rank 0's fitted files: it still counts the training shards' rows (6,400)."""
    cfg = stream_config(shards, epochs=1)
    cfg["data"]["numeric_encoding"] = "ple"
    cfg["model"]["blocks"][0].update(numeric_embedding="auto", numeric_dim=4)
    config = tmp_path / "stream.yaml"
    config.write_text(yaml.safe_dump(cfg))
    done = run_kiln("train", str(config), "--out", str(tmp_path / "run"), "--nproc", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["model"]["blocks"][0]["numeric_embedding"] == "linear"
