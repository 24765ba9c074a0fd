"""Transfer learning: Fashion-MNIST fine-tuned from an MNIST run against Fashion-MNIST from scratch, epoch by epoch.

The source is the seed model trained on MNIST once (`examples/mnist_seed.yaml`, `--source-epochs` epochs), or a
run given with `--source`. Then, for each seed, side by side in alternation, two `kiln train` processes with the
same recipe, data split and seed: `examples/fashion_mnist.yaml` with a 10% validation split (from scratch) and
`examples/fashion_from_mnist.yaml` (init_from the source, its convolution frozen, a new head). Each epoch's validation accuracy is
read from the runs' metrics.jsonl; the result is how many epochs each needs to reach each `--targets` accuracy,
its final test accuracy, and the training loop's seconds per epoch (the ratio, not absolute times, is the
comparison: the machine may be shared).

    KILN_DATA=../shared/data .venv/bin/python benchmarks/bench_transfer.py --seeds 0 1
    KILN_DATA=../shared/data .venv/bin/python benchmarks/bench_transfer.py --seeds 0 1 2 --set data.limit_train=10000

Writes benchmarks/results/transfer-<time>.json and the curves as transfer-<time>.png beside it.
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
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "src"))

SOURCE = ROOT / "examples" / "mnist_seed.yaml"
SCRATCH = ROOT / "examples" / "fashion_mnist.yaml"
FINETUNE = ROOT / "examples" / "fashion_from_mnist.yaml"


def train(config: Path, out: Path, overrides: list[str]) -> dict:
    """One `kiln train` in a fresh process; its per-epoch validation accuracy, test accuracy and loop time."""
    cmd = [sys.executable, "-m", "kiln", "train", str(config), "--out", str(out), "--json",
           *[a for o in overrides for a in ("--set", o)]]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"kiln train {config.name} failed:\n{done.stderr[-3000:]}")
    metrics = json.loads(done.stdout)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if r["kind"] == "epoch"]
    return {"val_accuracy": [r.get("val_accuracy") for r in epochs], "train_loss": [r["train_loss"] for r in epochs],
            "test_accuracy": metrics["test"]["accuracy"], "train_seconds": metrics["train_seconds"],
            "seconds_per_epoch": metrics["train_seconds"] / max(len(epochs), 1),
            "wall_seconds": time.perf_counter() - start}


def epochs_to(curve: list[float], target: float) -> int | None:
    """The first epoch (from 1) whose validation accuracy reaches ``target``; None if none does."""
    return next((i + 1 for i, a in enumerate(curve) if a is not None and a >= target), None)


def plot(path: Path, runs: dict[str, list[dict]], title: str) -> None:
    from kiln.training.charts import Series, line_chart, write_png

    colors = {"scratch": "#1f77b4", "finetune": "#d62728"}
    labels = {"scratch": "from scratch", "finetune": "fine-tuned from MNIST (convolution frozen)"}
    series = []
    for arm, arm_runs in runs.items():
        for i, r in enumerate(arm_runs):
            curve = r["val_accuracy"]
            series.append(Series(labels[arm] if i == 0 else "", list(range(1, len(curve) + 1)),
                                 [a * 100 for a in curve], color=colors[arm], dots=True))
    write_png(path, line_chart(series, title=title, xlabel="epoch", ylabel="validation accuracy (%)"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", help="an MNIST run to fine-tune from (default: train examples/mnist_seed.yaml)")
    p.add_argument("--source-epochs", type=int, default=3, help="epochs of the MNIST source run (default 3)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--epochs", type=int, default=6, help="epochs of both Fashion-MNIST trainings (default 6)")
    p.add_argument("--freeze", help="blocks frozen in the fine-tuned run, e.g. 0-3 (default: the example's, conv2d)")
    p.add_argument("--targets", type=float, nargs="+", default=[0.85, 0.88, 0.9],
                   help="validation accuracies to reach (default 0.85 0.88 0.9)")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="config override for both targets")
    args = p.parse_args()

    import torch

    from kiln.hardware import cpu_model

    with tempfile.TemporaryDirectory() as tmp:
        source = args.source
        if source is not None:
            done = json.loads((Path(source) / "results.json").read_text())
            source_info = {"run": source, "test_accuracy": done["test"]["accuracy"], "epochs": done.get("epochs")}
        else:
            source = str(Path(tmp) / "mnist_source")
            r = train(SOURCE, Path(source), [f"train.epochs={args.source_epochs}"])
            source_info = {"config": "examples/mnist_seed.yaml", "epochs": args.source_epochs,
                           "test_accuracy": r["test_accuracy"], "train_seconds": r["train_seconds"]}
            print(f"source: MNIST, {args.source_epochs} epochs, test accuracy {r['test_accuracy'] * 100:.2f}%",
                  flush=True)
        common = [f"train.epochs={args.epochs}", *args.overrides]
        runs: dict[str, list[dict]] = {"scratch": [], "finetune": []}
        for seed in args.seeds:
            tune = [f"train.init_from={source}"] + ([f"train.freeze=[\"{args.freeze}\"]"] if args.freeze else [])
            for arm, config, extra in (("scratch", SCRATCH, ["data.val_fraction=0.1"]), ("finetune", FINETUNE, tune)):
                r = train(config, Path(tmp) / f"{arm}{seed}", [f"seed={seed}", *common, *extra])
                r["seed"] = seed
                runs[arm].append(r)
                print(f"seed {seed} {arm:8s}: val accuracy by epoch "
                      + " ".join(f"{a * 100:.2f}" for a in r["val_accuracy"])
                      + f"; test {r['test_accuracy'] * 100:.2f}%; {r['seconds_per_epoch']:.1f} s/epoch", flush=True)

    reach = {arm: {str(t): [epochs_to(r["val_accuracy"], t) for r in rs] for t in args.targets}
             for arm, rs in runs.items()}
    summary = {arm: {"val_accuracy_median_by_epoch": [statistics.median(r["val_accuracy"][e] for r in rs)
                                                      for e in range(args.epochs)],
                     "test_accuracy_median": statistics.median(r["test_accuracy"] for r in rs),
                     "seconds_per_epoch_median": statistics.median(r["seconds_per_epoch"] for r in rs),
                     "epochs_to_target": reach[arm]}
               for arm, rs in runs.items()}
    ratio = (summary["scratch"]["seconds_per_epoch_median"] / summary["finetune"]["seconds_per_epoch_median"])
    hw = {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
          "load_average_1m_at_end": os.getloadavg()[0]}

    print(f"\nhardware: {hw}; torch {torch.__version__}")
    for t in args.targets:
        print(f"epochs to {t * 100:.0f}% validation accuracy (per seed): from scratch {reach['scratch'][str(t)]}, "
              f"fine-tuned {reach['finetune'][str(t)]}")
    for arm in runs:
        s = summary[arm]
        print(f"{arm:8s}: median val accuracy by epoch "
              + " ".join(f"{a * 100:.2f}" for a in s["val_accuracy_median_by_epoch"])
              + f"; median test {s['test_accuracy_median'] * 100:.2f}%; {s['seconds_per_epoch_median']:.1f} s/epoch")
    print(f"seconds per epoch, from scratch / fine-tuned (frozen front end): {ratio:.2f}x")

    out_dir = HERE / "results"
    out_dir.mkdir(exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = out_dir / f"transfer-{stamp}.json"
    png = out.with_suffix(".png")
    plot(png, runs, f"Fashion-MNIST, seed_hybrid: validation accuracy by epoch "
                                  f"({len(args.seeds)} seeds each)")
    out.write_text(json.dumps({"hardware": hw, "torch": torch.__version__,
                               "args": {k: v for k, v in vars(args).items() if k != "source"},
                               "source": source_info, "runs": runs, "summary": summary,
                               "scratch_over_finetune_seconds_per_epoch": ratio, "plot": png.name}, indent=2))
    print(f"wrote {out} and {png.name}")


if __name__ == "__main__":
    main()
