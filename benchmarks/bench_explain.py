"""Explanations of the seed model on MNIST and of German credit, every method side by side.

    KILN_DATA=../shared/data python benchmarks/bench_explain.py [--digits 20] [--epochs 1]

MNIST: trains examples/mnist_seed.yaml (``--epochs``), then for the first ``--digits`` test digits and each
method gives: seconds per digit (and the ratio to integrated gradients', measured one after the other in this
process), the model-randomisation sanity check (Adebayo et al. 2018: Spearman rank correlation between the maps
of the trained model and of the same architecture re-initialised; signed maps over all pixels, and absolute maps
over the digit's own pixels; mean and max over digits; below 0.5 passes), and integrated gradients' completeness
gap (|sum of attributions - (output - baseline output)| / |output - baseline output|). German credit: trains
examples/german_credit.yaml and ranks its columns globally over the test split with each method; prints the
top five per method and the Spearman agreement of each method's ranking with occlusion's. Writes
benchmarks/results/explain-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

import kiln
from kiln.explain import METHODS, attribute, explain_model
from kiln.hardware import cpu_model
from kiln.nn import build_model

REPO = Path(__file__).resolve().parents[1]


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import rankdata

    return float(np.corrcoef(rankdata(a), rankdata(b))[0, 1])


def mnist(tmp: Path, digits: int, epochs: int) -> dict:
    run = kiln.train(REPO / "examples" / "mnist_seed.yaml", {"train.epochs": epochs}, out=tmp / "mnist", live=False)
    run = kiln.Run.load(run.path)
    x, y = run.kind.load().split("test")
    x, y = run.kind.to_input(x[:digits]), y[:digits]
    trained = explain_model(run)
    torch.manual_seed(12345)
    randomised = build_model(run.config.blocks, run.kind.input_shape).eval()
    baseline = run.kind.explain_baseline(x)
    on_digit = (x > 0).reshape(digits, -1).numpy()
    out = {"test_accuracy": run.metrics["test"]["accuracy"], "epochs": epochs, "digits": digits, "methods": {}}
    for method in METHODS:
        start = time.perf_counter()
        result = attribute(trained, x, baseline, y, method)
        seconds = (time.perf_counter() - start) / digits
        a = result.values.reshape(digits, -1).numpy()
        b = attribute(randomised, x, baseline, y, method).values.reshape(digits, -1).numpy()
        signed = [spearman(p, q) for p, q in zip(a, b, strict=True)]
        absolute = [spearman(np.abs(p[m]), np.abs(q[m])) for p, q, m in zip(a, b, on_digit, strict=True)]
        entry = {"seconds_per_digit": seconds, "signed_spearman_mean": float(np.mean(signed)),
                 "signed_spearman_max": float(np.max(signed)), "abs_on_digit_spearman_mean": float(np.mean(absolute)),
                 "abs_on_digit_spearman_max": float(np.max(absolute))}
        if method == "integrated_gradients":
            change = result.output - result.start
            gaps = (a.sum(1) - change.numpy()).__abs__() / np.maximum(np.abs(change.numpy()), 1e-6)
            entry |= {"completeness_gap_max": float(gaps.max()), "steps_max": int(result.steps.max())}
        out["methods"][method] = entry
    ig = out["methods"]["integrated_gradients"]["seconds_per_digit"]
    for entry in out["methods"].values():
        entry["time_vs_integrated_gradients"] = entry["seconds_per_digit"] / ig
    return out


def credit(tmp: Path) -> dict:
    run = kiln.train(REPO / "examples" / "german_credit.yaml", out=tmp / "credit", live=False)
    run = kiln.Run.load(run.path)
    out = {"test_roc_auc": run.metrics["test"].get("roc_auc"), "methods": {}}
    for method in METHODS:
        start = time.perf_counter()
        result = run.explain_global(method, out=tmp / "credit_explanations")
        out["methods"][method] = {"seconds": time.perf_counter() - start, "rows": result["rows"],
                                  "ranking": [c["column"] for c in result["columns"]],
                                  "importance": {c["column"]: c["importance"] for c in result["columns"]}}
    reference = out["methods"]["occlusion"]["ranking"]
    for entry in out["methods"].values():
        order = entry["ranking"]
        entry["spearman_with_occlusion"] = spearman(np.array([order.index(c) for c in reference]),
                                                    np.arange(len(reference)))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--digits", type=int, default=20)
    p.add_argument("--epochs", type=int, default=1)
    args = p.parse_args()
    import captum

    hardware = {"cpu": cpu_model(), "threads": torch.get_num_threads(), "torch": torch.__version__,
                "captum": captum.__version__, "python": platform.python_version()}
    print(json.dumps(hardware))
    with tempfile.TemporaryDirectory() as tmp:
        results = {"hardware": hardware, "mnist_seed": mnist(Path(tmp), args.digits, args.epochs),
                   "german_credit": credit(Path(tmp))}
    m = results["mnist_seed"]
    print(f"\nMNIST seed model, {m['epochs']} epoch(s), test accuracy {m['test_accuracy']:.4f}; {m['digits']} digits")
    print(f"{'method':22s} {'s/digit':>8s} {'vs IG':>6s} {'signed rho mean/max':>20s} {'|rho| on digit':>16s}")
    for name, e in m["methods"].items():
        print(f"{name:22s} {e['seconds_per_digit']:8.4f} {e['time_vs_integrated_gradients']:6.2f} "
              f"{e['signed_spearman_mean']:9.3f}/{e['signed_spearman_max']:.3f} "
              f"{e['abs_on_digit_spearman_mean']:9.3f}/{e['abs_on_digit_spearman_max']:.3f}")
    ig = m["methods"]["integrated_gradients"]
    print(f"integrated gradients: largest completeness gap {ig['completeness_gap_max']:.2e} (at most {ig['steps_max']} steps)")
    c = results["german_credit"]
    print(f"\nGerman credit, test ROC-AUC {c['test_roc_auc']:.4f}; global column importance over the test split")
    for name, e in c["methods"].items():
        print(f"{name:22s} {e['seconds']:6.1f} s  rho vs occlusion {e['spearman_with_occlusion']:+.3f}  top 5: "
              f"{', '.join(e['ranking'][:5])}")
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = REPO / "benchmarks" / "results" / f"explain-{stamp}.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
