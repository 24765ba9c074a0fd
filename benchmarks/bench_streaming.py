"""Training on a table streamed from Parquet shards against the same rows read into memory.

    python benchmarks/bench_streaming.py [--rows 2000000] [--shards 20] [--rounds 2] [--epochs 1] [--no-scaling]

Generates a synthetic table with a learnable signal (6 numbers, one category, a binary target) into a temporary
folder as ``--shards`` Parquet shards, and trains the same config on it in each round, interleaved:

- ``memory``: ``data.stream: false`` (every training shard read into memory first, then the epoch plan);
- ``stream``: ``data.stream: true`` (the ``stream`` plan: rows read shard by shard, shuffled in blocks) with one
  reader thread (``data.workers: 1``, the default);
- ``stream_workers2``: the same with two reader threads (``data.workers: 2``), each with its own shards;
- ``stream_nproc2`` (unless ``--no-scaling``): ``kiln train --nproc 2``, two processes (DDP, gloo) of one thread
  each, each streaming its own half of the shards and training on half of each batch.

Then, without training, the readers alone: one epoch of batches drawn through the stream plan with
``data.workers`` 1 and 2 (rows/s, median of ``--rounds``), what the reader threads give when reading is all there
is to do.

Each training runs in its own process(es), which report the wall time (reading, fitting statistics, training,
evaluation), the training loop's samples/s (the last progress record of the epoch: the epoch's rate, over all
processes) and the peak resident memory of a one-process run (VmHWM). Prints the medians and the ratios to the
in-memory run (end to end and of the training loop), and writes benchmarks/results/streaming-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))

from kiln.hardware import cpu_model

CONFIG = """
name: streaming
seed: 0
data: {{dataset: tabular_stream, path: {path}, target: y, stream: {stream}, workers: {workers}}}
model:
  blocks:
    - {{type: tabular_encoder}}
    - {{type: dense, units: 64, activation: relu}}
    - {{type: classifier}}
train: {{epochs: {epochs}, batch_size: 1024, threads: 1, eval_batch_size: 8192, log_every: 200,
         checkpoint_every: 100000}}
"""

CHILD = """
import json, resource, sys, time
t0 = time.perf_counter()
import kiln
run = kiln.train(sys.argv[1], out=sys.argv[2], live=False)
wall = time.perf_counter() - t0
steps = [r for r in run.dir.read_metrics() if r["kind"] == "step"]
try:  # VmHWM starts afresh at exec; ru_maxrss keeps the peak of the process this one was forked from
    peak = int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM:")).split()[1]) / 1024
except OSError:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"wall_s": wall, "peak_rss_mb": peak,
                  "train_samples_per_s": steps[-1]["samples_per_s"],
                  "test_accuracy": run.metrics["test"]["accuracy"]}))
"""


def make_shards(folder: Path, rows: int, shards: int, seed: int = 0) -> None:
    """``rows`` rows in ``shards`` Parquet files: y depends on x0..x3 and the category (a logistic model gets ~0.9)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    per = rows // shards
    for s in range(shards):
        x = rng.normal(size=(per, 6))
        cat = rng.choice(["a", "b", "c", "d"], per)
        logit = 2 * x[:, 0] - x[:, 1] + 0.5 * x[:, 2] * x[:, 3] + 1.5 * (cat == "a")
        y = (logit + rng.normal(scale=0.5, size=per) > 0).astype(np.int64)
        pq.write_table(pa.table({**{f"x{i}": x[:, i] for i in range(6)}, "cat": cat, "y": y}),
                       folder / f"part-{s:03d}.parquet")


VARIANTS = {"memory": (False, 1, 1), "stream": (True, 1, 1), "stream_workers2": (True, 2, 1),
            "stream_nproc2": (True, 1, 2)}  # name: (data.stream, data.workers, processes)


def train_once(tmp: Path, shards: Path, name: str, epochs: int, n: int) -> dict:
    stream, workers, nproc = VARIANTS[name]
    config = tmp / f"config-{name}-{n}.yaml"
    config.write_text(CONFIG.format(path=shards, stream=str(stream).lower(), epochs=epochs, workers=workers))
    run = tmp / f"run-{name}-{n}"
    env = {"PYTHONPATH": str(REPO / "src"), "PATH": "/usr/bin:/bin"}
    if nproc == 1:
        out = subprocess.run([sys.executable, "-c", CHILD, str(config), str(run)], capture_output=True, text=True,
                             check=False, env=env)
        if out.returncode:
            raise SystemExit(out.stderr[-3000:])
        return json.loads(out.stdout.strip().splitlines()[-1])
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "kiln", "train", str(config), "--out", str(run), "--nproc", str(nproc)],
                         capture_output=True, text=True, check=False, env=env)
    wall = time.perf_counter() - t0
    if out.returncode:
        raise SystemExit(out.stderr[-3000:])
    steps = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "step"]
    return {"wall_s": wall, "peak_rss_mb": None, "train_samples_per_s": steps[-1]["samples_per_s"],
            "test_accuracy": json.loads((run / "results.json").read_text())["test"]["accuracy"]}


def read_rate(shards: Path, workers: int) -> float:
    """Rows/s of one epoch of training batches read through the stream plan (no training) with ``workers``
    reader threads."""
    from types import SimpleNamespace

    import yaml

    from kiln.config import load_config
    from kiln.data.kind import open_kind
    from kiln.training.stream_plan import Stream
    from kiln.training.trainer import TrainState

    cfg = load_config(yaml.safe_load(CONFIG.format(path=shards, stream="true", epochs=1, workers=workers)))
    kind = open_kind(cfg.data, cfg.seed)
    plan = Stream(SimpleNamespace(t=cfg.train, cfg=cfg, kind=kind, state=TrainState()), 0, 1)
    t0, rows = time.perf_counter(), 0
    for batch in plan.batches():
        rows += len(batch)
    return rows / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=2_000_000)
    p.add_argument("--shards", type=int, default=20)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--no-scaling", action="store_true", help="leave out the 2-process run")
    p.add_argument("--no-training", action="store_true", help="measure the readers alone")
    args = p.parse_args()
    import torch

    names = [n for n in VARIANTS if not (args.no_scaling and VARIANTS[n][2] > 1)]
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        make_shards(tmp / "shards", args.rows, args.shards)
        reading: dict[int, list[float]] = {1: [], 2: []}
        for n in range(args.rounds):
            for workers, rates in reading.items():
                rates.append(read_rate(tmp / "shards", workers))
                print(f"round {n + 1} reading alone, {workers} reader(s): {rates[-1]:,.0f} rows/s", flush=True)
        if args.no_training:
            names = []
        runs: dict[str, list[dict]] = {name: [] for name in names}
        for n in range(args.rounds):
            for name in names:
                runs[name].append(r := train_once(tmp, tmp / "shards", name, args.epochs, n))
                rss = f"{r['peak_rss_mb']:.0f} MB" if r["peak_rss_mb"] else "n/a"
                print(f"round {n + 1} {name}: {r['wall_s']:.1f} s, peak RSS {rss}, "
                      f"test accuracy {r['test_accuracy']:.4f}", flush=True)
    read = {w: statistics.median(v) for w, v in reading.items()}
    print(f"reading alone (no training), one process: 1 reader {read[1]:,.0f} rows/s, 2 readers {read[2]:,.0f} rows/s "
          f"(ratio {read[2] / read[1]:.2f}; medians of {args.rounds}; {os.cpu_count()} cores)")
    hardware = {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
                "torch": torch.__version__, "pyarrow": pa.__version__, "threads": 1}
    result = {"args": vars(args), "hardware": hardware, "reading_rows_per_s": reading,
              "reading_rows_per_s_median": read}
    if names:
        result |= training_summary(args, runs, hardware)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out = REPO / "benchmarks" / "results" / f"streaming-{stamp}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


def training_summary(args, runs: dict[str, list[dict]], hardware: dict) -> dict:
    summary = {k: {"wall_s_median": statistics.median(r["wall_s"] for r in v),
                   "train_samples_per_s_median": statistics.median(r["train_samples_per_s"] for r in v),
                   "peak_rss_mb_max": max((r["peak_rss_mb"] for r in v if r["peak_rss_mb"]), default=None),
                   "test_accuracy": v[-1]["test_accuracy"]} for k, v in runs.items()}
    memory = summary["memory"]
    for v in summary.values():
        v["speed_vs_memory"] = memory["wall_s_median"] / v["wall_s_median"]
        v["loop_speed_vs_memory"] = v["train_samples_per_s_median"] / memory["train_samples_per_s_median"]
    ratio, loop_ratio = summary["stream"]["speed_vs_memory"], summary["stream"]["loop_speed_vs_memory"]
    print(f"{args.rows:,} rows in {args.shards} Parquet shards, {args.epochs} epoch(s), batch 1024, 1 thread a "
          f"process; {hardware['cpu']}, {hardware['cores']} cores")
    print(f"  {'variant':16s} {'workers':>7s} {'procs':>5s} {'wall s':>7s} {'loop samples/s':>15s} {'peak RSS':>9s} "
          f"{'test acc':>8s} {'speed/mem':>9s} {'loop/mem':>8s}")
    for k, v in summary.items():
        rss = f"{v['peak_rss_mb_max']:.0f} MB" if v["peak_rss_mb_max"] else "n/a"
        print(f"  {k:16s} {VARIANTS[k][1]:7d} {VARIANTS[k][2]:5d} {v['wall_s_median']:7.1f} "
              f"{v['train_samples_per_s_median']:15,.0f} {rss:>9s} {v['test_accuracy']:8.4f} "
              f"{v['speed_vs_memory']:9.3f} {v['loop_speed_vs_memory']:8.3f}")
    print(f"  (medians of {args.rounds} rounds) streaming speed / in-memory speed: end to end {ratio:.3f}, training "
          f"loop {loop_ratio:.3f} ({'within' if min(ratio, loop_ratio) >= 0.9 else 'NOT within'} 10%)")
    return {"runs": runs, "summary": summary, "speed_ratio": ratio, "loop_speed_ratio": loop_ratio}


if __name__ == "__main__":
    main()
