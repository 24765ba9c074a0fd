"""Line charts as PNG, drawn with Pillow (a dependency of kiln already): the learning-rate finder's loss curve
and the benchmarks' accuracy curves. Axes, ticks (decades on a log scale), a legend and vertical marks."""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from kiln.fsutil import atomic_write_bytes

COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b"]
LEFT, RIGHT, TOP, BOTTOM = 70, 20, 44, 52  # margins around the plotting area, pixels


@dataclass
class Series:
    label: str
    xs: list[float]
    ys: list[float]
    color: str | None = None
    width: int = 2
    dots: bool = False  # a marker at each point (few points, e.g. one per epoch)


def _nice_ticks(lo: float, hi: float, count: int = 6) -> list[float]:
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / count
    step = 10 ** math.floor(math.log10(raw))
    step *= next(m for m in (1, 2, 2.5, 5, 10) if m * step >= raw)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def _label(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1e4 or abs(v) < 1e-3:
        return f"{v:.0e}".replace("e-0", "e-").replace("e+0", "e")
    return f"{v:g}"


def line_chart(series: list[Series], *, title: str, xlabel: str, ylabel: str, xlog: bool = False,
               ylim: tuple[float, float] | None = None, marks: list[tuple[float, str, str]] = (), size=(720, 440),
               legend: str = "lower right") -> Image.Image:
    """The chart as an RGB image; points outside ``ylim`` are drawn at its edge. ``legend``: lower/upper
    left/right, the corner of the plotting area the legend goes in; ``marks``: vertical lines (x, label, colour)."""
    width, height = size
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    font, small = ImageFont.load_default(size=14), ImageFont.load_default(size=12)
    fx = (lambda v: math.log10(v)) if xlog else (lambda v: v)
    points = [(fx(x), y) for s in series for x, y in zip(s.xs, s.ys, strict=True)
              if math.isfinite(y) and (x > 0 or not xlog)]
    x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
    y0, y1 = ylim or (min(p[1] for p in points), max(p[1] for p in points))
    if x1 == x0:
        x1 = x0 + 1
    if y1 == y0:
        y1 = y0 + 1
    pad = 0.04 * (y1 - y0)
    y0, y1 = y0 - pad, y1 + pad
    w, h = width - LEFT - RIGHT, height - TOP - BOTTOM

    def px(x: float, y: float) -> tuple[float, float]:
        y = min(max(y, y0), y1)
        return LEFT + (x - x0) / (x1 - x0) * w, TOP + (1 - (y - y0) / (y1 - y0)) * h

    xticks = ([float(k) for k in range(math.ceil(x0), math.floor(x1) + 1)] if xlog else _nice_ticks(x0, x1))
    for t in xticks:
        x, _ = px(t, y0)
        d.line([(x, TOP), (x, TOP + h)], fill="#e4e4e4")
        d.text((x, TOP + h + 6), _label(10 ** t if xlog else t), fill="black", font=small, anchor="ma")
    for t in _nice_ticks(y0, y1):
        _, y = px(x0, t)
        d.line([(LEFT, y), (LEFT + w, y)], fill="#e4e4e4")
        d.text((LEFT - 6, y), _label(round(t, 10)), fill="black", font=small, anchor="rm")
    d.rectangle([LEFT, TOP, LEFT + w, TOP + h], outline="#888888")
    for i, (x, text, color) in enumerate(marks):
        mx, _ = px(fx(x), y0)
        d.line([(mx, TOP), (mx, TOP + h)], fill=color, width=2)
        right = mx + 4 + d.textlength(text, font=small) < LEFT + w
        d.text((mx + 4 if right else mx - 4, TOP + 4 + 16 * i), text, fill=color, font=small,
               anchor="la" if right else "ra")
    for i, s in enumerate(series):
        color = s.color or COLORS[i % len(COLORS)]
        pts = [px(fx(x), y) for x, y in zip(s.xs, s.ys, strict=True) if math.isfinite(y) and (x > 0 or not xlog)]
        if len(pts) > 1:
            d.line(pts, fill=color, width=s.width, joint="curve")
        if s.dots:
            for x, y in pts:
                d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=color)
    labelled = [s for s in series if s.label]
    lx = LEFT + 10 if legend.endswith("left") else LEFT + w - 10 - max((d.textlength(s.label, font=small)
                                                                         for s in labelled), default=0) - 30
    for i, s in enumerate(labelled):
        y = TOP + 8 + 18 * i if legend.startswith("upper") else TOP + h - 18 * (len(labelled) - i) - 6
        color = s.color or COLORS[series.index(s) % len(COLORS)]
        d.line([(lx, y + 7), (lx + 24, y + 7)], fill=color, width=3)
        d.text((lx + 30, y), s.label, fill="black", font=small)
    d.text((width / 2, 12), title, fill="black", font=font, anchor="ma")
    d.text((LEFT + w / 2, height - 18), xlabel, fill="black", font=font, anchor="ma")
    label = Image.new("RGB", (h, 20), "white")
    ImageDraw.Draw(label).text((h / 2, 2), ylabel, fill="black", font=font, anchor="ma")
    img.paste(label.rotate(90, expand=True), (6, TOP))
    return img


def write_png(path: Path, image: Image.Image) -> None:
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    atomic_write_bytes(path, buf.getvalue())
