"""``kiln export``: a run's model as a file that runs without kiln, checked against PyTorch before it is kept.

Formats (``--format``):

- ``onnx``: ``model.onnx`` (opset 18, the dynamo exporter), run by ONNX Runtime; serving needs no PyTorch.
- ``torch-export``: ``model.pt2``, the same graph captured by ``torch.export`` and written by
  ``torch.export.save``; it runs with PyTorch alone: ``torch.export.load(path).module()(inputs)``.
- ``auto`` (the default): ONNX; if ONNX fails for this model (the exporter cannot express it, onnxruntime or
  the ONNX packages are missing, or its outputs differ from PyTorch's), torch-export, and the result says why
  in ``fallback_reason``. An ``out`` file ending in ``.onnx`` or ``.pt2`` names its format instead.

Either graph takes the stored input as it is, any batch size: images uint8 (B, C, H, W); table rows float32
(B, features) as the run's saved preprocessing makes them; token ids int64 (B, T), T the run's fixed input
length (a language model's ``data.context``). It gives the model's raw outputs (logits; a regression head's
standardised value). The file is written next to the weights, and only once its outputs match the PyTorch
model's on the check data within ``tolerance``; otherwise nothing is written.

Loading a ``.pt2`` file can run arbitrary code: in torch 2.13 ``torch.export.load`` unpickles parts of the
archive (tensor-subclass weights and constants with ``torch.load(weights_only=False)``, opaque constants with
``pickle.loads``, example inputs with ``torch.load`` falling back to ``weights_only=False``) and has no
safe mode. Load only ``.pt2`` files you wrote yourself. kiln loads exactly one: the temporary file it has just
written, to check it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kiln.errors import DataError, KilnError
from kiln.fsutil import atomic_write
from kiln.nn.inference import StoredInput
from kiln.nn.onnx_model import OnnxModel, with_stored_input
from kiln.run import Run
from kiln.rundir import RunDir

FILES = {"onnx": RunDir.ONNX, "torch-export": RunDir.TORCH_EXPORT}
FORMATS = ("auto", *FILES)
LABELS = {"onnx": "ONNX", "torch-export": "torch.export"}
EXPORTERS = {"onnx": "the ONNX exporter", "torch-export": "torch.export"}
OPSET = 18
RANDOM_SAMPLES = 512

Predict = Callable[[torch.Tensor], np.ndarray]


def _check_inputs(run: Run, check: str) -> torch.Tensor:
    """Stored inputs (N, *input_shape) to compare on: a split of the run's data, or random ones of its dtype."""
    if check == "random":
        return run.kind.random_inputs(RANDOM_SAMPLES, torch.Generator().manual_seed(0))
    try:
        x, y = run.kind.load().split(check)
    except DataError as e:
        raise KilnError(f"cannot check the export on the {check} split: {e}. Make the data available "
                        "(KILN_DATA) or check on random inputs with --check random") from None
    batches = [xb for xb, _ in run.kind.eval_batches(x, y, max(len(x), 1))]  # a text: windows of the input length
    if not batches or not len(batches[0]):
        raise KilnError(f"the {check} split of this run is empty or shorter than one input; choose another "
                        "with --check")
    return run.kind.standalone(batches[0])


def _chosen_format(format: str, out: str | Path | None) -> str:
    """The format to write: ``format``, or for auto the one ``out``'s suffix names (auto when it names none)."""
    if format not in FORMATS:
        raise KilnError(f"--format must be one of {', '.join(FORMATS)}, not {format!r}")
    if out is None:
        return format
    named = {Path(f).suffix: name for name, f in FILES.items()}.get(Path(out).suffix)
    if named is not None and format not in ("auto", named):
        raise KilnError(f"--out {out} ends in {Path(out).suffix}, the suffix of {named} files; name the "
                        f"{format} file {Path(out).with_suffix(Path(FILES[format]).suffix)}")
    return named if format == "auto" and named is not None else format


def _summary(e: Exception) -> str:
    """One line about an exporter's exception: its own summary when it has one, without colour codes."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
    summary = text.partition("## Exception summary")[2].strip() or text.strip()
    line = " ".join(summary.split("\n\n")[0].split())
    return f"{type(e).__name__}: {line[:300]}"


@contextlib.contextmanager
def _quiet():
    """The exporters print progress and warn about every op; the check decides whether the result is good."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def _onnx_missing() -> list[str]:
    return [m for m in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(m) is None]


def _export_onnx(wrapped: torch.nn.Module, example: torch.Tensor, tmp: Path, input_name: str) -> None:
    if isinstance(wrapped.model, OnnxModel):  # a quantized run: its int8 graph behind the data's input conversion
        with_stored_input(wrapped.model.path, StoredInput(torch.nn.Identity(), wrapped.to_input), example, tmp,
                          input_name)
        return
    batch = torch.export.Dim("batch", min=1, max=65536)
    torch.onnx.export(wrapped, (example,), str(tmp), input_names=[input_name], output_names=["logits"],
                      dynamic_shapes=({0: batch},), opset_version=OPSET, dynamo=True, external_data=False)


def _load_onnx(tmp: Path, input_name: str) -> Predict:
    import onnxruntime as ort

    session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
    return lambda xb: session.run(None, {input_name: xb.numpy()})[0]


def _export_torch(wrapped: torch.nn.Module, example: torch.Tensor, tmp: Path, input_name: str) -> None:
    batch = torch.export.Dim("batch", min=1, max=65536)
    program = torch.export.export(wrapped, (example,), dynamic_shapes=({0: batch},))
    with open(tmp, "wb") as f:  # a file object: torch.export.save warns about a path not ending in .pt2
        torch.export.save(program, f)


def _load_torch(tmp: Path, input_name: str) -> Predict:
    with open(tmp, "rb") as f:
        module = torch.export.load(f).module()  # unpickles: only ever the file written just before
    return lambda xb: module(xb).float().numpy()


def _write(format: str, run: Run, wrapped: torch.nn.Module, x: torch.Tensor, tmp: Path) -> Predict:
    """Export to ``tmp`` and load it back; a failure to export, load or run it is a KilnError naming the kind of run
    and the format."""
    kind, input_name = run.kind.description, run.kind.input_name
    missing = _onnx_missing() if format == "onnx" else []
    if missing:
        raise KilnError(f"ONNX export needs {', '.join(missing)}: pip install 'kiln[serve]'")
    export, load = (_export_onnx, _load_onnx) if format == "onnx" else (_export_torch, _load_torch)
    example = x[[0, min(1, len(x) - 1)]]  # two rows, so that the batch dimension stays free
    with _quiet():
        try:
            export(wrapped, example, tmp, input_name)
        except Exception as e:  # the exporters raise many kinds; all mean "this model does not export"
            raise KilnError(f"{EXPORTERS[format]} failed on this {kind} run ({run.path}): {_summary(e)}") from None
    what = f"the exported {LABELS[format]} model of this {kind} run ({run.path})"
    try:
        predict = load(tmp, input_name)
    except Exception as e:  # e.g. an op ONNX Runtime lacks: auto then falls back like for an exporter failure
        raise KilnError(f"{what} does not load: {_summary(e)}") from None

    def checked(xb: torch.Tensor) -> np.ndarray:
        try:
            return predict(xb)
        except Exception as e:
            raise KilnError(f"{what} does not run: {_summary(e)}") from None

    return checked


def _max_abs_diff(predict: Predict, wrapped: torch.nn.Module, x: torch.Tensor, batch_size: int) -> float:
    """Largest |exported - PyTorch| over all outputs; NaN when either gives NaN, inf when shapes differ."""
    worst = []
    with torch.inference_mode():
        for s in range(0, len(x), batch_size):
            xb = x[s:s + batch_size]
            got, ref = predict(xb), wrapped(xb).float().numpy()
            worst.append(np.abs(got - ref).max() if got.shape == ref.shape else np.inf)
    return float(np.max(worst))  # np.max keeps a NaN where Python's max would drop it


def _export(format: str, run: Run, wrapped: torch.nn.Module, x: torch.Tensor, path: Path, check: str,
            tolerance: float, batch_size: int) -> dict[str, Any]:
    result: dict[str, Any] = {"path": str(path), "format": format, "check": check, "samples": len(x),
                              "tolerance": tolerance}

    def write(tmp: Path) -> None:
        predict = _write(format, run, wrapped, x, tmp)
        worst = _max_abs_diff(predict, wrapped, x, batch_size)
        result["max_abs_diff"] = worst
        if not worst <= tolerance:  # NaN fails too
            raise KilnError(f"the {LABELS[format]} model of this {run.kind.description} run differs from PyTorch by "
                            f"up to {worst:.3g} on the {check} data (tolerance {tolerance:g}); nothing was written")

    atomic_write(path, write)
    return result


def export_run(run_dir: str | Path, format: str = "auto", out: str | Path | None = None, check: str = "test",
               tolerance: float = 1e-4, batch_size: int = 1024) -> dict[str, Any]:
    """Export, compare with PyTorch on ``check`` (test | val | train | random), and keep the file if it matches.

    ``format``: auto | onnx | torch-export (see the module docstring); ``out`` defaults to model.onnx or
    model.pt2 in the run directory. Returns {path, format, check, samples, max_abs_diff, tolerance}, and
    ``fallback_reason`` (why ONNX was not used) when auto wrote torch-export."""
    chosen = _chosen_format(format, out)
    if check not in ("test", "val", "train", "random"):
        raise KilnError(f"--check must be test, val, train or random, not {check!r}")
    run = Run.load(run_dir)
    wrapped = StoredInput(run.model, run.kind.to_input).eval()
    x = _check_inputs(run, check)

    def attempt(name: str) -> dict[str, Any]:
        path = Path(out) if out is not None else run.path / FILES[name]
        return _export(name, run, wrapped, x, path, check, tolerance, batch_size)

    if chosen != "auto":
        return attempt(chosen)
    try:
        return attempt("onnx")
    except KilnError as e:
        reason = str(e)
    try:
        result = attempt("torch-export")
    except KilnError as e:
        raise KilnError(f"neither format works for this {run.kind.description} run. onnx: {reason}. "
                        f"torch-export: {e}") from None
    result["fallback_reason"] = reason
    return result
