"""``kiln audit``: how a binary table run treats the groups of sensitive columns, and per-group thresholds.

For each sensitive column (any column of the data, trained on or not; see :class:`kiln.training.fairness.Grouping`
for mapping values to groups and cutting numbers) and one split of the run's rows, Fairlearn's ``MetricFrame``
gives each group's selection rate (the share decided positive), accuracy, true- and false-positive rates and
ROC-AUC, and Fairlearn's demographic-parity and equalized-odds differences and ratios. Bootstrap 95% intervals
(percentiles of ``--bootstrap`` resamples of the split's rows) go with every figure; a group of fewer than
10 rows is warned about and its figures flagged.

``--fit-thresholds`` fits Fairlearn's ``ThresholdOptimizer`` on the validation split's scores and saves its rules
as JSON (``fairness.json``); predict and serve then decide by them (``--thresholds off`` turns them off). The
audit shows the figures before (the run's one threshold) and after (the per-group rules).

Writes ``audit.json`` and ``audit.svg`` into the run. Needs the ``fairness`` extra (Fairlearn).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

import numpy as np

from kiln.errors import KilnError
from kiln.fsutil import atomic_write_text
from kiln.run import SPLITS, Run
from kiln.rundir import RunDir
from kiln.training.fairness import Grouping, GroupRule, GroupThresholds

SMALL_GROUP = 10  # rows: below this a group's figures and intervals are flagged
METRICS = ("selection_rate", "accuracy", "tpr", "fpr", "roc_auc")
CONSTRAINTS = ("demographic_parity", "equalized_odds")


def _fairlearn():
    try:
        import fairlearn.metrics as fm
        import fairlearn.postprocessing as fp
    except ImportError:
        raise KilnError("kiln audit needs the fairness extra (Fairlearn): pip install 'kiln[fairness]'") from None
    return fm, fp


# ---- figures -----------------------------------------------------------------------------------------------


def _safe_auc(y_true, scores) -> float:
    from sklearn.metrics import roc_auc_score

    y = np.asarray(y_true)
    return float(roc_auc_score(y, scores)) if 0 < y.sum() < len(y) else math.nan


def fairlearn_figures(y: np.ndarray, decided: np.ndarray, scores: np.ndarray, groups: list[str]) -> dict[str, Any]:
    """Per-group metrics and the disparity figures, all computed by Fairlearn."""
    fm, _ = _fairlearn()
    from sklearn.metrics import accuracy_score

    y, decided, scores = np.asarray(y, int), np.asarray(decided, int), np.asarray(scores, np.float64)
    frame = fm.MetricFrame(metrics={"selection_rate": fm.selection_rate, "accuracy": accuracy_score,
                                    "tpr": fm.true_positive_rate, "fpr": fm.false_positive_rate, "count": fm.count},
                           y_true=y, y_pred=decided, sensitive_features=np.asarray(groups, dtype=object))
    auc = fm.MetricFrame(metrics=_safe_auc, y_true=y, y_pred=scores, sensitive_features=np.asarray(groups, object))
    by = frame.by_group
    per_group = {str(g): {"rows": int(by.loc[g, "count"]), **{m: float(by.loc[g, m]) for m in METRICS[:4]},
                          "roc_auc": float(auc.by_group.loc[g])} for g in by.index}
    kw = {"sensitive_features": np.asarray(groups, dtype=object)}
    disparity = {"demographic_parity_difference": float(fm.demographic_parity_difference(y, decided, **kw)),
                 "demographic_parity_ratio": float(fm.demographic_parity_ratio(y, decided, **kw)),
                 "equalized_odds_difference": float(fm.equalized_odds_difference(y, decided, **kw)),
                 "equalized_odds_ratio": float(fm.equalized_odds_ratio(y, decided, **kw))}
    overall = {m: float(frame.overall[m]) for m in METRICS[:4]} | {"roc_auc": _safe_auc(y, scores), "rows": len(y)}
    return {"groups": per_group, "overall": overall, "disparity": disparity}


def _ratio(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(hi > 0, lo / hi, np.nan)  # as Fairlearn: 0 / 0 is NaN


def bootstrap_figures(y: np.ndarray, decided: np.ndarray, scores: np.ndarray, groups: list[str], names: list[str],
                      weights: np.ndarray) -> dict[str, np.ndarray]:
    """The figures of :func:`fairlearn_figures` for many resamples at once: ``weights`` (B, n) is how often each
    resample draws each row (all ones: the split itself). Per-group arrays are (B, groups); a group a resample
    misses is NaN."""
    y, d = np.asarray(y, np.float64), np.asarray(decided, np.float64)
    onehot = (np.asarray(groups, dtype=object)[:, None] == np.asarray(names, dtype=object)[None, :]).astype(np.float64)
    n_g = weights @ onehot
    pos, neg = weights @ (onehot * y[:, None]), weights @ (onehot * (1 - y)[:, None])
    with np.errstate(invalid="ignore", divide="ignore"):
        out = {"rows": n_g,
               "selection_rate": (weights @ (onehot * d[:, None])) / n_g,
               "accuracy": (weights @ (onehot * (d == y)[:, None])) / n_g,
               # As Fairlearn: a rate without positives (negatives) in a group is 0; a group a resample misses, NaN.
               "tpr": np.where(pos > 0, (weights @ (onehot * (d * y)[:, None])) / pos, 0.0),
               "fpr": np.where(neg > 0, (weights @ (onehot * (d * (1 - y))[:, None])) / neg, 0.0)}
    for m in ("selection_rate", "accuracy", "tpr", "fpr"):
        out[m][n_g == 0] = np.nan
    out["roc_auc"] = np.stack([_weighted_auc(y[onehot[:, k] > 0], scores[onehot[:, k] > 0],
                                             weights[:, onehot[:, k] > 0]) for k in range(len(names))], axis=1)
    sel, tpr, fpr = out["selection_rate"], out["tpr"], out["fpr"]
    with np.errstate(invalid="ignore"), _quiet_nan():
        out["demographic_parity_difference"] = np.nanmax(sel, 1) - np.nanmin(sel, 1)
        out["demographic_parity_ratio"] = _ratio(np.nanmin(sel, 1), np.nanmax(sel, 1))
        out["equalized_odds_difference"] = np.maximum(np.nanmax(tpr, 1) - np.nanmin(tpr, 1),
                                                      np.nanmax(fpr, 1) - np.nanmin(fpr, 1))
        out["equalized_odds_ratio"] = np.minimum(_ratio(np.nanmin(tpr, 1), np.nanmax(tpr, 1)),
                                                 _ratio(np.nanmin(fpr, 1), np.nanmax(fpr, 1)))
    return out


class _quiet_nan:
    """numpy warns on an all-NaN row (a resample without one of the rates); that row's figure is NaN, as meant."""

    def __enter__(self):
        import warnings

        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)

    def __exit__(self, *exc):
        self._w.__exit__(*exc)


def _weighted_auc(y: np.ndarray, scores: np.ndarray, w: np.ndarray) -> np.ndarray:
    """ROC-AUC (ties count half) of rows drawn ``w`` (B, m) times each: the Mann-Whitney statistic."""
    if not len(y):
        return np.full(len(w), np.nan)
    order = np.argsort(scores, kind="stable")
    s, y, w = scores[order], y[order], w[:, order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])  # the first row of each distinct score
    pos_w = np.add.reduceat(w * y, starts, axis=1)  # (B, levels): drawn positives and negatives at each score
    neg_w = np.add.reduceat(w * (1 - y), starts, axis=1)
    below = np.cumsum(neg_w, axis=1) - neg_w
    with np.errstate(invalid="ignore", divide="ignore"):
        return (pos_w * (below + 0.5 * neg_w)).sum(1) / (pos_w.sum(1) * neg_w.sum(1))


def _interval(samples: np.ndarray) -> list[float] | None:
    finite = samples[np.isfinite(samples)]
    if len(finite) < 2:
        return None
    return [round(float(v), 6) for v in np.percentile(finite, [2.5, 97.5])]


def assess(y: np.ndarray, decided: np.ndarray, scores: np.ndarray, groups: list[str], order: list[str] | None,
           bootstrap: int, seed: int) -> dict[str, Any]:
    """Fairlearn's figures for one grouping of one set of decisions, each with its bootstrap 95% interval."""
    figures = fairlearn_figures(y, decided, scores, groups)
    names = [g for g in (order or []) if g in figures["groups"]] + sorted(g for g in figures["groups"]
                                                                           if g not in (order or []))
    figures["groups"] = {g: figures["groups"][g] for g in names}
    small = [g for g in names if figures["groups"][g]["rows"] < SMALL_GROUP]
    if bootstrap:
        rng = np.random.default_rng(seed)
        n = len(y)
        draws = rng.integers(0, n, size=(bootstrap, n))
        weights = np.zeros((bootstrap, n))
        np.add.at(weights, (np.arange(bootstrap)[:, None], draws), 1.0)
        boot = bootstrap_figures(y, decided, scores, groups, names, weights)
        for k, g in enumerate(names):
            figures["groups"][g]["interval"] = {m: _interval(boot[m][:, k]) for m in METRICS}
        figures["disparity_interval"] = {m: _interval(boot[m]) for m in figures["disparity"]}
    for g in names:
        figures["groups"][g]["small"] = g in small
    figures["intervals_unreliable"] = bool(small)
    return figures


# ---- per-group thresholds ---------------------------------------------------------------------------------


def _scores_estimator():
    """A fitted 'estimator' whose input is already the model's P(positive): ThresholdOptimizer(prefit=True)
    thresholds the scores kiln computed, and needs nothing of PyTorch."""
    from sklearn.base import BaseEstimator, ClassifierMixin

    class Scores(ClassifierMixin, BaseEstimator):
        def fit(self, x, y):
            return self

        def predict_proba(self, x):
            p = np.asarray(x, dtype=np.float64)[:, 0]
            return np.column_stack([1.0 - p, p])

        def predict(self, x):
            return (np.asarray(x, dtype=np.float64)[:, 0] >= 0.5).astype(int)

        def __sklearn_is_fitted__(self) -> bool:
            return True

    return Scores()


def fit_thresholds(scores: np.ndarray, y: np.ndarray, groups: list[str], grouping: Grouping, constraint: str,
                   seed: int = 0) -> GroupThresholds:
    """Fairlearn's ThresholdOptimizer on validation scores (float64), kept as plain per-group rules."""
    _, fp = _fairlearn()
    opt = fp.ThresholdOptimizer(estimator=_scores_estimator(), constraints=constraint, objective="accuracy_score",
                                prefit=True, predict_method="predict_proba")
    opt.fit(np.asarray(scores, np.float64)[:, None], np.asarray(y, int), sensitive_features=np.asarray(groups, object))
    rules = {}
    for g, b in opt.interpolated_thresholder_.interpolation_dict.items():
        rules[str(g)] = GroupRule(float(b.p0), b.operation0.operator, float(b.operation0.threshold), float(b.p1),
                                  b.operation1.operator, float(b.operation1.threshold),
                                  float(b.get("p_ignore", 0.0)), float(b.get("prediction_constant", 0.0)))
    return GroupThresholds(grouping, rules, constraint, enabled=True, fitted_on="val", seed=seed)


def set_thresholds(run_path: str | Path, enabled: bool) -> GroupThresholds:
    """Turn a run's saved per-group thresholds on or off for predict and serve."""
    run_dir = RunDir(run_path)
    if not (run_dir / RunDir.FAIRNESS).is_file():
        raise KilnError(f"{run_dir.path} has no {RunDir.FAIRNESS}; fit per-group thresholds first: kiln audit "
                        f"{run_dir.path} --sensitive COLUMN --fit-thresholds")
    rules = GroupThresholds.from_json(run_dir.read_json(RunDir.FAIRNESS), str(run_dir / RunDir.FAIRNESS))
    rules.enabled = enabled
    run_dir.write_json(RunDir.FAIRNESS, rules.to_json())
    return rules


# ---- the audit ---------------------------------------------------------------------------------------------


def _grouping(run: Run, spec: str, split: str, bins: int) -> tuple[Grouping, list[str]]:
    grouping = Grouping.parse(spec)
    values = run.kind.column_values(split, grouping.column)
    grouping = grouping.with_quantile_bins(run.kind.column_values("train", grouping.column), bins)
    return grouping, grouping.groups(values)


def audit(run: str | Path | Run, sensitive: list[str], split: str = "test", bins: int = 4, bootstrap: int = 1000,
          seed: int = 0, fit: str | None = None, write: bool = True) -> dict[str, Any]:
    """The audit of ``run`` on ``split`` for each sensitive column spec; ``fit`` (a constraint) first fits and
    saves per-group thresholds for the first column. Returns what ``audit.json`` holds."""
    _fairlearn()
    run = run if isinstance(run, Run) else Run.load(run)
    if run.kind.task != "binary":
        raise KilnError(f"kiln audit measures binary classification (selection rates, true and false positive "
                        f"rates); {run.path} is a {run.kind.task} run")
    if split not in SPLITS:
        raise KilnError(f"--split must be one of {', '.join(SPLITS)}, not {split!r}")
    if not sensitive:
        raise KilnError("give at least one --sensitive COLUMN")
    if bootstrap < 0 or bins < 2:
        raise KilnError("--bootstrap must be 0 or more and --bins at least 2")
    if fit is not None and fit not in CONSTRAINTS:
        raise KilnError(f"--constraint must be one of {', '.join(CONSTRAINTS)}, not {fit!r}")
    data = run.kind.load()
    x, y = data.split(split)
    if len(y) == 0:
        raise KilnError(f"the {split} split of {run.path} is empty")
    scores = run.from_outputs(run.outputs(x))[:, 1].double().numpy()
    y = y.numpy().astype(int)
    groupings = [_grouping(run, spec, split, bins) for spec in sensitive]
    warnings: list[str] = []
    if fit is not None:
        vx, vy = data.split("val")
        if len(vy) == 0:
            raise KilnError(f"--fit-thresholds fits on the validation split, and {run.path} has none "
                            "(data.val_fraction is 0)")
        grouping, _ = groupings[0]
        val_groups = grouping.groups(run.kind.column_values("val", grouping.column))
        val_scores = run.from_outputs(run.outputs(vx))[:, 1].double().numpy()
        rules = fit_thresholds(val_scores, vy.numpy().astype(int), val_groups, grouping, fit, seed)
        for g in rules.rules:
            if val_groups.count(g) < SMALL_GROUP:
                warnings.append(f"{grouping.column}: the thresholds of group {g!r} were fitted on {val_groups.count(g)} "
                                f"validation rows (fewer than {SMALL_GROUP}); they are unreliable")
        run.dir.write_json(RunDir.FAIRNESS, rules.to_json())
        vars(run).pop("_group_thresholds", None)  # Run.group_thresholds reads the new file
    path = run.dir / RunDir.FAIRNESS
    saved = GroupThresholds.from_json(run.dir.read_json(RunDir.FAIRNESS), str(path)) if path.is_file() else None
    after = None
    if saved is not None:
        raw = run.kind.column_values(split, saved.grouping.column)
        after = saved.decide_raw(scores, x.numpy(), raw).astype(int)
    before = (scores >= run.threshold).astype(int)
    report: dict[str, Any] = {"run": str(run.path), "split": split, "rows": len(y), "positive": run.class_names[1],
                              "threshold": run.threshold, "bootstrap": bootstrap, "seed": seed,
                              "selection": f"the share of rows decided {run.class_names[1]!r}", "sensitive": []}
    for grouping, groups in groupings:
        entry: dict[str, Any] = {"spec": grouping.spec, "column": grouping.column,
                                 "before": assess(y, before, scores, groups, grouping.labels(), bootstrap, seed)}
        if after is not None:
            entry["after"] = assess(y, after, scores, groups, grouping.labels(), bootstrap, seed)
            entry["after_rule"] = (f"per-group thresholds, {saved.constraint}"
                                   + ("" if saved.enabled else "; saved but off for predict and serve"))
        for g, fig in entry["before"]["groups"].items():
            if fig["small"]:
                warnings.append(f"{grouping.column}: group {g!r} has {fig['rows']} rows in the {split} split (fewer "
                                f"than {SMALL_GROUP}); its figures and the intervals of this column are unreliable")
        report["sensitive"].append(entry)
    if saved is not None:
        report["thresholds"] = saved.to_json()
    report["warnings"] = warnings
    if write:
        run.dir.write_json(RunDir.AUDIT, report)
        atomic_write_text(run.dir / RunDir.AUDIT_PLOT, audit_svg(report))
    return report


# ---- the table and the plot ----------------------------------------------------------------------------------


def _fmt(v: float | None) -> str:
    return "  n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def _with_interval(v: float, iv: list[float] | None) -> str:
    return f"{_fmt(v)} [{_fmt(iv[0])}, {_fmt(iv[1])}]" if iv else f"{_fmt(v)}"


def render(report: dict[str, Any]) -> str:
    """The audit as the table ``kiln audit`` prints."""
    lines = [f"{report['run']}: {report['split']} split, {report['rows']} rows; selection = decided "
             f"{report['positive']!r}; 95% bootstrap intervals of {report['bootstrap']} resamples"]
    for entry in report["sensitive"]:
        for stage in ("before", "after"):
            if stage not in entry:
                continue
            fig = entry[stage]
            rule = entry.get("after_rule") if stage == "after" else f"one threshold {report['threshold']:.3g}"
            lines.append("")
            lines.append(f"{entry['spec']} ({stage}: {rule})")
            lines.append(f"  {'group':<14}{'rows':>6}  " + "  ".join(f"{m:<22}" for m in METRICS))
            for g, f in fig["groups"].items():
                iv = f.get("interval", {})
                mark = " !" if f["small"] else ""
                lines.append(f"  {g[:14]:<14}{f['rows']:>6}  " + "  ".join(
                    f"{_with_interval(f[m], iv.get(m)):<22}" for m in METRICS) + mark)
            d, div = fig["disparity"], fig.get("disparity_interval", {})
            for name in ("demographic_parity", "equalized_odds"):
                lines.append(f"  {name.replace('_', ' ')}: difference "
                             f"{_with_interval(d[name + '_difference'], div.get(name + '_difference'))}, ratio "
                             f"{_with_interval(d[name + '_ratio'], div.get(name + '_ratio'))}")
            if fig["intervals_unreliable"]:
                lines.append(f"  ! a group of fewer than {SMALL_GROUP} rows: its figures and these intervals are "
                             "unreliable")
    return "\n".join(lines) + "\n"


COLORS = ("#4477aa", "#ee6677", "#228833", "#ccbb44", "#66ccee", "#aa3377", "#bbbbbb")
PANEL_W, PANEL_H, PAD = 420, 220, 40


def audit_svg(report: dict[str, Any]) -> str:
    """One panel per sensitive column and stage: each group's selection rate, TPR and FPR as bars with their
    95% intervals as whiskers."""
    panels = [(e["spec"], stage, e[stage]) for e in report["sensitive"] for stage in ("before", "after") if stage in e]
    shown = ("selection_rate", "tpr", "fpr")
    width, height = PANEL_W * 2 + PAD, (PANEL_H + PAD) * math.ceil(len(panels) / 2) + PAD
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
             f'font-size="11"><rect width="100%" height="100%" fill="white"/>']
    for k, (spec, stage, fig) in enumerate(panels):
        ox, oy = PAD // 2 + (k % 2) * PANEL_W, PAD + (k // 2) * (PANEL_H + PAD)
        left, top, w, h = ox + 40, oy + 10, PANEL_W - 60, PANEL_H - 50
        title = f"{spec[:48]} ({stage}); DP diff {_fmt(fig['disparity']['demographic_parity_difference'])}"
        parts.append(f'<text x="{ox}" y="{oy - 8}" font-size="12">{escape(title)}</text>')
        parts.append(f'<line x1="{left}" y1="{top + h}" x2="{left + w}" y2="{top + h}" stroke="black"/>')
        for t in (0.0, 0.5, 1.0):
            yy = top + h * (1 - t)
            parts.append(f'<text x="{left - 6}" y="{yy + 4}" text-anchor="end">{t:.1f}</text>'
                         f'<line x1="{left}" y1="{yy}" x2="{left + w}" y2="{yy}" stroke="#ddd"/>')
        groups = list(fig["groups"].items())
        slot = w / len(shown)
        bar = slot * 0.8 / max(len(groups), 1)
        for i, m in enumerate(shown):
            parts.append(f'<text x="{left + slot * (i + 0.5)}" y="{top + h + 16}" text-anchor="middle">{m}</text>')
            for j, (g, f) in enumerate(groups):
                v = f[m]
                x0 = left + slot * i + slot * 0.1 + bar * j
                if v is not None and not math.isnan(v):
                    parts.append(f'<rect x="{x0:.1f}" y="{top + h * (1 - v):.1f}" width="{bar * 0.9:.1f}" '
                                 f'height="{h * v:.1f}" fill="{COLORS[j % len(COLORS)]}"><title>{escape(g)} {m} '
                                 f'{v:.3f}</title></rect>')
                iv = f.get("interval", {}).get(m)
                if iv:
                    cx = x0 + bar * 0.45
                    parts.append(f'<line x1="{cx:.1f}" y1="{top + h * (1 - iv[0]):.1f}" x2="{cx:.1f}" '
                                 f'y2="{top + h * (1 - iv[1]):.1f}" stroke="black"/>')
        for j, (g, f) in enumerate(groups):
            label = f"{g} ({f['rows']}{' !' if f['small'] else ''})"
            parts.append(f'<rect x="{left + j * 95}" y="{top + h + 26}" width="10" height="10" '
                         f'fill="{COLORS[j % len(COLORS)]}"/><text x="{left + j * 95 + 14}" y="{top + h + 35}">'
                         f'{escape(label[:16])}</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def warn(report: dict[str, Any]) -> None:
    for line in report["warnings"]:
        print(f"warning: {line}", file=sys.stderr)
