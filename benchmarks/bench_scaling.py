"""Training throughput on 1 and 2 processes (`kiln train --nproc N`, DDP over gloo on a CPU, nccl on GPUs):
the seed model on MNIST and the character GPT of examples/shakespeare_char.yaml.

    KILN_DATA=../shared/data python benchmarks/bench_scaling.py [--reps 2] [--limit-train 6000] [--steps 200]
        [--threads 1] [--parallel ddp]

Each configuration trains the same global batch (the config's train.batch_size) in the same sample order; 2
processes each take half of every batch. Samples per second = samples trained / the run's train_seconds
(results.json: time in the training loop, without start-up, data loading and the end-of-epoch evaluation).
Each process gets --threads threads, so 2 processes use twice the cores of 1; "1 process, 2x threads" is
printed beside them with --wide (what the same cores give without distribution). Scaling efficiency =
rate(2 processes) / (2 x rate(1 process)). Runs alternate (1, 2, [1 x 2 threads,] 1, 2, ...) and the median
of --reps is kept. Writes benchmarks/results/scaling-<UTC time>.json.
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
from datetime import datetime, timezone
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from kiln.hardware import cpu_model  # noqa: E402
from kiln.version import __version__  # noqa: E402


def configs(args) -> dict[str, dict]:
    seed = yaml.safe_load((REPO / "examples" / "mnist_seed.yaml").read_text())
    seed["data"]["limit_train"] = args.limit_train
    seed["data"]["limit_test"] = 1000
    seed["train"].update({"epochs": 1, "log_every": 1000, "checkpoint_every": 100000})
    gpt = yaml.safe_load((REPO / "examples" / "shakespeare_char.yaml").read_text())
    gpt["train"].update({"steps": args.steps, "eval_every": 100000, "eval_batches": 1, "log_every": 1000,
                         "checkpoint_every": 100000})
    return {"mnist_seed": seed, "shakespeare_char": gpt}


def train(cfg_path: Path, out: Path, processes: int, threads: int, parallel: str) -> dict:
    cmd = [sys.executable, "-m", "kiln", "train", str(cfg_path), "--out", str(out), "--set", f"train.threads={threads}"]
    if processes > 1:
        cmd += ["--nproc", str(processes), "--set", f"train.parallel={parallel}"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    results = json.loads((out / "results.json").read_text())
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    manifest = json.loads((out / "manifest.json").read_text())
    t = cfg["train"]
    samples = (results["steps"] * t["batch_size"] if "steps" in results
               else results["epochs"] * manifest["samples"]["train"])
    return {"samples": samples, "train_seconds": results["train_seconds"],
            "samples_per_s": samples / results["train_seconds"], "test": results["test"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--limit-train", type=int, default=6000, help="MNIST training images (the first N)")
    p.add_argument("--steps", type=int, default=200, help="character GPT steps")
    p.add_argument("--threads", type=int, default=1, help="threads per process")
    p.add_argument("--parallel", choices=["ddp", "fsdp"], default="ddp")
    p.add_argument("--wide", action="store_true", help="also 1 process with 2x --threads (the same cores, no DDP)")
    args = p.parse_args()
    layouts = [("1 process", 1, args.threads), ("2 processes", 2, args.threads)]
    if args.wide:
        layouts.append(("1 process, 2x threads", 1, 2 * args.threads))
    out: dict = {"conditions": {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
                                "torch": torch.__version__, "kiln": __version__,
                                "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                                "backend": "nccl" if torch.cuda.is_available() else "gloo",
                                "command": " ".join(["benchmarks/bench_scaling.py", *sys.argv[1:]])},
                 "args": vars(args), "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, cfg in configs(args).items():
            path = Path(tmp) / f"{name}.yaml"
            path.write_text(yaml.safe_dump(cfg))
            runs: dict[str, list[dict]] = {label: [] for label, _, _ in layouts}
            for rep in range(args.reps):
                for label, processes, threads in layouts:
                    r = train(path, Path(tmp) / f"{name}-{processes}-{threads}-{rep}", processes, threads,
                              args.parallel)
                    runs[label].append(r)
                    print(f"{name}: {label} ({threads} thread(s) each): {r['samples_per_s']:,.0f} samples/s",
                          flush=True)
            rows = []
            for label, processes, threads in layouts:
                rate = statistics.median(r["samples_per_s"] for r in runs[label])
                rows.append({"layout": label, "processes": processes, "threads_per_process": threads,
                             "samples_per_s": rate, "runs": runs[label]})
            one, two = rows[0]["samples_per_s"], rows[1]["samples_per_s"]
            out["models"][name] = {"global_batch": cfg["train"]["batch_size"], "rows": rows,
                                   "speedup_2_processes": two / one, "scaling_efficiency": two / (2 * one)}
            print(f"{name}: 2 processes {two / one:.2f}x one ({100 * two / (2 * one):.0f}% scaling efficiency)",
                  flush=True)
            if args.wide:
                wide = rows[2]["samples_per_s"]
                out["models"][name]["two_processes_vs_one_with_2x_threads"] = two / wide
                print(f"{name}: 2 processes {two / wide:.2f}x one process with twice the threads", flush=True)
    c = out["conditions"]
    print(f"hardware: {c['cpu']}, {c['cores']} cores, CUDA: {c['cuda']}; torch {c['torch']}, Python {c['python']}, "
          f"backend {c['backend']}")
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = REPO / "benchmarks" / "results" / f"scaling-{stamp}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path.relative_to(REPO)}")


if __name__ == "__main__":
    main()
