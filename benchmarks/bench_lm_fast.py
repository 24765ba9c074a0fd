"""Time to a held-out loss: examples/shakespeare_char_fast.yaml against nanoGPT's CPU configuration
(examples/shakespeare_char.yaml), side by side.

Each training is a whole `kiln train` process, timed start to finish (Python and torch imports, tokenizer, data,
training, the final exact evaluation, saving): the wall time a user waits. Its loss is results.json's exact
validation loss (every held-out token of the last 10% once). The two configurations alternate, one seed after the
other, with the same thread count. Printed per configuration: the median exact loss and wall time over the seeds,
the FLOPs of the recipe (FlopCounterMode on its model: training steps, periodic estimates and the final exact
pass) and that over (the CPU time the run used x the best fp32 matrix-multiply rate of one core, measured here in
CPU time): the fraction of peak the whole run achieved, start to finish.

    KILN_DATA=../shared/data .venv/bin/python benchmarks/bench_lm_fast.py --seeds 1337 1338 1339 --threads 1

The issue's goal: fast reaches an exact loss <= 1.89 in <= 60 s (median of 3 seeds) and >= 2x faster than
nanoGPT's configuration in the same run. On a shared machine the absolute time depends on the load (printed);
the ratio does less, and the CPU time a process used (printed beside the wall time) least. Results go to
benchmarks/results/lm_fast-<timestamp>.json (a row of the README's results table); a run with --only goes to
benchmarks/results/lm_fast/ instead.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CONFIGS = {"nanogpt": ROOT / "examples" / "shakespeare_char.yaml",
           "fast": ROOT / "examples" / "shakespeare_char_fast.yaml"}
TARGET = 1.89


def recipe_flops(path: Path) -> dict:
    """FLOPs of a text recipe: train.steps forward+backward steps (with Muon's orthogonalisation), its periodic
    estimates (eval_batches batches of each split at step 0, every eval_every steps and at the end) and the final
    exact pass over the held-out tail."""
    import torch
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    from kiln.config import load_config
    from kiln.data.kind import open_kind
    from kiln.summary import model_of

    cfg = load_config(path)
    t = cfg.train
    model = model_of(cfg)
    context = cfg.data.context
    x = torch.randint(0, model.output_shape[-1], (t.batch_size, context))
    train = FlopCounterMode(display=False)
    with train:
        F.cross_entropy(model(x).flatten(0, 1), x.flatten()).backward()
    forward = FlopCounterMode(display=False)
    with forward, torch.no_grad():
        model(x)
    kind = open_kind(cfg.data, cfg.seed)
    n = len(kind.tokenizer.encode(kind.text))
    held_out = n - int(n * (1 - cfg.data.val_fraction))
    per_token = forward.get_total_flops() / (t.batch_size * context)
    estimates = len({0, t.steps, *range(t.eval_every, t.steps, t.eval_every)})
    optimizer = 0
    if t.optimizer.name == "muon":  # FlopCounterMode sees the model, not the optimiser: Muon's Newton-Schulz steps
        from kiln.training.muon import hidden_matrices

        for p in hidden_matrices(model):  # 5 iterations of X X^T, (A, A @ A) and B @ X on the wide form of each matrix
            m, n = sorted(p.shape)
            optimizer += 5 * (4 * m * m * n + 2 * m**3)
    total = (t.steps * (train.get_total_flops() + optimizer)
             + estimates * 2 * t.eval_batches * forward.get_total_flops() + held_out * per_token)
    return {"tflop": total / 1e12, "train_gflop_per_step": train.get_total_flops() / 1e9,
            "optimizer_gflop_per_step": optimizer / 1e9,
            "parameters": sum(p.numel() for p in model.parameters()), "steps": t.steps,
            "tokens": t.steps * t.batch_size * context}


def peak_gflops() -> float:
    """The best fp32 matrix-multiply rate of one core measured here: GFLOP per CPU-second on one thread. Counted in
    CPU time (time.process_time), not wall time, so that other processes sharing the machine do not lower it."""
    import torch

    torch.set_num_threads(1)
    best_rate = 0.0
    for m, k, n in ((2048, 2048, 2048), (768, 128, 512), (3072, 128, 512)):
        a, b = torch.randn(m, k), torch.randn(k, n)
        reps = max(3, int(2e10 / (2 * m * k * n)))
        a @ b
        for _ in range(3):
            start = time.process_time()
            for _ in range(reps):
                a @ b
            best_rate = max(best_rate, 2 * m * k * n * reps / (time.process_time() - start) / 1e9)
    return best_rate


def train_once(config: Path, seed: int, threads: int | None) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "kiln", "train", str(config), "--out", str(out), "--set", f"seed={seed}"]
        if threads:
            cmd += ["--set", f"train.threads={threads}"]
        load = os.getloadavg()[0]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        wall = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
        if done.returncode:
            sys.exit(f"{config.name} failed:\n{done.stderr[-3000:]}")
        results = json.loads((out / "results.json").read_text())
    return {"seed": seed, "wall_seconds": wall, "cpu_seconds": cpu, "loop_seconds": results["train_seconds"],
            "exact_val_loss": results["val"]["loss"], "estimate": results.get("estimate", {}).get("val_loss"),
            "load_before": load, "load_after": os.getloadavg()[0]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[1337, 1338, 1339])
    p.add_argument("--threads", type=int, default=None, help="train.threads for both (default: kiln's auto)")
    p.add_argument("--only", choices=list(CONFIGS), help="train only this configuration")
    args = p.parse_args()
    if not os.environ.get("KILN_DATA"):
        sys.exit("set KILN_DATA to a folder holding tinyshakespeare/input.txt (e.g. ../shared/data)")
    sys.path.insert(0, str(ROOT / "src"))
    import torch

    from kiln.hardware import cpu_model

    names = [args.only] if args.only else list(CONFIGS)
    print(f"machine: {cpu_model()}, {os.cpu_count()} CPUs; python {platform.python_version()}, torch "
          f"{torch.__version__}; threads {args.threads or 'auto'}; load average {os.getloadavg()[0]:.1f}", flush=True)
    peak = peak_gflops()
    flops = {name: recipe_flops(CONFIGS[name]) for name in names}
    for name in names:
        f = flops[name]
        print(f"{name:8s} {CONFIGS[name].name}: {f['parameters']:,} parameters, {f['steps']} steps, "
              f"{f['tokens']:,} training tokens, {f['tflop']:.2f} TFLOP in all; at the best fp32 rate of one core "
              f"measured here ({peak:.0f} GFLOP per CPU-second) at least {f['tflop'] * 1e3 / peak:.0f} CPU-seconds",
              flush=True)
    runs: dict[str, list[dict]] = {name: [] for name in names}
    for seed in args.seeds:
        for name in names:
            r = train_once(CONFIGS[name], seed, args.threads)
            runs[name].append(r)
            print(f"seed {seed} {name:8s} exact val loss {r['exact_val_loss']:.4f}  wall {r['wall_seconds']:.1f} s "
                  f"(CPU {r['cpu_seconds']:.1f} s, loop {r['loop_seconds']:.1f} s)  load {r['load_before']:.1f} -> {r['load_after']:.1f}", flush=True)
    summary = {}
    for name, rs in runs.items():
        wall = statistics.median(r["wall_seconds"] for r in rs)
        summary[name] = {"median_cpu_seconds": statistics.median(r["cpu_seconds"] for r in rs),"median_exact_val_loss": statistics.median(r["exact_val_loss"] for r in rs),
                         "median_wall_seconds": wall}
        summary[name]["fraction_of_peak"] = flops[name]["tflop"] * 1e3 / (summary[name]["median_cpu_seconds"] * peak)
        s = summary[name]
        print(f"{name:8s} median exact val loss {s['median_exact_val_loss']:.4f}  median wall {wall:.1f} s  CPU {s['median_cpu_seconds']:.1f} s  "
              f"{flops[name]['tflop']:.2f} TFLOP = {s['fraction_of_peak']:.1%} of the measured fp32 peak over its CPU time")
    if len(names) == 2:
        ratio = summary["nanogpt"]["median_wall_seconds"] / summary["fast"]["median_wall_seconds"]
        cpu_ratio = summary["nanogpt"]["median_cpu_seconds"] / summary["fast"]["median_cpu_seconds"]
        fast = summary["fast"]
        print(f"nanogpt / fast wall time: {ratio:.2f}x, CPU time: {cpu_ratio:.2f}x; fast reaches <= {TARGET}: "
              f"{fast['median_exact_val_loss'] <= TARGET}; in <= 60 s: {fast['median_wall_seconds'] <= 60}")
        summary["speedup"], summary["cpu_speedup"] = ratio, cpu_ratio
    # A run of both configurations is a result of the table (scripts/results_table.py); a run of one is a side
    # measurement and goes into a folder of its own (the pid keeps simultaneous runs apart).
    stamp = datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')
    out = (HERE / "results" / f"lm_fast-{stamp}.json" if len(names) == 2
           else HERE / "results" / "lm_fast" / f"lm_fast-{stamp}-{os.getpid()}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "hardware": {"cpu": cpu_model(), "cores": os.cpu_count(),
                                                                "python": platform.python_version()},
                               "torch": torch.__version__, "peak_fp32_gflops_per_core": peak, "flops": flops, "runs": runs,
                               "summary": summary}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
