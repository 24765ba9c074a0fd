"""``kiln export``: a run's model as an ONNX file, checked against PyTorch before it is kept.

The exported graph takes the stored input as it is (uint8 images, any batch size) and gives logits,
so a serving backend needs no PyTorch. The file is written next to the weights (``model.onnx``)
only after its outputs match the PyTorch model's on the check data within ``tolerance``.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kiln.errors import DataError, KilnError
from kiln.fsutil import atomic_write
from kiln.run import Run

ONNX_FILE = "model.onnx"
FORMATS = ("onnx",)
OPSET = 18


class _StoredInput(torch.nn.Module):
    """The model behind the data set's own input conversion (for images: uint8 (B, C, H, W) scaled to [0, 1])."""

    def __init__(self, model: torch.nn.Module, to_input) -> None:
        super().__init__()
        self.model = model
        self.to_input = to_input

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model(self.to_input(pixels))


def _check_inputs(run: Run, check: str) -> torch.Tensor:
    if check == "random":
        gen = torch.Generator().manual_seed(0)
        return torch.randint(0, 256, (512, *run.dataset.input_shape), dtype=torch.uint8, generator=gen)
    try:
        x, _ = run.dataset.load().split(check)
    except DataError as e:
        raise KilnError(f"cannot check the export on the {check} split: {e}. Make the data available "
                        "(KILN_DATA) or check on random inputs with --check random") from None
    if len(x) == 0:
        raise KilnError(f"the {check} split of this run is empty; choose another with --check")
    return x


def export_run(run_dir: str | Path, format: str = "onnx", out: str | Path | None = None, check: str = "test",
               tolerance: float = 1e-4, batch_size: int = 1024) -> dict[str, Any]:
    """Export, compare with PyTorch on ``check`` (test | val | train | random), and keep the file if it
    matches. Returns {path, format, check, samples, max_abs_diff, tolerance}."""
    if format not in FORMATS:
        raise KilnError(f"--format must be one of {', '.join(FORMATS)}, not {format!r}")
    if check not in ("test", "val", "train", "random"):
        raise KilnError(f"--check must be test, val, train or random, not {check!r}")
    import onnxruntime as ort

    run = Run.load(run_dir)
    path = Path(out) if out is not None else run.path / ONNX_FILE
    wrapped = _StoredInput(run.model, run.dataset.to_input).eval()
    x = _check_inputs(run, check)
    result: dict[str, Any] = {"path": str(path), "format": format, "check": check, "samples": len(x),
                              "tolerance": tolerance}

    def write(tmp: Path) -> None:
        example = x[:2].clone()
        batch = torch.export.Dim("batch", min=1, max=65536)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            try:
                torch.onnx.export(wrapped, (example,), str(tmp), input_names=["pixels"], output_names=["logits"],
                                  dynamic_shapes={"pixels": {0: batch}}, opset_version=OPSET, dynamo=True,
                                  external_data=False)
            except Exception as e:  # the exporter raises many kinds; all mean "this model does not export"
                raise KilnError(f"ONNX export of {run.path} failed: {type(e).__name__}: {str(e)[:500]}") from None
        session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        worst = 0.0
        with torch.inference_mode():
            for s in range(0, len(x), batch_size):
                xb = x[s:s + batch_size]
                ref = wrapped(xb).float().numpy()
                got = session.run(None, {"pixels": xb.numpy()})[0]
                worst = max(worst, float(np.abs(got - ref).max()))
        result["max_abs_diff"] = worst
        if not worst <= tolerance:
            raise KilnError(f"the ONNX model differs from PyTorch by up to {worst:.3g} on the {check} data "
                            f"(tolerance {tolerance:g}); nothing was written")

    atomic_write(path, write)
    return result
