"""kiln's table configs against scikit-learn on the same stratified folds: German credit and bank marketing.

    KILN_DATA=../shared/data python benchmarks/bench_tables.py [--config examples/german_credit.yaml ...]
        [--folds 5] [--rows N] [--first-folds N] [--variant "NAME:key=value;key=value" ...] [--no-default]
        [--seeds 0 1 2] [--jobs 2]

For each config (default: examples/german_credit.yaml and examples/bank_marketing.yaml) every model is
scored on the same k stratified folds (seeded by the config's seed, as `kiln train --folds` draws them):
ROC-AUC and PR-AUC (average precision) on each fold's test rows, which no model sees before scoring. kiln
uses its own validation split (carved from the fold's training rows) for early stopping and the decision
threshold; the baselines train on all of the fold's training rows. Baselines, with default settings:
logistic regression on one-hot categories and standardised numbers, and HistGradientBoostingClassifier with
native categorical support. ``--variant`` adds kiln runs of the same config with overrides (the same ones
for every config), e.g. ``--variant ple:data.numeric_encoding=ple``; ``--rows`` trains and tests
on a stratified subsample (for development: quicker, noisier). ``--seeds`` repeats every model with each
seed (kiln's ``seed``, which draws its initial weights and batches, the folds staying the config's;
HistGradientBoosting's ``random_state``, which draws its early-stopping split): a difference smaller than
the seed-to-seed spread then shows as such. ``--jobs N`` runs the kiln models (each seed and variant) in N processes
at once, each with an equal share of the cores as ``train.threads`` (a small table's training uses a second thread
poorly: on 2 cores, bank marketing takes about 7.5 minutes a seed with two seeds at once on one thread each,
against 5 to 6 minutes a seed one after the other on two threads). Prints mean +- std over folds (with several
seeds: the mean over seeds and folds, the std over the folds of the seeds' mean, and each seed's mean) and kiln's difference to
HistGradientBoosting; writes benchmarks/results/tables-<time>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import signal
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

import kiln
from kiln.config import load_config, parse_set
from kiln.data.kind import find_data
from kiln.data.preprocess import fit
from kiln.data.splits import stratified_folds, stratified_holdout
from kiln.data.table import read_table
from kiln.hardware import cpu_model
from kiln.training.metrics import average_precision, roc_auc

REPO = Path(__file__).resolve().parents[1]
CONFIGS = [REPO / "examples" / "german_credit.yaml", REPO / "examples" / "bank_marketing.yaml"]
METRICS = ("roc_auc", "pr_auc")



def subsample(table, target: str, rows: int, seed: int, tmp: Path) -> Path:
    """A stratified subsample of ``rows`` rows written as a CSV (kiln reads it like the full file)."""
    _, keep = stratified_holdout(table.columns[target], rows / len(table), seed)
    path = tmp / "subsample.csv"
    import csv
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(table.columns)
        for i in keep.tolist():
            w.writerow(["" if v[i] is None else v[i] for v in table.columns.values()])
    return path


def baselines(table, cfg, folds, seed: int = 0) -> dict[str, list[dict[str, float]]]:
    from sklearn.compose import ColumnTransformer
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import OneHotEncoder, OrdinalEncoder, StandardScaler

    prep, _ = fit(table, cfg.data.target, cfg.data.task, dict(cfg.data.columns), cfg.data.positive)
    num = [c.name for c in prep.numeric if c.type == "numeric"]
    cat = [c.name for c in prep.columns if c.type != "numeric"]  # categorical and boolean columns
    x = np.array([[table.columns[c][i] for c in num + cat] for i in range(len(table))], dtype=object)
    x[:, :len(num)] = np.array([[np.nan if v is None else float(v) for v in row] for row in x[:, :len(num)]])
    x[:, len(num):] = np.where(x[:, len(num):] == None, "(missing)", x[:, len(num):])  # noqa: E711
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
                                           random_state=seed)),
    }
    results = {}
    for name, make in models.items():
        per_fold = []
        t0 = time.perf_counter()
        for test in folds:
            mask = np.ones(len(y), bool)
            mask[test] = False
            p = make().fit(x[mask], y[mask]).predict_proba(x[test])[:, 1]
            per_fold.append({"roc_auc": roc_auc(p, y[test]), "pr_auc": average_precision(p, y[test])})
        results[name] = {"folds": per_fold, "seconds": time.perf_counter() - t0}
    return results


def kiln_folds(cfg, overrides: dict, folds: int, tmp: Path, first: int | None, label: str = "") -> dict:
    per_fold = []
    t0 = time.perf_counter()
    for k in range(first or folds):
        with contextlib.redirect_stderr(io.StringIO()):  # the training log: the table below says what counts
            run = kiln.train(cfg, {**overrides, "data.folds": folds, "data.fold": k},
                             out=tmp / f"run_{time.monotonic_ns()}", live=False)
        per_fold.append({m: run.metrics["test"][m] for m in METRICS} | {"bins": run.config.data.bins})
        print(f"  {label}fold {k}: " + "  ".join(f"{m} {per_fold[-1][m]:.4f}" for m in METRICS)
              + f"  bins {run.config.data.bins}", flush=True)
    return {"folds": per_fold, "seconds": time.perf_counter() - t0}


def kiln_job(job: tuple) -> dict:
    """One kiln model over the folds in a worker process (``--jobs``): the config is read again there."""
    config, sets, overrides, folds, first, label = job
    with tempfile.TemporaryDirectory() as tmpdir:
        return kiln_folds(load_config(config, sets), overrides, folds, Path(tmpdir), first, label)


def run_kiln(jobs: list[tuple], workers: int) -> list[dict]:
    """Each (config, sets, overrides, folds, first, label) job's folds, in order, from ``workers`` processes at
    once, each given an equal share of the cores (train.threads, unless the overrides set it)."""
    if not jobs:
        return []
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from kiln.training.distributed import die_with_parent

    threads = max(1, (os.cpu_count() or 1) // workers)
    jobs = [(c, s, {"train.threads": threads, **o}, f, first, label) for c, s, o, f, first, label in jobs]
    # A worker ends with this process (killed, it would otherwise leave its workers training on, unseen)
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=die_with_parent,
                             initargs=(signal.SIGTERM, os.getpid())) as pool:
        return list(pool.map(kiln_job, jobs))


def summarise(per_seed: list[dict]) -> dict:
    """One model's folds (of each seed) to mean +- std over folds; with several seeds, each fold's value is its
    mean over the seeds, and each seed's own mean is kept."""
    first = per_seed[0]
    out = {"seconds": round(sum(r["seconds"] for r in per_seed), 1), "overrides": first.get("overrides", {})}
    if "bins" in first["folds"][0]:  # kiln's data.bins as each fold's run resolved it (auto follows the rows)
        out["bins"] = [f["bins"] for f in first["folds"]]
    for m in METRICS:
        values = [statistics.fmean(r["folds"][k][m] for r in per_seed) for k in range(len(first["folds"]))]
        out[m] = {"mean": statistics.fmean(values), "std": statistics.pstdev(values), "values": values}
        if len(per_seed) > 1:
            out[m]["seeds"] = [statistics.fmean(f[m] for f in r["folds"]) for r in per_seed]
    return out


def parse_variant(text: str) -> tuple[str, dict]:
    """``NAME:key=value;key=value``: values are YAML (``model.blocks=[{type: tabular_encoder}, ...]``)."""
    name, _, sets = text.partition(":")
    return name, parse_set([s for s in sets.split(";") if s.strip()])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", nargs="+", action="extend", default=[], help="table configs")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--rows", type=int, default=None, help="a stratified subsample of this many rows")
    ap.add_argument("--first-folds", type=int, default=None, help="score only the first N of the folds (development)")
    ap.add_argument("--variant", nargs="+", action="extend", default=[],
                    help="NAME:key=value;key=value (YAML values), one or more")
    ap.add_argument("--no-default", action="store_true", help="run only the variants, not the configs as they are")
    ap.add_argument("--no-baselines", action="store_true")
    ap.add_argument("--seeds", type=int, nargs="+", default=None,
                    help="run every model with each of these seeds (default: kiln the config's, HGB 0)")
    ap.add_argument("--jobs", type=int, default=1,
                    help="kiln runs (seeds, variants) in this many processes at once, the cores shared among them")
    ap.add_argument("--out", default=None, help="default: benchmarks/results/tables-<time>.json")
    args = ap.parse_args()
    if args.jobs < 1:
        ap.error("--jobs must be at least 1")

    import sklearn
    variants = ([] if args.no_default else [("kiln", {})]) + [
        (f"kiln_{n}", o) for n, o in map(parse_variant, args.variant)]
    conditions = {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
                  "torch": torch.__version__, "kiln": kiln.__version__, "scikit-learn": sklearn.__version__,
                  "numpy": np.__version__, "folds": args.folds, "rows": args.rows, "command": " ".join(sys.argv)}
    print(f"{conditions['cpu']}, {conditions['cores']} cores; torch {torch.__version__}, scikit-learn "
          f"{sklearn.__version__}, kiln {kiln.__version__}")
    settings = {"config": [str(c) for c in args.config], "folds": args.folds, "rows": args.rows,
                "first_folds": args.first_folds, "variant": args.variant, "no_default": args.no_default,
                "no_baselines": args.no_baselines, "seeds": args.seeds, "jobs": args.jobs}
    report = {"conditions": conditions, "settings": settings, "tables": {}}
    for config in args.config or CONFIGS:
        cfg, sets = load_config(config), {}
        with tempfile.TemporaryDirectory() as tmpdir:
            tmp = Path(tmpdir)
            table = read_table(find_data(cfg.data.path, cfg.data.root, "a table"))
            if args.rows and args.rows < len(table):
                sets = {"data.path": str(subsample(table, cfg.data.target, args.rows, cfg.seed, tmp))}
                cfg = load_config(config, sets)
                table = read_table(Path(cfg.data.path))
            # The same folds kiln's --folds uses: stratified by the target, seeded by the config's seed.
            folds = [f.numpy() for f in stratified_folds(table.columns[cfg.data.target], args.folds, cfg.seed)]
            print(f"\n{config}: {len(table)} rows, {args.folds} stratified folds (seed {cfg.seed})", flush=True)
            runs: dict[str, list[dict]] = {}  # per model, one result per seed
            jobs, names = [], []
            for seed in args.seeds or [None]:
                same = {} if seed is None else {"seed": seed, "data.split_seed": cfg.seed}  # the folds stay
                for name, overrides in variants:
                    print(f"{name} {({**overrides, **same}) or ''}", flush=True)
                    label = "" if args.jobs == 1 else f"{name}{'' if seed is None else f' seed {seed}'} "
                    job = (str(config), sets, {**overrides, **same}, args.folds, args.first_folds, label)
                    if args.jobs == 1:  # at once, so that each model's folds follow its line
                        runs.setdefault(name, []).append({**kiln_job(job), "overrides": overrides})
                    else:
                        jobs.append(job)
                        names.append((name, overrides))
            for (name, overrides), result in zip(names, run_kiln(jobs, args.jobs), strict=True):
                runs.setdefault(name, []).append({**result, "overrides": overrides})
            for seed in args.seeds or [None]:
                if not args.no_baselines:
                    for name, r in baselines(table, cfg, folds[:args.first_folds], seed or 0).items():
                        runs.setdefault(name, []).append(r)
        summary = {name: summarise(r) for name, r in runs.items()}
        hgb = summary.get("hist_gradient_boosting")
        print(f"{'model':28s} {'ROC-AUC mean +- std':>20s} {'PR-AUC mean +- std':>20s} {'ROC-AUC - HGB':>14s} "
              f"{'seconds':>8s}")
        for name, s in summary.items():
            diff = f"{s['roc_auc']['mean'] - hgb['roc_auc']['mean']:+.4f}" if hgb else ""
            seeds = "  seeds " + " ".join(f"{v:.4f}" for v in s["roc_auc"]["seeds"]) if "seeds" in s["roc_auc"] else ""
            print(f"{name:28s} {s['roc_auc']['mean']:>11.4f} +- {s['roc_auc']['std']:.4f} "
                  f"{s['pr_auc']['mean']:>11.4f} +- {s['pr_auc']['std']:.4f} {diff:>14s} {s['seconds']:>8.0f}{seeds}")
        report["tables"][str(config)] = {"config": cfg.to_dict(), "rows": len(table), "results": summary}
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = Path(args.out or REPO / "benchmarks" / "results" / f"tables-{stamp}.json")
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
