"""Training on several processes (`kiln train --nproc N`, torchrun, gloo on the CPU): the same losses and weights as
one process, DDP and FSDP2, evaluation shared by the ranks with one process's figures, a killed worker restarting
from the checkpoint to the same weights, a killed launcher leaving no workers, two "machines" meeting at a loopback
endpoint, and bad input.

Why 2-process results may differ from 1-process ones at all: each rank multiplies its half of the batch and gloo
adds the two gradients, so float32 sums are formed in another order (about 1e-7 relative per step here); the
checks allow 1e-4 relative on the losses. A restarted run repeats the interrupted one bit for bit: it continues
from the checkpoint's exact state, with the same per-rank batch slices and the same reduction order.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

pytestmark = pytest.mark.usefixtures("one_thread")

SRC = str(Path(__file__).resolve().parents[1] / "src")
SEED_BLOCKS = [
    {"type": "conv2d", "filters": 32, "kernel": 3, "activation": "relu"},
    {"type": "maxpool2d", "size": 2},
    {"type": "rows_to_sequence"},
    {"type": "dense", "units": 64, "activation": "relu"},
    {"type": "lstm", "units": 50, "steps": "all"},
    {"type": "transformer_encoder", "heads": 2, "ff": 100, "norm": "post", "dropout": 0.0},
    {"type": "seq_pool", "mode": "mean"},
    {"type": "classifier", "classes": 10},
]
STEPS = 44  # 2 epochs of 1,350 training images in batches of 64 (the last one of 6 images: 3 per rank)


def mnist_config(folder: Path, name: str = "seed", **train) -> Path:
    """The seed model on the first 1,500 MNIST images (1,350 train / 150 val) and 499 test images, 2 epochs, a loss
    every step; evaluated in batches of 32 (val: 5 batches, test: 16, the last of 19 images), which 2 ranks share
    unevenly. Float32 on every CPU: precision auto trains in bf16 on one with AMX tiles, where the weights of 2
    processes and 1 part by up to 28% of a tensor's norm after 44 steps; the tolerances below are float32's."""
    cfg = {"name": name, "seed": 0,
           "data": {"dataset": "mnist", "val_fraction": 0.1, "limit_train": 1500, "limit_test": 499},
           "model": {"blocks": SEED_BLOCKS},
           "train": {"epochs": 2, "batch_size": 64, "optimizer": {"name": "adam", "lr": 0.001}, "threads": 1,
                     "precision": "fp32", "log_every": 1, "checkpoint_every": 5, "eval_batch_size": 32, **train}}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")]), **extra}


def run_kiln(*args: str, timeout: float = 180, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kiln", *args], capture_output=True, text=True, env=env(**extra),
                          timeout=timeout)


def step_losses(run: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "step"]


def weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return load_file(str(run / "model.safetensors"))


def assert_close_losses(one: list[float], many: list[float], steps: int = 20) -> None:
    assert len(one) >= steps and len(many) >= steps
    worst = max(abs(a - b) / abs(a) for a, b in zip(one[:steps], many[:steps]))
    assert worst < 1e-4, f"largest relative loss difference in the first {steps} steps: {worst:.2e}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, mnist_root) -> dict[str, Path]:
    """The same config trained by 1 process (in this one), by 2 with DDP and by 2 with FSDP2."""
    import kiln

    folder = tmp_path_factory.mktemp("dist")
    cfg = mnist_config(folder)
    out = {"one": folder / "one", "one_unfused": folder / "one_unfused", "ddp": folder / "ddp", "fsdp": folder / "fsdp"}
    kiln.train(cfg, out=out["one"], live=False)
    kiln.train(cfg, {"train.fuse": "off"}, out=out["one_unfused"], live=False)  # as FSDP computes (no fused kernels)
    for parallel in ("ddp", "fsdp"):
        done = run_kiln("train", str(cfg), "--out", str(out[parallel]), "--nproc", "2", "--set",
                    f"train.parallel={parallel}")
        assert done.returncode == 0, done.stderr[-3000:]
        assert f"distributed: 2 processes, rank 0, backend gloo (CPU), train.parallel {parallel}" in done.stderr
    out["config"] = cfg
    return out


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_train_like_one(runs, parallel):
    """Losses within 1e-4 relative for 20 steps (measured: 1.2e-7 DDP, 4.9e-7 FSDP), the same test accuracy and test
    loss within 1e-4 relative, and after all 44 Adam steps every weight tensor within 2% of the one-process run's
    (relative norm; measured 1.4e-4 DDP, 6.6e-3 FSDP). Weights drift more than losses because the attention's key
    bias has a true gradient of exactly zero (softmax ignores a constant added to every score): its computed
    gradient is rounding noise, which Adam scales to full-size steps, and the difference spreads from there
    (after 2 steps it is 3.7e-5 there and under 2.1e-7 in every other tensor)."""
    one, many = runs["one" if parallel == "ddp" else "one_unfused"], runs[parallel]
    assert_close_losses(step_losses(one), step_losses(many))
    assert len(step_losses(many)) == STEPS
    a, b = weights(one), weights(many)
    assert a.keys() == b.keys()
    worst = max(((a[k] - b[k]).norm() / a[k].norm().clamp(min=1e-12)).item() for k in a)
    assert worst < 2e-2, f"a weight tensor differs by {worst:.2e} of its norm"
    manifest = json.loads((many / "manifest.json").read_text())
    assert manifest["distributed"] == {"processes": 2, "parallel": parallel, "backend": "gloo"}
    test, test_one = (json.loads((run / "results.json").read_text())["test"] for run in (many, one))
    assert abs(test["accuracy"] - test_one["accuracy"]) < 0.003
    assert test["loss"] == pytest.approx(test_one["loss"], rel=1e-4)


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_sharded_evaluation_equals_one_process_evaluation(runs, parallel):
    """Each of the 2 ranks evaluates every other batch (val: 150 images in 5 batches, 3 and 2; test: 499 in 16) and
    the outputs are gathered: results.json's validation and test metrics, and the last epoch's validation metrics,
    equal a one-process evaluation of the run's weights (kiln.Run.load(...).evaluate), with every sample counted
    once. DDP: within 1e-9 relative (measured: equal; each batch is computed as one process computes it). FSDP:
    within 1e-6 (measured 6.5e-8), because FSDP trains and evaluates without the fused CPU kernels, which a loaded
    run uses."""
    import kiln

    run = runs[parallel]
    results = json.loads((run / "results.json").read_text())
    loaded = kiln.Run.load(run)
    rel = 1e-9 if parallel == "ddp" else 1e-6
    for split, samples in (("val", 150), ("test", 499)):
        one = loaded.evaluate(split)
        assert results[split]["samples"] == one["samples"] == samples
        for metric in ("loss", "accuracy", "macro_f1"):
            assert results[split][metric] == pytest.approx(one[metric], rel=rel), (split, metric)
    last = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "epoch"][-1]
    assert {k: last[f"val_{k}"] for k in ("loss", "accuracy", "macro_f1")} == \
        {k: results["val"][k] for k in ("loss", "accuracy", "macro_f1")}  # the last epoch's weights are the run's


def test_fsdp_run_is_an_ordinary_run(runs):
    """FSDP's checkpoint is sharded (torch.distributed.checkpoint); the finished run's weights are consolidated,
    so evaluate reads them like any run's."""
    import kiln

    run = runs["fsdp"]
    assert [p.name for p in (run / "checkpoints" / "last.dcp").iterdir()] == [f"step-{STEPS}"]
    assert (run / "checkpoints" / "last.dcp" / f"step-{STEPS}" / ".metadata").is_file()
    loaded = kiln.Run.load(run)
    test = json.loads((run / "results.json").read_text())["test"]
    assert loaded.evaluate("test")["accuracy"] == pytest.approx(test["accuracy"], abs=1e-9)


def workers_of(pid: int) -> dict[int, int]:
    """rank -> pid of the kiln workers below process `pid` (the launcher)."""
    found, todo = {}, [pid]
    while todo:
        p = todo.pop()
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                pass
        try:
            environ = dict(e.split("=", 1) for e in Path(f"/proc/{p}/environ").read_text().split("\0") if "=" in e)
        except OSError:
            continue
        if "TORCHELASTIC_RESTART_COUNT" in environ and "RANK" in environ and p != pid:
            found[int(environ["RANK"])] = p
    return found


def checkpoint_step(run: Path) -> int:
    from kiln.training.checkpoint import read_metadata
    try:
        return read_metadata(run / "checkpoints" / "last.safetensors")["state"]["progress"]["global_step"]
    except Exception:
        return 0


def start_until_checkpoint(args: list[str], run: Path) -> tuple[subprocess.Popen, Path]:
    """Start `kiln train ARGS` and wait until it has written a checkpoint; (the launcher, the file its stderr goes
    to: a pipe nobody reads while we wait would fill and stall the workers)."""
    log = run.parent / f"{run.name}.stderr"
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "kiln", "train", *args], env=env(), text=True,
                                stdout=subprocess.DEVNULL, stderr=err)
    deadline = time.monotonic() + 120
    while checkpoint_step(run) < 5:
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.01)
    return proc, log


def kill_worker_mid_run(args: list[str], run: Path, rank: int = 1) -> tuple[subprocess.Popen, int, Path]:
    """Start `kiln train ARGS`, SIGKILL worker `rank` once a checkpoint is written; (the launcher, step killed at,
    the file its stderr goes to)."""
    proc, log = start_until_checkpoint(args, run)
    os.kill(workers_of(proc.pid)[rank], signal.SIGKILL)
    killed_at = checkpoint_step(run)
    assert not (run / "results.json").exists() and killed_at < STEPS
    return proc, killed_at, log


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_killed_worker_restarts_from_checkpoint_to_the_same_weights(runs, tmp_path, parallel):
    """torchrun --max-restarts: a SIGKILLed worker brings the job down and back; it resumes from the last checkpoint
    (data position included) and ends with the weights of the uninterrupted 2-process run, bit for bit."""
    run = tmp_path / "killed"
    proc, killed_at, log = kill_worker_mid_run([str(runs["config"]), "--out", str(run), "--nproc", "2",
                                                "--max-restarts", "1", "--set", f"train.parallel={parallel}"], run)
    proc.wait(timeout=180)
    err = log.read_text()
    assert proc.returncode == 0, err[-3000:]
    assert f"resuming {run} at step {killed_at}" in err
    a, b = weights(runs[parallel]), weights(run)
    assert all(torch.equal(a[k], b[k]) for k in a), "the restarted run's weights differ from the uninterrupted run's"
    assert step_losses(run) == step_losses(runs[parallel])


def test_killed_job_continues_with_resume(runs, tmp_path):
    """Without --max-restarts the job fails when a worker is killed; `--resume` continues it to the same weights."""
    run = tmp_path / "killed"
    args = [str(runs["config"]), "--out", str(run), "--nproc", "2"]
    proc, _, log = kill_worker_mid_run(args, run)
    proc.wait(timeout=120)
    err = log.read_text()
    assert proc.returncode == 2 and "--resume" in err
    done = run_kiln("train", *args, "--resume")
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = weights(runs["ddp"]), weights(run)
    assert all(torch.equal(a[k], b[k]) for k in a)


def process_tree(pid: int) -> list[int]:
    """`pid` and every process below it, parents first."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop(0)
        found.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                pass
    return found


def running(pids: list[int]) -> list[int]:
    """Those of `pids` still running (not gone, not a zombie waiting to be reaped)."""
    alive = []
    for p in pids:
        try:
            if Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                alive.append(p)
        except OSError:
            pass
    return alive


@pytest.mark.slow
@pytest.mark.parametrize("killed", ["kiln", "torchrun"])
def test_killed_launcher_leaves_no_workers_and_resumes_to_the_same_weights(runs, tmp_path, killed):
    """SIGKILL of the command (`kiln train --nproc 2`) or of torchrun below it, mid-run: nothing trains on. torchrun
    gets SIGTERM when kiln dies (it stops its workers) and the workers SIGKILL when torchrun dies (both through
    PR_SET_PDEATHSIG; before, workers orphaned by a killed torchrun trained on to the end, unseen). The run stays at
    its checkpoint, and `--resume` with the same --nproc ends with the uninterrupted run's weights, bit for bit."""
    run = tmp_path / "killed"
    args = [str(runs["config"]), "--out", str(run), "--nproc", "2"]
    proc, log = start_until_checkpoint(args, run)
    tree = process_tree(proc.pid)
    workers = workers_of(proc.pid)
    assert len(workers) == 2 and len(tree) == 4, tree  # kiln, torchrun, 2 workers
    os.kill(proc.pid if killed == "kiln" else tree[1], signal.SIGKILL)
    deadline = time.monotonic() + 30
    while running(tree[1:] if killed == "kiln" else tree[2:]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not running(tree[1:] if killed == "kiln" else tree[2:]), "processes left after the launcher was killed"
    proc.wait(timeout=60)
    assert proc.returncode == (-signal.SIGKILL if killed == "kiln" else 2), log.read_text()[-3000:]
    killed_at = checkpoint_step(run)
    assert 5 <= killed_at < STEPS and not (run / "results.json").exists()
    done = run_kiln("train", *args, "--resume")
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resuming {run} at step {killed_at}" in done.stderr
    a, b = weights(runs["ddp"]), weights(run)
    assert all(torch.equal(a[k], b[k]) for k in a), "the resumed run's weights differ from the uninterrupted run's"
    assert step_losses(run) == step_losses(runs["ddp"])


def test_two_machines_meet_at_a_loopback_endpoint(runs, tmp_path):
    """The README's two-node example: two launches of --nnodes 2 --nproc 1 at 127.0.0.1, one run."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = tmp_path / "two_nodes"
    common = [sys.executable, "-m", "kiln", "train", str(runs["config"]), "--out", str(run), "--nproc", "1",
              "--nnodes", "2", "--rdzv-endpoint", f"127.0.0.1:{port}", "--node-rank"]
    logs = [tmp_path / f"node{rank}.stderr" for rank in (0, 1)]
    nodes = []
    for rank, log in enumerate(logs):
        with open(log, "w") as err:
            nodes.append(subprocess.Popen([*common, str(rank)], env=env(), stdout=subprocess.DEVNULL, stderr=err))
    for node in nodes:
        node.wait(timeout=180)
    errs = [log.read_text() for log in logs]
    assert [n.returncode for n in nodes] == [0, 0], errs[0][-2000:] + errs[1][-2000:]
    assert "distributed: 2 processes" in errs[0] and "node 1 of 2" in errs[1]
    assert_close_losses(step_losses(runs["one"]), step_losses(run))


def test_resume_with_another_process_count_is_refused(runs, tmp_path):
    import kiln
    from kiln.errors import ConfigError

    run = tmp_path / "copy"
    shutil.copytree(runs["ddp"], run)
    refused = r"trained by 2 process\(es\) .* this start has 1 .* resume it with --nproc 2"
    with pytest.raises(ConfigError, match=refused):
        kiln.train(runs["config"], {"train.parallel": "ddp"}, out=run, resume=True, live=False)


def test_text_runs_shard_their_step_batches(tmp_path):
    """A character GPT (the step-based loop; a tied lm_head sharded with its embedding under FSDP): 2 processes
    give the losses of 1. Its evaluations add up token sums over the ranks' batches (all_reduce; the estimates of
    train.eval_batches: 1 leave rank 1 no batch, and agree with one process's at step 0): results.json's
    validation loss equals a one-process evaluation of the run's weights within 1e-6 relative (every held-out token
    counted once; the float64 sums are added in another order, and FSDP runs without the fused kernels a loaded
    run uses)."""
    import kiln

    text = Path(os.environ.get("KILN_DATA", "")) / "tinyshakespeare" / "input.txt"
    if not text.is_file():
        pytest.skip(f"Tiny Shakespeare unavailable: {text} is missing")
    cfg = {"name": "gpt", "seed": 1337,
           "data": {"dataset": "text", "path": str(text), "tokenizer": "char", "context": 32, "val_fraction": 0.1},
           "model": {"blocks": [{"type": "token_embedding", "width": 32},
                                {"type": "positional_encoding", "kind": "learned"},
                                {"type": "transformer_decoder", "layers": 1, "heads": 2, "dropout": 0.0,
                                 "bias": False},
                                {"type": "lm_head", "tie": True}]},
           "train": {"steps": 20, "batch_size": 8, "optimizer": {"name": "adamw", "lr": 0.003}, "threads": 1,
                     "precision": "fp32",  # bf16 (auto, with AMX) parts the losses by 3.4e-3 at step 20
                     "log_every": 1, "eval_every": 20, "eval_batches": 1, "parallel": "fsdp"}}
    path = tmp_path / "gpt.yaml"
    path.write_text(yaml.safe_dump(cfg))
    kiln.train(path, out=tmp_path / "one", live=False)
    done = run_kiln("train", str(path), "--out", str(tmp_path / "two"), "--nproc", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    assert_close_losses(step_losses(tmp_path / "one"), step_losses(tmp_path / "two"))
    first = [next(r for r in map(json.loads, (tmp_path / run / "metrics.jsonl").read_text().splitlines())
                  if r["kind"] == "eval") for run in ("one", "two")]  # step 0: the same weights; one batch, on rank 0
    assert first[0]["step"] == first[1]["step"] == 0
    assert first[1]["val_loss"] == pytest.approx(first[0]["val_loss"], rel=1e-6)
    val = json.loads((tmp_path / "two" / "results.json").read_text())["val"]
    one = kiln.Run.load(tmp_path / "two").evaluate("val")
    assert val["tokens"] == one["tokens"]
    for metric in ("loss", "token_accuracy"):
        assert val[metric] == pytest.approx(one[metric], rel=1e-6), metric


@pytest.mark.parametrize("batches", ["shared", "own"])
def test_weighted_table_runs_share_the_weighted_loss(tmp_path, batches):
    """A table with train.fairness reweighing (a weighted mean loss: each rank's share is its summed weights), early
    stopping (made to stop after epoch 2) and the best epoch restored: 2 processes give the losses, the decisions
    and the test metrics of 1. The validation (120 rows) and test (199) splits are evaluated in batches of 16 shared
    by the ranks, with the predictions gathered: the 2-process run's ROC-AUC, PR-AUC, F1 and decision threshold
    (train.threshold_metric, chosen on gathered validation outputs) equal a one-process evaluation of its
    weights. With the ensemble's members on batches of their own (``batches: own``), each rank takes the same
    slice of every member's batch."""
    import kiln
    from kiln.training.metrics import choose_threshold

    if not (Path(os.environ.get("KILN_DATA", "")) / "german_credit" / "german_credit.csv").is_file():
        pytest.skip("German credit unavailable under $KILN_DATA")
    config = str(Path(__file__).resolve().parents[1] / "examples" / "german_credit_fair.yaml")
    overrides = ["model.blocks.1.dropout=0.0",  # dropout masks differ by batch layout (block 1: the ensemble_mlp)
                 "train.epochs=4", "train.log_every=1", "train.threads=1", "train.eval_batch_size=16",
                 "data.test_fraction=0.199", "data.val_fraction=0.15",  # 120 validation rows (the example: 80)
                 "train.early_stopping.patience=1", "train.early_stopping.min_delta=1.0",
                 f"model.blocks.1.batches={batches}"]
    kiln.train(config, overrides, out=tmp_path / "one", live=False)
    done = run_kiln("train", config, "--out", str(tmp_path / "two"), "--nproc", "2",
                    *[w for o in overrides for w in ("--set", o)])
    assert done.returncode == 0, done.stderr[-3000:]
    assert_close_losses(step_losses(tmp_path / "one"), step_losses(tmp_path / "two"))
    one, two = (json.loads((tmp_path / r / "results.json").read_text()) for r in ("one", "two"))
    decisions = ("epochs", "best_epoch", "stopped_early")
    assert [two[k] for k in decisions] == [one[k] for k in decisions] == [2, 1, True]
    assert two["test"]["roc_auc"] == pytest.approx(one["test"]["roc_auc"], abs=1e-3)
    loaded = kiln.Run.load(tmp_path / "two")
    x, y = loaded.kind.load().split("val")
    assert two["threshold"] == choose_threshold(loaded.outputs(x), y, "accuracy")
    for split, samples in (("val", 120), ("test", 199)):
        mine = loaded.evaluate(split)
        assert two[split]["samples"] == mine["samples"] == samples
        for metric in ("loss", "accuracy", "roc_auc", "pr_auc", "f1", "brier"):
            assert two[split][metric] == pytest.approx(mine[metric], rel=1e-9), (split, metric)


# ---- bad input -------------------------------------------------------------------------------------------------

def test_fsdp_refuses_a_block_it_cannot_shard():
    """FSDP2 splits parameters along their first dimension: matrix_factorization's global bias (a single number)
    cannot be; the error names the block and what to use instead."""
    from kiln.errors import ConfigError
    from kiln.training.distributed import shard_blocks

    model = torch.nn.Module()
    bias_block = torch.nn.Module()
    bias_block.bias = torch.nn.Parameter(torch.zeros(()))
    model.blocks = torch.nn.ModuleList([torch.nn.Linear(3, 3), bias_block])
    with pytest.raises(ConfigError, match=r"fsdp cannot shard model.blocks.1 .*single number.*train.parallel: ddp"):
        shard_blocks(model)


def assert_refused(done: subprocess.CompletedProcess, message: str) -> None:
    """A distributed start refused by its workers ends with their reason as its last line: no torchrun traceback,
    no hint to resume a run that never started."""
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.rstrip().splitlines()[-1].startswith(f"error: {message}"), done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "--resume" not in done.stderr, done.stderr[-3000:]


def test_fsdp_refuses_a_block_it_cannot_shard_when_launched(tmp_path):
    """The same through `kiln train --nproc 2`: matrix_factorization (its global bias is a single number)."""
    data = Path(os.environ.get("KILN_DATA", "")) / "movielens_small" / "ratings.csv"
    if not data.is_file():
        pytest.skip(f"MovieLens unavailable: {data} is missing")
    config = str(Path(__file__).resolve().parents[1] / "examples" / "movielens.yaml")
    done = run_kiln("train", config, "--out", str(tmp_path / "r"), "--nproc", "2", "--set", "train.parallel=fsdp",
                    "--set", "train.threads=1")
    assert_refused(done, "train.parallel: fsdp cannot shard model.blocks.0 (MF): its parameter is a single number")
    assert not (tmp_path / "r").exists()


def test_more_processes_than_samples_is_refused(tmp_path, mnist_root):
    cfg = mnist_config(tmp_path)
    done = run_kiln("train", str(cfg), "--out", str(tmp_path / "r"), "--nproc", "2", "--set", "data.limit_train=2",
                "--set", "data.val_fraction=0.5")
    assert_refused(done, "--nproc: 2 processes but the training split has only 1 samples")


def test_an_endpoint_that_does_not_answer_fails_within_the_timeout(tmp_path):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nobody listens there once closed
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"blocks": SEED_BLOCKS}}))
    t0 = time.monotonic()
    done = run_kiln("train", str(cfg), "--out", str(tmp_path / "r"), "--nproc", "1", "--nnodes", "2", "--node-rank", "1",
                "--rdzv-endpoint", f"127.0.0.1:{port}", timeout=120, KILN_RDZV_TIMEOUT="3")
    assert done.returncode == 2
    assert f"error: --rdzv-endpoint: 127.0.0.1:{port} did not answer within 3 s; start node 0" in done.stderr
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert time.monotonic() - t0 < 90


def test_launch_arguments_are_checked():
    from kiln.cli import main
    assert main(["train", "c.yaml", "--nproc", "0"]) == 2
    assert main(["train", "c.yaml", "--nproc", "1", "--nnodes", "2"]) == 2
    assert main(["train", "c.yaml", "--nproc", "1", "--nnodes", "2", "--node-rank", "1",
                 "--rdzv-endpoint", "nohost"]) == 2


@pytest.mark.slow
def test_one_epoch_of_mnist_reaches_the_same_accuracy(tmp_path, mnist_root):
    """1 epoch of the seed model on all of MNIST: 1 process, 2 with DDP and 2 with FSDP2 end within 0.3 points."""
    import kiln

    cfg = mnist_config(tmp_path, epochs=1, checkpoint_every=200)
    data = yaml.safe_load(cfg.read_text())
    data["data"].pop("limit_train"), data["data"].pop("limit_test")
    cfg.write_text(yaml.safe_dump(data))
    one = kiln.train(cfg, out=tmp_path / "one", live=False).metrics["test"]["accuracy"]
    for parallel in ("ddp", "fsdp"):
        done = run_kiln("train", str(cfg), "--out", str(tmp_path / parallel), "--nproc", "2", "--set",
                    f"train.parallel={parallel}", timeout=1800)
        assert done.returncode == 0, done.stderr[-3000:]
        many = json.loads((tmp_path / parallel / "results.json").read_text())["test"]["accuracy"]
        assert abs(many - one) < 0.003, (parallel, one, many)
        assert_close_losses(step_losses(tmp_path / "one"), step_losses(tmp_path / parallel), steps=20)
