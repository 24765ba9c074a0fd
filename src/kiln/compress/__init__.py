"""``kiln compress``: a smaller, faster run made from a trained one, written as a NEW run directory that evaluates,
predicts, exports and serves like any run.

Steps, in this order, each optional:

1. ``distill``: a student (a smaller config's model) trained on the run's soft targets (temperature T) and the
   hard labels (:mod:`kiln.compress.fit`);
2. ``prune``: structured pruning (Torch-Pruning; attention heads and channels read through ``rows_to_sequence``
   by hand), then fine-tuning (:mod:`kiln.compress.prune`); the new config holds the new widths;
3. ``quantize``: int8 through ONNX Runtime, dynamic or statically calibrated (:mod:`kiln.compress.quantize`); the
   run then predicts with ``model.int8.onnx`` (``kiln.run.Run.load`` picks it up).

Each step is measured (:mod:`kiln.compress.measure`) and the whole is refused, with nothing written, when a step's
test accuracy is more than ``max_drop`` points below the original's. ``compression.json`` in the new run holds every
step's measures.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from kiln.compress import measure
from kiln.compress.fit import DistillObjective, train_into
from kiln.compress.prune import prune as prune_model
from kiln.compress.quantize import MODES, check_available
from kiln.compress.quantize import quantize as quantize_model
from kiln.config import load_config, read_yaml
from kiln.data.kind import resolve
from kiln.errors import ConfigError, KilnError
from kiln.fsutil import atomic_write_text
from kiln.nn import build_model
from kiln.nn.onnx_model import OnnxModel
from kiln.run import Run
from kiln.rundir import RunDir, open_run_dir
from kiln.training.checkpoint import save_weights
from kiln.training.metrics import evaluate

__all__ = ["CompressionRefused", "compress"]
CALIBRATION_POOL = 1024  # training samples drawn once: pruning traces 8 of them, static int8 calibrates on 512


class CompressionRefused(KilnError):
    """A step lost more test accuracy than ``max_drop`` allows; nothing was written. ``report`` holds the steps
    measured up to and including the refused one."""

    def __init__(self, message: str, report: dict[str, Any]) -> None:
        super().__init__(message)
        self.report = report


def compress(run: str | os.PathLike, *, prune: float | None = None, structured: bool = True,
             quantize: str | None = None, distill: str | os.PathLike | dict | None = None, max_drop: float = 0.5,
             out: str | os.PathLike | None = None, finetune_epochs: int = 2, temperature: float = 4.0,
             alpha: float = 0.7, latency: bool = True, live: bool | None = None) -> dict[str, Any]:
    """Compress the run at ``run`` into the new run ``out`` (default ``<run>_compressed``) and return what
    compression.json holds. Raises :class:`CompressionRefused` (nothing written) when a step's test accuracy is
    more than ``max_drop`` points (percentage points) below the original's."""
    source_dir = open_run_dir(run)
    out_dir = RunDir(out if out is not None else source_dir.path.parent / f"{source_dir.path.name}_compressed")
    student = _check_options(prune, structured, quantize, distill, max_drop, finetune_epochs, temperature, alpha)
    out_dir.check_new()
    source = Run.load(source_dir.path)
    if isinstance(source.model, OnnxModel):
        raise KilnError(f"{source.path} is already quantized ({RunDir.INT8_ONNX}); compress the run it was made from")
    if source.kind.task not in ("binary", "multiclass"):
        raise KilnError(f"kiln compress measures test accuracy, so it takes classification runs; {source.path} is a "
                        f"{source.kind.task} run")
    if student is not None:
        student = student_config(source.config, source.kind, student)  # refused before any work when bad
    out_dir.path.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out_dir.path.name}.compress-", dir=out_dir.path.parent))
    try:
        report = _run_steps(source, work, out_dir, prune, quantize, student, max_drop, finetune_epochs, temperature,
                            alpha, latency, live)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return report


def _check_options(prune, structured, quantize, distill, max_drop, finetune_epochs, temperature, alpha):
    """Every option checked before anything is read or written; the student config, loaded."""
    if prune is None and quantize is None and distill is None:
        raise KilnError("nothing to do: give at least one of --prune, --quantize and --distill")
    if prune is not None:
        if not structured:
            raise KilnError("kiln prunes structurally only (--structured): zeroed weights (masks) keep every shape "
                            "and make nothing faster")
        if not 0.0 < prune < 1.0:
            raise KilnError(f"--prune is the fraction of channels to remove from each prunable layer, between 0 and 1 "
                            f"(exclusive), not {prune}")
        if importlib.util.find_spec("torch_pruning") is None:
            raise KilnError("--prune needs Torch-Pruning: pip install 'kiln[compress]'")
        if finetune_epochs < 1:
            raise KilnError(f"--finetune-epochs must be at least 1, not {finetune_epochs}")
    if quantize is not None:
        if quantize not in MODES:
            raise KilnError(f"--quantize must be {' or '.join(MODES)}, not {quantize!r}")
        check_available()
    if not max_drop >= 0:
        raise KilnError(f"--max-drop is in accuracy points and cannot be negative: {max_drop}")
    if not temperature > 0:
        raise KilnError(f"--temperature must be positive, not {temperature}")
    if not 0.0 <= alpha <= 1.0:
        raise KilnError(f"--alpha (the weight of the teacher's soft targets) must be in [0, 1], not {alpha}")
    if distill is None:
        return None
    raw = distill if isinstance(distill, dict) else read_yaml(Path(distill))
    if not isinstance(raw.get("model"), dict):
        raise ConfigError(f"{distill if not isinstance(distill, dict) else 'the student config'}: a student config "
                          "needs a model section (model.blocks), the smaller model to train")
    extra = sorted(set(raw) - {"name", "model", "train"})
    if extra:
        raise ConfigError(f"the student config may set name, model and train only (it learns on the teacher's data); "
                          f"remove {', '.join(extra)}")
    return raw


def _accuracy_check(steps: list[dict[str, Any]], max_drop: float) -> None:
    original, last = steps[0], steps[-1]
    drop = round((original["test_accuracy"] - last["test_accuracy"]) * 100, 4)
    last["accuracy_drop_points"] = drop
    if drop > max_drop:
        raise CompressionRefused(
            f"refused: after the {last['step']} step the test accuracy is {last['test_accuracy']:.4f}, "
            f"{drop:.2f} points below the original's {original['test_accuracy']:.4f} (--max-drop {max_drop:g}); "
            "nothing was written", {"steps": steps, "max_drop_points": max_drop, "refused": True})


def _run_steps(source: Run, work: Path, out_dir: RunDir, prune, quantize, student, max_drop, finetune_epochs,
               temperature, alpha, latency, live) -> dict[str, Any]:
    steps = [{"step": "original", "run": str(source.path), **measure.static_measures(source)}]
    paths = [source.path]
    current = source
    train_x, _ = source.kind.load().split("train")
    samples = source.kind.to_input(train_x[torch.randperm(len(train_x), generator=torch.Generator().manual_seed(0))
                                           [:CALIBRATION_POOL]])
    if student is not None:
        current = _distill(current, student, work / "distill", temperature, alpha, live)
        steps.append({"step": "distill", "temperature": temperature, "alpha": alpha,
                      "student": current.config.to_dict()["model"], **measure.static_measures(current)})
        paths.append(current.path)
        _accuracy_check(steps, max_drop)
    if prune is not None:
        current, info = _prune(current, prune, samples, work / "prune", finetune_epochs, live)
        steps.append({"step": "prune", "ratio": prune, "finetune_epochs": finetune_epochs, **info,
                      **measure.static_measures(current)})
        paths.append(current.path)
        _accuracy_check(steps, max_drop)
    if quantize is not None:
        current, info = _quantize(current, quantize, samples, work / "quantize")
        steps.append({"step": "quantize", **info, **measure.static_measures(current)})
        paths.append(current.path)
        _accuracy_check(steps, max_drop)
    if latency:
        for step, lat in zip(steps, measure.latencies(paths), strict=True):
            step["latency"] = lat
    for step in steps[1:]:
        step.pop("run", None)  # the steps' own runs were temporary: only the last one is kept
    original = steps[0]
    report = {"source": str(source.path), "steps": steps, "max_drop_points": max_drop, "refused": False,
              "threads": 1,
              "smaller": round(original["file_bytes"] / steps[-1]["file_bytes"], 3),
              "fewer_parameters": round(original["parameters"] / max(steps[-1]["parameters"], 1), 3)}
    if latency:
        report["faster"] = {f"batch_{b}": round(original["latency"][f"batch_{b}"]["kiln"]["median_ms"]
                                                / steps[-1]["latency"][f"batch_{b}"]["kiln"]["median_ms"], 3)
                            for b in measure.BATCHES}
    final = RunDir(current.path)
    final.write_json(RunDir.COMPRESSION, report)
    os.replace(final.path, out_dir.path)  # onto a missing or empty directory (check_new allowed nothing else)
    report["run"] = str(out_dir.path)
    return report


def student_config(teacher, kind, student: dict[str, Any]):
    """The teacher's config (a Config) with the student's model, name and train settings (a student config's
    sections, as read from its YAML): the data stays the teacher's (its ``kind``); shapes are checked now."""
    base = teacher.to_dict()
    raw = {**base, "name": student.get("name", f"{teacher.name}_student"), "model": student["model"],
           "train": {**base["train"], **(student.get("train") or {})}}
    cfg = resolve(load_config(raw), kind)
    build_model(cfg.blocks, kind.input_shape)
    return cfg


def _distill(teacher: Run, cfg, path: Path, temperature: float, alpha: float, live) -> Run:
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.blocks, teacher.kind.input_shape)
    teacher.model.eval()
    train_into(cfg, RunDir(path), teacher.kind, model, live=live,
               objective=lambda base_objective: DistillObjective(base_objective, teacher.model, temperature, alpha),
               execution={"distilled_from": str(teacher.path), "temperature": temperature, "alpha": alpha})
    return Run.load(path)


def _prune(run: Run, ratio: float, samples: torch.Tensor, path: Path, epochs: int, live) -> tuple[Run, dict]:
    result = prune_model(run.config, measure.float_model(run).state_dict(), run.kind.input_shape, samples[:8], ratio)
    cfg = load_config(result.config, {"train.epochs": epochs, "name": f"{run.config.name}_pruned"})
    info = {"pruned": result.pruned, "kept": result.kept}
    x, y = run.kind.load().split("test")
    before = evaluate(result.model, run.kind, run.kind.eval_batches(x, y, run.config.train.eval_batch_size),
                      device=torch.device("cpu"), threshold=run.threshold)
    info["test_accuracy_before_finetune"] = before.get("accuracy")
    train_into(cfg, RunDir(path), run.kind, result.model, live=live, execution={"pruned_from": str(run.path)})
    return Run.load(path), info


def _quantize(run: Run, mode: str, samples: torch.Tensor, path: Path) -> tuple[Run, dict]:
    """A new run: the same config and float weights, and the int8 graph it predicts with."""
    new = RunDir(path)
    new.create()
    model = measure.float_model(run)
    with tempfile.TemporaryDirectory(prefix="kiln-quantize-") as tmp:
        report = quantize_model(model, mode, samples[:2], samples, new / RunDir.INT8_ONNX, Path(tmp))
    for entry in report["blocks"]:
        entry["type"] = run.config.blocks[entry["block"]].type
    report["kept_in_float"] = [b for b in report["blocks"] if not b["int8"]]
    run.kind.save(new.path)
    atomic_write_text(new / RunDir.CONFIG, run.config.to_yaml())
    save_weights(new / RunDir.WEIGHTS, model, {"quantized": mode, "float weights of": RunDir.INT8_ONNX})
    results = {k: v for k, v in run.metrics.items() if k not in ("val", "test")}
    new.write_json(RunDir.RESULTS, results)  # the threshold, which evaluation reads
    new.write_json(RunDir.MANIFEST, {**run.manifest, "status": "completed", "quantized": mode})
    quantized = Run.load(new.path)
    results["val"] = quantized.evaluate("val") if len(quantized.kind.load().split("val")[1]) else {}
    results["test"] = quantized.evaluate("test")
    new.write_json(RunDir.RESULTS, results)
    new.append_metrics({"kind": "test", "step": results.get("steps", 0), **results["test"]})
    return quantized, {"quantization": report}


def summary_lines(report: dict[str, Any]) -> list[str]:
    """The steps as a table: parameters, file size, test accuracy, and latency when measured."""
    lines = [f"{'step':10s} {'params':>9s} {'file KB':>9s} {'test acc':>9s} {'b1 kiln ms':>11s} {'b64 kiln ms':>12s} "
             f"{'b64 ORT ms':>11s}"]
    for s in report["steps"]:
        def ms(b: str, path: str, lat: dict = s.get("latency", {})) -> str:
            v = lat.get(b, {}).get(path)
            return f"{v['median_ms']:.3f}" if v else "-"

        lines.append(f"{s['step']:10s} {s['parameters']:9,d} {s['file_bytes'] / 1024:9.1f} {s['test_accuracy']:9.4f} "
                     f"{ms('batch_1', 'kiln'):>11s} {ms('batch_64', 'kiln'):>12s} {ms('batch_64', 'onnxruntime'):>11s}")
    for s in report["steps"]:
        for k in s.get("kept", []) + s.get("quantization", {}).get("kept_in_float", []):
            lines.append(f"{s['step']}: block {k['block']} ({k['type']}) {k.get('reason', 'kept')}")
    faster = report.get("faster", {})
    lines.append(f"{report['smaller']}x smaller file" + (f", {faster['batch_64']}x faster at batch 64 (kiln's "
                                                         "predict path)" if faster else "")
                 + f"; wrote {report['run']}")
    return lines
