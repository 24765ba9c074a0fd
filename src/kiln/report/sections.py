"""The sections every run has (from its own files) and those its test predictions give: each function returns
``(id, heading, html)`` or None when the run has nothing for it."""

from __future__ import annotations

import math
from html import escape
from typing import Any

from kiln.report.svg import heatmap, lines, scatter
from kiln.report.page import Raw, data_uri, figure, fmt, png, table
from kiln.report.predictions import Predictions, calibration, confusion, per_class, worst

Section = tuple[str, str, str]
MAX_MATRIX_CLASSES = 40  # a larger confusion matrix is listed by its most frequent confusions instead
WORST = 12  # wrong predictions shown
SKIP_CURVE = ("epoch", "step", "samples", "kind", "lr", "samples_per_s")


def summary(info: dict[str, Any]) -> Section:
    """What was trained on what: the kind of data, task, classes, splits, the model and where it ran."""
    rows = [[k, v] for k, v in info["facts"].items() if v not in (None, "")]
    html = table(["", ""], rows, "summary-table")
    if info.get("layers"):
        html += "<h3>Model</h3>" + table(["#", "block", "output shape", "parameters", "multiply-adds"],
                                         info["layers"], "model-table")
    if info.get("classes"):
        names = info["classes"]
        shown = ", ".join(names[:60]) + (f" and {len(names) - 60} more" if len(names) > 60 else "")
        html += f"<h3>Classes ({len(names)})</h3><p>{escape(shown)}</p>"
    if info.get("lines"):
        html += "<h3>Data as read</h3><pre>" + escape("\n".join(info["lines"])) + "</pre>"
    return "summary", "Data and model", html


def metrics(results: dict[str, Any]) -> Section | None:
    """The final metrics of each split (results.json), one row per split."""
    splits = [s for s in ("train", "val", "test") if isinstance(results.get(s), dict)]
    if not splits:
        return None
    cols = list(dict.fromkeys(k for s in splits for k, v in results[s].items() if isinstance(v, int | float)
                              and not isinstance(v, bool)))
    rows = [[s, *(results[s].get(k, "") for k in cols)] for s in splits]
    extra = {k: v for k, v in results.items() if k not in splits and (isinstance(v, int | float | str))}
    html = table(["split", *cols], rows, "metrics-table")
    if extra:
        html += table(["", ""], [[k, v] for k, v in extra.items()])
    return "metrics", "Metrics", html


def config(text: str) -> Section:
    return "config", "Config", f"<pre id=\"config-yaml\">{escape(text)}</pre>"


def _numeric_keys(records: list[dict[str, Any]]) -> list[str]:
    keys = dict.fromkeys(k for r in records for k, v in r.items() if isinstance(v, int | float)
                         and not isinstance(v, bool) and k not in SKIP_CURVE)
    return [k for k in keys if not k.endswith(("threshold", "log_loss", "samples", "tokens"))]


def curves(records: list[dict[str, Any]]) -> Section | None:
    """Learning curves from metrics.jsonl: losses and the other metrics per epoch (or per evaluation of a run
    trained by steps), and the training loss at each logged step."""
    evals = [r for r in records if r.get("kind", "epoch" if "epoch" in r and "val_loss" in r else None) == "epoch"]
    x_key = "epoch"
    if not evals:
        evals, x_key = [r for r in records if r.get("kind") == "eval"], "step"
    steps = [r for r in records if r.get("kind") == "step" and isinstance(r.get("loss"), int | float)]
    figs = []
    keys = _numeric_keys(evals)

    def series(names: list[str]) -> list[tuple[str, list[float], list[float]]]:
        out = []
        for k in names:
            pts = [(float(r[x_key]), float(r[k])) for r in evals if isinstance(r.get(k), int | float)
                   and isinstance(r.get(x_key), int | float)]
            if pts:
                out.append((k, [p[0] for p in pts], [p[1] for p in pts]))
        return out

    losses = series([k for k in keys if k.endswith("loss")])
    if losses:
        figs.append(figure(lines("fig-loss", losses, title="Loss", xlabel=x_key, ylabel="loss", points=True),
                           f"training and validation loss per {x_key}"))
    others = series([k for k in keys if not k.endswith("loss")])
    rates = [s for s in others if all(0.0 <= v <= 1.0 for v in s[2])]
    scaled = [s for s in others if s not in rates]
    if rates:
        figs.append(figure(lines("fig-metrics", rates[:8], title="Metrics", xlabel=x_key, ylabel="value",
                                     points=True, yspan=(0.0, 1.0)), f"metrics in [0, 1] per {x_key}"))
    if scaled:
        figs.append(figure(lines("fig-metrics-scaled", scaled[:8], title="Other metrics", xlabel=x_key,
                                     ylabel="value", points=True), f"metrics in their own units per {x_key}"))
    if len(steps) > 1:
        xs = [float(r.get("step", i)) for i, r in enumerate(steps)]
        figs.append(figure(lines("fig-steps", [("loss", xs, [float(r["loss"]) for r in steps])],
                                     title="Training loss per logged step", xlabel="step", ylabel="loss"),
                           "the running training loss at each progress line"))
    if not figs:
        return None
    return "curves", "Learning curves", "".join(figs)


def confusion_section(p: Predictions) -> Section | None:
    if p.task not in ("binary", "multiclass"):
        return None
    counts = confusion(p)
    n = len(p.names)
    rule = f"decided at P({p.names[1]}) >= {p.threshold:.2f}" if p.task == "binary" else "the most probable class"
    if n <= MAX_MATRIX_CLASSES:
        heat = heatmap("fig-confusion", counts, p.names, title=f"Confusion matrix ({len(p.y):,} test samples)")
        fig = figure(heat, f"rows: true class, columns: predicted ({rule}); shade: share of the row")
    else:
        pairs = sorted(((counts[i][j], p.names[i], p.names[j]) for i in range(n) for j in range(n) if i != j),
                       reverse=True)[:30]
        fig = '<div id="fig-confusion">' + table(["count", "true", "predicted"], [list(t) for t in pairs]) + "</div>"
    return "confusion", "Confusion matrix", fig


def regression_section(p: Predictions, target: str | None) -> Section | None:
    if p.task != "regression":
        return None
    name = target or "target"
    err = p.scores - p.y
    fig = figure(scatter("fig-pred-true", p.y.tolist(), p.scores.tolist(), title=f"Predicted against true "
                             f"{name}", xlabel=f"true {name}", ylabel=f"predicted {name}"),
                 f"{len(p.y):,} test samples; the dashed line is a perfect prediction")
    res = figure(lines("fig-residuals", [("error", p.y.tolist(), err.tolist())], title="Error against true value",
                           xlabel=f"true {name}", ylabel="predicted - true", connect=False),
                 "each sample's error")
    return "regression", "Predicted against true", fig + res


def per_class_section(p: Predictions) -> Section | None:
    if p.task not in ("binary", "multiclass", "multilabel"):
        return None
    rows = per_class(p)
    html = table(["class" if p.task != "multilabel" else "label", "precision", "recall", "F1", "support"],
                 [[r["class"], r["precision"], r["recall"], r["f1"], r["support"]] for r in rows], "per-class-table")
    f1s = [r["f1"] for r in rows if not math.isnan(r["f1"])]
    if f1s:
        html += f'<p class="note">macro F1 {sum(f1s) / len(f1s):.4f} over {len(f1s)} classes; test split.</p>'
    return "per-class", "Per-class metrics", html


def calibration_section(p: Predictions, pr_svg: bytes | None) -> Section | None:
    if p.task not in ("binary", "multiclass", "multilabel"):
        return None
    cal = calibration(p)
    xs = [b["confidence"] for b in cal["bins"]]
    ys = [b["frequency"] for b in cal["bins"]]
    fig = lines("fig-calibration", [("model", xs, ys)], title="Reliability diagram", xlabel=cal["what"],
                    ylabel="observed frequency", diagonal=True, points=True, xspan=(0.0, 1.0), yspan=(0.0, 1.0))
    html = figure(fig, f"{cal['what']} in {len(cal['bins'])} bins against how often it was right; the dashed "
                       f"line is perfect calibration. Expected calibration error {cal['ece']:.4f}")
    html += table(["mean predicted", "observed", "samples"],
                  [[b["confidence"], b["frequency"], b["count"]] for b in cal["bins"]], "calibration-table")
    if pr_svg is not None:
        html += figure(f'<img class="plot" alt="precision-recall curve" src="{data_uri(pr_svg, "image/svg+xml")}">',
                       "precision against recall on the test split (written in training)", "fig-pr")
    return "calibration", "Calibration", html


def errors_section(p: Predictions, shown: list[dict[str, Any]]) -> Section | None:
    """The most confident wrong predictions, with the sample itself as the kind of data shows it."""
    wrong = worst(p, WORST)
    if not wrong:
        return "errors", "Worst errors", '<p class="note" id="errors-table">No wrong test predictions.</p>'
    regression = p.task == "regression"
    header = ["test sample", "shown", "true", "predicted", "error" if regression else "probability"]
    rows = []
    for w, s in zip(wrong, shown, strict=True):
        rows.append([w["index"], Raw(_show(s)), w["true"], w["predicted"], w["error" if regression else "probability"]])
    what = "largest errors" if regression else "most confident wrong predictions"
    return "errors", "Worst errors", f'<p class="note">The {len(wrong)} {what} on the test split.</p>' + table(
        header, rows, "errors-table")


def _show(sample: dict[str, Any]) -> str:
    if "image" in sample:
        return f'<img class="sample" alt="input" src="{data_uri(png(sample["image"]), "image/png")}">'
    if "row" in sample:
        return '<div class="row">' + " &middot; ".join(
            f"<b>{escape(str(k))}</b> {escape(fmt(v))}" for k, v in sample["row"].items()) + "</div>"
    if "text" in sample:
        text = str(sample["text"])
        return '<div class="row">' + escape(text[:600] + ("..." if len(text) > 600 else "")) + "</div>"
    return ""
