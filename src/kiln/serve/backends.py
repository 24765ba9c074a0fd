"""Backends that turn one input batch into class probabilities: PyTorch, or ONNX Runtime.

A backend is used from one thread only (the batch worker owns it).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from kiln.errors import KilnError
from kiln.inference import StoredInput, freeze_for_inference
from kiln.run import Run


class TorchBackend:
    """The run's PyTorch model; a traced, frozen TorchScript copy when it equals the eager one (see
    :mod:`kiln.inference`: the copy runs without taking Python's lock between operators)."""

    name = "torch"

    def __init__(self, run: Run, threads: int | None = None) -> None:
        self.run = run
        self.threads = threads
        self.mode = "not started"
        self._forward = None

    def start(self, example: np.ndarray | None = None) -> None:
        """Called on the worker thread before the first batch; ``example`` is one stored input batch."""
        if self.threads:
            torch.set_num_threads(self.threads)
        module = StoredInput(self.run.model, self.run.dataset.to_input, self.run.from_outputs)
        if example is None:
            self._forward, self.mode = module.eval(), "eager (no example input to trace with)"
        else:
            self._forward, self.mode = freeze_for_inference(module, torch.from_numpy(example))

    def predict(self, batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return self._forward(torch.from_numpy(batch)).numpy()  # one call: the lock is taken once


class OnnxBackend:
    name = "onnx"

    def __init__(self, model_path: Path, threads: int | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise KilnError("the onnx backend needs onnxruntime: pip install 'kiln[serve]'") from None
        if not model_path.is_file():
            raise KilnError(f"{model_path} does not exist; export the run first: "
                            f"kiln export {model_path.parent} --format onnx")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.mode = f"onnxruntime {ort.__version__} ({model_path.name})"

    def start(self, example: np.ndarray | None = None) -> None:
        pass

    def predict(self, batch: np.ndarray) -> np.ndarray:
        logits = self.session.run(None, {self.input_name: batch})[0].astype(np.float64)
        logits -= logits.max(axis=1, keepdims=True)
        e = np.exp(logits)
        return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def make_backend(name: str, run: Run, threads: int | None = None):
    if name == "torch":
        return TorchBackend(run, threads)
    if name == "onnx":
        from kiln.export import ONNX_FILE

        return OnnxBackend(run.path / ONNX_FILE, threads)
    raise KilnError(f"backend must be torch or onnx, not {name!r}")
