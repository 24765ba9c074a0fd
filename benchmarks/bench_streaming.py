"""Training on a table streamed from Parquet shards against the same rows read into memory.

    python benchmarks/bench_streaming.py [--rows 2000000] [--shards 20] [--rounds 2] [--epochs 1]

Generates a synthetic table with a learnable signal (6 numbers, one category, a binary target) into a temporary
folder as ``--shards`` Parquet shards, and trains the same config on it twice per round, interleaved: with
``data.stream: true`` (the ``stream`` plan: rows read shard by shard, shuffled in blocks) and ``data.stream: false``
(every training shard read into memory first, then the epoch plan). Each training runs in its own process, which
reports its wall time (reading, fitting statistics, training, evaluation), the training loop's samples/s (the
last progress record of the epoch: the epoch's rate) and its peak resident memory (``resource.getrusage``).
Prints the medians and the ratios (streaming speed / in-memory speed, end to end and of the training loop), and
writes
benchmarks/results/streaming-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
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
data: {{dataset: tabular_stream, path: {path}, target: y, stream: {stream}}}
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


def train_once(tmp: Path, shards: Path, stream: bool, epochs: int, n: int) -> dict:
    config = tmp / f"config-{stream}-{n}.yaml"
    config.write_text(CONFIG.format(path=shards, stream=str(stream).lower(), epochs=epochs))
    out = subprocess.run([sys.executable, "-c", CHILD, str(config), str(tmp / f"run-{stream}-{n}")],
                         capture_output=True, text=True, check=False, env={"PYTHONPATH": str(REPO / "src"), "PATH": "/usr/bin"})
    if out.returncode:
        raise SystemExit(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=2_000_000)
    p.add_argument("--shards", type=int, default=20)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--epochs", type=int, default=1)
    args = p.parse_args()
    import torch

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        make_shards(tmp / "shards", args.rows, args.shards)
        runs: dict[str, list[dict]] = {"stream": [], "memory": []}
        for n in range(args.rounds):
            for name, stream in (("stream", True), ("memory", False)):
                runs[name].append(r := train_once(tmp, tmp / "shards", stream, args.epochs, n))
                print(f"round {n + 1} {name}: {r['wall_s']:.1f} s, peak RSS {r['peak_rss_mb']:.0f} MB, "
                      f"test accuracy {r['test_accuracy']:.4f}", flush=True)
    summary = {k: {"wall_s_median": statistics.median(r["wall_s"] for r in v),
                   "train_samples_per_s_median": statistics.median(r["train_samples_per_s"] for r in v),
                   "peak_rss_mb_max": max(r["peak_rss_mb"] for r in v),
                   "test_accuracy": v[-1]["test_accuracy"]} for k, v in runs.items()}
    ratio = summary["memory"]["wall_s_median"] / summary["stream"]["wall_s_median"]
    loop_ratio = summary["stream"]["train_samples_per_s_median"] / summary["memory"]["train_samples_per_s_median"]
    hardware = {"cpu": cpu_model(), "python": platform.python_version(), "torch": torch.__version__,
                "pyarrow": pa.__version__, "threads": 1}
    print(f"{args.rows:,} rows in {args.shards} Parquet shards, {args.epochs} epoch(s), batch 1024, 1 thread; "
          f"{hardware['cpu']}")
    for k, v in summary.items():
        print(f"  {k:7s} {v['wall_s_median']:.1f} s (median of {args.rounds}), training loop "
              f"{v['train_samples_per_s_median']:,.0f} samples/s, peak RSS {v['peak_rss_mb_max']:.0f} MB, "
              f"test accuracy {v['test_accuracy']:.4f}")
    print(f"  streaming speed / in-memory speed: end to end {ratio:.3f}, training loop {loop_ratio:.3f} "
          f"({'within' if min(ratio, loop_ratio) >= 0.9 else 'NOT within'} 10%)")
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out = REPO / "benchmarks" / "results" / f"streaming-{stamp}.json"
    out.write_text(json.dumps({"args": vars(args), "hardware": hardware, "runs": runs, "summary": summary,
                               "speed_ratio": ratio, "loop_speed_ratio": loop_ratio}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
