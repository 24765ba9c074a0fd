"""Evaluation: a model's outputs over batches of a split, then the task's metrics.

- multiclass: loss (cross-entropy), accuracy, macro F1
- binary: also ROC-AUC, PR-AUC (average precision), F1, precision and recall at the decision threshold,
  log loss and Brier score of the positive class's probability
- multilabel: loss (binary cross-entropy per label), micro and macro F1 of the labels at probability 0.5, ROC-AUC
  (the mean over labels) and each label's own ROC-AUC (``roc_auc_<label>``)
- regression: loss (MSE of the standardised target), MAE, RMSE and R2 in the target's own units
- ranking (recommendation): per user, every item scored; items marked seen (target -1) left out; Recall@10,
  NDCG@10 and hit rate@10 of the held-out items (target 1), and as loss their mean cross-entropy over all
  unseen items (a full softmax)
- lm, seq2seq: loss (cross-entropy per target token), perplexity, token accuracy; seq2seq also the share of
  samples whose greedy output is exactly the target
- forecast: loss (MSE of the scaled targets); the kind of data adds MAE, RMSE, MASE, sMAPE and directional
  accuracy in the series' units beside its baselines (``DataKind.metrics``)
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F

from kiln.data.kind import DataKind
from kiln.training.dist_eval import Share
from kiln.training.distributed import is_sharded
from kiln.training.objectives import TOKEN_TASKS, Objective

TASK_METRICS = {
    "multiclass": ("loss", "accuracy", "macro_f1"),
    "binary": ("loss", "accuracy", "roc_auc", "pr_auc", "f1", "precision", "recall", "log_loss", "brier"),
    "multilabel": ("loss", "micro_f1", "macro_f1", "roc_auc"),
    "regression": ("loss", "mae", "rmse", "r2"),
    "lm": ("loss", "perplexity", "token_accuracy"),
    "seq2seq": ("loss", "perplexity", "token_accuracy", "exact_match"),
    "forecast": ("loss", "mae", "rmse", "mase", "smape", "directional_accuracy"),
    "ranking": ("loss", "recall@10", "ndcg@10", "hit_rate@10"),
}
RANK_K = 10  # the cut-off of the ranking metrics
# Metrics early stopping may watch, and those of them that are better when higher.
MONITORS = ("val_loss", "val_accuracy", "train_loss", "train_accuracy", "val_roc_auc", "val_pr_auc", "val_f1",
            "val_mae", "val_rmse", "val_r2", "val_mase", "val_smape", "val_micro_f1", "val_macro_f1",
            "val_recall@10", "val_ndcg@10", "val_hit_rate@10")
HIGHER_IS_BETTER = ("accuracy", "roc_auc", "pr_auc", "f1", "r2", "recall@10", "ndcg@10", "hit_rate@10")
SHOWN = ("loss", "accuracy", "micro_f1", "roc_auc", "rmse", "r2", "perplexity", "token_accuracy", "exact_match", "mase",
         "smape", "directional_accuracy", "recall@10", "ndcg@10", "hit_rate@10")


def _without_grad(fn):
    """``torch.inference_mode``, or ``no_grad`` for a model sharded by FSDP: its all-gather buffers outlive the
    call and training would then write into inference tensors."""
    @functools.wraps(fn)
    def run(model, *args, **kwargs):
        with torch.no_grad() if is_sharded(model) else torch.inference_mode():
            return fn(model, *args, **kwargs)
    return run


@_without_grad
def evaluate(model: torch.nn.Module, kind: DataKind, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], *,
             device: torch.device, precision=None, threshold: float = 0.5, exact: bool = True,
             share: Share | None = None) -> dict[str, float]:
    """The task's metrics over (stored inputs, targets) batches; ``exact``: with seq2seq's greedy exact match.
    ``share``: in a distributed run, this rank computes its share of the batches and every rank gets the metrics
    of all of them (:mod:`kiln.training.dist_eval`)."""
    share = share or Share()
    was_training = model.training
    model.eval()
    try:
        with share.whole(model):
            if kind.task in TOKEN_TASKS:
                return _token_metrics(model, kind, batches, device, precision, exact, share)
            xs, mine, targets = [], {}, []
            for i, (xb, yb) in enumerate(batches):
                if share.mine(i):
                    mine[i] = _forward(model, kind.to_input(xb.to(device)), precision).float().cpu()
                targets.append(yb)
                xs.append(xb)
    finally:
        model.train(was_training)
    outputs = share.gather(mine, len(targets))
    y = torch.cat(targets) if targets else torch.empty(0)
    own = kind.metrics(xs, torch.cat(outputs) if outputs else torch.empty(0), y)
    if own is not None:
        return own
    return task_metrics(kind.task, torch.cat(outputs) if outputs else torch.empty(0), y, threshold=threshold,
                        target_scale=kind.target_scale, names=kind.class_names)


def _forward(model: torch.nn.Module, x: torch.Tensor, precision) -> torch.Tensor:
    with precision.autocast() if precision is not None else contextlib.nullcontext():
        return model(x)


def _token_metrics(model, kind: DataKind, batches, device, precision, exact: bool, share: Share) -> dict[str, float]:
    objective = Objective(kind.task)
    loss_sum, tokens, correct, matches, rows = 0.0, 0, 0, 0, 0
    for i, (xb, yb) in enumerate(batches):
        if not share.mine(i):
            continue
        xb, yb = xb.to(device), yb.to(device)
        logits = _forward(model, xb, precision).float()
        right, counted = objective.counts(logits, yb)
        loss_sum += float(objective.loss(logits, yb)) * int(counted)
        tokens += int(counted)
        correct += int(right)
        found = kind.exact_matches(model, xb, yb) if exact else None
        if found is not None:
            matches += found
            rows += len(xb)
    loss_sum, tokens, correct, matches, rows = share.sum([loss_sum, tokens, correct, matches, rows])
    tokens, correct, matches, rows = int(tokens), int(correct), int(matches), int(rows)
    loss = loss_sum / max(tokens, 1)
    out = {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "token_accuracy": correct / max(tokens, 1),
           "tokens": tokens}
    if rows:
        out |= {"exact_match": matches / rows, "samples": rows}
    return out


def metrics_line(metrics: dict[str, float]) -> str:
    """The few metrics a progress or result line shows; then the same ones of each baseline the metrics hold
    (forecasts: ``naive_mase`` ... under ``baselines``)."""
    line = "  ".join(f"{k} {metrics[k]:.4f}" for k in SHOWN if k in metrics)
    for name in metrics.get("baselines", ()):
        line += f"  | {name} " + "  ".join(f"{k} {metrics[f'{name}_{k}']:.4f}" for k in SHOWN
                                            if f"{name}_{k}" in metrics)
    return line
THRESHOLD_CANDIDATES = 101  # binary decision thresholds tried on validation: 0.00, 0.01, ..., 1.00


@_without_grad
def model_outputs(model: torch.nn.Module, x: torch.Tensor, to_input: Callable[[torch.Tensor], torch.Tensor], *,
                  batch_size: int, device: torch.device, precision=None, share: Share | None = None) -> torch.Tensor:
    """Raw outputs (logits, or standardised values) for stored samples ``x``, float32 on the CPU; with ``share``,
    this rank computes its share of the batches and every rank gets all the outputs."""
    share = share or Share()
    was_training = model.training
    model.eval()
    mine = {}
    starts = range(0, len(x), batch_size)
    try:
        with share.whole(model):
            for i, start in enumerate(starts):
                if share.mine(i):
                    mine[i] = _forward(model, to_input(x[start:start + batch_size].to(device)), precision).float().cpu()
    finally:
        model.train(was_training)
    out = share.gather(mine, len(starts))
    return torch.cat(out) if out else torch.empty(0)


def probabilities(outputs: torch.Tensor, task: str = "multiclass") -> torch.Tensor:
    """Class probabilities (softmax over classes), or for multilabel each label's own (sigmoid)."""
    return torch.sigmoid(outputs) if task == "multilabel" else torch.softmax(outputs, dim=1)


def task_metrics(task: str, outputs: torch.Tensor, y: torch.Tensor, *, threshold: float = 0.5,
                 target_scale: tuple[float, float] = (0.0, 1.0), names: list[str] | None = None) -> dict[str, float]:
    """Metrics of outputs (N, C) or (N, 1) against targets (N,) (multilabel: (N, labels) of 0/1). ``target_scale``
    (mean, std) undoes the standardisation of regression targets; ``names`` name multilabel's labels."""
    n = len(y)
    if n == 0:
        return {"loss": float("nan"), "samples": 0}
    if task == "multilabel":
        return multilabel_metrics(outputs, y, names or [str(j) for j in range(outputs.shape[1])])
    if task == "ranking":
        return ranking_metrics(outputs, y)
    if task == "regression":
        pred, y = outputs[:, 0].double(), y.double()
        loss = F.mse_loss(pred, y).item()
        mean, std = target_scale
        err = (pred - y).numpy() * std
        truth = y.numpy() * std + mean
        ss_tot = float(((truth - truth.mean()) ** 2).sum())
        return {"loss": loss, "mae": float(np.abs(err).mean()), "rmse": float(np.sqrt((err ** 2).mean())),
                "r2": 1.0 - float((err ** 2).sum()) / ss_tot if ss_tot else float("nan"), "samples": n}
    loss = F.cross_entropy(outputs, y, reduction="sum").item() / n
    if task == "binary":
        p = probabilities(outputs)[:, 1].double().numpy()
        t = y.numpy()
        pred = (p >= threshold).astype(np.int64)
        tp, fp, fn = int(((pred == 1) & (t == 1)).sum()), int(((pred == 1) & (t == 0)).sum()), \
            int(((pred == 0) & (t == 1)).sum())
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        return {"loss": loss, "accuracy": float((pred == t).mean()), "roc_auc": roc_auc(p, t),
                "pr_auc": average_precision(p, t), "f1": _f1(tp, fp, fn), "precision": precision, "recall": recall,
                "log_loss": loss, "brier": float(((p - t) ** 2).mean()), "threshold": threshold, "samples": n}
    pred = outputs.argmax(1)
    classes = outputs.shape[1]
    f1s = [_f1(int(((pred == c) & (y == c)).sum()), int(((pred == c) & (y != c)).sum()),
               int(((pred != c) & (y == c)).sum())) for c in range(classes) if (y == c).any() or (pred == c).any()]
    return {"loss": loss, "accuracy": (pred == y).float().mean().item(), "macro_f1": float(np.mean(f1s)),
            "samples": n}


def multilabel_metrics(outputs: torch.Tensor, y: torch.Tensor, names: list[str]) -> dict[str, float]:
    """Labels decided at probability 0.5: micro F1 (all decisions pooled) and macro F1 (the mean of each label's);
    ROC-AUC per label, and their mean over the labels that have both positive and negative samples."""
    loss = F.binary_cross_entropy_with_logits(outputs.double(), y.double()).item()
    p, t = torch.sigmoid(outputs.double()).numpy(), y.numpy() > 0.5
    pred = p >= 0.5
    tp, fp, fn = (pred & t).sum(0), (pred & ~t).sum(0), (~pred & t).sum(0)  # per label
    per_label = {f"roc_auc_{name}": roc_auc(p[:, j], t[:, j].astype(np.int64)) for j, name in enumerate(names)}
    aucs = [v for v in per_label.values() if not math.isnan(v)]
    return {"loss": loss, "micro_f1": _f1(int(tp.sum()), int(fp.sum()), int(fn.sum())),
            "macro_f1": float(np.mean([_f1(int(a), int(b), int(c)) for a, b, c in zip(tp, fp, fn, strict=True)])),
            "roc_auc": float(np.mean(aucs)) if aucs else float("nan"), **per_label,
            "exact_match": float((pred == t).all(1).mean()), "samples": len(y)}


def ranking_metrics(scores: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """Ranking metrics of item scores (users, items) against targets (users, items): 1 a held-out (relevant) item,
    -1 an item the user had seen (not ranked), 0 any other. Users without a relevant item are not counted.

    With k = 10: Recall@k: relevant items in the top k / relevant items. NDCG@k: sum of 1/log2(rank + 1) over
    relevant items in the top k, over the best possible sum (min(relevant, k) items at the top). Hit rate@k: users
    with a relevant item in the top k. Ties in score rank the lower item index first."""
    relevant = targets == 1
    n_rel = relevant.sum(1)
    keep = n_rel > 0
    scores, relevant, n_rel = scores[keep].double(), relevant[keep], n_rel[keep].double()
    if not len(scores):
        return {"loss": float("nan"), "samples": 0}
    scores = scores.masked_fill(targets[keep] == -1, -torch.inf)
    loss = -(torch.log_softmax(scores, dim=1)[relevant]).mean().item()
    k = min(RANK_K, scores.shape[1])  # fewer items than 10: all of them
    top = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
    hits = relevant.gather(1, top).double()  # (users, k)
    discount = 1.0 / torch.log2(torch.arange(2, k + 2, dtype=torch.float64))
    ideal = torch.cumsum(discount, 0)[(n_rel.clamp(max=k) - 1).long()]
    return {"loss": loss, f"recall@{RANK_K}": float((hits.sum(1) / n_rel).mean()),
            f"ndcg@{RANK_K}": float(((hits * discount).sum(1) / ideal).mean()),
            f"hit_rate@{RANK_K}": float((hits.sum(1) > 0).double().mean()), "samples": len(scores)}



def _f1(tp: int, fp: int, fn: int) -> float:
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def roc_auc(p: np.ndarray, t: np.ndarray) -> float:
    """Area under the ROC curve: the chance a random positive scores above a random negative (ties count half)."""
    n_pos, n_neg = int(t.sum()), int(len(t) - t.sum())
    if not n_pos or not n_neg:
        return float("nan")
    _, inverse, counts = np.unique(p, return_inverse=True, return_counts=True)
    mid_rank = np.cumsum(counts) - (counts - 1) / 2.0  # 1-based rank of each distinct score, ties averaged
    ranks = mid_rank[inverse]
    return float((ranks[t == 1].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def average_precision(p: np.ndarray, t: np.ndarray) -> float:
    """Area under the precision-recall curve as the mean precision at each recall step (scikit-learn's AP)."""
    if not t.sum():
        return float("nan")
    order = np.argsort(-p, kind="mergesort")
    p, t = p[order], t[order]
    last_of_score = np.r_[np.nonzero(np.diff(p))[0], len(p) - 1]  # cut points between distinct scores
    tp = np.cumsum(t)[last_of_score]
    precision = tp / (last_of_score + 1)
    recall = tp / tp[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def choose_threshold(outputs: torch.Tensor, y: torch.Tensor, metric: str,
                     costs: tuple[float, float] | None = None) -> float:
    """The decision threshold on P(positive) in 0.00..1.00 that maximises ``metric`` on these outputs (``cost``:
    minimises the total cost of the errors, ``costs`` = (per false positive, per false negative)); among equal
    scores, the one nearest 0.5."""
    p = probabilities(outputs)[:, 1].double().numpy()
    t = y.numpy()
    best, best_score = 0.5, -math.inf
    for threshold in sorted(np.linspace(0, 1, THRESHOLD_CANDIDATES), key=lambda v: abs(v - 0.5)):
        pred = p >= threshold
        tp, fp = int((pred & (t == 1)).sum()), int((pred & (t == 0)).sum())
        fn, tn = int((~pred & (t == 1)).sum()), int((~pred & (t == 0)).sum())
        if metric == "f1":
            score = _f1(tp, fp, fn)
        elif metric == "accuracy":
            score = (tp + tn) / len(t)
        elif metric == "cost":
            if costs is None:
                raise ValueError("threshold metric cost needs the costs of a false positive and a false negative")
            score = -(fp * costs[0] + fn * costs[1])
        else:  # balanced_accuracy
            score = 0.5 * (tp / max(tp + fn, 1) + tn / max(tn + fp, 1))
        if score > best_score:
            best, best_score = float(threshold), score
    return round(best, 2)


def expected_cost(outputs: torch.Tensor, y: torch.Tensor, threshold: float, costs: tuple[float, float]) -> float:
    """The mean cost per row of deciding at ``threshold``: (false positives * costs[0] + false negatives *
    costs[1]) / rows."""
    pred = probabilities(outputs)[:, 1].double().numpy() >= threshold
    t = y.numpy()
    return float(((pred & (t == 0)).sum() * costs[0] + (~pred & (t == 1)).sum() * costs[1]) / max(len(t), 1))


def precision_recall_curve(p: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(precision, recall, threshold) at each distinct score, highest score first: deciding "positive" for the
    rows scoring at least that threshold."""
    order = np.argsort(-p, kind="mergesort")
    p, t = p[order], t[order]
    last_of_score = np.r_[np.nonzero(np.diff(p))[0], len(p) - 1]
    tp = np.cumsum(t)[last_of_score]
    return tp / (last_of_score + 1), tp / max(int(t.sum()), 1), p[last_of_score]
