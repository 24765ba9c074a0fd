"""What each compression step is measured on: parameters, model file size, test accuracy, and latency at batch 1
and batch 64 on kiln's own predict path (``Run.predict``) and on ONNX Runtime, all runs side by side in one
process, one thread, interleaved rounds (each round times every run once), median and quartiles over rounds."""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kiln.compress.quantize import INPUT, export_float
from kiln.errors import KilnError
from kiln.nn import build_model
from kiln.nn.onnx_model import OnnxModel, ort_session
from kiln.run import Run
from kiln.rundir import RunDir
from kiln.training.checkpoint import load_weights

BATCHES = (1, 64)


def model_file(run: Run) -> Path:
    """The file the run predicts with: its int8 graph, else its weights."""
    int8 = run.dir / RunDir.INT8_ONNX
    return int8 if int8.is_file() else run.dir / RunDir.WEIGHTS


def float_model(run: Run) -> torch.nn.Module:
    """The run's float model as built from its config and weights (unfused: what exporters and pruning read)."""
    model = build_model(run.config.blocks, run.kind.input_shape)
    load_weights(run.dir / RunDir.WEIGHTS, model)
    return model.eval()


def static_measures(run: Run) -> dict[str, Any]:
    """Parameters, model file and its size, test metrics (accuracy: the one --max-drop compares)."""
    test = run.evaluate("test")
    if "accuracy" not in test:
        raise KilnError(f"kiln compress compares test accuracy, which a {run.kind.task} run has none of")
    params = sum(p.numel() for p in float_model(run).parameters())
    path = model_file(run)
    return {"parameters": params, "file": path.name, "file_bytes": path.stat().st_size,
            "test_accuracy": test["accuracy"], "test": test,
            "weights": "int8 (ONNX Runtime)" if isinstance(run.model, OnnxModel) else "float32"}


def _quartiles(values: list[float]) -> dict[str, float]:
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return {"median_ms": round(q[1], 4), "q1_ms": round(q[0], 4), "q3_ms": round(q[2], 4),
            "min_ms": round(min(values), 4)}


def latencies(paths: list[Path], rounds: int = 9, min_seconds: float = 0.05) -> list[dict[str, Any]]:
    """Per run (``paths``): batch size -> {kiln, onnxruntime} -> median, quartiles and min ms per batch. One thread;
    inputs are the first test samples of the first run (every run here reads the same data)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with tempfile.TemporaryDirectory(prefix="kiln-measure-") as tmp:
            runs = [Run.load(p) for p in paths]  # after set_num_threads: ONNX Runtime sessions get one thread too
            x_all, _ = runs[0].kind.load().split("test")
            x_all = runs[0].kind.standalone(x_all[:max(BATCHES)])
            fns: list[dict[str, Any]] = []
            for k, run in enumerate(runs):
                fns.append({"kiln": run.predict, "onnxruntime": _ort(run, x_all, Path(tmp) / f"{k}.onnx")})
            times: list[dict[int, dict[str, list[float]]]] = [{b: {} for b in BATCHES} for _ in runs]
            with torch.inference_mode():
                for b in BATCHES:
                    x = x_all[:b]
                    for fn in (f for per in fns for f in per.values() if f is not None):
                        fn(x)  # warm-up
                    for _ in range(rounds):
                        for k, per in enumerate(fns):
                            for name, fn in per.items():
                                if fn is not None:
                                    times[k][b].setdefault(name, []).append(_time(fn, x, min_seconds))
            return [{f"batch_{b}": {name: _quartiles(v) for name, v in t[b].items()} for b in BATCHES}
                    for t in times]
    finally:
        torch.set_num_threads(before)


def _time(fn, x, min_seconds: float) -> float:
    n, start = 0, time.perf_counter()
    while True:
        fn(x)
        n += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return elapsed / n * 1000


def _ort(run: Run, stored: torch.Tensor, tmp: Path):
    """An ONNX Runtime function of stored inputs for the run: its int8 graph, or its float model exported."""
    if isinstance(run.model, OnnxModel):
        path = run.model.path
    else:
        try:
            export_float(float_model(run), run.kind.to_input(stored[:2]), tmp)
        except KilnError:
            return None
        path = tmp
    session = ort_session(path, 1)
    to_input = run.kind.to_input

    def predict(x: torch.Tensor) -> np.ndarray:
        return session.run(None, {INPUT: to_input(x).numpy()})[0]

    return predict
