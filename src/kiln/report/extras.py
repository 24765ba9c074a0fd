"""Sections from files other commands add to a run, each rendered only when its file is there, and read
tolerantly (an unexpected shape is shown as tables of its JSON, never an error):

- ``explanations/`` (`kiln explain`): one JSON per input, and PNG / SVG / HTML files beside them. A JSON's
  top-level scalars are shown as facts; its attributions are found as a list of records with a name
  (``column``, ``feature``, ``name``, ``token``) and a number (``attribution``, ``importance``, ``value``,
  ``score``), or a mapping of names to numbers under a key naming attributions or importance; tokens keep
  their order as coloured text, other attributions are ranked as bars. The files whose names start with the
  JSON's stem are shown with it, the rest after.
- ``audit.json`` + ``audit.svg`` (`kiln audit`): the plot, and the JSON as tables.
- ``results.json["privacy"]`` (or the manifest's) with ``epsilon``, ``delta``, ``max_grad_norm``,
  ``noise_multiplier``, ``accountant``: the privacy budget spent.
- ``compression.json`` (`kiln compress`): as tables; exported models (``model.onnx``, ``model.pt2``) and their
  sizes as the serving figures.
"""

from __future__ import annotations

import json
import re
from html import escape
from pathlib import Path
from typing import Any

from kiln.report.svg import hbars
from kiln.report.page import CSP, data_uri, figure, fmt, json_html, table
from kiln.rundir import RunDir

Section = tuple[str, str, str]
EXPLANATIONS = "explanations"
AUDIT_JSON, AUDIT_SVG = "audit.json", "audit.svg"
COMPRESSION = "compression.json"
INT8_ONNX = "model.int8.onnx"
MAX_FILE = 2 * 2**20  # larger files from other commands are named, not inlined
MAX_EXPLAINED = 12  # inputs shown
MAX_BARS = 15
SMALL_SHOWN = 140  # pixels
MAX_FACT = 100  # characters of a text fact shown on an explanation's card (longer ones stay in its JSON)
NAME_KEYS = ("column", "feature", "name", "token", "input", "word")
VALUE_KEYS = ("attribution", "importance", "value", "score", "weight", "contribution")
MEDIA = {".png": "image/png", ".svg": "image/svg+xml", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}


def _read_json(path: Path) -> tuple[Any, str | None]:
    try:
        return json.loads(path.read_text(encoding="utf-8")), None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return None, f"{path.name} could not be read: {e}"


def _pairs(obj: Any) -> tuple[list[tuple[str, float]], bool] | None:
    """(name, value) attributions found in a JSON, and whether they are tokens (kept in order)."""
    if isinstance(obj, list) and obj and all(isinstance(r, dict) for r in obj):
        name = next((k for k in NAME_KEYS if all(k in r for r in obj)), None)
        value = next((k for k in VALUE_KEYS if all(isinstance(r.get(k), int | float) for r in obj)), None)
        if name and value:
            return [(str(r[name]), float(r[value])) for r in obj], name in ("token", "word")
    if isinstance(obj, dict):
        for key, v in obj.items():
            about = any(w in key.lower() for w in ("attribution", "importance", "token", "column", "feature"))
            if about and isinstance(v, dict) and v and all(isinstance(x, int | float) for x in v.values()):
                return [(str(k), float(x)) for k, x in v.items()], "token" in key.lower()
            found = _pairs(v) if isinstance(v, list | dict) else None
            if found:
                return found
    return None


def _tokens(pairs: list[tuple[str, float]]) -> str:
    biggest = max((abs(v) for _, v in pairs), default=1.0) or 1.0
    spans = []
    for token, v in pairs:
        a = min(abs(v) / biggest, 1.0) * 0.8
        colour = f"rgba(44,160,44,{a:.2f})" if v >= 0 else f"rgba(214,39,40,{a:.2f})"
        spans.append(f'<span style="background:{colour}" title="{v:.4g}">{escape(token)}</span>')
    return '<p class="tokens">' + " ".join(spans) + "</p>"


def _media(path: Path, notes: list[str]) -> str:
    if path.stat().st_size > MAX_FILE:
        notes.append(f"{path.name} is larger than {MAX_FILE // 2**20} MiB and is not inlined")
        return ""
    if path.suffix.lower() in MEDIA:
        data = path.read_bytes()
        return figure(f'<img class="plot" alt="{escape(path.name)}"{_enlarged(data)} '
                      f'src="{data_uri(data, MEDIA[path.suffix.lower()])}">', path.name)
    # An HTML snippet: shown in a sandboxed frame (no scripts) that carries the page's policy itself (nothing
    # fetched): Chromium did not always apply the page's inherited policy to the frame before it loaded an image.
    text = f'<meta http-equiv="Content-Security-Policy" content="{CSP}">' + path.read_text(encoding="utf-8",
                                                                                          errors="replace")
    return f'<div class="card"><iframe sandbox="" title="{escape(path.name)}" srcdoc="{escape(text)}"></iframe>' \
           f'<div class="note">{escape(path.name)}</div></div>'


def _enlarged(data: bytes) -> str:
    """A style that shows a small PNG (a 28x28 attribution map) at least SMALL_SHOWN pixels wide, pixels kept sharp."""
    if data[:8] != b"\x89PNG\r\n\x1a\n" or len(data) < 24:
        return ""
    width = int.from_bytes(data[16:20], "big")
    if not 0 < width < SMALL_SHOWN:
        return ""
    return f' style="width:{width * -(-SMALL_SHOWN // width)}px;image-rendering:pixelated"'


def explanations(run_dir: RunDir) -> Section | None:
    folder = run_dir / EXPLANATIONS
    if not folder.is_dir():
        return None
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.is_symlink() and not p.name.startswith("."))
    jsons = [p for p in files if p.suffix.lower() == ".json"]
    media = [p for p in files if p.suffix.lower() in (*MEDIA, ".html", ".htm")]
    used: set[Path] = set()
    notes: list[str] = []
    cards = []
    for path in jsons[:MAX_EXPLAINED]:
        obj, error = _read_json(path)
        if error:
            notes.append(error)
            continue
        facts = [[k, v] for k, v in obj.items() if isinstance(v, int | float | bool)
                 or (isinstance(v, str) and len(v) <= MAX_FACT)] if isinstance(obj, dict) else []
        html = f"<h3>{escape(path.stem)}</h3>" + (table(["", ""], facts[:12]) if facts else "")
        found = _pairs(obj)
        if found and found[1]:
            html += _tokens(found[0][:400])
        elif found:
            ranked = sorted(found[0], key=lambda t: -abs(t[1]))[:MAX_BARS]
            fig_id = "fig-explanation-" + re.sub(r"[^A-Za-z0-9_-]", "-", path.stem)
            html += hbars(fig_id, ranked, title=f"Attributions: {path.stem}"[:70])
        elif not facts:
            html += json_html(obj)
        for m in media:
            if m not in used and m.name.startswith(path.stem):
                used.add(m)
                if not (found and found[1] and m.suffix.lower() in (".html", ".htm")):  # its tokens are shown above
                    html += _media(m, notes)
        cards.append(f'<div class="card">{html}</div>')
    rest = [m for m in media if m not in used][:MAX_EXPLAINED]
    cards += [_media(m, notes) for m in rest]
    if len(jsons) > MAX_EXPLAINED:
        notes.append(f"{len(jsons) - MAX_EXPLAINED} more explanations are in {EXPLANATIONS}/")
    if not cards:
        notes.append(f"{EXPLANATIONS}/ holds no JSON or picture")
    html = '<div class="cards" id="explanation-cards">' + "".join(cards) + "</div>"
    html += "".join(f'<p class="note">{escape(n)}</p>' for n in notes)
    return "explanations", "Explanations", html


def fairness(run_dir: RunDir) -> Section | None:
    plot, data = run_dir / AUDIT_SVG, run_dir / AUDIT_JSON
    if not (plot.is_file() or data.is_file()):
        return None
    html = ""
    if plot.is_file() and plot.stat().st_size <= MAX_FILE:
        html += figure(f'<img class="plot" alt="fairness audit" src="{data_uri(plot.read_bytes(), "image/svg+xml")}">',
                       "the audit's plot (kiln audit)", "fig-audit")
    if data.is_file():
        obj, error = _read_json(data)
        html += f'<div id="audit-table">{_audit_tables(obj) if error is None else escape(error)}</div>'
    return "fairness", "Fairness audit", html


def _interval(value: Any, interval: Any) -> Any:
    """A figure with its 95% interval, "0.133 [0.079, 0.193]", when there is one."""
    if isinstance(interval, list) and len(interval) == 2 and all(isinstance(v, int | float) for v in interval) \
            and isinstance(value, int | float):
        return f"{fmt(float(value))} [{fmt(float(interval[0]))}, {fmt(float(interval[1]))}]"
    return value


def _audit_tables(obj: Any) -> str:
    """kiln audit's JSON: per sensitive column, before (and after) mitigation, each group's figures and the
    disparities, with their bootstrap intervals; then the warnings. Any other shape: its JSON as tables."""
    entries = obj.get("sensitive") if isinstance(obj, dict) else None
    if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
        return json_html(obj)
    facts = [[k, v] for k, v in obj.items() if isinstance(v, str | int | float | bool) and k != "run"]
    html = table(["", ""], facts) if facts else ""
    for entry in entries:
        html += f"<h3>{escape(str(entry.get('column', '')))}</h3>"
        if entry.get("spec"):
            html += f'<p class="note">groups: {escape(str(entry["spec"]))}</p>'
        for phase in ("before", "after"):
            part = entry.get(phase)
            if not isinstance(part, dict):
                continue
            rule = f" ({entry['after_rule']})" if phase == "after" and entry.get("after_rule") else ""
            html += f"<p><b>{phase}{escape(rule)}</b></p>"
            groups = part.get("groups")
            if isinstance(groups, dict) and all(isinstance(g, dict) for g in groups.values()):
                cols = list(dict.fromkeys(k for g in groups.values() for k, v in g.items()
                                          if isinstance(v, int | float | bool) or v is None))
                html += table(["group", *cols], [[name, *(_interval(g.get(c), (g.get("interval") or {}).get(c))
                                                          for c in cols)] for name, g in groups.items()])
            disparity = part.get("disparity")
            if isinstance(disparity, dict):
                ci = part.get("disparity_interval") or {}
                html += table(["disparity", "value [95% interval]"],
                              [[k, _interval(v, ci.get(k))] for k, v in disparity.items()])
    for warning in obj.get("warnings") or []:
        html += f'<p class="note">{escape(str(warning))}</p>'
    return html


PRIVACY_KEYS = ("epsilon", "delta", "max_grad_norm", "noise_multiplier", "accountant")


def privacy(results: dict[str, Any], manifest: dict[str, Any]) -> Section | None:
    spent = results.get("privacy") or manifest.get("privacy")
    if not isinstance(spent, dict):
        return None
    order = [k for k in PRIVACY_KEYS if k in spent] + [k for k in spent if k not in PRIVACY_KEYS]
    rows = [[k, spent[k] if not isinstance(spent[k], dict | list) else json.dumps(spent[k])] for k in order]
    eps, delta = spent.get("epsilon"), spent.get("delta")
    line = (f"<p>Trained with differential privacy (DP-SGD): (&epsilon; = {escape(fmt(eps))}, &delta; = "
            f"{escape(fmt(delta))}) spent.</p>") if eps is not None else ""
    return "privacy", "Privacy budget", line + table(["", ""], rows, "privacy-table")


def compression(run_dir: RunDir) -> Section | None:
    path = run_dir / COMPRESSION
    if not path.is_file():
        return None
    obj, error = _read_json(path)
    html = f'<div id="compression-table">{_compression_tables(obj) if error is None else escape(error)}</div>'
    return "compression", "Compression", html


def _compression_tables(obj: Any) -> str:
    """kiln compress's JSON: one row per step (parameters, file size, test accuracy, median latency of each
    batch size and engine), then every measure as tables. Any other shape: its JSON as tables."""
    steps = obj.get("steps") if isinstance(obj, dict) else None
    if not isinstance(steps, list) or not steps or not all(isinstance(s, dict) for s in steps):
        return json_html(obj)
    rows: list[dict[str, Any]] = []
    for s in steps:
        row = {k: v for k, v in s.items() if isinstance(v, int | float | str) and k not in ("run", "file_bytes")}
        if isinstance(s.get("file_bytes"), int | float):
            row["file MiB"] = s["file_bytes"] / 2**20
        latency = s.get("latency") if isinstance(s.get("latency"), dict) else {}
        for batch, engines in latency.items():
            for engine, m in engines.items() if isinstance(engines, dict) else ():
                if isinstance(m, dict) and isinstance(m.get("median_ms"), int | float):
                    row[f"{batch} {engine} median ms"] = m["median_ms"]
        rows.append(row)
    cols = list(dict.fromkeys(k for r in rows for k in r))
    html = table(cols, [[r.get(c, "") for c in cols] for r in rows])
    return html + f"<details><summary>every measure</summary>{json_html(obj)}</details>"


def serving(run_dir: RunDir, manifest: dict[str, Any]) -> Section | None:
    """The model files a server loads, with their sizes."""
    rows = []
    for name, what in ((RunDir.WEIGHTS, "weights (PyTorch, safetensors)"), (RunDir.ONNX, "ONNX (kiln export)"),
                       (RunDir.TORCH_EXPORT, "torch.export (kiln export)"), (INT8_ONNX, "int8 ONNX (kiln compress)")):
        path = run_dir / name
        if path.is_file():
            rows.append([name, what, path.stat().st_size / 2**20])
    exported = any(r[0] != RunDir.WEIGHTS for r in rows)
    if not exported:
        return None
    html = table(["file", "what", "MiB"], rows, "serving-table")
    if manifest.get("parameters"):
        html += f'<p class="note">{manifest["parameters"]:,} parameters.</p>'
    return "serving", "Export and serving", html
