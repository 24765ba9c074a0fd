"""Pictures of attributions, one form per kind of explanation: an image's overlay (PNG), a ranked bar chart of
columns (SVG) and coloured tokens (an HTML snippet). Red is for evidence for the explained output, blue against it.
All written with Pillow or as plain text: nothing to download to view them."""

from __future__ import annotations

import html
import io
from pathlib import Path

import numpy as np
import torch

from kiln.fsutil import atomic_write_bytes, atomic_write_text

SCALE_TO = 224  # pixels of an image panel's longer side (small inputs are enlarged, nearest neighbour)
RED, BLUE = np.array([220, 40, 40]), np.array([40, 90, 220])


def image_png(path: Path, pixels: torch.Tensor, values: torch.Tensor) -> None:
    """The input (uint8 (C, H, W)) beside it greyed with its attributions (summed over channels) laid over it."""
    from PIL import Image

    img = pixels.to(torch.uint8).cpu().numpy()
    rgb = np.repeat(img, 3, axis=0) if img.shape[0] == 1 else img[:3]
    rgb = rgb.transpose(1, 2, 0).astype(np.float64)  # (H, W, 3)
    heat = values.detach().float().cpu().sum(0).numpy()  # (H, W)
    top = float(np.abs(heat).max()) or 1.0
    strength = np.clip(np.abs(heat) / top, 0, 1)[..., None]
    colour = np.where(heat[..., None] >= 0, RED, BLUE)
    grey = rgb.mean(-1, keepdims=True).repeat(3, -1) * 0.5
    overlay = grey * (1 - strength) + colour * strength
    both = np.concatenate([rgb, np.full((rgb.shape[0], 2, 3), 255.0), overlay], axis=1)
    h, w = both.shape[:2]
    factor = max(1, SCALE_TO // max(h, w // 2))
    picture = Image.fromarray(both.clip(0, 255).astype(np.uint8)).resize((w * factor, h * factor), Image.NEAREST)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())


def bar_svg(path: Path, title: str, names: list[str], values: list[float]) -> None:
    """Horizontal bars, one per column in the given (ranked) order, signed values drawn from a middle line."""
    row, label_w, bar_w, pad = 22, 220, 360, 10
    top = max((abs(v) for v in values), default=0.0) or 1.0
    signed = any(v < 0 for v in values)
    zero = label_w + (bar_w / 2 if signed else 0)
    scale = (bar_w / 2 if signed else bar_w) / top
    height = pad * 2 + row * (len(names) + 1)
    width = label_w + bar_w + 90
    parts = [(f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
              f'font-family="sans-serif" font-size="12">'),
             f'<text x="{pad}" y="{pad + 12}" font-weight="bold">{html.escape(title)}</text>']
    for i, (name, v) in enumerate(zip(names, values, strict=True)):
        y = pad + row * (i + 1)
        length = abs(v) * scale
        x = zero if v >= 0 else zero - length
        fill = "#dc2828" if v >= 0 else "#285adc"
        shown = name if len(name) <= 32 else name[:31] + "…"
        parts.append(f'<text x="{label_w - 6}" y="{y + 14}" text-anchor="end">{html.escape(shown)}</text>')
        parts.append(f'<rect x="{x:.1f}" y="{y + 3}" width="{max(length, 0.5):.1f}" height="{row - 6}" '
                     f'fill="{fill}"><title>{html.escape(name)}: {v:.6g}</title></rect>')
        parts.append(f'<text x="{label_w + bar_w + 6}" y="{y + 14}">{v:+.4g}</text>')
    parts.append(f'<line x1="{zero:.1f}" y1="{pad + row}" x2="{zero:.1f}" y2="{height - pad}" stroke="#444"/>')
    parts.append("</svg>")
    atomic_write_text(path, "\n".join(parts) + "\n")


def tokens_html(path: Path, title: str, tokens: list[str], values: list[float]) -> None:
    """A self-contained HTML snippet: each token on a background whose colour and strength show its attribution
    (its value in the tooltip)."""
    top = max((abs(v) for v in values), default=0.0) or 1.0
    spans = []
    for token, v in zip(tokens, values, strict=True):
        rgb = "220,40,40" if v >= 0 else "40,90,220"
        spans.append(f'<span title="{v:+.4g}" style="background:rgba({rgb},{abs(v) / top:.3f});'
                     f'white-space:pre-wrap">{html.escape(token)}</span>')
    body = (f'<div class="kiln-explanation" style="font-family:monospace;line-height:1.8">'
            f'<div style="font-family:sans-serif;font-weight:bold">{html.escape(title)}</div>'
            + "".join(spans) + "</div>\n")
    atomic_write_text(path, body)
