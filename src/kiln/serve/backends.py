"""Backends that turn one input batch into the run's predictions: class probabilities (N, classes), values
(N,) in the target's units, or texts (N,). PyTorch for every run; ONNX Runtime for runs answered in one
forward pass (image, table and text-classification runs).

A backend is used from one thread only (the batch worker owns it).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from kiln.errors import KilnError
from kiln.nn.inference import StoredInput, freeze_for_inference
from kiln.run import Run
from kiln.rundir import RunDir


class TorchBackend:
    """The run's PyTorch model; a traced, frozen TorchScript copy when it equals the eager one (see
    :mod:`kiln.nn.inference`: the copy runs without taking Python's lock between operators)."""

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
        module = StoredInput(self.run.model, self.run.kind.to_input, self.run.from_outputs)
        if example is None:
            self._forward, self.mode = module.eval(), "eager (no example input to trace with)"
        else:
            self._forward, self.mode = freeze_for_inference(module, torch.from_numpy(example))

    def predict(self, batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return self._forward(torch.from_numpy(batch)).numpy()  # one call: the lock is taken once


class DecodingBackend:
    """A run whose kind answers each batch itself, eagerly: text decoded step by step (nothing to trace: each
    step's shapes differ) with a key/value cache, or a forecast undone per history."""

    name = "torch"

    def __init__(self, run: Run, threads: int | None = None) -> None:
        self.run, self.threads = run, threads
        self.mode = ("eager (decoding with a key/value cache)" if run.kind.task in ("lm", "seq2seq") else
                     "eager (answered by the run's kind of data)")

    def start(self, example: np.ndarray | None = None) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        return self.run.kind.decode_batch(self.run, batch)


class OnnxBackend:
    name = "onnx"
    DTYPES = {np.dtype(np.uint8): "tensor(uint8)", np.dtype(np.float32): "tensor(float)",
              np.dtype(np.int64): "tensor(int64)"}

    def __init__(self, model_path: Path, run: Run, threads: int | None = None,
                 example: np.ndarray | None = None) -> None:
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
        graph_input = self.session.get_inputs()[0]
        self.input_name = graph_input.name
        if example is not None:
            want = (self.DTYPES.get(example.dtype), list(example.shape[1:]))
            if (graph_input.type, list(graph_input.shape[1:])) != want:
                raise KilnError(f"{model_path} takes {graph_input.type} inputs of shape {graph_input.shape[1:]} per "
                                f"row, but this run's inputs are {want[0]} of shape {want[1]}: the file belongs "
                                f"to another model. Export this run again: kiln export {model_path.parent}")
        self.regression = run.kind.task == "regression"
        self.multilabel = run.kind.task == "multilabel"
        self.target_scale = run.kind.target_scale
        self.mode = f"onnxruntime {ort.__version__} ({model_path.name})"

    def start(self, example: np.ndarray | None = None) -> None:
        pass

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """What ``Run.from_outputs`` makes of the model's outputs: values, or softmax (multilabel: sigmoid)
        probabilities."""
        outputs = self.session.run(None, {self.input_name: batch})[0].astype(np.float64)
        if self.regression:
            mean, std = self.target_scale
            return (outputs[:, 0] * std + mean).astype(np.float32)
        if self.multilabel:
            return (1.0 / (1.0 + np.exp(-outputs))).astype(np.float32)
        outputs -= outputs.max(axis=1, keepdims=True)
        e = np.exp(outputs)
        return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def make_backend(name: str, run: Run, threads: int | None = None, example: np.ndarray | None = None):
    """The backend ``name`` for ``run``; ``example`` (one stored input batch) checks an ONNX file's input."""
    if run.kind.decodes:
        if name != "torch":
            raise KilnError(f"the {name} backend serves runs answered in one forward pass; {run.path} is a "
                            f"{run.kind.description} run, decoded step by step: serve it with --backend torch")
        return DecodingBackend(run, threads)
    if name == "torch":
        return TorchBackend(run, threads)
    if name == "onnx":
        return OnnxBackend(run.dir / RunDir.ONNX, run, threads, example)
    raise KilnError(f"backend must be torch or onnx, not {name!r}")
