"""kiln's best tabular config against scikit-learn on the same 5 stratified folds of German credit.

    KILN_DATA=../shared/data python benchmarks/bench_german_credit.py [--config examples/german_credit.yaml]
        [--out bench_german_credit.json]

Each fold's test rows are never seen by any model before scoring. kiln uses its own validation split
(carved from the fold's training rows) for early stopping and the decision threshold; the baselines train
on all of the fold's training rows. Baselines: logistic regression on one-hot categories and standardised
numbers, and HistGradientBoostingClassifier with native categorical support; both with default settings.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import kiln
from kiln.config import load_config
from kiln.data.splits import stratified_folds
from kiln.data.preprocess import fit
from kiln.data.table import find_table, read_table
from kiln.training.metrics import roc_auc

REPO = Path(__file__).resolve().parents[1]
FOLDS = 5


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def baselines(table, cfg, folds):
    from sklearn.compose import ColumnTransformer
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import OneHotEncoder, OrdinalEncoder, StandardScaler

    prep, _ = fit(table, cfg.data.target, cfg.data.task, dict(cfg.data.columns), cfg.data.positive)
    num = [c.name for c in prep.numeric]
    cat = [c.name for c in prep.categorical]
    x = np.array([[table.columns[c][i] for c in num + cat] for i in range(len(table))], dtype=object)
    x[:, :len(num)] = x[:, :len(num)].astype(float)
    y = (np.array(table.columns[cfg.data.target]) == prep.target.classes[1]).astype(int)
    ni, ci = list(range(len(num))), list(range(len(num), len(num) + len(cat)))
    models = {
        "logistic_regression": lambda: make_pipeline(
            ColumnTransformer([("num", StandardScaler(), ni), ("cat", OneHotEncoder(handle_unknown="ignore"), ci)]),
            LogisticRegression(max_iter=2000)),
        "hist_gradient_boosting": lambda: make_pipeline(
            ColumnTransformer([("num", "passthrough", ni),
                               ("cat", OrdinalEncoder(handle_unknown="use_encoded_value", unknown_value=-1), ci)]),
            HistGradientBoostingClassifier(categorical_features=list(range(len(ni), len(ni) + len(ci))),
                                           random_state=0)),
    }
    results = {}
    for name, make in models.items():
        per_fold = []
        for test in folds:
            mask = np.ones(len(y), bool)
            mask[test] = False
            model = make().fit(x[mask], y[mask])
            p = model.predict_proba(x[test])[:, 1]
            per_fold.append({"roc_auc": roc_auc(p, y[test]), "accuracy": float(((p >= 0.5) == y[test]).mean())})
        results[name] = per_fold
    return results


def kiln_folds(config, overrides):
    per_fold = []
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(FOLDS):
            run = kiln.train(config, {**overrides, "data.folds": FOLDS, "data.fold": k},
                             out=Path(tmp) / f"fold_{k}", live=False)
            per_fold.append({m: run.metrics["test"][m] for m in ("roc_auc", "accuracy")})
    return per_fold


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(REPO / "examples" / "german_credit.yaml"))
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--out", default="bench_german_credit.json")
    args = ap.parse_args()

    cfg = load_config(args.config, args.overrides)
    table = read_table(find_table(cfg.data.path, cfg.data.root))
    # The same folds kiln's --folds uses: stratified by the target, seeded by the config's seed.
    folds = [f.numpy() for f in stratified_folds(table.columns[cfg.data.target], FOLDS, cfg.seed)]

    import sklearn

    t0 = time.perf_counter()
    results = {"kiln": kiln_folds(cfg, {})}
    kiln_seconds = time.perf_counter() - t0
    results.update(baselines(table, cfg, folds))

    summary = {name: {m: {"mean": statistics.fmean(f[m] for f in per_fold),
                          "std": statistics.pstdev(f[m] for f in per_fold),
                          "values": [f[m] for f in per_fold]} for m in ("roc_auc", "accuracy")}
               for name, per_fold in results.items()}
    conditions = {"cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                  "python": platform.python_version(), "torch": torch.__version__, "kiln": kiln.__version__,
                  "scikit-learn": sklearn.__version__, "numpy": np.__version__, "config": cfg.to_dict(),
                  "folds": FOLDS, "seed": cfg.seed, "kiln_seconds": round(kiln_seconds, 1),
                  "command": " ".join(sys.argv)}
    print(f"German credit, {FOLDS} stratified folds (seed {cfg.seed}); {conditions['cpu']}, {conditions['cores']} "
          f"cores; torch {torch.__version__}, scikit-learn {sklearn.__version__}, kiln {kiln.__version__}")
    print(f"kiln config: {args.config} {' '.join(args.overrides)}  ({kiln_seconds:.0f} s for {FOLDS} folds)")
    print(f"{'model':26s} {'ROC-AUC mean +- std':>22s} {'accuracy mean +- std':>22s}")
    for name, s in summary.items():
        print(f"{name:26s} {s['roc_auc']['mean']:>13.4f} +- {s['roc_auc']['std']:.4f} "
              f"{s['accuracy']['mean']:>13.4f} +- {s['accuracy']['std']:.4f}")
    Path(args.out).write_text(json.dumps({"conditions": conditions, "results": summary}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
