"""The report's figures as inline SVG, drawn by hand: no plotting library, a few kilobytes each, and any browser
shows them without a network. Each function returns one ``<svg>`` element with the given ``id``.

- :func:`lines`: curves (and optional points) on shared axes, with a legend: learning curves, calibration
- :func:`scatter`: points, with the line y = x: predicted against true values
- :func:`heatmap`: a matrix of counts with its labels: a confusion matrix
- :func:`hbars`: horizontal bars of signed values, largest first: attributions, importances
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from html import escape

WIDTH, HEIGHT = 500, 320  # pixels of a chart: two side by side on the page
LEFT, RIGHT, TOP, BOTTOM = 64, 140, 34, 46  # margins around the plotting area (the legend sits on the right)
COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf")
MAX_POINTS = 1500  # a curve or scatter is thinned to about this many points
STYLE = ("<style>text{font:12px sans-serif;fill:#222}.grid{stroke:#e4e4e4}.axis{stroke:#888}"
         ".diag{stroke:#999;stroke-dasharray:4 3}</style>")


def ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """About ``count`` round values covering [lo, hi] (1, 2 or 5 times a power of ten apart)."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo]
    raw = (hi - lo) / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    return [round(first + i * step, 12) for i in range(int((hi - first) / step + 1e-9) + 1)]


def _label(v: float) -> str:
    return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.2e}"


def _span(values: Sequence[float], pad: float = 0.0) -> tuple[float, float]:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return 0.0, 1.0
    lo, hi = min(finite), max(finite)
    if hi == lo:
        lo, hi = lo - 0.5, hi + 0.5
    margin = (hi - lo) * pad
    return lo - margin, hi + margin


def _thin(xs: Sequence[float], ys: Sequence[float]) -> list[tuple[float, float]]:
    step = max(1, math.ceil(len(xs) / MAX_POINTS))
    return [(x, y) for x, y in list(zip(xs, ys, strict=True))[::step] if math.isfinite(x) and math.isfinite(y)]


class _Axes:
    """Maps data coordinates to pixels and draws the grid, tick labels and axis titles."""

    def __init__(self, xspan: tuple[float, float], yspan: tuple[float, float], width: int = WIDTH,
                 height: int = HEIGHT, right: int = RIGHT) -> None:
        self.x0, self.x1 = xspan
        self.y0, self.y1 = yspan
        self.w, self.h, self.right = width, height, right

    def px(self, x: float, y: float) -> tuple[float, float]:
        fx = (x - self.x0) / (self.x1 - self.x0)
        fy = (y - self.y0) / (self.y1 - self.y0)
        return LEFT + fx * (self.w - LEFT - self.right), TOP + (1 - fy) * (self.h - TOP - BOTTOM)

    def frame(self, title: str, xlabel: str, ylabel: str) -> list[str]:
        out = [(f'<text x="{(LEFT + self.w - self.right) / 2:.0f}" y="18" text-anchor="middle" '
                f'font-weight="bold">{escape(title)}</text>')]
        bottom, right = self.h - BOTTOM, self.w - self.right
        for t in ticks(self.x0, self.x1):
            x, _ = self.px(t, self.y0)
            out.append(f'<line class="grid" x1="{x:.1f}" y1="{TOP}" x2="{x:.1f}" y2="{bottom}"/>'
                       f'<text x="{x:.1f}" y="{bottom + 15}" text-anchor="middle">{_label(t)}</text>')
        for t in ticks(self.y0, self.y1):
            _, y = self.px(self.x0, t)
            out.append(f'<line class="grid" x1="{LEFT}" y1="{y:.1f}" x2="{right}" y2="{y:.1f}"/>'
                       f'<text x="{LEFT - 5}" y="{y + 4:.1f}" text-anchor="end">{_label(t)}</text>')
        out.append(f'<rect x="{LEFT}" y="{TOP}" width="{right - LEFT}" height="{bottom - TOP}" fill="none" '
                   f'class="axis"/>')
        out.append(f'<text x="{(LEFT + right) / 2:.0f}" y="{self.h - 8}" text-anchor="middle">{escape(xlabel)}</text>')
        mid = (TOP + bottom) / 2
        out.append(f'<text x="14" y="{mid:.0f}" text-anchor="middle" transform="rotate(-90 14 {mid:.0f})">'
                   f'{escape(ylabel)}</text>')
        return out


def _svg(fig_id: str, width: int, height: int, body: list[str], label: str) -> str:
    return (f'<svg id="{escape(fig_id)}" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" role="img" aria-label="{escape(label)}">{STYLE}'
            f'<rect width="{width}" height="{height}" fill="white"/>{"".join(body)}</svg>')


def lines(fig_id: str, series: list[tuple[str, Sequence[float], Sequence[float]]], *, title: str, xlabel: str,
          ylabel: str, diagonal: bool = False, points: bool = False, yspan: tuple[float, float] | None = None,
          xspan: tuple[float, float] | None = None, connect: bool = True) -> str:
    """Curves (name, xs, ys) on shared axes; ``diagonal`` draws y = x (a perfectly calibrated model); without
    ``connect`` only the points."""
    xs = [x for _, sx, _ in series for x in sx]
    ys = [y for _, _, sy in series for y in sy]
    axes = _Axes(xspan or _span(xs), yspan or _span(ys, 0.05))
    body = axes.frame(title, xlabel, ylabel)
    if diagonal:
        (a, b), (c, d) = axes.px(axes.x0, axes.x0), axes.px(axes.x1, axes.x1)
        body.append(f'<line class="diag" x1="{a:.1f}" y1="{b:.1f}" x2="{c:.1f}" y2="{d:.1f}"/>')
    for i, (name, sx, sy) in enumerate(series):
        colour = COLOURS[i % len(COLOURS)]
        pts = [axes.px(x, y) for x, y in _thin(sx, sy)]
        if connect and len(pts) > 1:
            body.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" '
                        f'points="{" ".join(f"{x:.1f},{y:.1f}" for x, y in pts)}"/>')
        if points or not connect or len(pts) == 1:
            body += [f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{colour}"/>' for x, y in pts]
        ly = TOP + 8 + 18 * i
        lx = WIDTH - RIGHT + 12
        body.append(f'<line x1="{lx}" y1="{ly}" x2="{lx + 18}" y2="{ly}" stroke="{colour}" stroke-width="3"/>'
                    f'<text x="{lx + 24}" y="{ly + 4}">{escape(name[:20])}</text>')
    return _svg(fig_id, WIDTH, HEIGHT, body, title)


def scatter(fig_id: str, xs: Sequence[float], ys: Sequence[float], *, title: str, xlabel: str, ylabel: str) -> str:
    """Points (x, y) with the line y = x, on one range for both axes (predicted against true)."""
    span = _span([*xs, *ys], 0.03)
    axes = _Axes(span, span, right=RIGHT // 3)
    width = WIDTH - RIGHT + RIGHT // 3
    body = axes.frame(title, xlabel, ylabel)
    (a, b), (c, d) = axes.px(span[0], span[0]), axes.px(span[1], span[1])
    body.append(f'<line class="diag" x1="{a:.1f}" y1="{b:.1f}" x2="{c:.1f}" y2="{d:.1f}"/>')
    body += [f'<circle cx="{px:.1f}" cy="{py:.1f}" r="2.5" fill="{COLOURS[0]}" fill-opacity="0.5"/>'
             for px, py in (axes.px(x, y) for x, y in _thin(xs, ys))]
    return _svg(fig_id, width, HEIGHT, body, title)


def heatmap(fig_id: str, matrix: Sequence[Sequence[int]], labels: Sequence[str], *, title: str,
            xlabel: str = "predicted", ylabel: str = "true") -> str:
    """A square matrix of counts (rows: true class, columns: predicted), each cell shaded by its share of its
    row and labelled with its count."""
    n = len(labels)
    cell = max(14, min(48, 480 // max(n, 1)))
    short = [escape(str(name)[:12]) for name in labels]
    left, top = 100, 34
    width, height = max(left + n * cell + 20, 320), top + n * cell + 70
    middle, bottom = top + n * cell / 2, top + n * cell
    body = [f'<text x="{width / 2:.0f}" y="18" text-anchor="middle" font-weight="bold">{escape(title)}</text>',
            f'<text x="{left + n * cell / 2:.0f}" y="{bottom + 62}" text-anchor="middle">{escape(xlabel)}</text>',
            (f'<text x="12" y="{middle:.0f}" text-anchor="middle" '
             f'transform="rotate(-90 12 {middle:.0f})">{escape(ylabel)}</text>')]
    small = cell < 30
    for i, row in enumerate(matrix):
        total = sum(row) or 1
        y = top + i * cell
        body.append(f'<text x="{left - 4}" y="{y + cell / 2 + 4:.1f}" text-anchor="end">{short[i]}</text>')
        for j, count in enumerate(row):
            share = count / total
            colour = f"rgb({int(255 - 224 * share)},{int(255 - 136 * share)},{int(255 - 75 * share)})"
            text = "#fff" if share > 0.5 else "#222"
            body.append(f'<rect x="{left + j * cell}" y="{y}" width="{cell}" height="{cell}" fill="{colour}" '
                        f'stroke="#fff"><title>true {short[i]}, predicted {short[j]}: {count}</title></rect>')
            if count and not (small and count < 1):
                size = 9 if small else 12
                body.append(f'<text x="{left + j * cell + cell / 2:.1f}" y="{y + cell / 2 + 4:.1f}" '
                            f'text-anchor="middle" style="font-size:{size}px;fill:{text}">{count}</text>')
    for j in range(n):
        x = left + j * cell + cell / 2
        body.append(f'<text x="{x:.1f}" y="{top + n * cell + 14}" text-anchor="end" '
                    f'transform="rotate(-45 {x:.1f} {top + n * cell + 14})">{short[j]}</text>')
    return _svg(fig_id, width, height, body, title)


def hbars(fig_id: str, items: Sequence[tuple[str, float]], *, title: str) -> str:
    """Horizontal bars of signed values (name, value), in the order given: positive right, negative left."""
    bar, left, right = 18, 170, 70
    width, height = 560, 40 + bar * len(items) + 10
    top = 34
    biggest = max((abs(v) for _, v in items), default=1.0) or 1.0
    zero = left + (width - left - right) / 2 if any(v < 0 for _, v in items) else left
    scale = (width - right - zero) / biggest
    body = [f'<text x="{width / 2:.0f}" y="18" text-anchor="middle" font-weight="bold">{escape(title)}</text>',
            f'<line class="axis" x1="{zero:.1f}" y1="{top - 4}" x2="{zero:.1f}" y2="{top + bar * len(items)}"/>']
    for i, (name, value) in enumerate(items):
        y = top + i * bar
        w = abs(value) * scale
        x = zero if value >= 0 else zero - w
        colour = COLOURS[0] if value >= 0 else COLOURS[1]
        body.append(f'<text x="{left - 6}" y="{y + 13}" text-anchor="end">{escape(str(name)[:26])}</text>'
                    f'<rect x="{x:.1f}" y="{y + 2}" width="{max(w, 0.5):.1f}" height="{bar - 4}" fill="{colour}"/>'
                    f'<text x="{(x + w + 4) if value >= 0 else (x - 4):.1f}" y="{y + 13}" '
                    f'text-anchor="{"start" if value >= 0 else "end"}">{value:.3g}</text>')
    return _svg(fig_id, width, height, body, title)
