"""``kiln report``: a run's model card, one self-contained HTML file.

It reads the run directory (config, manifest, metrics.jsonl, results.json, and whatever other commands added)
and computes the test split's predictions through :class:`kiln.run.Run`, as `kiln evaluate` does. A run made
before a feature existed, or one whose data cannot be read here, gets the sections its files allow and a note
saying what is missing and why.
"""

from __future__ import annotations

from html import escape
from pathlib import Path
from typing import Any

from kiln.errors import KilnError, RunDirError
from kiln.fsutil import atomic_write_text
from kiln.report import extras, sections
from kiln.report.page import page
from kiln.rundir import RunDir, open_run_dir

REPORT = "report.html"


def write_report(run: str | Path, out: str | Path | None = None) -> Path:
    """Write the model card of the run at ``run`` to ``out`` (default ``<run>/report.html``); its path."""
    path = Path(out) if out is not None else Path(run) / REPORT
    if path.is_dir():
        raise KilnError(f"--out {path} is a folder; give a file name, e.g. {path / REPORT}")
    atomic_write_text(path, render_report(run))
    return path


def render_report(run: str | Path) -> str:
    """The model card's HTML."""
    run_dir = open_run_dir(run)
    notes: list[str] = []
    results = _json(run_dir, RunDir.RESULTS, notes)
    manifest = _json(run_dir, RunDir.MANIFEST, notes)
    config_text = (run_dir / RunDir.CONFIG).read_text(encoding="utf-8", errors="replace")
    loaded = _predict(run_dir, notes)
    info = _info(run_dir, loaded, results, manifest)
    p = loaded["predictions"]
    pr = run_dir / RunDir.PR_CURVE
    found = [
        sections.summary(info),
        sections.metrics(results),
        sections.curves(run_dir.read_metrics()),
        *((sections.confusion_section(p), sections.regression_section(p, info["target"]),
           sections.per_class_section(p), sections.calibration_section(p, pr.read_bytes() if pr.is_file() else None),
           sections.errors_section(p, loaded["shown"])) if p is not None else ()),
        extras.explanations(run_dir),
        extras.fairness(run_dir),
        extras.privacy(results, manifest),
        extras.compression(run_dir),
        extras.serving(run_dir, manifest),
        sections.config(config_text),
    ]
    if notes:
        found.append(("notes", "Notes", "".join(f'<p class="note">{escape(n)}</p>' for n in notes)))
    title = f"Model card: {info['name']}"
    subtitle = f"{info['facts'].get('kind of data', '')} run at {run_dir.path}"
    return page(title, subtitle, [s for s in found if s is not None])


def _json(run_dir: RunDir, name: str, notes: list[str]) -> dict[str, Any]:
    """A JSON file of the run, or {} (with a note when it is there but unreadable)."""
    if not (run_dir / name).is_file():
        return {}
    try:
        data = run_dir.read_json(name)
    except RunDirError as e:
        notes.append(str(e))
        return {}
    if not isinstance(data, dict):
        notes.append(f"{run_dir / name} holds no JSON object; it is left out")
        return {}
    return data


def _predict(run_dir: RunDir, notes: list[str]) -> dict[str, Any]:
    """The loaded run, its data and its test predictions, as far as they can be had (None where not, with a note
    saying why)."""
    from kiln.report.predictions import TASKS, test_predictions, worst
    from kiln.run import Run

    loaded: dict[str, Any] = {"run": None, "splits": None, "predictions": None, "shown": []}
    try:
        loaded["run"] = run = Run.load(run_dir.path)
        loaded["splits"] = splits = run.kind.load()
        if run.kind.task not in TASKS:
            notes.append(f"a {run.kind.task} run: no confusion matrix, calibration or per-sample errors (they apply "
                         "to classification and regression)")
            return loaded
        loaded["predictions"] = p = test_predictions(run, splits)
        loaded["shown"] = run.kind.shown("test", p.x, [w["index"] for w in worst(p, sections.WORST)])
    except KilnError as e:
        notes.append(f"Test predictions were not computed, so the sections that need them are left out: {e}")
        loaded["predictions"] = None
    return loaded


def _info(run_dir: RunDir, loaded: dict[str, Any], results: dict[str, Any],
          manifest: dict[str, Any]) -> dict[str, Any]:
    from kiln.config import load_config

    facts: dict[str, Any] = {}
    name, classes, lines, target, layers = run_dir.path.name, [], [], None, []
    try:
        cfg = load_config(run_dir / RunDir.CONFIG)
        name = cfg.name
        facts["dataset"] = cfg.data.dataset
    except KilnError as e:
        facts["config"] = f"could not be read: {e}"
    run, splits = loaded["run"], loaded["splits"]
    facts["task"] = results.get("task")
    if run is not None:  # the run's own files say what it is; its data is not needed for that
        kind = run.kind
        facts["kind of data"] = kind.description
        facts["task"] = kind.task
        facts["input shape"] = " x ".join(map(str, kind.input_shape))
        classes = list(kind.class_names)
        target = kind.target_name
        layers = [[layer.index, layer.type, " x ".join(map(str, layer.out_shape)), layer.params, layer.macs]
                  for layer in run.model.layers]
    if splits is not None:
        for split in ("train", "val", "test"):
            facts[f"{split} samples"] = run.kind.samples(splits.split(split)[0])
        lines = run.kind.report()
    else:
        for split in ("val", "test"):
            if isinstance(results.get(split), dict) and "samples" in results[split]:
                facts[f"{split} samples"] = results[split]["samples"]
    for key, label in (("parameters", "parameters"), ("device", "trained on"), ("precision", "precision"),
                       ("threads", "threads"), ("kiln", "kiln"), ("torch", "torch")):
        if key in manifest:
            facts[label] = manifest[key]
    for key, label in (("epochs", "epochs"), ("best_epoch", "best epoch"), ("stopped_early", "stopped early"),
                       ("train_seconds", "training seconds")):
        if key in results:
            facts[label] = results[key]
    for file, digest in (manifest.get("data_checksums") or {}).items():
        facts[f"sha256 {file}"] = digest
    return {"name": name, "facts": facts, "classes": classes, "lines": lines, "target": target, "layers": layers}
