"""Plots a run directory keeps, written as SVG by hand: no plotting library, and any browser shows them.

- ``precision_recall.svg`` (binary classification): precision against recall on the test split, the curve of
  every decision threshold, with the run's chosen threshold marked and the positive-class base rate drawn as
  the line a model without skill would follow.
"""

from __future__ import annotations

from pathlib import Path
from xml.sax.saxutils import escape

import numpy as np

from kiln.fsutil import atomic_write_text
from kiln.training.metrics import average_precision, precision_recall_curve

WIDTH, HEIGHT = 480, 400  # pixels of the whole picture
LEFT, RIGHT, TOP, BOTTOM = 60, 20, 40, 50  # margins around the plotting area
MAX_POINTS = 2000  # the curve is thinned to about this many points (a large test split has one per row)


def _xy(recall: float, precision: float) -> str:
    x = LEFT + recall * (WIDTH - LEFT - RIGHT)
    y = TOP + (1.0 - precision) * (HEIGHT - TOP - BOTTOM)
    return f"{x:.1f},{y:.1f}"


def precision_recall_svg(p: np.ndarray, t: np.ndarray, threshold: float, title: str) -> str:
    """The SVG text of the precision-recall curve of scores ``p`` (P(positive)) against labels ``t`` (0/1)."""
    precision, recall, _ = precision_recall_curve(p, t)
    keep = np.unique(np.linspace(0, len(recall) - 1, min(len(recall), MAX_POINTS)).round().astype(int))
    # A step curve starts at recall 0 with the precision of the highest-scoring rows.
    points = [_xy(0.0, float(precision[0]))] + [_xy(float(r), float(q)) for r, q in zip(recall[keep], precision[keep],
                                                                                       strict=True)]
    pred = p >= threshold
    tp = int((pred & (t == 1)).sum())
    at_p, at_r = (tp / int(pred.sum()) if pred.sum() else 1.0), tp / max(int(t.sum()), 1)
    base = float(t.mean()) if len(t) else 0.0
    grid = []
    for v in (0.0, 0.2, 0.4, 0.6, 0.8, 1.0):
        x0, y0 = _xy(v, 0.0).split(","), _xy(0.0, v).split(",")
        grid.append(f'<line x1="{x0[0]}" y1="{TOP}" x2="{x0[0]}" y2="{HEIGHT - BOTTOM}" class="grid"/>'
                    f'<text x="{x0[0]}" y="{HEIGHT - BOTTOM + 16}" text-anchor="middle">{v:.1f}</text>'
                    f'<line x1="{LEFT}" y1="{y0[1]}" x2="{WIDTH - RIGHT}" y2="{y0[1]}" class="grid"/>'
                    f'<text x="{LEFT - 6}" y="{float(y0[1]) + 4:.1f}" text-anchor="end">{v:.1f}</text>')
    b0, b1 = _xy(0.0, base), _xy(1.0, base)
    mark = _xy(at_r, at_p).split(",")
    return f"""<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}">
<style>text {{ font: 12px sans-serif; }} .grid {{ stroke: #ddd; }} .curve {{ fill: none; stroke: #1f77b4; stroke-width: 2; }}
.base {{ stroke: #999; stroke-dasharray: 4 3; }}</style>
<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>
<text x="{WIDTH / 2}" y="18" text-anchor="middle">{escape(title)}</text>
<text x="{WIDTH / 2}" y="32" text-anchor="middle">PR-AUC (average precision) {average_precision(p, t):.4f}, \
{len(t)} rows, {int(t.sum())} positive</text>
{''.join(grid)}
<line x1="{b0.split(',')[0]}" y1="{b0.split(',')[1]}" x2="{b1.split(',')[0]}" y2="{b1.split(',')[1]}" class="base"/>
<polyline class="curve" points="{' '.join(points)}"/>
<circle cx="{mark[0]}" cy="{mark[1]}" r="5" fill="#d62728"/>
<text x="{float(mark[0]) + (8 if at_r < 0.5 else -8):.1f}" y="{float(mark[1]) - 8:.1f}" text-anchor="{'start' if at_r < 0.5 else 'end'}">threshold {threshold:.2f}: precision {at_p:.3f}, \
recall {at_r:.3f}</text>
<text x="{(LEFT + WIDTH - RIGHT) / 2}" y="{HEIGHT - 12}" text-anchor="middle">recall</text>
<text x="16" y="{(TOP + HEIGHT - BOTTOM) / 2}" text-anchor="middle" \
transform="rotate(-90 16 {(TOP + HEIGHT - BOTTOM) / 2})">precision</text>
</svg>
"""


def write_precision_recall(path: Path, p: np.ndarray, t: np.ndarray, threshold: float, title: str) -> None:
    atomic_write_text(path, precision_recall_svg(p, t, threshold, title))
