"""Training speed of the seed_hybrid model, side by side: kiln vs a plain eager PyTorch loop vs Keras 3.

Same work for all: 1 epoch (by default) of MNIST's 54,000 training images (kiln's seed-0 split; fewer with
--limit-train), batch 64, Adam 1e-3, fp32 (kiln in its `auto` precision: bf16 only on a CPU with bf16 matrix tiles,
and then a kiln-fp32 row runs beside it), then test accuracy on the 10,000 test images. Repetition r initialises
and shuffles with seed r in every system, so the accuracy median is over seeds. Systems run alternately in
fresh processes, --reps times each; the table gives min / median / max training-loop seconds per epoch
and the median ratios. Keras needs benchmarks/setup_keras.sh first (it is skipped, with a note, without it).
--background-load N runs every system beside N processes that keep a CPU busy each (a shared machine).

    KILN_DATA=../shared/data .venv/bin/python benchmarks/bench_mnist_speed.py --reps 3
    KILN_DATA=../shared/data .venv/bin/python benchmarks/bench_mnist_speed.py --reps 3 --limit-train 12800 \
        --background-load 2

Results also go to benchmarks/results/mnist_speed-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
KERAS_PYTHON = HERE / ".venv-keras" / "bin" / "python"
SEED_CONFIG = ROOT / "examples" / "mnist_seed.yaml"


# ---- workers: each runs in its own process and prints one JSON line ----------------------------

def worker_kiln(epochs: int, seed: int, overrides: list[str]) -> dict:
    import torch

    import kiln

    with tempfile.TemporaryDirectory() as tmp:
        # Seed r varies initialisation and order; the split stays the one every system trains on.
        overrides = [f"train.epochs={epochs}", f"seed={seed}", "data.split_seed=0", *overrides]
        run = kiln.train(SEED_CONFIG, overrides, out=Path(tmp) / "run", live=False)
        m = run.metrics
        return {"train_seconds": m["train_seconds"], "test_accuracy": m["test"]["accuracy"],
                "train_samples": run.manifest["samples"]["train"], "parameters": run.manifest["parameters"], "choices": run.manifest.get("execution", {}),
                "precision": f"{run.manifest['precision']} ({run.manifest['precision_reason']})",
                "inference": inference_speed(run), "train_flop_per_sample": train_flop_per_sample(run),
                "peak_gflops": peak_gflops(),
                "versions": {"torch": torch.__version__, "kiln": kiln.__version__}}


def inference_speed(run) -> dict:
    """Evaluation (test split, metrics included) and prediction throughput, and batch-1 latency."""
    import torch

    test_x, _ = run.kind.load().split("test")
    start = time.perf_counter()
    run.evaluate("test")
    evaluate_s = time.perf_counter() - start
    start = time.perf_counter()
    run.predict(test_x)
    predict_s = time.perf_counter() - start
    one = test_x[:1]
    latencies = []
    for i in range(220):
        start = time.perf_counter()
        run.predict(one)
        if i >= 20:  # after warm-up
            latencies.append(time.perf_counter() - start)
    latencies.sort()
    return {"evaluate_samples_per_s": len(test_x) / evaluate_s, "predict_samples_per_s": len(test_x) / predict_s,
            "batch1_latency_ms_p50": latencies[len(latencies) // 2] * 1000,
            "batch1_latency_ms_p99": latencies[int(len(latencies) * 0.99)] * 1000, "threads": torch.get_num_threads()}


def train_flop_per_sample(run) -> float:
    """FLOPs of one training sample (forward and backward), counted by torch's FlopCounterMode on a batch."""
    from unittest import mock

    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    from kiln.nn import fuse, native_attention, native_lstm, native_norm

    x, y = run.kind.load().split("test")
    model = run.model.train()
    counter = FlopCounterMode(display=False)
    # The C kernels are opaque to the counter: count the same work as PyTorch operators.
    with mock.patch.object(fuse, "_native_applies", lambda *args: False), \
            mock.patch.object(native_attention, "applies", lambda *args: False), \
            mock.patch.object(native_lstm, "applies", lambda *args: False), \
            mock.patch.object(native_norm, "applies", lambda *args: False):
        with counter:
            F.cross_entropy(model(run.kind.to_input(x[:64])), y[:64]).backward()
        lstm = lstm_train_flops(model, run.kind.to_input(x[:64]))
    model.eval()
    return (counter.get_total_flops() + lstm) / 64


def lstm_train_flops(model, x) -> float:
    """FlopCounterMode does not see the fused CPU LSTM kernel: count its matrix multiplies here,
    2 * 4H(I + H) per sample and step forward, and twice that backward."""
    import torch

    shapes = []
    hooks = [m.register_forward_hook(lambda m, inp, out: shapes.append((m, inp[0].shape)))
             for m in model.modules() if isinstance(m, torch.nn.LSTM)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    total = 0.0
    for m, (b, steps, _) in shapes:  # batch_first
        per_step = sum(2 * 4 * m.hidden_size * (getattr(m, f"weight_ih_l{k}").shape[1] + m.hidden_size)
                       for k in range(m.num_layers))
        total += 3 * per_step * steps * b
    return total


def peak_gflops() -> float:
    """The machine's fp32 peak as this process's threads see it: the best of a few 2048^3 matrix multiplies."""
    import torch

    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * 2048**3 / best / 1e9


def worker_eager(epochs: int, seed: int, data_path: str) -> dict:
    """The loop most PyTorch tutorials write: float tensors, DataLoader, .item() every step."""
    import numpy as np
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from benchmarks.plain_seed import PlainSeedHybrid

    data = np.load(data_path)
    torch.manual_seed(seed)
    model = PlainSeedHybrid()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.from_numpy(data["train_x"]).float().div(255).unsqueeze(1)
    loader = DataLoader(TensorDataset(x, torch.from_numpy(data["train_y"]).long()), batch_size=64, shuffle=True)
    t0 = time.perf_counter()
    for _ in range(epochs):
        model.train()
        total = 0.0
        for xb, yb in loader:
            loss = torch.nn.functional.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item()
    seconds = time.perf_counter() - t0
    model.eval()
    with torch.no_grad():
        tx = torch.from_numpy(data["test_x"]).float().div(255).unsqueeze(1)
        pred = torch.cat([model(tx[i:i + 1000]).argmax(1) for i in range(0, len(tx), 1000)])
    acc = (pred == torch.from_numpy(data["test_y"]).long()).float().mean().item()
    return {"train_seconds": seconds, "test_accuracy": acc, "parameters": sum(p.numel() for p in model.parameters()),
            "versions": {"torch": torch.__version__}}


# ---- driver ------------------------------------------------------------------------------------

def hardware() -> dict:
    info = {"machine": platform.machine(), "cores": os.cpu_count(), "python": platform.python_version()}
    from kiln.hardware import cpu_flags, cpu_model

    info["cpu"] = cpu_model()
    flags = cpu_flags()
    info["isa"] = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    return info


def export_data(path: Path, overrides: list[str]) -> int:
    """The kiln seed-0 split (with kiln's data overrides, e.g. data.limit_train) as uint8 arrays, so every system
    trains on exactly the same samples; returns how many training samples that is."""
    import numpy as np

    from kiln.config import load_config
    from kiln.data.kind import open_kind

    cfg = load_config(SEED_CONFIG, [o for o in overrides if o.startswith("data.")])
    s = open_kind(cfg.data, cfg.seed).load()
    np.savez(path, train_x=s.train_x[:, 0].numpy(), train_y=s.train_y.numpy(),
             test_x=s.test_x[:, 0].numpy(), test_y=s.test_y.numpy())
    return len(s.train_x)


@contextlib.contextmanager
def background_load(n: int):
    """``n`` processes that keep a CPU busy each (a machine shared with other work), stopped afterwards."""
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        if n:
            time.sleep(1.0)  # they are running before the system under test starts
        yield
    finally:
        for p in spinners:
            p.kill()
            p.wait()


def kiln_precision(overrides: list[str]) -> str:
    """The precision kiln's runs will use: the config's `train.precision` with the --set overrides, as
    `auto` resolves it on this CPU."""
    import torch

    from kiln.config import load_config
    from kiln.training.precision import pick_precision

    cfg = load_config(SEED_CONFIG, overrides)
    return pick_precision(cfg.train.precision, torch.device("cpu")).name


def run_worker(system: str, epochs: int, seed: int, data_path: Path, overrides: list[str],
               threads: int | None, load: int = 0) -> dict:
    if system == "kiln-fp32":  # the same kiln run in fp32, beside a faster precision that changes numerics
        system, overrides = "kiln", [*overrides, "train.precision=fp32"]
    if system == "keras":
        cmd = [str(KERAS_PYTHON), str(HERE / "keras_seed.py"), str(data_path), str(epochs), str(seed)]
    else:
        cmd = [sys.executable, __file__, "--worker", system, "--epochs", str(epochs), "--seed", str(seed),
               "--data", str(data_path),
               *[a for o in overrides for a in ("--set", o)]]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    if threads:
        # Read by PyTorch (OpenMP) and by TensorFlow's intra-op pool; inter-op set in keras_seed.py.
        env.update(OMP_NUM_THREADS=str(threads), KILN_BENCH_THREADS=str(threads))
    with background_load(load):
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if out.returncode != 0:
        raise RuntimeError(f"{system} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--systems", default="kiln,eager,keras")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="kiln config override")
    p.add_argument("--threads", type=int, help="CPU threads for every system (default: each one's own choice); "
                                               "1 keeps a shared, busy machine from distorting the comparison")
    p.add_argument("--limit-train", type=int, help="train every system on the first N images of MNIST's training "
                                                   "set (kiln's data.limit_train, then its 10%% validation hold-out)")
    p.add_argument("--background-load", type=int, default=0, metavar="N",
                   help="run every system beside N processes that each keep a CPU busy (started and stopped here)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.worker:
        result = (worker_kiln(args.epochs, args.seed, args.overrides) if args.worker == "kiln"
                  else worker_eager(args.epochs, args.seed, args.data))
        print(json.dumps(result))
        return

    # kiln's overrides; --limit-train is one more (recorded as itself in the JSON's args)
    overrides = [*args.overrides, *([f"data.limit_train={args.limit_train}"] if args.limit_train else [])]
    systems = args.systems.split(",")
    if "keras" in systems and not KERAS_PYTHON.exists():
        print("note: Keras skipped; run benchmarks/setup_keras.sh to include it", file=sys.stderr)
        systems.remove("keras")
    if "kiln" in systems and kiln_precision(overrides) != "fp32":
        # bf16 changes numerics: its accuracy is shown beside fp32's (issue 3, goal 4).
        systems.insert(systems.index("kiln") + 1, "kiln-fp32")
    results: dict[str, list[dict]] = {s: [] for s in systems}
    with tempfile.TemporaryDirectory() as tmp:
        data_path = Path(tmp) / "mnist_split.npz"
        train_samples = export_data(data_path, overrides)
        for rep in range(args.reps):
            for system in systems:
                # Repetition r uses seed r in every system: the accuracy spread is over seeds too.
                r = run_worker(system, args.epochs, rep, data_path, overrides, args.threads, args.background_load)
                results[system].append(r)
                print(f"rep {rep + 1}/{args.reps} {system:6s} {r['train_seconds'] / args.epochs:7.2f} s/epoch  "
                      f"test acc {r['test_accuracy'] * 100:.2f}%", flush=True)

    hw = hardware()
    print(f"\nhardware: {hw}")
    print(f"config: seed_hybrid, {args.epochs} epoch(s) x {train_samples:,} samples, batch 64, Adam 1e-3, "
          f"beside {args.background_load} busy processes, "
          f"kiln in {kiln_precision(overrides)}; "
          f"threads: {args.threads or 'default'}; kiln overrides: {overrides or 'none'}")
    for system, rs in results.items():
        print(f"versions[{system}]: {rs[0]['versions']}" + (f"  kiln chose: {rs[0]['choices']}" if rs[0].get("choices") else "")
              + (f"  precision: {rs[0]['precision']}" if rs[0].get("precision") else ""))
    print(f"\n{'system':8s} {'min s':>7s} {'median s':>9s} {'max s':>7s} {'samples/s':>10s} {'test acc (median)':>18s}")
    summary = {}
    for system, rs in results.items():
        secs = sorted(r["train_seconds"] / args.epochs for r in rs)
        med = statistics.median(secs)
        acc = statistics.median(r["test_accuracy"] for r in rs)
        summary[system] = {"seconds_per_epoch": secs, "median": med, "samples_per_s": train_samples / med,
                           "test_accuracy_median": acc}
        print(f"{system:8s} {secs[0]:7.2f} {med:9.2f} {secs[-1]:7.2f} {train_samples / med:10.0f} {acc * 100:17.2f}%")
    ratios = {}
    if "kiln" in results:
        rs = results["kiln"]
        flops = rs[0]["train_flop_per_sample"]
        achieved = [flops * r["train_samples"] * args.epochs / r["train_seconds"] / 1e9 for r in rs]
        peaks = [r["peak_gflops"] for r in rs]
        print(f"\nkiln training: {flops / 1e6:.2f} MFLOP per sample (forward + backward: FlopCounterMode, plus the LSTM), "
              f"{flops * train_samples / 1e12:.3f} TFLOP per epoch; median {statistics.median(achieved):.1f} GFLOP/s "
              f"= {statistics.median(a / p for a, p in zip(achieved, peaks, strict=True)) * 100:.1f}% of the measured "
              f"fp32 peak ({statistics.median(peaks):.0f} GFLOP/s, 2048^3 matmul, same threads)")
        inf = {k: statistics.median(r["inference"][k] for r in rs) for k in rs[0]["inference"]}
        print(f"kiln inference (median over reps, {inf['threads']:.0f} threads): evaluate {inf['evaluate_samples_per_s']:,.0f} "
              f"samples/s, predict {inf['predict_samples_per_s']:,.0f} samples/s, batch-1 latency "
              f"p50 {inf['batch1_latency_ms_p50']:.2f} ms / p99 {inf['batch1_latency_ms_p99']:.2f} ms")
        summary["kiln"]["inference"] = inf
    if "kiln" in summary:
        for other in [s for s in summary if s != "kiln"]:
            ratios[other] = summary[other]["median"] / summary["kiln"]["median"]
            accuracy_gap = (summary["kiln"]["test_accuracy_median"] - summary[other]["test_accuracy_median"]) * 100
            print(f"kiln is {ratios[other]:.2f}x faster than {other} (median epoch time); "
                  f"test accuracy {accuracy_gap:+.2f} points")
    out_dir = HERE / "results"
    out_dir.mkdir(exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = out_dir / f"mnist_speed-{stamp}.json"
    out.write_text(json.dumps({"hardware": hw, "args": vars(args), "results": results, "summary": summary,
                               "kiln_speedup": ratios}, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
