"""``kiln explain``: which parts of an input made a run's model answer as it did, for images, table rows and texts.

For each input it writes, in the run's ``explanations/`` folder (or ``out``), ``<name>.<method>.json`` and a
picture: an image's attribution overlay (``.png``), a table row's ranked columns (``.svg``), a text's coloured
tokens (``.html``). The kind of data says what an input is and how its positions group into what a reader thinks
of as one feature (``DataKind.explains``, ``explain_inputs``, ``explain_baseline``, ``feature_groups``).

The explained output is the logit of the predicted class (or of the class asked for), or a regression's value
(standardised). Explanations run on the run's model rebuilt with PyTorch's own operators: kiln's fused native
kernels compute no gradients, so attributions never go through them.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kiln.data.kind import DataKind
from kiln.errors import DataError, KilnError
from kiln.explain.render import bar_svg, image_png, tokens_html
from kiln.explain.methods import IG_TOLERANCE, METHODS, attribute
from kiln.fsutil import atomic_write_text
from kiln.nn import KilnModel, build_model
from kiln.rundir import RunDir
from kiln.training.checkpoint import load_weights
from kiln.training.threads import pick_threads

ENGINE = ("PyTorch operators: kiln's fused native kernels compute no gradients, so explanations use the run's "
          "model rebuilt without them")
BATCH = 32  # inputs attributed together
GLOBAL_ROWS = 1000  # rows of the split that global importance reads by default
PICTURE = {"image": "png", "columns": "svg", "tokens": "html"}


def _run_threads(function):
    """Run ``function(run, ...)`` with the CPU threads the run trained with (``train.threads``; auto: what is free
    now): on a busy machine, more threads than free CPUs make every operator wait (see kiln.training.threads)."""
    @functools.wraps(function)
    def wrapper(run, *args, **kwargs):
        before = torch.get_num_threads()
        if run.device.type == "cpu":
            torch.set_num_threads(pick_threads(run.config.train.threads)[0])
        try:
            return function(run, *args, **kwargs)
        finally:
            torch.set_num_threads(before)
    return wrapper


@_run_threads
def explain(run, inputs, method: str = "integrated_gradients", out: str | Path | None = None,
            target: str | None = None, limit: int | None = None) -> list[dict[str, Any]]:
    """Explain each input (files as `kiln predict` reads them, or an array of model inputs as ``Run.predict``
    takes them; ``limit``: the first so many) and write a JSON and a picture per input; returns the JSON records
    (with the ``files`` written)."""
    kind = _explaining(run, method)
    if limit is not None and limit < 1:
        raise KilnError(f"limit must be at least 1, not {limit}")
    stored, items = _read(kind, inputs)
    stored, items = stored[:limit], items[:limit]
    folder = _folder(run, out)
    model = explain_model(run)
    records: list[dict[str, Any]] = []
    used: set[str] = set()
    for start in range(0, len(stored), BATCH):
        x_stored = stored[start:start + BATCH].to(run.device)
        x = kind.to_input(x_stored)
        with torch.no_grad():
            outputs = model(x)
        targets = _targets(run, kind, outputs, target)
        groups = kind.feature_groups()
        result = attribute(model, x, kind.explain_baseline(x), targets, method,
                           [g for _, g in groups] if groups else None)
        probs = run.from_outputs(outputs)
        for i, item in enumerate(items[start:start + BATCH]):
            records.append(_record(run, kind, folder, method, item, x_stored[i], result, i, targets, probs[i],
                                   groups, used))
    return records


@_run_threads
def explain_global(run, method: str = "occlusion", split: str = "test", limit: int | None = GLOBAL_ROWS,
                   out: str | Path | None = None) -> dict[str, Any]:
    """Global feature importance of a table run: the mean absolute attribution of each column over (the first
    ``limit`` rows of) a split, ranked; written as ``global.<method>.json`` and ``.svg``."""
    kind = _explaining(run, method)
    groups = kind.feature_groups()
    if groups is None:
        raise KilnError(f"global importance ranks a table's columns; {run.path} is a {kind.description} run, whose "
                        "inputs have no columns: explain single inputs instead")
    if split not in ("train", "val", "test"):
        raise KilnError(f"split must be train, val or test, not {split!r}")
    try:
        x_all, _ = kind.load().split(split)
    except DataError as e:
        raise KilnError(f"global importance reads the run's {split} split, which cannot be read here: {e}") from None
    if len(x_all) == 0:
        raise KilnError(f"{run.path} has no {split} split (it is empty); global importance needs its rows: "
                        f"choose another split, or train with data that leaves a {split} split")
    if limit is not None and limit < 1:
        raise KilnError(f"limit must be at least 1, not {limit}")
    rows = x_all[:limit] if limit else x_all
    model = explain_model(run)
    total = torch.zeros(len(groups), dtype=torch.float64)
    signed = torch.zeros(len(groups), dtype=torch.float64)
    for start in range(0, len(rows), 256):
        x = kind.to_input(rows[start:start + 256].to(run.device))
        with torch.no_grad():
            targets = _targets(run, kind, model(x), None)
        values = attribute(model, x, kind.explain_baseline(x), targets, method, [g for _, g in groups]).values
        total += values.abs().sum(0).double().cpu()
        signed += values.sum(0).double().cpu()
    n = len(rows)
    ranked = sorted(zip([name for name, _ in groups], (total / n).tolist(), (signed / n).tolist(), strict=True),
                    key=lambda t: -t[1])
    folder = _folder(run, out)
    name = f"global.{method}"
    result = {"method": method, "split": split, "rows": n, "explained": _explained(kind),
              "importance": "mean |attribution| over the rows", "engine": ENGINE,
              "columns": [{"column": c, "importance": round(v, 8), "mean_attribution": round(s, 8), "rank": k + 1}
                          for k, (c, v, s) in enumerate(ranked)],
              "files": [str(folder / f"{name}.json"), str(folder / f"{name}.svg")]}
    bar_svg(folder / f"{name}.svg", f"{run.path.name}: column importance ({method}, {n} {split} rows)",
                   [c for c, _, _ in ranked], [v for _, v, _ in ranked])
    atomic_write_text(folder / f"{name}.json", json.dumps(result, indent=2) + "\n")
    return result


def explain_model(run) -> KilnModel:
    """The run's model with PyTorch's operators only (not fused), in evaluation mode, on the run's device."""
    model = build_model(run.config.blocks, run.kind.input_shape).to(run.device)
    load_weights(run.dir / RunDir.WEIGHTS, model)
    return model.eval()


# ---- parts ----------------------------------------------------------------------------------------------------


def _explaining(run, method: str) -> DataKind:
    kind = run.kind
    if kind.explains is None:
        raise KilnError(f"{run.path} is a {kind.description} run; explanations apply to image, table and "
                        "text-classification runs")
    if method not in METHODS:
        raise KilnError(f"method must be one of {', '.join(METHODS)}, not {method!r}")
    return kind


def _read(kind: DataKind, inputs) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    if isinstance(inputs, torch.Tensor | np.ndarray):
        stored = kind.as_stored(torch.as_tensor(inputs))
        shape = tuple(kind.input_shape)
        if tuple(stored.shape[1:]) != shape:
            raise KilnError(f"explain expects input of shape (N, {', '.join(map(str, shape))}), got "
                            f"{tuple(torch.as_tensor(inputs).shape)}")
        return stored, [{"name": f"input{i + 1}"} for i in range(len(stored))]
    paths = [inputs] if isinstance(inputs, str | Path) else list(inputs)
    if not paths:
        raise KilnError("give at least one input to explain")
    for p in paths:
        if not Path(p).is_file():
            raise KilnError(f"{p}: no such file" if not Path(p).exists() else f"{p} is not a regular file")
    return kind.explain_inputs(paths)


def _folder(run, out: str | Path | None) -> Path:
    folder = Path(out) if out is not None else run.dir / RunDir.EXPLANATIONS
    if folder.exists() and not folder.is_dir():
        raise KilnError(f"{folder} is not a folder; give --out a folder for the explanations")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _targets(run, kind: DataKind, outputs: torch.Tensor, target: str | None) -> torch.Tensor | None:
    """The output explained per sample: the predicted class (binary: by the run's threshold; multilabel: the most
    probable label), or the class named by ``target``; None for a regression's single value."""
    if kind.task == "regression":
        if target is not None:
            raise KilnError("target names a class; a regression run has one output to explain: leave it out")
        return None
    names = kind.class_names
    if target is not None:
        if target not in names:
            raise KilnError(f"target {target!r} is not one of this run's classes ({', '.join(names)})")
        return torch.full((len(outputs),), names.index(target), dtype=torch.int64, device=outputs.device)
    if kind.task == "binary":
        probs = torch.softmax(outputs, dim=1)[:, 1]
        return (probs >= run.threshold).long()
    return outputs.argmax(1)


def _explained(kind: DataKind, target: int | None = None) -> str:
    if kind.task == "regression":
        return "the predicted value, standardised"
    return "the logit of the predicted class" if target is None else f"the logit of class {kind.class_names[target]!r}"


def _record(run, kind: DataKind, folder: Path, method: str, item: dict[str, Any], stored: torch.Tensor, result,
            i: int, targets: torch.Tensor | None, probs: torch.Tensor, groups, used: set[str]) -> dict[str, Any]:
    stem = _unique(used, _safe(item["name"]), method)
    values = result.values[i].detach().cpu()
    output, start = float(result.output[i]), float(result.start[i])
    record: dict[str, Any] = {"input": {k: v for k, v in item.items() if k != "name"}, "method": method,
                              "explained": _explained(kind, None if targets is None else int(targets[i]))}
    if targets is not None:
        record["class"] = kind.class_names[int(targets[i])]
        record["probabilities"] = {n: round(float(p), 6) for n, p in zip(kind.class_names, probs, strict=True)}
    else:
        record["prediction"] = float(probs)
    total = float(values.sum())
    record |= {"output": round(output, 6), "baseline_output": round(start, 6),
               "sum_of_attributions": round(total, 6)}
    if method == "integrated_gradients":
        change = output - start
        record["completeness_gap"] = round(abs(total - change) / max(abs(change), 1e-6), 6)
        record["steps"] = int(result.steps[i])
        record["completeness_tolerance"] = IG_TOLERANCE
    record["engine"] = ENGINE
    picture = folder / f"{stem}.{PICTURE[kind.explains]}"
    title = f"{item['name']}: {record.get('class', 'value')} ({method})"
    if kind.explains == "image":
        heat = values.sum(0)
        record["attributions"] = {"shape": list(heat.shape), "summed_over": "channels",
                                  "map": np.round(heat.numpy().astype(np.float64), 7).tolist()}
        image_png(picture, stored, values)
    elif kind.explains == "columns":
        shown = item.get("values", {})
        ranked = sorted(zip([n for n, _ in groups], values.tolist(), strict=True), key=lambda t: -abs(t[1]))
        record["columns"] = [{"column": n, "value": shown.get(n), "attribution": round(v, 8), "rank": k + 1}
                             for k, (n, v) in enumerate(ranked)]
        bar_svg(picture, title, [f"{n} = {shown.get(n)}" if n in shown else n for n, _ in ranked],
                       [v for _, v in ranked])
    else:
        ids = stored.tolist()
        tokens = item.get("tokens") or [str(t) for t in ids]
        per_token = values.tolist()[:len(tokens)]
        record["tokens"] = [{"token": t, "attribution": round(v, 8)} for t, v in zip(tokens, per_token, strict=True)]
        tokens_html(picture, title, tokens, per_token)
    json_path = folder / f"{stem}.json"
    record["files"] = [str(json_path), str(picture)]
    atomic_write_text(json_path, json.dumps(record, indent=2) + "\n")
    return record


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._")[:80] or "input"


def _unique(used: set[str], name: str, method: str) -> str:
    """``name.method``; ``name-2.method``... when two inputs of one call share a name."""
    stem, k = f"{name}.{method}", 1
    while stem in used:
        k += 1
        stem = f"{name}-{k}.{method}"
    used.add(stem)
    return stem
