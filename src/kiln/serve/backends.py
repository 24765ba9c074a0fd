"""Backends that turn one input batch into class probabilities: PyTorch, or ONNX Runtime.

A backend is used from one thread only (the batch worker owns it).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from kiln.errors import KilnError
from kiln.run import Run


class TorchBackend:
    name = "torch"

    def __init__(self, run: Run, threads: int | None = None) -> None:
        self.run = run
        self.threads = threads

    def start(self) -> None:
        """Called on the worker thread before the first batch."""
        if self.threads:
            torch.set_num_threads(self.threads)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        return self.run.predict(torch.from_numpy(batch)).numpy()


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

    def start(self) -> None:
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
