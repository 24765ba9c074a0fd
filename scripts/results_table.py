"""README.md's results table, made from the benchmark results in benchmarks/results/*.json.

Each file there is one benchmark run, named <benchmark>-<UTC time>.json by the benchmark that wrote it; the
files are the history and are never edited. The table has one row per benchmark and variant, from the newest
file of that variant (by the time in its name). A variant is a benchmark's recorded options except those that
only size or place the sample: how many repetitions or seeds, which systems or servers ran beside kiln, the
seconds per load point, the run directory served. So rerunning `bench_mnist_speed.py --reps 5` replaces the
`--reps 3` row, while `--threads 1` or a `--set` override keeps a row of its own. Development runs that a
benchmark marks as such (`bench_tables.py --variant`: screens of levers against the examples; `--no-default`:
baselines alone) stay history, not rows. A run of part of a benchmark (`bench_tables.py --config X`) gives way
to a newer run of the whole that includes X.

    python scripts/results_table.py            # rewrite the table between the markers in README.md
    python scripts/results_table.py --check    # exit 1 if README.md's table is not what this would write

Standard library only (no torch, no kiln), so it runs in a fraction of a second.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
FILE_NAME = re.compile(r"(?P<benchmark>[a-z0-9_]+)-(?P<stamp>\d{8}T\d{6}Z)\.json")
SYSTEMS = {"kiln": "kiln", "kiln-fp32": "kiln fp32", "eager": "eager PyTorch", "keras": "Keras 3"}


class ResultsError(Exception):
    """A results file or README the table cannot be made from; the message names the file."""


@dataclass(frozen=True)
class Benchmark:
    script: str
    defaults: dict  # the script's argparse defaults: options at these are left out of the command
    not_variant: frozenset  # options that only size or place the sample; any other option, new ones too, splits rows
    options: Callable[[dict], dict]  # the run's options from its JSON, named as the script's flags
    cells: Callable[[dict, dict], tuple[str, str, str]]  # (what was measured, result, conditions)
    shown: Callable[[dict], bool] = lambda options: True  # False: a development run, kept as history, not a row
    # (newer, older) -> True where the newer run measured all that the older one did (the older row is dropped)
    covers: Callable[[Result, Result], bool] = lambda newer, older: False


class Result(NamedTuple):
    stamp: str  # the UTC time in the file's name: YYYYMMDDTHHMMSSZ, so it sorts as text
    path: Path
    options: dict
    variant: dict
    data: dict


# ---- formatting --------------------------------------------------------------------------------

def spread(values: list[float], digits: int = 2) -> str:
    """Median, with min-max when there is more than one value."""
    med = f"{statistics.median(values):.{digits}f}"
    return med if len(values) == 1 else f"{med} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def pct(fraction: float) -> str:
    return f"{fraction * 100:.2f}%"


def machine(hw: dict | None) -> str:
    if not hw:
        return "CPU not recorded"
    isa = f" ({', '.join(hw['isa'])})" if hw.get("isa") else ""  # CPUs of one name differ: AVX-512 or not
    return f"{hw.get('cpu') or hw['machine']}{isa}, {hw['cores']} cores, Python {hw['python']}"


def threads(n: int | None, actual: int | None = None) -> str:
    if n:
        return plural(n, "thread")
    return "default threads" + (f" ({actual})" if actual else "")


def flags(benchmark: Benchmark, options: dict) -> list[str]:
    """The command-line words that give these options, leaving out those at the script's defaults."""
    words = []
    for name, value in options.items():
        if value in (None, [], False) or value == benchmark.defaults.get(name):
            continue
        if name == "overrides":  # recorded as a list, given as one --set per override
            words += [f"--set {o}" for o in value]
            continue
        if value is True:  # a switch: its flag alone
            words.append(f"--{name.replace('_', '-')}")
            continue
        values = value if isinstance(value, list) else [value]
        words += [f"--{name.replace('_', '-')}", *(f"{v:g}" if isinstance(v, float) else str(v) for v in values)]
    return words


def plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


# ---- the benchmarks' formats -------------------------------------------------------------------

def mnist_speed_options(data: dict) -> dict:
    # --worker, --data and --seed are the driver's arguments to its worker processes, not the user's
    return {k: v for k, v in data["args"].items() if k not in ("worker", "data", "seed")}


def mnist_speed_cells(data: dict, options: dict) -> tuple[str, str, str]:
    summary, results = data["summary"], data["results"]
    labels = [SYSTEMS.get(s, s) for s in summary]
    what = (f"seed_hybrid training on MNIST, {plural(options['epochs'], 'epoch')}, batch 64, Adam 1e-3: "
            + " vs ".join(labels))
    result = (f"seconds per epoch, median (min-max) of {plural(options['reps'], 'seed')}: "
              + ", ".join(f"{SYSTEMS.get(s, s)} {spread(v['seconds_per_epoch'])}" for s, v in summary.items())
              + "".join(f"; kiln **{r:.2f}x** faster than {SYSTEMS.get(s, s)}" for s, r in data["kiln_speedup"].items())
              + "; median test accuracy "
              + " / ".join(pct(v["test_accuracy_median"]) for v in summary.values()))
    kiln, inference = results.get("kiln", []), summary.get("kiln", {}).get("inference", {})
    if kiln and "train_flop_per_sample" in kiln[0]:  # recorded since the FLOP count was added
        achieved = [kiln[0]["train_flop_per_sample"] * r["train_samples"] * options["epochs"] / r["train_seconds"] / 1e9
                    for r in kiln]
        peak = statistics.median(a / r["peak_gflops"] for a, r in zip(achieved, kiln, strict=True))
        result += (f"; kiln trains at {statistics.median(achieved):.1f} GFLOP/s, {peak * 100:.1f}% of the measured "
                   f"fp32 peak, predicts {inference['predict_samples_per_s']:,.0f} samples/s, batch-1 latency p50 "
                   f"{inference['batch1_latency_ms_p50']:.2f} ms")
    versions = {k: v for r in results.values() for k, v in r[0]["versions"].items()}
    conditions = f"{machine(data['hardware'])}; " + ", ".join(f"{k} {v}" for k, v in versions.items())
    conditions += f"; {threads(options['threads'], inference.get('threads'))}"
    if kiln and "precision" in kiln[0]:
        conditions += f"; kiln in {kiln[0]['precision'].split(' ')[0]}"
    return what, result, conditions


def time_to_accuracy_options(data: dict) -> dict:
    options = {k: v for k, v in data["args"].items() if k != "flops"}  # --flops: the driver's own worker call
    config = Path(options["config"])  # recorded absolute: from the repository root, as the command takes it
    options["config"] = str(Path("examples", config.name) if config.parent.name == "examples" else config)
    return options


def time_to_accuracy_cells(data: dict, options: dict) -> tuple[str, str, str]:
    runs, flops = data["runs"], data["flops"]
    walls = [r["wall_seconds"] for r in runs]
    gflops = statistics.median(flops["train_flop_per_sample"] * flops["samples_trained"] / r["train_seconds"] / 1e9
                               for r in runs)
    what = (f"`kiln train {options['config']}`: wall time from start to printed test accuracy (imports, data, "
            f"training, evaluation); goal {options['target'] * 100:g}% in {options['budget']:g} s")
    result = (f"**{data['hits']} of {len(runs)} seeds** reached the goal; test accuracy "
              f"{spread([r['test_accuracy'] * 100 for r in runs])}%; wall {spread(walls, 1)} s, of which the "
              f"training loop {spread([r['train_seconds'] for r in runs], 1)} s; the loop at {gflops:.1f} GFLOP/s, "
              f"{gflops / flops['peak_gflops'] * 100:.1f}% of the measured fp32 peak")
    conditions = (f"{machine(data['hardware'])}; torch {flops['torch']}, kiln {flops['kiln']}; "
                  f"{threads(None, flops['threads'])}")
    return what, result, conditions


def nanogpt_options(data: dict) -> dict:
    # Files written before the options were recorded hold only the thread count; they ran the default seed.
    options = data.get("args", {"threads": data["threads"]})
    return {"reps": len(data["results"]["kiln"]),
            **{k: v for k, v in options.items() if k not in ("reps", "worker", "floor")}}


def nanogpt_cells(data: dict, options: dict) -> tuple[str, str, str]:
    results = data["results"]
    loss = {name: [r["val_loss"] for r in rs] for name, rs in results.items()}
    secs = {name: [r["loop_seconds"] for r in rs] for name, rs in results.items()}
    what = ("nanoGPT's CPU configuration (Tiny Shakespeare, characters, 2000 steps): kiln "
            "(`examples/shakespeare_char.yaml`) vs a plain nanoGPT-style PyTorch loop")
    result = (f"val loss, median (min-max) of {plural(options['reps'], 'run')}: kiln {spread(loss['kiln'], 3)}, plain "
              f"{spread(loss['plain'], 3)}; training loop kiln {spread(secs['kiln'], 1)} s, plain "
              f"{spread(secs['plain'], 1)} s: plain / kiln "
              f"{statistics.median(secs['plain']) / statistics.median(secs['kiln']):.2f}x")
    if options.get("jobs", 1) > 1:
        result += f" ({options['jobs']} runs at a time: the seconds are no speed comparison)"
    if all("full_val_loss" in r for rs in results.values() for r in rs):  # recorded since both measure it
        exact = {name: [r["full_val_loss"] for r in rs] for name, rs in results.items()}
        result += (f"; exact val loss (every held-out token; the figures above are 20-batch estimates): kiln "
                   f"{spread(exact['kiln'], 4)}, plain {spread(exact['plain'], 4)}")
    floor = data.get("compute_floor")  # recorded since the floor was measured
    if floor:
        result += (f"; compute floor {floor['tflop']:.2f} TFLOP, at least {floor['floor_seconds']:.0f} s at the best "
                   f"fp32 matmul rate ({max(floor['fp32_gflops'].values()):.0f} GFLOP/s)")
    conditions = (f"{machine(data.get('hardware'))}; torch {data['torch']}; "
                  f"{threads(options['threads'], results['kiln'][0]['threads'])}")
    return what, result, conditions


def serve_options(data: dict) -> dict:
    s = data["settings"]
    return {"run": s["run"], "duration": s["duration_s"], "warmup": s["warmup_s"], "concurrency": s["concurrency"],
            "servers": list(dict.fromkeys(r["server"] for r in data["results"])), "max_batch": s["max_batch"],
            "max_wait_ms": s["max_wait_ms"]}


def serve_cells(data: dict, options: dict) -> tuple[str, str, str]:
    by = {(r["server"], r["concurrency"]): r for r in data["results"]}
    top, low, servers = max(options["concurrency"]), min(options["concurrency"]), options["servers"]
    s, env = data["settings"], data["environment"]
    kiln, plain = [x for x in servers if x != "plain-fastapi"], by.get(("plain-fastapi", top))
    what = (f"`kiln serve` ({', '.join(kiln)})" + (" vs a plain FastAPI endpoint" if plain else "") + ": "
            f"{s['payload']}; {s['load_generator']}; {options['duration']:g} s per point")
    result = f"at concurrency {top}: " + ", ".join(
        f"{x} {by[x, top]['rps']:,.0f} req/s (p99 {by[x, top]['p99_ms']:.0f} ms)" for x in servers)
    if plain and plain["rps"]:
        result += (f"; {' / '.join(kiln)} **" + " / ".join(f"{by[x, top]['rps'] / plain['rps']:.1f}x" for x in kiln)
                   + "** the plain endpoint's req/s")
    result += (f"; at concurrency {low}, p50 " + " / ".join(f"{by[x, low]['p50_ms']:.2f}" for x in servers)
               + f" ms; {sum(r['errors'] for r in data['results'])} errors")
    conditions = (f"{env['cpu']}, {env['cores']} cores, Python {env['python']}; torch {env['torch']}, onnxruntime "
                  f"{env['onnxruntime']}, FastAPI {env['fastapi']}, uvicorn {env['uvicorn']}, kiln {env['kiln']}; "
                  f"load average {env['load_average_at_start'][0]:.1f} at start")
    return what, result, conditions


def timeseries_options(data: dict) -> dict:
    return dict(data["args"])


def timeseries_cells(data: dict, options: dict) -> tuple[str, str, str]:
    parts = []
    for name, r in data["results"].items():
        runs = r["runs"]
        model = [run["model"]["mase"] for run in runs]
        base = runs[0]
        ratios = r["model_mase_over"]
        parts.append(f"{name}: model MASE {spread(model, 3)}, naive {base['naive']['mase']:.3f}, seasonal naive "
                     f"{base['seasonal_naive']['mase']:.3f}, linear AR {base['linear_ar']['mase']:.3f} (model / "
                     f"seasonal naive **{ratios['seasonal_naive']:.2f}x**, / naive {ratios['naive']:.2f}x, / linear AR "
                     f"{ratios['linear_ar']:.2f}x); directional accuracy "
                     f"{spread([run['model']['directional_accuracy'] for run in runs], 3)} (up fraction "
                     f"{base['model']['up_fraction']:.3f})")
    what = ("time-series examples (`examples/airline.yaml`, `examples/msft_returns.yaml`): kiln's model vs naive, "
            "seasonal-naive and linear-AR forecasts of the same test windows"
            + (f", {options['folds']} walk-forward folds" if options.get("folds") else ", one test part"))
    result = (f"test MASE, median (min-max) of {plural(len(options['seeds']), 'seed')}: " + "; ".join(parts))
    v = data["versions"]
    conditions = (f"{machine(data['hardware'])}; torch {v['torch']}, numpy {v['numpy']}, kiln {v['kiln']}; "
                  f"{threads(options.get('threads'))}")
    return what, result, conditions


def sms_spam_options(data: dict) -> dict:
    return time_to_accuracy_options(data)  # the same: args, with the config path from the repository root


SMS_NAMES = {"kiln": "kiln", "tfidf_word_lr": "TF-IDF words + LR", "tfidf_char_lr": "TF-IDF char n-grams + LR"}


def sms_spam_cells(data: dict, options: dict) -> tuple[str, str, str]:
    summary, n = data["summary"], len(options["seeds"])
    what = (f"SMS spam, `{options['config']}` vs TF-IDF + logistic regression (words; character 2-5-grams) on the "
            f"same stratified test split, {plural(n, 'seed')}")
    result = "ROC-AUC / spam F1, mean +- std: " + ", ".join(
        f"{SMS_NAMES.get(k, k)} {v['roc_auc']['mean']:.4f} +- {v['roc_auc']['std']:.4f} / {v['f1']['mean']:.3f}"
        for k, v in summary.items())
    result += "; kiln's ROC-AUC at least as good on " + ", ".join(
        f"**{w} of {n}** seeds against {SMS_NAMES.get(k, k)}" for k, w in data["kiln_at_least_as_good"].items())
    hw, v = data["hardware"], data["versions"]
    conditions = (f"{hw['cpu']}, {hw['cores']} cores, load average {hw['load_average'][0]:.1f}; "
                  + ", ".join(f"{k} {x}" for k, x in v.items()))
    return what, result, conditions


def tables_options(data: dict) -> dict:
    s = data["settings"]
    # Configs are recorded as given; from the repository root they are examples/<name>.
    configs = [str(Path("examples", Path(c).name)) if Path(c).parent.name == "examples" else c for c in s["config"]]
    return {**s, "config": configs, "variant": [f'"{v}"' for v in s["variant"]]}  # quoted, as a shell needs them


def tables_covers(newer: Result, older: Result) -> bool:
    """A run of some of the configs (--config) gives way to a newer run of the examples that includes them."""
    if "config" not in older.variant or newer.variant != {k: v for k, v in older.variant.items() if k != "config"}:
        return False
    return {Path(c).name for c in older.options["config"]} <= {Path(c).name for c in newer.data["tables"]}


def tables_cells(data: dict, options: dict) -> tuple[str, str, str]:
    c, tables = data["conditions"], data["tables"]
    names = {"kiln": "kiln", "hist_gradient_boosting": "HGB", "logistic_regression": "LR"}
    folds = f"{options['first_folds']} of {options['folds']}" if options.get("first_folds") else options["folds"]
    what = (f"tables, {folds} stratified folds"
            + (f", a {options['rows']:,}-row subsample" if options.get("rows") else "")
            + (f", each model with seeds {', '.join(map(str, options['seeds']))}" if options.get("seeds") else "")
            + ": ROC-AUC and PR-AUC of kiln's example configs vs scikit-learn's HistGradientBoosting (HGB) and "
              "logistic regression (LR), defaults")
    parts = []
    for config, t in tables.items():
        r = t["results"]
        hgb = r.get("hist_gradient_boosting", {}).get("roc_auc", {}).get("mean")
        cells = ", ".join(
            f"{names.get(n, n)} {v['roc_auc']['mean']:.4f} +- {v['roc_auc']['std']:.4f} (PR {v['pr_auc']['mean']:.3f})"
            + (f" **{v['roc_auc']['mean'] - hgb:+.4f}**" if hgb is not None and n.startswith("kiln") else "")
            + (f" [seeds {' / '.join(f'{x:.4f}' for x in v['roc_auc']['seeds'])}]" if "seeds" in v["roc_auc"] else "")
            for n, v in r.items())
        parts.append(f"{Path(config).stem} ({t['rows']:,} rows): {cells}")
    over = "over folds (of the seeds' mean; each seed's mean in brackets)" if options.get("seeds") else "over folds"
    result = f"ROC-AUC mean +- std {over} (PR-AUC mean), kiln minus HGB in bold: " + "; ".join(parts)
    conditions = (f"{c['cpu']}, {c['cores']} cores, Python {c['python']}; torch {c['torch']}, scikit-learn "
                  f"{c['scikit-learn']}, kiln {c['kiln']}")
    return what, result, conditions



def settings_options(data: dict) -> dict:
    """The options a script recorded under "settings", but where it wrote its output."""
    return {k: v for k, v in data["settings"].items() if k != "out"}


def tune_cells(data: dict, options: dict) -> tuple[str, str, str]:
    r, c, seeds = data["results"], data["conditions"], options["fresh_seeds"]
    what = (f"`kiln tune examples/german_credit.yaml --space examples/german_credit_space.yaml --trials "
            f"{options['trials']} --folds {options['folds']}` (TPE, {options['pruner']} pruner), then the hand-set "
            f"example and the best config each scored on {options['folds']} stratified folds of fresh seeds "
            f"({', '.join(map(str, seeds))}) that the tuning never saw")

    def roc(name: str, key: str) -> str:
        m = r[name][key]["roc_auc"]
        return f"{m['mean']:.4f} +- {m['sd']:.4f}"

    n = len(data["fresh_paired_differences"])
    result = (f"ROC-AUC mean +- sd over {n} fresh folds: tuned {roc('tuned', 'fresh_folds')}, hand-set "
              f"{roc('hand_set', 'fresh_folds')}: **{data['fresh_gain_roc_auc']:+.4f}**, tuned better on "
              f"{data['fresh_folds_won']} of {n} folds; on the tuning's own folds (optimistic for the tuned config) "
              f"{roc('tuned', 'same_folds')} vs {roc('hand_set', 'same_folds')}; tuning "
              f"{data['tune']['seconds']:.0f} s ({', '.join(f'{v} {k}' for k, v in data['tune']['trials'].items())})")
    conditions = (f"{c['cpu']}, {c['cores']} cores, Python {c['python']}; torch {c['torch']}, optuna {c['optuna']}, "
                  f"kiln {c['kiln']}; 1 thread")
    return what, result, conditions


def movielens_options(data: dict) -> dict:
    c = data["conditions"]
    parts = data.get("parts") or ["ranking"]  # recorded since --parts exists; the first file holds the ranking only
    return {"seeds": c["seeds"], "threads": c["threads"], "parts": ",".join(parts)}


RANKERS = {"popularity": "popularity", "item_knn": "item-kNN", "als": "ALS (implicit)",
           "matrix_factorization": "kiln matrix factorisation", "two_tower": "kiln two-tower"}


def movielens_cells(data: dict, options: dict) -> tuple[str, str, str]:
    d = data["data"]
    what = (f"MovieLens latest-small, `{data['config']}`, each user's last interactions held out ({d['users']} users, "
            f"{d['items']:,} items ranked per user): kiln vs popularity, item-kNN and ALS on the same split and metric "
            f"function, {plural(options['seeds'], 'seed')} for kiln")
    parts = []
    if "kiln" in data:
        pop = data["baselines"]["popularity"]["ndcg@10"]
        rows = {**data["baselines"], **data["kiln"]}
        parts.append("test NDCG@10 / Recall@10 / hit rate@10: " + ", ".join(
            f"{RANKERS.get(k, k)} {v['ndcg@10']:.4f}"
            + (f" +- {v['std']['ndcg@10']:.4f} (**{v['ndcg@10'] / pop:.2f}x** popularity)" if "std" in v else "")
            + f" / {v['recall@10']:.4f} / {v['hit_rate@10']:.3f}" for k, v in rows.items()))
    if "rating" in data:
        r = data["rating"]
        parts.append(f"ratings: test RMSE kiln matrix factorisation {r['kiln_matrix_factorization_rmse']:.3f} +- "
                     f"{r['std']:.3f} stars, global mean {r['global_mean']:.3f}, user+item biases "
                     f"{r['user_item_bias']:.3f}")
    c = data["conditions"]
    conditions = f"{c['cpu']}, Python {c['python']}; torch {c['torch']}; {threads(c['threads'])}"
    return what, "; ".join(parts), conditions


def cifar_options(data: dict) -> dict:
    return {k: v for k, v in data["args"].items() if k not in ("worker", "seed")}


def cifar_cells(data: dict, options: dict) -> tuple[str, str, str]:
    summary = data["summary"]
    what = (f"`examples/cifar10_small.yaml` (small ResNet, {plural(data['epochs'], 'epoch')} on 5,000 CIFAR-10 photos "
            "with the example's augmentation): " + " vs ".join(SYSTEMS.get(s, s) for s in summary))
    result = (f"seconds per epoch, median of {plural(options['reps'], 'run')}: "
              + ", ".join(f"{SYSTEMS.get(s, s)} {v['seconds_per_epoch_median']:.2f}" for s, v in summary.items())
              + "".join(f"; {SYSTEMS.get(s, s)} / kiln **{r:.2f}x**" for s, r in data["kiln_speedup"].items())
              + "; test accuracy " + " / ".join(pct(v["test_accuracy_median"]) for v in summary.values()))
    hw = data["hardware"]
    conditions = (f"{machine(hw)}; {threads(options['threads'])}; load average {hw['load_average_1m_at_end']:.1f} "
                  "at the end")
    return what, result, conditions


def fairness_cells(data: dict, options: dict) -> tuple[str, str, str]:
    c, s, seeds = data["conditions"], data["summary"], data["seeds"]
    what = (f"German credit: demographic-parity difference for sex (personal_status_and_sex mapped; selection = "
            f"decided bad), `examples/german_credit_fair.yaml` (reweighing on sex) vs `examples/german_credit.yaml`, "
            f"{options['folds']} stratified folds pooled per seed (every loan decided once), "
            f"{plural(len(seeds), 'seed')}")
    per_seed = "; ".join(
        f"seed {e['seed']}: " + " vs ".join(
            f"{e[n]['pooled']['disparity']['demographic_parity_difference']:.3f} "
            f"[{e[n]['pooled']['disparity_interval']['demographic_parity_difference'][0]:.3f}, "
            f"{e[n]['pooled']['disparity_interval']['demographic_parity_difference'][1]:.3f}]"
            for n in ("plain", "reweighed")) for e in seeds)
    result = (f"mean DP difference plain {s['dp_difference_plain_mean']:.3f}, reweighed "
              f"**{s['dp_difference_reweighed_mean']:.3f}**; lower in {s['seeds_lower']}/{len(seeds)} seeds and "
              f"{s['folds_lower']}/{s['folds']} folds; ROC-AUC {s['roc_auc_plain']:.4f} vs {s['roc_auc_reweighed']:.4f}. "
              f"Per seed, plain vs reweighed with bootstrap 95% intervals: {per_seed}")
    conditions = (f"{c['cpu']}, {c['cores']} cores, Python {c['python']}; torch {c['torch']}, fairlearn "
                  f"{c['fairlearn']}, kiln {c['kiln']}")
    return what, result, conditions


def explain_cells(data: dict, options: dict) -> tuple[str, str, str]:
    m, g, h = data["mnist_seed"], data["german_credit"], data["hardware"]
    what = (f"Model-randomisation sanity check (Adebayo et al. 2018): Spearman correlation of the attributions of the "
            f"seed model ({m['epochs']} epoch, test accuracy {m['test_accuracy']:.4f}) and of it re-initialised, "
            f"{m['digits']} MNIST digits (absolute maps over the digit's pixels); German credit global importance")
    per = "; ".join(f"{name} {r['abs_on_digit_spearman_mean']:.3f} (signed {r['signed_spearman_mean']:.3f})"
                    for name, r in m["methods"].items())
    first = ", ".join(f"{name} {r['ranking'][0]}" for name, r in g["methods"].items())
    result = f"mean correlation, all below 0.5: {per}; German credit's first column by method: {first}"
    conditions = f"{h['cpu']}, {h['threads']} threads, Python {h['python']}; torch {h['torch']}, captum {h['captum']}"
    return what, result, conditions


def compress_options(data: dict) -> dict:
    return dict(data["args"])


def compress_cells(data: dict, options: dict) -> tuple[str, str, str]:
    models = data["models"]
    what = ("`kiln compress` (pruning, int8, distillation) of " + " and ".join(
        f"`{m['config']}`" + (f" (original: {', '.join(f'{k}={v}' for k, v in m['original_overrides'].items())})"
                              if m.get("original_overrides") else "") for m in models.values())
            + ": file size, test accuracy, batch-64 latency against the original on kiln's predict path / ONNX Runtime")
    parts = []
    for name, m in models.items():
        rows = m["rows"]
        cells = [f"original {pct(rows[0]['test_accuracy'])}, {rows[0]['file_bytes'] / 1024:.0f} KB"]
        for r in rows[1:]:
            f = r.get("faster", {}).get("batch_64", {})
            cells.append(f"{r['variant']}: {r['smaller']:.1f}x smaller, {f.get('kiln', 0):.2f}x / "
                         f"{f.get('onnxruntime', 0):.2f}x faster, {pct(r['test_accuracy'])}"
                         + (" **goal met**" if r.get("meets_goal") else ""))
        parts.append(f"{name}: " + "; ".join(cells))
    return what, " / ".join(parts), f"{machine(data['conditions'])}; 1 thread, {options['rounds']} interleaved rounds"
def transfer_options(data: dict) -> dict:
    return dict(data["args"])


def transfer_cells(data: dict, options: dict) -> tuple[str, str, str]:
    summary, n = data["summary"], len(options["seeds"])
    ft, sc = summary["finetune"], summary["scratch"]
    frozen = f"blocks {options['freeze']}" if options.get("freeze") else "its convolution"
    what = (f"Fashion-MNIST fine-tuned from an MNIST run of the seed model (`examples/fashion_from_mnist.yaml`, "
            f"{frozen} frozen, a new head) vs from scratch (`examples/fashion_mnist.yaml`), same recipe, "
            f"{plural(options['epochs'], 'epoch')}, 10% validation split, {plural(n, 'seed')}")
    reach = "; ".join(f"{float(t) * 100:g}%: fine-tuned {_epochs(ft['epochs_to_target'][t])} vs scratch "
                      f"{_epochs(sc['epochs_to_target'][t])}" for t in ft["epochs_to_target"])
    first = ft["val_accuracy_median_by_epoch"][0], sc["val_accuracy_median_by_epoch"][0]
    shown = [_bold(pct(a), a > b) for a, b in (first, first[::-1])]  # the better one in bold
    result = (f"epochs to a validation accuracy, per seed (- never): {reach}; median validation accuracy after epoch "
              f"1: fine-tuned {shown[0]} vs {shown[1]}"
              f"; final test accuracy {pct(ft['test_accuracy_median'])} vs {pct(sc['test_accuracy_median'])}; "
              f"seconds per epoch, scratch / fine-tuned: {data['scratch_over_finetune_seconds_per_epoch']:.2f}x")
    hw = data["hardware"]
    conditions = (f"{hw['cpu']}, {hw['cores']} cores, Python {hw['python']}, load average "
                  f"{hw['load_average_1m_at_end']:.1f} at the end; torch {data['torch']}")
    return what, result, conditions


def _bold(text: str, bold: bool) -> str:
    return f"**{text}**" if bold else text


def _epochs(per_seed: list) -> str:
    return ", ".join("-" if e is None else str(e) for e in per_seed)


def privacy_options(data: dict) -> dict:
    runs = [k for k in data["runs"] if k.startswith("epsilon_")]
    args = data.get("args", {})
    return {"epsilons": [float(k.removeprefix("epsilon_")) for k in runs] or args.get("epsilons", []),
            "epochs": args.get("epochs"), "threads": data["threads"], "step_repeats": data["step_time"]["repeats"],
            "skip_runs": not data["runs"]}


def privacy_cells(data: dict, options: dict) -> tuple[str, str, str]:
    runs, step = data["runs"], data["step_time"]
    what = (f"MNIST with differential privacy (DP-SGD through Opacus), `{data['config']}` "
            f"({plural(data['epochs'], 'epoch')}, batch {data['batch_size']}, delta 1e-5, PRV accountant) at each "
            "epsilon, against the same network without privacy")
    parts = []
    for key, r in runs.items():
        p = r.get("privacy")
        label = (f"epsilon {key.removeprefix('epsilon_')} (spent {p['epsilon']:.2f}, noise "
                 f"{p['noise_multiplier']:.2f})" if p else "no privacy")
        parts.append(f"{label} **{pct(r['test_accuracy'])}**")
    # Whole runs follow one another, so their times follow the machine's load; the cost is the alternated steps'.
    result = ("test accuracy: " + "; ".join(parts) + "; " if parts else "") + (
        f"time cost: one training step of {step['batch']} private / plain **{step['ratio_private_over_plain']:.2f}x** "
        f"(median of {step['repeats']}, alternated: {step['median_ms']['private']:.0f} / "
        f"{step['median_ms']['plain']:.0f} ms)")
    conditions = (f"{data['cpu']}, Python {data['python']}; torch {data['torch']}, opacus {data['opacus']}, "
                  f"kiln {data['kiln']}; {threads(options['threads'])}")
    return what, result, conditions


def streaming_cells(data: dict, options: dict) -> tuple[str, str, str]:
    a, h = data["args"], data["hardware"]
    if a.get("no_training"):  # reading alone: rows per second with 1 and 2 reader threads
        rates = data["reading_rows_per_s_median"]
        what = f"reading {a['rows']:,} rows from {a['shards']} Parquet shards, no training, by 1 and 2 reader threads"
        result = (f"{rates['1'] / 1e6:.2f}M rows/s with 1 reader, {rates['2'] / 1e6:.2f}M with 2: "
                  f"**{rates['2'] / rates['1']:.2f}x**")
        return what, result, (f"{h['cpu']}, Python {h['python']}; pyarrow {h['pyarrow']}; median of {a['rounds']} "
                              "rounds")
    s = data["summary"]
    what = (f"a table streamed from {a['shards']} Parquet shards ({a['rows']:,} rows, {a['epochs']} epoch) against the "
            "same rows read into memory (`data.stream: false`), same config")
    loop = data.get("loop_speed_ratio")
    result = (f"streaming speed / in-memory: end to end **{data['speed_ratio']:.2f}**"
              + (f", training loop **{loop:.2f}**" if loop is not None else "")
              + f"; peak RSS {s['stream']['peak_rss_mb_max']:.0f} MB streamed, {s['memory']['peak_rss_mb_max']:.0f} MB "
              f"in memory; test accuracy {pct(s['stream']['test_accuracy'])} / {pct(s['memory']['test_accuracy'])}")
    for key, name in (("stream_workers2", "2 readers (`data.workers: 2`)"), ("stream_nproc2", "2 processes")):
        if key in s:  # recorded since streams take readers and processes
            result += f"; streamed with {name} / in memory: end to end {s[key]['speed_vs_memory']:.2f}"
    conditions = (f"{h['cpu']}, {h['threads']} thread, Python {h['python']}; torch {h['torch']}, pyarrow "
                  f"{h['pyarrow']}; median of {a['rounds']} interleaved rounds")
    return what, result, conditions


def generate_serve_options(data: dict) -> dict:
    return dict(data["args"])


def generate_serve_cells(data: dict, options: dict) -> tuple[str, str, str]:
    m, h, results = data["model"], data["hardware"], data["results"]
    what = (f"`kiln serve` generating text ({m['name']}, {m['parameters']:,} parameters, context {m['context']}): "
            f"tokens/s of {options['requests']} requests of {options['max_tokens']} sampled tokens, OpenAI's "
            "/v1/completions (continuous batching) and kiln's /v1/predict (same engine) vs one request at a time "
            "(Run.generate in process)")
    cells = [f"{r['system']} at concurrency {r['concurrency']}: {r['tokens_per_s']:,.0f} tokens/s "
             f"({r['vs_one_at_a_time']:.2f}x)" for r in results]  # medians over the interleaved rounds
    same = [r["identical"] for r in results if r["identical"] is not None]
    result = ("; ".join(cells) + f"; **{data['speedup']['completions_vs_one_at_a_time']:.1f}x** one at a time; "
              f"texts identical to Run.generate's with the same seed: {sum(same)}/{options['requests'] * len(same)}")
    conditions = (f"{h['cpu']}, {h['cores']} cores, {h['threads']} thread, Python {h['python']}; torch {h['torch']}, "
                  f"kiln {h['kiln']}; load average {h['load_average_at_start'][0]:.1f} at start")
    return what, result, conditions


def scaling_options(data: dict) -> dict:
    return dict(data["args"])


def scaling_cells(data: dict, options: dict) -> tuple[str, str, str]:
    c = data["conditions"]
    what = (f"`kiln train --nproc 2` ({options['parallel']}, {c['backend']}) against 1 process, same global batch: "
            "samples/s in the training loop; scaling efficiency = rate(2) / (2 x rate(1))")
    parts = []
    for name, m in data["models"].items():
        rates = ", ".join(f"{r['layout']} {r['samples_per_s']:,.0f}/s" for r in m["rows"])
        parts.append(f"{name} (batch {m['global_batch']}): {rates}; {m['speedup_2_processes']:.2f}x, "
                     f"{100 * m['scaling_efficiency']:.0f}% efficiency")
    hw = c["cuda"] or f"{c['cpu']}, {c['cores']} cores"
    return (what, "; ".join(parts),
            f"{hw}, {plural(options['threads'], 'thread')} per process, torch {c['torch']}, Python {c['python']}, "
            f"median of {options['reps']}")


def lm_fast_cells(data: dict, options: dict) -> tuple[str, str, str]:
    runs, s = data["runs"], data["summary"]
    what = ("Time to an exact held-out loss of 1.89 on Tiny Shakespeare (characters): "
            "`examples/shakespeare_char_fast.yaml` vs nanoGPT's configuration (`examples/shakespeare_char.yaml`), "
            "whole `kiln train` processes")
    parts = []
    for name in ("fast", "nanogpt"):
        loss = [r["exact_val_loss"] for r in runs[name]]
        wall = [r["wall_seconds"] for r in runs[name]]
        cpu = [r["cpu_seconds"] for r in runs[name]]
        parts.append(f"{name}: exact val loss {spread(loss, 4)}, wall {spread(wall, 1)} s, CPU {spread(cpu, 1)} s, "
                     f"{data['flops'][name]['tflop']:.2f} TFLOP ({s[name]['fraction_of_peak']:.0%} of peak)")
    result = (f"median (min-max) of {plural(len(runs['fast']), 'seed')}: " + "; ".join(parts)
              + f"; nanogpt / fast wall {s['speedup']:.2f}x, CPU {s['cpu_speedup']:.2f}x")
    loads = [r[k] for rs in runs.values() for r in rs for k in ("load_before", "load_after")]
    conditions = (f"{machine(data['hardware'])}; torch {data['torch']}; {threads(options['threads'])}; "
                  f"load average {min(loads):.1f}-{max(loads):.1f}")
    return what, result, conditions


BENCHMARKS = {
    "mnist_speed": Benchmark("benchmarks/bench_mnist_speed.py",
                             {"reps": 3, "epochs": 1, "systems": "kiln,eager,keras", "overrides": [], "threads": None,
                              "limit_train": None, "background_load": 0},
                             frozenset({"reps", "systems"}), mnist_speed_options, mnist_speed_cells),
    "time_to_accuracy": Benchmark("benchmarks/bench_time_to_accuracy.py",
                                  {"config": "examples/mnist_seed_99_fast.yaml", "seeds": [0, 1, 2], "target": 0.99,
                                   "budget": 30.0, "overrides": []},
                                  frozenset({"seeds"}), time_to_accuracy_options, time_to_accuracy_cells),
    "nanogpt": Benchmark("benchmarks/bench_nanogpt.py", {"reps": 2, "threads": None, "seed": 1337, "jobs": 1},
                         frozenset({"reps", "seed", "jobs"}), nanogpt_options, nanogpt_cells),
    "serve": Benchmark("benchmarks/bench_serve.py",
                       {"run": None, "duration": 20.0, "warmup": 2.0, "concurrency": [1, 8, 64],
                        "servers": ["kiln-torch", "kiln-onnx", "plain-fastapi"], "max_batch": 64, "max_wait_ms": 2.0},
                       frozenset({"run", "duration", "warmup", "concurrency", "servers"}), serve_options, serve_cells),
    "timeseries": Benchmark("benchmarks/bench_timeseries.py",
                            {"seeds": [0, 1, 2], "folds": None, "threads": None,
                             "examples": ["airline", "msft_returns"]},
                            frozenset({"seeds"}), timeseries_options, timeseries_cells),
    "sms_spam": Benchmark("benchmarks/bench_sms_spam.py",
                          {"config": "examples/sms_spam.yaml", "seeds": [0, 1, 2, 3, 4], "overrides": []},
                          frozenset({"seeds"}), sms_spam_options, sms_spam_cells),
    "movielens": Benchmark("benchmarks/bench_movielens.py", {"seeds": 2, "threads": 2, "parts": "ranking,rating"},
                           frozenset({"seeds"}), movielens_options, movielens_cells),
    "tables": Benchmark("benchmarks/bench_tables.py",
                        {"config": [], "folds": 5, "rows": None, "first_folds": None, "variant": [], "no_default": False,
                         "no_baselines": False},
                        frozenset({"seeds", "jobs"}), tables_options, tables_cells,
                        # runs with kiln variants (screens of levers) and baselines-only runs (--no-default): history
                        lambda options: not options["variant"] and not options["no_default"], tables_covers),
    "explain": Benchmark("benchmarks/bench_explain.py", {}, frozenset(), lambda data: {}, explain_cells),
    "fairness": Benchmark("benchmarks/bench_fairness.py", {"seeds": [0, 1, 2], "folds": 5, "bootstrap": 1000},
                          frozenset({"seeds", "bootstrap"}), settings_options, fairness_cells),
    "tune": Benchmark("benchmarks/bench_tune.py", {"trials": 30, "folds": 5, "fresh_seeds": [1, 2, 3],
                                                   "pruner": "median", "workers": 1},
                      frozenset({"fresh_seeds"}), settings_options, tune_cells),
    "cifar": Benchmark("benchmarks/bench_cifar.py", {"epochs": None, "reps": 1, "threads": 1, "systems": "kiln,eager"},
                       frozenset({"reps", "systems"}), cifar_options, cifar_cells),
    "compress": Benchmark("benchmarks/bench_compress.py",
                          {"model": ["mnist_seed", "german_credit"], "rounds": 15, "reuse": False},
                          frozenset({"rounds", "reuse"}), compress_options, compress_cells),
    "transfer": Benchmark("benchmarks/bench_transfer.py",
                          {"source_epochs": 3, "seeds": [0, 1], "epochs": 6, "freeze": None,
                           "targets": [0.85, 0.88, 0.9], "overrides": []},
                          frozenset({"seeds", "targets"}), transfer_options, transfer_cells),
    "privacy": Benchmark("benchmarks/bench_privacy.py",
                         {"epsilons": [3.0, 1.0, 8.0], "epochs": None, "threads": 1, "step_repeats": 30,
                          "skip_runs": False},
                         frozenset({"step_repeats"}), privacy_options, privacy_cells),
    "streaming": Benchmark("benchmarks/bench_streaming.py", {"rows": 2_000_000, "shards": 20, "rounds": 2, "epochs": 1,
                                                             "no_scaling": False, "no_training": False},
                           frozenset({"rounds"}), lambda data: dict(data["args"]), streaming_cells),
    "generate_serve": Benchmark("benchmarks/bench_generate_serve.py",
                                {"requests": 32, "max_tokens": 128, "concurrency": [1, 16], "run": None, "context": 256,
                                 "steps": 30, "rounds": 2},
                                frozenset({"requests", "run", "steps", "rounds"}), generate_serve_options, generate_serve_cells),
    "lm_fast": Benchmark("benchmarks/bench_lm_fast.py", {"seeds": [1337, 1338, 1339], "threads": None, "only": None},
                         frozenset({"seeds"}), lambda data: dict(data["args"]), lm_fast_cells),
    "scaling": Benchmark("benchmarks/bench_scaling.py",
                         {"reps": 2, "limit_train": 6000, "steps": 200, "threads": 1, "parallel": "ddp", "wide": False},
                         frozenset({"reps"}), scaling_options, scaling_cells),
}


# ---- the table ---------------------------------------------------------------------------------

@contextmanager
def format_errors(path: Path, name: str):
    """A file that lacks a field, or holds one of another type, is named in the error, not in a traceback."""
    try:
        yield
    except KeyError as e:
        raise ResultsError(f"{path}: not a {name} result as this script reads it: missing field {e}") from None
    except (IndexError, TypeError, ValueError, AttributeError) as e:
        raise ResultsError(f"{path}: not a {name} result as this script reads it: {type(e).__name__}: {e}") from None


def read(path: Path) -> tuple[str, Result]:
    """The benchmark name and the result of one file."""
    match = FILE_NAME.fullmatch(path.name)
    if not match:
        raise ResultsError(f"{path}: not named <benchmark>-<YYYYMMDDTHHMMSSZ>.json as the benchmarks write it")
    name = match["benchmark"]
    if name not in BENCHMARKS:
        raise ResultsError(f"{path}: unknown benchmark {name!r}; this script reads {', '.join(BENCHMARKS)}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ResultsError(f"{path}: cannot be read as JSON: {e}") from None
    with format_errors(path, name):
        options = BENCHMARKS[name].options(data)
    bench = BENCHMARKS[name]
    # An option at its default is no variant: a result from before the option existed is the same variant.
    variant = {k: v for k, v in options.items()
               if k not in bench.not_variant and v not in (None, [], False) and v != bench.defaults.get(k)}
    return name, Result(match["stamp"], path, options, variant, data)


def table(results: Path) -> str:
    paths = sorted(results.glob("*.json"))
    if not paths:
        raise ResultsError(f"{results}: no benchmark results (*.json) in it")
    newest: dict[tuple[str, str], Result] = {}
    for path in paths:
        name, r = read(path)
        if not BENCHMARKS[name].shown(r.options):
            continue
        key = (name, json.dumps(r.variant, sort_keys=True))
        if key not in newest or r.stamp > newest[key].stamp:
            newest[key] = r
    covered = {key for key, r in newest.items()
               if any(k[0] == key[0] and w.stamp > r.stamp and BENCHMARKS[key[0]].covers(w, r)
                      for k, w in newest.items())}
    newest = {key: r for key, r in newest.items() if key not in covered}

    def order(key: tuple[str, str]) -> tuple:
        # benchmarks in a fixed order; within one, the variant with fewest options changed from the defaults first
        name, variant = key
        changed = sum(v != BENCHMARKS[name].defaults.get(k) for k, v in newest[key].variant.items())
        return list(BENCHMARKS).index(name), changed, variant

    lines = ["| benchmark | result | conditions | command |", "|---|---|---|---|"]
    for key in sorted(newest, key=order):
        r, bench = newest[key], BENCHMARKS[key[0]]
        with format_errors(r.path, key[0]):
            what, result, conditions = bench.cells(r.data, r.options)
        changed = flags(bench, r.variant)  # what sets this row apart from the benchmark's default one
        if changed:
            what += f" (with `{' '.join(changed)}`)"
        when = datetime.strptime(r.stamp, "%Y%m%dT%H%M%SZ").replace(tzinfo=timezone.utc)
        conditions = f"{when:%Y-%m-%d %H:%M} UTC ({r.path.name}); {conditions}"
        cells = [what, result, conditions, f"`{' '.join(['python', bench.script, *flags(bench, r.options)])}`"]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def with_table(readme: Path, text: str, rows: str) -> str:
    """README's text with the part between the markers replaced by the table."""
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise ResultsError(f"{readme}: needs one line {BEGIN} and, after it, one line {END} around the results table")
    head, rest = text.split(BEGIN, 1)
    return f"{head}{BEGIN}\n{rows}{END}{rest.split(END, 1)[1]}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="only check that README.md's table is current")
    p.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results", help="folder of result files")
    p.add_argument("--readme", type=Path, default=ROOT / "README.md")
    args = p.parse_args()
    try:
        text = args.readme.read_text(encoding="utf-8")
        new = with_table(args.readme, text, table(args.results))
    except (OSError, ResultsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.check:
        if new != text:
            print(f"{args.readme}: the results table is not the one {args.results} gives; "
                  "run `python scripts/results_table.py` and commit README.md", file=sys.stderr)
            return 1
        return 0
    if new != text:
        args.readme.write_text(new, encoding="utf-8")
        print(f"wrote the results table into {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
