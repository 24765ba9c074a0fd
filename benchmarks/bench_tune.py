"""kiln tune on German credit: the tuned config against the example's hand-set one, on cross-validated ROC-AUC.

    KILN_DATA=../shared/data python benchmarks/bench_tune.py [--trials 30] [--folds 5] [--fresh-seeds 1 2 3]
        [--pruner median] [--workers 1]

1. Tunes examples/german_credit.yaml over examples/german_credit_space.yaml with ``kiln.tune`` (TPE, each trial
   scored by the mean ROC-AUC over k stratified folds of the config's seed, the folds `kiln train --folds`
   draws), in a temporary folder.
2. Scores the hand-set config and the best config on the same k folds (the tuning's own folds: optimistic for
   the tuned config, which was chosen on them) and on fresh folds: the config's ``seed`` set to each of
   ``--fresh-seeds``, which draws other folds (and another initialisation and order) that the tuning never saw.
Prints mean +- sd over folds per seed and over all fresh folds together; writes benchmarks/results/tune-<time>.json.
Every training runs on one thread (train.threads=1), so the two configs are trained alike.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

import kiln
from kiln.config import load_config
from kiln.hardware import cpu_model

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "examples" / "german_credit.yaml"
SPACE = REPO / "examples" / "german_credit_space.yaml"
METRICS = ("roc_auc", "pr_auc")
COMMON = {"train.threads": 1}


def cv(config, folds: int, seed: int, tmp: Path) -> list[dict[str, float]]:
    """Each fold's test metrics of ``config`` with its seed set to ``seed`` (which draws the folds)."""
    out = []
    for k in range(folds):
        with contextlib.redirect_stderr(io.StringIO()):
            run = kiln.train(config, {**COMMON, "seed": seed, "data.folds": folds, "data.fold": k},
                             out=tmp / f"run_{time.monotonic_ns()}", live=False)
        out.append({m: run.metrics["test"][m] for m in METRICS})
    return out


def spread(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "sd": statistics.pstdev(values), "values": values}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trials", type=int, default=30)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--fresh-seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--pruner", default="median", choices=["median", "hyperband", "none"])
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--out", default=None, help="default: benchmarks/results/tune-<time>.json")
    args = ap.parse_args()

    import optuna

    conditions = {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
                  "torch": torch.__version__, "optuna": optuna.__version__, "kiln": kiln.__version__,
                  "command": " ".join(sys.argv)}
    print(f"{conditions['cpu']}, {conditions['cores']} cores; torch {torch.__version__}, optuna "
          f"{optuna.__version__}, kiln {kiln.__version__}", flush=True)
    hand = load_config(CONFIG)
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        t0 = time.perf_counter()
        summary = kiln.tune(CONFIG, SPACE, args.trials, folds=args.folds, pruner=args.pruner, workers=args.workers,
                            out=tmp / "tune", overrides=COMMON)
        tune_seconds = time.perf_counter() - t0
        best = load_config(tmp / "tune" / "best.yaml")
        trials_md = (tmp / "tune" / "trials.md").read_text()
        scores: dict[str, dict[int, list[dict[str, float]]]] = {"hand_set": {}, "tuned": {}}
        for seed in [hand.seed, *args.fresh_seeds]:
            for name, cfg in (("hand_set", hand), ("tuned", best)):
                scores[name][seed] = cv(cfg, args.folds, seed, tmp)
                roc = [f["roc_auc"] for f in scores[name][seed]]
                print(f"  {name:9s} folds of seed {seed}: ROC-AUC {statistics.fmean(roc):.4f} +- "
                      f"{statistics.pstdev(roc):.4f}", flush=True)
    results: dict = {}
    print(f"\n{'config':10s} {'folds':34s} {'ROC-AUC mean +- sd':>20s} {'PR-AUC mean +- sd':>20s}")
    for name, by_seed in scores.items():
        same = by_seed[hand.seed]
        fresh = [f for s in args.fresh_seeds for f in by_seed[s]]
        results[name] = {
            "same_folds": {m: spread([f[m] for f in same]) for m in METRICS},
            "fresh_folds": {m: spread([f[m] for f in fresh]) for m in METRICS},
            "per_seed": {str(s): {m: spread([f[m] for f in folds]) for m in METRICS} for s, folds in by_seed.items()},
        }
        for label, key in ((f"tuning's folds (seed {hand.seed})", "same_folds"),
                           (f"fresh folds (seeds {','.join(map(str, args.fresh_seeds))})", "fresh_folds")):
            r = results[name][key]
            print(f"{name:10s} {label:34s} {r['roc_auc']['mean']:>11.4f} +- {r['roc_auc']['sd']:.4f} "
                  f"{r['pr_auc']['mean']:>11.4f} +- {r['pr_auc']['sd']:.4f}")
    gain = results["tuned"]["fresh_folds"]["roc_auc"]["mean"] - results["hand_set"]["fresh_folds"]["roc_auc"]["mean"]
    paired = [t["roc_auc"] - h["roc_auc"] for s in args.fresh_seeds
              for t, h in zip(scores["tuned"][s], scores["hand_set"][s], strict=True)]
    wins = sum(d > 0 for d in paired)
    print(f"\ntuned - hand-set on fresh folds: {gain:+.4f} ROC-AUC (tuned better on {wins} of {len(paired)} folds, "
          f"paired difference {statistics.fmean(paired):+.4f} +- {statistics.pstdev(paired):.4f}); "
          f"tuning took {tune_seconds:.0f} s for {args.trials} trials ({summary['trials']})")
    report = {"conditions": conditions, "settings": vars(args), "tune": {**summary, "seconds": round(tune_seconds, 1),
                                                                         "trials_md": trials_md},
              "best_config": best.to_dict(), "results": results,
              "fresh_gain_roc_auc": gain, "fresh_paired_differences": paired, "fresh_folds_won": wins}
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = Path(args.out or REPO / "benchmarks" / "results" / f"tune-{stamp}.json")
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
