"""What a study leaves in its output folder, rewritten (atomically) whenever a command finishes:

    best.yaml         the best trial's config: `kiln train best.yaml` trains it again
    trials.csv        one row per trial: number, state, value, per-fold values, seconds, parameters, run, note
    trials.md         the same as a Markdown table, best first
    importances.json  each parameter's share of the objective's variance (Optuna's fANOVA evaluator)
    history.svg       the objective of every trial and the best so far, by trial number
    tune.json         a summary: study, storage, metric, counts, best trial, importances
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

from kiln.config import load_config
from kiln.fsutil import atomic_write_text
from kiln.tuning.study import optuna

BEST = "best.yaml"
TRIALS_CSV = "trials.csv"
TRIALS_MD = "trials.md"
IMPORTANCES = "importances.json"
HISTORY = "history.svg"
SUMMARY = "tune.json"


def note(t) -> str:
    a = t.user_attrs
    if "error" in a:
        return "error: " + a["error"].splitlines()[0][:200]
    if "lost" in a:
        return f"lost: {a['lost']}"
    if a.get("surplus"):
        return "not needed (the study had its trials)"
    if t.state.name == "PRUNED" and t.intermediate_values:
        step = max(t.intermediate_values)
        return f"pruned at step {step} ({t.intermediate_values[step]:.4f})"
    return f"retry of trial {a['retry_of']}" if "retry_of" in a else ""


def rows(study, keys: list[str]) -> list[dict[str, Any]]:
    out = []
    for t in study.get_trials(deepcopy=False):
        seconds = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete and \
            t.datetime_start else None
        out.append({"number": t.number, "state": t.state.name.lower(), "value": t.value,
                    "folds": " ".join(f"{v:.4f}" for v in t.user_attrs.get("folds", [])),
                    "seconds": None if seconds is None else round(seconds, 1),
                    **{k: t.params.get(k) for k in keys}, "run": t.user_attrs.get("run", ""), "note": note(t)})
    return out


def importances(study) -> dict[str, Any]:
    """fANOVA importances over the complete trials (parameters every one of them has), or why there are none."""
    op = optuna()
    complete = study.get_trials(deepcopy=False, states=(op.trial.TrialState.COMPLETE,))
    if len(complete) < 2:
        return {"error": f"{len(complete)} complete trial(s); importances need at least 2"}
    try:
        found = op.importance.get_param_importances(study, evaluator=op.importance.FanovaImportanceEvaluator(seed=0))
    except (ValueError, RuntimeError) as e:
        return {"error": str(e)}
    return {k: round(float(v), 4) for k, v in found.items()}


def history_svg(study, metric: str, maximize: bool) -> str:
    """Each complete trial's value (dots), pruned trials at their last reported value (grey), the best so far."""
    op = optuna()
    w, h, left, right, top, bottom = 560, 360, 64, 20, 40, 46
    points = []
    for t in study.get_trials(deepcopy=False):
        if t.state == op.trial.TrialState.COMPLETE and t.value is not None and math.isfinite(t.value):
            points.append((t.number, t.value, True))
        elif t.state == op.trial.TrialState.PRUNED and t.intermediate_values:
            points.append((t.number, t.intermediate_values[max(t.intermediate_values)], False))
    head = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}">\n'
            "<style>text { font: 12px sans-serif; } .grid { stroke: #ddd; } .best { fill: none; stroke: #d62728; "
            "stroke-width: 2; }</style>\n"
            f'<rect width="{w}" height="{h}" fill="white"/>\n'
            f'<text x="{w / 2}" y="18" text-anchor="middle">{escape(study.study_name)}: {escape(metric)} by trial '
            f'({"higher" if maximize else "lower"} is better)</text>\n')
    if not points:
        return head + f'<text x="{w / 2}" y="{h / 2}" text-anchor="middle">no finished trials yet</text>\n</svg>\n'
    xs = [p[0] for p in points]
    ys = [p[1] for p in points]
    x0, x1 = min(xs), max(max(xs), min(xs) + 1)
    y0, y1 = min(ys), max(ys)
    pad = (y1 - y0) * 0.05 or abs(y0) * 0.05 or 1.0
    y0, y1 = y0 - pad, y1 + pad

    def xy(x: float, y: float) -> tuple[float, float]:
        return (left + (x - x0) / (x1 - x0) * (w - left - right), top + (y1 - y) / (y1 - y0) * (h - top - bottom))

    parts = [head]
    for i in range(5):
        v = y0 + (y1 - y0) * i / 4
        _, py = xy(x0, v)
        parts.append(f'<line x1="{left}" y1="{py:.1f}" x2="{w - right}" y2="{py:.1f}" class="grid"/>'
                     f'<text x="{left - 6}" y="{py + 4:.1f}" text-anchor="end">{v:.4g}</text>\n')
    best, line = None, []
    for x, y, done in sorted(points):
        px, py = xy(x, y)
        parts.append(f'<circle cx="{px:.1f}" cy="{py:.1f}" r="3.5" fill="{"#1f77b4" if done else "#bbb"}"/>\n')
        if done and (best is None or (y > best if maximize else y < best)):
            best = y
        if best is not None:
            line.append("{:.1f},{:.1f}".format(*xy(x, best)))
    parts.append(f'<polyline class="best" points="{" ".join(line)}"/>\n')
    for x in sorted({x0, x1, (x0 + x1) // 2}):
        px, _ = xy(x, y0)
        parts.append(f'<text x="{px:.1f}" y="{h - bottom + 16}" text-anchor="middle">{x}</text>\n')
    parts.append(f'<text x="{(left + w - right) / 2}" y="{h - 10}" text-anchor="middle">trial (blue: complete, grey: '
                 'pruned at its last report, red: best so far)</text>\n</svg>\n')
    return "".join(parts)


def write_outputs(study, out: Path, base: dict[str, Any], keys: list[str], metric: str, info: dict[str, Any]
                  ) -> dict[str, Any]:
    """Write the files above from the study as it stands; returns the summary (tune.json)."""
    op = optuna()
    maximize = study.direction == op.study.StudyDirection.MAXIMIZE
    table = rows(study, keys)
    counts: dict[str, int] = {}
    for r in table:
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    summary: dict[str, Any] = {**info, "metric": metric, "direction": "maximize" if maximize else "minimize",
                               "trials": counts, "best": None}
    try:
        best = study.best_trial
    except ValueError:
        best = None
    if best is not None:
        cfg = load_config(base, best.params)
        runs = best.user_attrs.get("run")
        spread = best.user_attrs.get("folds")
        how = f"mean of {len(spread)} folds" if spread else "validation split"
        atomic_write_text(out / BEST, f"# kiln tune: the best of {counts.get('complete', 0)} complete trials of study "
                                      f"{study.study_name!r}: trial {best.number}, {metric} {best.value:.4f} ({how})\n"
                                      f"# parameters: {json.dumps(best.params)}\n" + cfg.to_yaml())
        summary["best"] = {"number": best.number, "value": best.value, "params": best.params, "run": runs,
                           "folds": spread, "config": str(out / BEST)}
    summary["importances"] = importances(study)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(table[0]) if table else ["number"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(table)
    atomic_write_text(out / TRIALS_CSV, buf.getvalue())
    atomic_write_text(out / TRIALS_MD, markdown(table, keys, metric, maximize))
    atomic_write_text(out / IMPORTANCES, json.dumps(summary["importances"], indent=2) + "\n")
    atomic_write_text(out / HISTORY, history_svg(study, metric, maximize))
    atomic_write_text(out / SUMMARY, json.dumps(summary, indent=2, default=str) + "\n")
    return summary


def markdown(table: list[dict[str, Any]], keys: list[str], metric: str, maximize: bool) -> str:
    def order(r: dict[str, Any]) -> tuple:
        v = r["value"]
        return (v is None or r["state"] != "complete", -(v or 0) if maximize else (v or 0), r["number"])

    head = ["trial", "state", metric, "seconds", *keys, "note"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in sorted(table, key=order):
        cells = [r["number"], r["state"], "" if r["value"] is None else f"{r['value']:.4f}", r["seconds"] or "",
                 *("" if r[k] is None else (f"{r[k]:.4g}" if isinstance(r[k], float) else r[k]) for k in keys),
                 r["note"]]
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"
