"""The report's HTML: the page around its sections, and small builders (tables, inline images, any JSON).

The page is one file that needs no network: its style is inline, its figures inline SVG or ``data:`` images, it
has no script, and its Content-Security-Policy forbids loading anything from anywhere, so even a file another
command wrote into the run directory (an explanation's HTML snippet) cannot reach out when it is shown.
"""

from __future__ import annotations

import base64
import io
import json
import math
from html import escape
from typing import Any

import numpy as np

# Nothing may be fetched: images only from data: URIs, styles only inline, no scripts, frames only srcdoc ones.
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
CSS = """
body{font:14px/1.45 system-ui,-apple-system,'Segoe UI',sans-serif;color:#222;margin:0;background:#f6f6f4}
header{background:#2b2d42;color:#fff;padding:18px 32px}header h1{margin:0 0 4px;font-size:24px}
header p{margin:0;color:#cfd2e6}nav{margin-top:10px}nav a{color:#fff;margin-right:14px;font-size:13px}
main{max-width:1180px;margin:0 auto;padding:12px 32px 48px}
section{background:#fff;border:1px solid #e2e2de;border-radius:6px;margin:18px 0;padding:6px 22px 18px}
h2{font-size:19px;border-bottom:1px solid #eee;padding-bottom:6px}h3{font-size:15px;margin:16px 0 6px}
table{border-collapse:collapse;margin:6px 0;font-size:13px}td,th{border:1px solid #e0e0e0;padding:3px 8px;
text-align:left;vertical-align:top}th{background:#f3f3f0}td.num{text-align:right;font-variant-numeric:tabular-nums}
pre{background:#f7f7f7;border:1px solid #e6e6e6;padding:10px;overflow:auto;font-size:12px;max-height:520px}
figure{display:inline-block;margin:8px 16px 8px 0;vertical-align:top}figcaption{font-size:12px;color:#555;
max-width:500px}img.sample{image-rendering:pixelated;width:84px;border:1px solid #ccc}
img.plot{max-width:100%}.note{color:#666;font-size:13px}.row{font-size:12px;max-width:640px}
.tokens span{padding:1px 2px;border-radius:2px}iframe{border:1px solid #ddd;width:100%;height:140px}
.cards{display:flex;flex-wrap:wrap;gap:12px}.card{border:1px solid #e4e4e4;border-radius:4px;padding:8px;
max-width:500px}
"""


def page(title: str, subtitle: str, sections: list[tuple[str, str, str]]) -> str:
    """The whole document: ``sections`` are (id, heading, inner HTML), in order."""
    nav = "".join(f'<a href="#{escape(i)}">{escape(h)}</a>' for i, h, _ in sections)
    body = "".join(f'<section id="{escape(i)}"><h2>{escape(h)}</h2>{html}</section>' for i, h, html in sections)
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<title>{escape(title)}</title><style>{CSS}</style></head><body>'
            f'<header><h1>{escape(title)}</h1><p>{escape(subtitle)}</p><nav>{nav}</nav></header>'
            f'<main>{body}</main></body></html>\n')


def fmt(v: Any) -> str:
    """A value as a table shows it: floats to 4 significant digits, big counts with separators."""
    if isinstance(v, bool) or v is None:
        return "" if v is None else str(v).lower()
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if math.isnan(v):
            return "n/a"
        return f"{v:,.0f}" if abs(v) >= 1e5 else f"{v:.4g}"
    return str(v)


def table(header: list[str], rows: list[list[Any]], table_id: str | None = None) -> str:
    """An HTML table; numbers right-aligned; every value escaped."""
    head = "<tr>" + "".join(f"<th>{escape(str(h))}</th>" for h in header) + "</tr>" if any(header) else ""
    body = "".join("<tr>" + "".join(
        f'<td class="num">{escape(fmt(v))}</td>' if isinstance(v, int | float) and not isinstance(v, bool)
        else f"<td>{v.html if isinstance(v, Raw) else escape(fmt(v))}</td>" for v in row) + "</tr>" for row in rows)
    return f'<table{f" id={chr(34)}{escape(table_id)}{chr(34)}" if table_id else ""}>{head}{body}</table>'


class Raw:
    """HTML already built (a cell of :func:`table` that holds an image or markup)."""

    def __init__(self, html: str) -> None:
        self.html = html


def data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def png(pixels: np.ndarray) -> bytes:
    """uint8 pixels (H, W) or (H, W, C) as PNG bytes."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def figure(inner: str, caption: str, fig_id: str | None = None) -> str:
    attr = f' id="{escape(fig_id)}"' if fig_id else ""
    return f"<figure{attr}>{inner}<figcaption>{escape(caption)}</figcaption></figure>"


MAX_ROWS = 200  # rows of one table rendered from JSON
MAX_DEPTH = 4


def _scalar(v: Any) -> bool:
    return v is None or isinstance(v, str | int | float | bool)


def json_html(obj: Any, depth: int = 0) -> str:
    """Any JSON as readable tables: scalars as key/value rows, a list of records or a mapping of records as one
    table, lists of scalars inline; deeper structure under its key as a heading."""
    if _scalar(obj):
        return f"<p>{escape(fmt(obj))}</p>"
    if depth >= MAX_DEPTH:
        return f"<pre>{escape(json.dumps(obj, indent=1)[:4000])}</pre>"
    if isinstance(obj, list):
        if obj and all(isinstance(r, dict) and all(_scalar(v) or _short_list(v) for v in r.values()) for r in obj):
            cols = list(dict.fromkeys(k for r in obj for k in r))
            return table(cols, [[_cell(r.get(c)) for c in cols] for r in obj[:MAX_ROWS]])
        if all(_scalar(v) for v in obj):
            return f"<p>{escape(', '.join(fmt(v) for v in obj[:MAX_ROWS]))}</p>"
        return "".join(json_html(v, depth + 1) for v in obj[:MAX_ROWS])
    scalars = [[k, _cell(v)] for k, v in obj.items() if _scalar(v) or _short_list(v)]
    out = [table(["", ""], scalars)] if scalars else []
    for k, v in obj.items():
        if _scalar(v) or _short_list(v):
            continue
        out.append(f"<h3>{escape(str(k))}</h3>")
        records = isinstance(v, dict) and v and all(
            isinstance(r, dict) and all(_scalar(x) or _short_list(x) for x in r.values()) for r in v.values())
        if records:
            cols = list(dict.fromkeys(c for r in v.values() for c in r))
            out.append(table(["", *cols], [[name, *(_cell(r.get(c)) for c in cols)]
                                           for name, r in list(v.items())[:MAX_ROWS]]))
        else:
            out.append(json_html(v, depth + 1))
    return "".join(out)


def _short_list(v: Any) -> bool:
    return isinstance(v, list) and len(v) <= 8 and all(isinstance(x, int | float | str) for x in v)


def _cell(v: Any) -> Any:
    if isinstance(v, list):
        return "[" + ", ".join(fmt(x) for x in v) + "]"
    return "" if v is None else v
