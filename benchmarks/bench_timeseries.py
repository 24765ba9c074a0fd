"""Time series: kiln's forecasting examples beside the baselines a forecaster tries first, on the same test windows.

    KILN_DATA=../shared/data python benchmarks/bench_timeseries.py [--seeds 0 1 2] [--folds K] [--threads 1]

For each example (examples/airline.yaml: monthly, 12 months ahead; examples/msft_returns.yaml: daily log
returns, next day) it trains kiln once per seed and reads the test metrics kiln reports: MASE, sMAPE, MAE,
RMSE and directional accuracy in the series' units, for the model and for the naive (last value),
seasonal-naive and linear-autoregression forecasts of the same windows (least squares on the same lookback,
fitted on the training part). The baselines do not depend on the seed. Ratios below 1 mean the model's error
is smaller. With --folds K each seed runs K walk-forward folds (expanding window) and the metrics are their
means. Results also go to benchmarks/results/timeseries-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench_mnist_speed import hardware  # noqa: E402

EXAMPLES = ("airline", "msft_returns")
METRICS = ("mase", "smape", "mae", "rmse", "directional_accuracy")
FORECASTERS = ("model", "naive", "seasonal_naive", "linear_ar")


def test_metrics(config: Path, seed: int, folds: int | None, threads: int | None, out: Path) -> dict:
    """{forecaster: {metric: value}} on the test part (the mean over walk-forward folds with ``folds``)."""
    import kiln
    from kiln.api import train_folds

    overrides = {"seed": seed, **({"train.threads": threads} if threads else {})}
    if folds:
        test = {k: v["mean"] for k, v in train_folds(config, folds, overrides, out=out, live=False)["test"].items()}
    else:
        test = kiln.train(config, overrides, out=out, live=False).metrics["test"]
    return {f: {m: test.get(m if f == "model" else f"{f}_{m}") for m in METRICS} | {"up_fraction": test["up_fraction"]}
            for f in FORECASTERS}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--folds", type=int, default=None, help="walk-forward folds per seed (default: one test part)")
    ap.add_argument("--threads", type=int, default=None, help="train.threads (default: the configs' auto)")
    ap.add_argument("--examples", nargs="+", default=list(EXAMPLES), choices=EXAMPLES)
    args = ap.parse_args()

    import numpy as np
    import torch

    import kiln

    results = {}
    for name in args.examples:
        config = ROOT / "examples" / f"{name}.yaml"
        runs, seconds = [], []
        for seed in args.seeds:
            with tempfile.TemporaryDirectory() as tmp:
                t0 = time.perf_counter()
                runs.append(test_metrics(config, seed, args.folds, args.threads, Path(tmp) / "run"))
                seconds.append(time.perf_counter() - t0)
        results[name] = {"runs": runs, "seconds": seconds}

    hw = hardware()
    print(f"hardware: {hw}; torch {torch.__version__}, numpy {np.__version__}, kiln {kiln.__version__}; "
          f"seeds {args.seeds}; {'walk-forward folds: ' + str(args.folds) if args.folds else 'one test part'}")
    for name, r in results.items():
        runs = r["runs"]
        part = f"mean of {args.folds} walk-forward test blocks" if args.folds else "test part"
        print(f"\n{name} (examples/{name}.yaml), {part}; model: median (min-max) over {len(runs)} seed(s), "
              f"training {statistics.median(r['seconds']):.1f} s per seed")
        print(f"{'forecaster':16s}" + "".join(f"{m:>27s}" for m in METRICS))
        for f in FORECASTERS:
            cells = []
            for m in METRICS:
                values = [run[f][m] for run in runs if run[f][m] is not None]
                cells.append("-" if not values else f"{statistics.median(values):.4f}" if len(set(values)) == 1 else
                             f"{statistics.median(values):.4f} ({min(values):.4f}-{max(values):.4f})")
            print(f"{f:16s}" + "".join(f"{c:>27s}" for c in cells))
        mase = statistics.median(run["model"]["mase"] for run in runs)
        ratios = {b: mase / runs[0][b]["mase"] for b in FORECASTERS[1:]}
        r["model_mase_over"] = ratios
        print("model MASE / baseline MASE: " + ", ".join(f"{b} {v:.3f}x" for b, v in ratios.items())
              + f"; up_fraction {runs[0]['model']['up_fraction']:.4f}")
    out_dir = HERE / "results"
    out_dir.mkdir(exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = out_dir / f"timeseries-{stamp}.json"
    out.write_text(json.dumps({"hardware": hw, "versions": {"torch": torch.__version__, "numpy": np.__version__,
                                                            "kiln": kiln.__version__},
                               "args": vars(args), "results": results}, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
