"""Differentially private training of MNIST (examples/mnist_private.yaml) at several epsilons, against the same
network trained without privacy: test accuracy, the epsilon spent, and the time cost.

    KILN_DATA=../shared/data python benchmarks/bench_privacy.py [--epsilons 1 3 8] [--epochs 10]
        [--threads 1] [--step-repeats 30] [--skip-runs]

Each epsilon is one full training of the example config (delta 1e-5, PRV accountant), run one after another
with the non-private reference (same network, batch size and epochs; Adam, no clipping, no noise). Time is
measured two ways, side by side on this machine: each run's train_seconds, and (less disturbed by other work on
a shared machine) one training step of the private and the non-private model alternated ``--step-repeats``
times on the same batch size, medians compared. Writes benchmarks/results/privacy-<time>.json.
Anchor: Opacus's own MNIST example (its CNN, RDP accountant) reports 96.78% at epsilon 3.01.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import platform
import statistics
import sys
import tempfile
import time
import warnings
from datetime import UTC, datetime
from pathlib import Path

import torch

import kiln
from kiln.config import load_config
from kiln.hardware import cpu_model

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "examples" / "mnist_private.yaml"
PLAIN = {"train.privacy": None, "train.optimizer": {"name": "adam", "lr": 2e-3}}


def train(overrides: dict, tmp: Path, label: str) -> dict:
    t0 = time.perf_counter()
    with contextlib.redirect_stderr(io.StringIO()):
        run = kiln.train(CONFIG, overrides, out=tmp / label, live=False)
    results = json.loads((run.path / "results.json").read_text())
    out = {"test_accuracy": results["test"]["accuracy"], "train_seconds": results["train_seconds"],
           "wall_seconds": round(time.perf_counter() - t0, 1), "privacy": results.get("privacy")}
    spent = f"  epsilon spent {out['privacy']['epsilon']:.3f} (noise {out['privacy']['noise_multiplier']:.3f})" \
        if out["privacy"] else ""
    print(f"{label:>12}: test accuracy {out['test_accuracy']:.4f}  train {out['train_seconds']:.1f} s{spent}",
          flush=True)
    return out


def step_times(batch: int, repeats: int) -> dict:
    """Median seconds of one training step, private (hooks, clipping, noise) and not, alternated."""
    from opacus.grad_sample import GradSampleHooks
    from opacus.optimizers import DPOptimizer

    from kiln.nn import build_model
    from kiln.training.privacy import Privacy  # noqa: F401  (fails early without the privacy extra)
    cfg = load_config(CONFIG)
    x = torch.rand(batch, 1, 28, 28)
    y = torch.randint(0, 10, (batch,))
    models = {}
    for name in ("plain", "private"):
        torch.manual_seed(0)
        model = build_model(cfg.blocks, (1, 28, 28))
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        if name == "private":
            GradSampleHooks(model, loss_reduction="mean")
            opt = DPOptimizer(opt, noise_multiplier=1.0, max_grad_norm=0.1, expected_batch_size=batch)
        models[name] = (model, opt)

    def step(name: str) -> float:
        model, opt = models[name]
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        return time.perf_counter() - t0

    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    times: dict[str, list[float]] = {"plain": [], "private": []}
    for name in times:  # warm-up
        step(name)
    for _ in range(repeats):
        for name in times:
            times[name].append(step(name))
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"batch": batch, "repeats": repeats, "median_ms": {k: round(1000 * v, 2) for k, v in med.items()},
            "ratio_private_over_plain": round(med["private"] / med["plain"], 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epsilons", type=float, nargs="+", default=[3.0, 1.0, 8.0])
    ap.add_argument("--epochs", type=int, default=None, help="default: the example config's")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--step-repeats", type=int, default=30)
    ap.add_argument("--skip-runs", action="store_true", help="only the step timing")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(CONFIG)
    epochs = args.epochs or cfg.train.epochs
    common = {"train.epochs": epochs, "train.threads": args.threads}
    print(f"kiln privacy benchmark: {CONFIG.name}, {epochs} epochs, batch {cfg.train.batch_size}, "
          f"{args.threads} thread(s); {cpu_model()}; torch {torch.__version__}", flush=True)
    import opacus
    report: dict = {
        "benchmark": "privacy", "config": str(CONFIG.relative_to(REPO)), "epochs": epochs,
        "batch_size": cfg.train.batch_size, "threads": args.threads, "cpu": cpu_model(),
        "python": platform.python_version(), "torch": torch.__version__, "opacus": opacus.__version__,
        "kiln": kiln.__version__, "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "anchor": "Opacus MNIST example (SampleConvNet, RDP): 96.78% at epsilon 3.01, 98.94% without privacy",
        "args": vars(args), "runs": {},
    }
    report["step_time"] = step_times(cfg.train.batch_size, args.step_repeats)
    print(f"one step of {cfg.train.batch_size}: private {report['step_time']['median_ms']['private']} ms, "
          f"plain {report['step_time']['median_ms']['plain']} ms: "
          f"{report['step_time']['ratio_private_over_plain']}x", flush=True)
    out_dir = REPO / "benchmarks" / "results"
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = out_dir / f"privacy-{stamp}.json"
    if not args.skip_runs:
        with tempfile.TemporaryDirectory() as tmp:
            # The first epsilon first (the one that matters most when the machine is slow), then the reference.
            for i, eps in enumerate(args.epsilons):
                report["runs"][f"epsilon_{eps:g}"] = train(common | {"train.privacy.epsilon": eps}, Path(tmp),
                                                           f"epsilon {eps:g}")
                if i == 0:
                    report["runs"]["no_privacy"] = train(common | PLAIN, Path(tmp), "no privacy")
                path.write_text(json.dumps(report, indent=2) + "\n")  # what is done so far survives a kill
        plain = report["runs"]["no_privacy"]["train_seconds"]
        for key, r in report["runs"].items():
            r["time_ratio_to_no_privacy"] = round(r["train_seconds"] / plain, 2)
        print("\n| run | test accuracy | epsilon spent | noise multiplier | train s | x no privacy |")
        print("|---|---|---|---|---|---|")
        for key, r in report["runs"].items():
            p = r["privacy"] or {}
            print(f"| {key} | {100 * r['test_accuracy']:.2f}% | {p.get('epsilon', '-')} | "
                  f"{p.get('noise_multiplier', '-')} | {r['train_seconds']:.1f} | {r['time_ratio_to_no_privacy']} |")
    out_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path.relative_to(REPO)}")


if __name__ == "__main__":
    main()
