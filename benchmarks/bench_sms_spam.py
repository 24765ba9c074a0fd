"""kiln's SMS spam classifier against TF-IDF + logistic regression on the same splits.

    KILN_DATA=../shared/data python benchmarks/bench_sms_spam.py [--config examples/sms_spam.yaml]
        [--seeds 0 1 2 3 4] [--set KEY=VALUE ...]

For each seed, the split is the one kiln draws for `data.split_seed` = that seed (stratified: 20% test, then 10% of
the rest for validation). kiln trains on the training part, picks its spam threshold on validation
(`train.threshold_metric: f1`) and is scored once on the test part. The baselines are fitted on training and
validation together (they need no validation split) and use scikit-learn's default threshold 0.5:

- `tfidf_word_lr`: TfidfVectorizer() (words, defaults) + LogisticRegression: the baseline the field uses first;
- `tfidf_char_lr`: TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True) + LogisticRegression,
  a stronger one on short, misspelled texts.

Measured: ROC-AUC (spam's probability) and F1 of the spam class on the test split. Results go to
benchmarks/results/sms_spam-<UTC time>.json.
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
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

import kiln
from kiln.config import load_config
from kiln.data.kind import open_kind
from kiln.hardware import cpu_model
from kiln.training.metrics import roc_auc

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
METRICS = ("roc_auc", "f1")



def f1(p: np.ndarray, t: np.ndarray, threshold: float = 0.5) -> float:
    pred = p >= threshold
    tp = int((pred & (t == 1)).sum())
    return 2 * tp / (int(pred.sum()) + int(t.sum())) if tp else 0.0


def baselines(cfg, seed: int) -> dict[str, dict[str, float]]:
    """TF-IDF + logistic regression on kiln's split for this seed (the kind draws it: the same rows)."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    # The split does not depend on the tokenizer: a byte tokenizer skips fitting BPE here.
    kind = open_kind(cfg.data.model_copy(update={"tokenizer": "byte", "split_seed": seed}), seed)
    train, val, test = kind.rows
    texts = np.array(kind.file.texts, dtype=object)
    positive = kind.class_names[1]
    y = np.array([labels[0] == positive for labels in kind.file.labels], dtype=np.int64)
    fit = np.array(train + val)
    vectorizers = {"tfidf_word_lr": lambda: TfidfVectorizer(),
                   "tfidf_char_lr": lambda: TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True)}
    out = {}
    for name, make in vectorizers.items():
        t0 = time.perf_counter()
        model = make_pipeline(make(), LogisticRegression(max_iter=2000)).fit(texts[fit], y[fit])
        p = model.predict_proba(texts[np.array(test)])[:, 1]
        out[name] = {"roc_auc": roc_auc(p, y[test]), "f1": f1(p, y[test]), "seconds": time.perf_counter() - t0}
    return out


def kiln_run(config: str, seed: int, overrides: list[str], tmp: Path) -> dict[str, float]:
    t0 = time.perf_counter()
    run = kiln.train(config, [*overrides, f"data.split_seed={seed}", f"seed={seed}"], out=tmp / f"seed_{seed}",
                     live=False)
    test = run.metrics["test"]
    return {"roc_auc": test["roc_auc"], "f1": test["f1"], "threshold": run.metrics["threshold"],
            "seconds": time.perf_counter() - t0, "train_seconds": run.metrics["train_seconds"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(REPO / "examples" / "sms_spam.yaml"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()

    import sklearn

    cfg = load_config(args.config, args.overrides)
    results: dict[str, list[dict]] = {"kiln": [], "tfidf_word_lr": [], "tfidf_char_lr": []}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            results["kiln"].append(kiln_run(args.config, seed, args.overrides, Path(tmp)))
            for name, r in baselines(cfg, seed).items():
                results[name].append(r)
            print(f"seed {seed}: " + "; ".join(f"{name} ROC-AUC {rs[-1]['roc_auc']:.4f} F1 {rs[-1]['f1']:.4f}"
                                               for name, rs in results.items()), flush=True)
    summary = {name: {m: {"mean": statistics.fmean(r[m] for r in rs), "std": statistics.pstdev(r[m] for r in rs),
                          "values": [r[m] for r in rs]} for m in (*METRICS, "seconds")}
               for name, rs in results.items()}
    wins = {name: sum(k["roc_auc"] >= b["roc_auc"] for k, b in zip(results["kiln"], rs, strict=True))
            for name, rs in results.items() if name != "kiln"}
    hardware = {"cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                "load_average": list(os.getloadavg())}
    versions = {"python": platform.python_version(), "torch": torch.__version__, "kiln": kiln.__version__,
                "scikit-learn": sklearn.__version__, "numpy": np.__version__}
    print(f"\nSMS spam, test split of {len(args.seeds)} seeds ({', '.join(map(str, args.seeds))}); {hardware['cpu']}, "
          f"{hardware['cores']} cores, load average {hardware['load_average'][0]:.1f}; "
          + ", ".join(f"{k} {v}" for k, v in versions.items()))
    print(f"kiln config: {args.config} {' '.join(args.overrides)}")
    print(f"{'model':16s} {'ROC-AUC mean +- std':>22s} {'spam F1 mean +- std':>22s} {'seconds':>9s}")
    for name, s in summary.items():
        print(f"{name:16s} {s['roc_auc']['mean']:>13.4f} +- {s['roc_auc']['std']:.4f} "
              f"{s['f1']['mean']:>13.4f} +- {s['f1']['std']:.4f} {s['seconds']['mean']:>9.1f}")
    for name, n in wins.items():
        ratio = summary["kiln"]["roc_auc"]["mean"] / summary[name]["roc_auc"]["mean"]
        print(f"kiln / {name} ROC-AUC: {ratio:.4f} (kiln at least as good on {n} of {len(args.seeds)} seeds)")
    out = HERE / "results" / f"sms_spam-{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%SZ')}.json"
    out.write_text(json.dumps({"args": vars(args), "hardware": hardware, "versions": versions, "config": cfg.to_dict(),
                               "summary": summary, "kiln_at_least_as_good": wins, "results": results,
                               "command": " ".join(sys.argv)}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
