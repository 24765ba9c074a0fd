"""The test split's predictions, through the run's own API, and what the report derives from them: the confusion
matrix, each class's precision, recall and F1, calibration bins and the worst errors.

Only classification (binary, multiclass, multilabel) and regression runs have these; other tasks (language
models, translation, forecasts, ranking) are reported from their files alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from kiln.data.splits import Splits
from kiln.errors import KilnError
from kiln.run import Run

TASKS = ("binary", "multiclass", "multilabel", "regression")
BINS = 10  # calibration bins of equal width over [0, 1]


@dataclass
class Predictions:
    """A run's test split: stored inputs, targets and what the model predicts for them."""

    task: str
    names: list[str]  # class (or label) names; empty for regression
    x: torch.Tensor  # stored inputs, as the kind's ``load`` gave them
    y: np.ndarray  # class indices (N,), 0/1 labels (N, L) for multilabel, values (N,) in the target's units
    scores: np.ndarray  # probabilities (N, C) (multilabel: each label's), or predicted values (N,)
    threshold: float  # binary: the decision threshold on P(positive)

    @property
    def pred(self) -> np.ndarray:
        """Predicted class per sample (multilabel: 0/1 per label at 0.5; regression: the values)."""
        if self.task == "binary":
            return (self.scores[:, 1] >= self.threshold).astype(np.int64)
        if self.task == "multiclass":
            return self.scores.argmax(1)
        if self.task == "multilabel":
            return (self.scores >= 0.5).astype(np.int64)
        return self.scores


def test_predictions(run: Run, splits: Splits) -> Predictions:
    """Predictions for the test split of ``splits`` (the run's data as its kind loads it, as `kiln evaluate`
    does)."""
    task = run.kind.task
    if task not in TASKS:
        raise KilnError(f"a {task} run has no per-sample predictions to report")
    x, y = splits.split("test")
    if len(x) == 0:
        raise KilnError("the test split is empty")
    scores = run.from_outputs(run.outputs(x)).double().numpy()
    if task == "regression":
        mean, std = run.kind.target_scale
        return Predictions(task, [], x, y.double().numpy() * std + mean, scores, 0.5)
    return Predictions(task, list(run.kind.class_names), x, y.numpy(), scores, run.threshold)


def confusion(p: Predictions) -> list[list[int]]:
    """counts[true][predicted] (single-label classification)."""
    n = len(p.names)
    counts = np.zeros((n, n), dtype=np.int64)
    np.add.at(counts, (p.y, p.pred), 1)
    return counts.tolist()


def per_class(p: Predictions) -> list[dict[str, Any]]:
    """Each class's (multilabel: label's) precision, recall, F1 and support (true samples)."""
    rows = []
    for c, name in enumerate(p.names):
        if p.task == "multilabel":
            truth, said = p.y[:, c] > 0.5, p.pred[:, c] == 1
        else:
            truth, said = p.y == c, p.pred == c
        tp, fp, fn = int((truth & said).sum()), int((~truth & said).sum()), int((truth & ~said).sum())
        rows.append({"class": name, "precision": tp / (tp + fp) if tp + fp else float("nan"),
                     "recall": tp / (tp + fn) if tp + fn else float("nan"),
                     "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else float("nan"), "support": int(truth.sum())})
    return rows


def calibration(p: Predictions) -> dict[str, Any]:
    """A reliability diagram's bins: binary, P(positive) against the share of positives; multiclass, the top
    label's probability against accuracy; multilabel, every label's probability against its truth. Each bin:
    mean predicted probability, observed frequency and count; ECE: the count-weighted mean gap."""
    if p.task == "binary":
        conf, hit, what = p.scores[:, 1], (p.y == 1).astype(float), "P(positive)"
    elif p.task == "multiclass":
        conf, hit, what = p.scores.max(1), (p.pred == p.y).astype(float), "top-label confidence"
    else:
        conf, hit, what = p.scores.ravel(), (p.y.ravel() > 0.5).astype(float), "each label's probability"
    which = np.minimum((conf * BINS).astype(np.int64), BINS - 1)
    bins = []
    for b in range(BINS):
        inside = which == b
        if inside.any():
            bins.append({"confidence": float(conf[inside].mean()), "frequency": float(hit[inside].mean()),
                         "count": int(inside.sum())})
    ece = sum(abs(b["confidence"] - b["frequency"]) * b["count"] for b in bins) / max(len(conf), 1)
    return {"bins": bins, "ece": float(ece), "what": what}


def worst(p: Predictions, k: int) -> list[dict[str, Any]]:
    """The ``k`` most confident wrong predictions (regression: the largest errors), worst first: test index,
    truth, prediction and its probability (or the error)."""
    if p.task == "regression":
        err = np.abs(p.scores - p.y)
        order = np.argsort(-err, kind="stable")[:k]
        return [{"index": int(i), "true": float(p.y[i]), "predicted": float(p.scores[i]),
                 "error": float(p.scores[i] - p.y[i])} for i in order]
    if p.task == "multilabel":
        wrong = p.pred != (p.y > 0.5)  # (N, labels)
        sure = np.where(p.pred == 1, p.scores, 1 - p.scores)  # how sure each label decision was
        conf = np.where(wrong, sure, 0.0).max(1)  # the surest of a sample's wrong decisions
        order = [i for i in np.argsort(-conf, kind="stable") if wrong[i].any()][:k]
        return [{"index": int(i), "true": ", ".join(n for n, t in zip(p.names, p.y[i], strict=True) if t > 0.5),
                 "predicted": ", ".join(n for n, s in zip(p.names, p.pred[i], strict=True) if s),
                 "probability": float(conf[i])} for i in order]
    pred = p.pred
    conf = p.scores[np.arange(len(pred)), pred]
    wrong = np.nonzero(pred != p.y)[0]
    order = wrong[np.argsort(-conf[wrong], kind="stable")][:k]
    return [{"index": int(i), "true": p.names[int(p.y[i])], "predicted": p.names[int(pred[i])],
             "probability": float(conf[i])} for i in order]
