"""Does reweighing on sex lower the demographic-parity difference of German credit? Plain against reweighed,
side by side on the same folds and seeds.

    KILN_DATA=../shared/data python benchmarks/bench_fairness.py [--seeds 0 1 2] [--folds 5] [--bootstrap 1000]

For each seed, examples/german_credit.yaml (plain) and examples/german_credit_fair.yaml (the same config with
``train.fairness: {sensitive: personal_status_and_sex:A91=male,..., method: reweigh}``) are trained on the same
k stratified folds (seeded by the seed, as ``kiln train --folds`` draws them). Each fold's test rows are decided
by that run's own threshold (chosen on its validation split, as ``kiln predict`` decides); the k test sets
together hold every row once, so each seed gives decisions on all 1,000 loans, and kiln's audit
(:func:`kiln.audit.assess`: Fairlearn's figures, bootstrap 95% intervals) measures the pooled rows. Also printed:
the per-fold demographic-parity differences (paired: the same test rows), test ROC-AUC and accuracy, seconds.
Writes benchmarks/results/fairness-<time>.json.
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

import numpy as np
import torch

import kiln
from kiln.audit import assess
from kiln.config import load_config
from kiln.hardware import cpu_model
from kiln.training.fairness import Grouping

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {"plain": REPO / "examples" / "german_credit.yaml",
           "reweighed": REPO / "examples" / "german_credit_fair.yaml"}
SEX = "personal_status_and_sex:A91=male,A92=female,A93=male,A94=male,A95=female"


def fold_decisions(config: Path, seed: int, folds: int, k: int, tmp: Path) -> dict:
    with contextlib.redirect_stderr(io.StringIO()):  # the training log
        run = kiln.train(config, {"seed": seed, "data.folds": folds, "data.fold": k, "train.threads": 1},
                         out=tmp / f"run_{time.monotonic_ns()}", live=False)
    x, y = run.kind.load().split("test")
    scores = run.from_outputs(run.outputs(x))[:, 1].double().numpy()
    grouping = Grouping.parse(SEX)
    return {"scores": scores, "y": y.numpy().astype(int), "decided": (scores >= run.threshold).astype(int),
            "groups": grouping.groups(run.kind.column_values("test", grouping.column)),
            "roc_auc": run.metrics["test"]["roc_auc"], "accuracy": run.metrics["test"]["accuracy"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--out", default=None, help="default: benchmarks/results/fairness-<time>.json")
    args = ap.parse_args()
    import fairlearn

    conditions = {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
                  "torch": torch.__version__, "kiln": kiln.__version__, "fairlearn": fairlearn.__version__,
                  "numpy": np.__version__, "command": " ".join(sys.argv)}
    print(f"{conditions['cpu']}, {conditions['cores']} cores; torch {torch.__version__}, fairlearn "
          f"{fairlearn.__version__}, kiln {kiln.__version__}")
    print(f"sensitive: {SEX}; {args.folds} folds x seeds {args.seeds}; selection = decided 'bad'", flush=True)
    report: dict = {"conditions": conditions, "sensitive": SEX, "settings": vars(args),
                    "configs": {n: load_config(c).to_dict() for n, c in CONFIGS.items()}, "seeds": []}
    with tempfile.TemporaryDirectory() as tmpdir:
        for seed in args.seeds:
            entry: dict = {"seed": seed}
            for name, config in CONFIGS.items():
                t0 = time.perf_counter()
                parts = [fold_decisions(config, seed, args.folds, k, Path(tmpdir)) for k in range(args.folds)]
                pooled = {key: np.concatenate([p[key] for p in parts]) for key in ("scores", "y", "decided")}
                groups = [g for p in parts for g in p["groups"]]
                fig = assess(pooled["y"], pooled["decided"], pooled["scores"], groups, ["male", "female"],
                             args.bootstrap, seed)
                per_fold = [assess(p["y"], p["decided"], p["scores"], p["groups"], None, 0, 0)
                            ["disparity"]["demographic_parity_difference"] for p in parts]
                entry[name] = {
                    "pooled": {"rows": len(groups), "disparity": fig["disparity"],
                               "disparity_interval": fig["disparity_interval"],
                               "groups": {g: {k: v for k, v in f.items()} for g, f in fig["groups"].items()}},
                    "per_fold_dp_difference": per_fold,
                    "roc_auc": statistics.fmean(p["roc_auc"] for p in parts),
                    "accuracy": statistics.fmean(p["accuracy"] for p in parts),
                    "seconds": round(time.perf_counter() - t0, 1)}
                d, iv = fig["disparity"], fig["disparity_interval"]
                sel = {g: f["selection_rate"] for g, f in fig["groups"].items()}
                print(f"seed {seed} {name:9s}: DP difference {d['demographic_parity_difference']:.3f} "
                      f"[{iv['demographic_parity_difference'][0]:.3f}, {iv['demographic_parity_difference'][1]:.3f}]"
                      f"  ratio {d['demographic_parity_ratio']:.3f}  EO difference {d['equalized_odds_difference']:.3f}"
                      f"  selection " + ", ".join(f"{g} {v:.3f}" for g, v in sel.items())
                      + f"  ROC-AUC {entry[name]['roc_auc']:.4f}  accuracy {entry[name]['accuracy']:.4f}"
                      f"  ({entry[name]['seconds']:.0f} s)", flush=True)
            report["seeds"].append(entry)
    plain = [s["plain"]["pooled"]["disparity"]["demographic_parity_difference"] for s in report["seeds"]]
    fair = [s["reweighed"]["pooled"]["disparity"]["demographic_parity_difference"] for s in report["seeds"]]
    folds_plain = [v for s in report["seeds"] for v in s["plain"]["per_fold_dp_difference"]]
    folds_fair = [v for s in report["seeds"] for v in s["reweighed"]["per_fold_dp_difference"]]
    lower = sum(f < p for f, p in zip(folds_fair, folds_plain, strict=True))
    summary = {"dp_difference_plain_mean": statistics.fmean(plain),
               "dp_difference_reweighed_mean": statistics.fmean(fair),
               "ratio_reweighed_to_plain": statistics.fmean(fair) / statistics.fmean(plain) if statistics.fmean(plain)
               else None, "seeds_lower": sum(f < p for f, p in zip(fair, plain, strict=True)),
               "folds_lower": lower, "folds": len(folds_plain),
               "roc_auc_plain": statistics.fmean(s["plain"]["roc_auc"] for s in report["seeds"]),
               "roc_auc_reweighed": statistics.fmean(s["reweighed"]["roc_auc"] for s in report["seeds"])}
    report["summary"] = summary
    print(f"\nDP difference (sex), pooled over folds, mean over {len(plain)} seeds: plain "
          f"{summary['dp_difference_plain_mean']:.3f}, reweighed {summary['dp_difference_reweighed_mean']:.3f} "
          f"(ratio {summary['ratio_reweighed_to_plain']:.2f}); lower in {summary['seeds_lower']}/{len(plain)} seeds "
          f"and {lower}/{len(folds_plain)} folds; ROC-AUC plain {summary['roc_auc_plain']:.4f}, reweighed "
          f"{summary['roc_auc_reweighed']:.4f}")
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = Path(args.out or REPO / "benchmarks" / "results" / f"fairness-{stamp}.json")
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
