"""int8 quantization through ONNX Runtime: the model is exported to ONNX (model input -> raw outputs), its
constants folded (``quant_pre_process``, which turns an LSTM's reordered gate weights into constants that can
be quantized), then quantized:

- ``int8`` (dynamic): weights of dense layers (MatMul, Gemm) and LSTMs to int8 ahead of time, activations at run
  time per batch (``quantize_dynamic``). Weights are QUInt8: QInt8 weights lose accuracy on CPUs without VNNI
  (onnxruntime#14642).
- ``int8-static``: convolutions and dense layers with activation ranges calibrated on training samples
  (``quantize_static``, QDQ format, ``reduce_range`` for CPUs without VNNI).

A block whose layers have no int8 kernel in the chosen mode (an LSTM under static quantization, a GRU or plain
RNN in either, convolutions under dynamic) is kept in float and reported, as is anything ONNX Runtime left in
float; ``report`` says, per block and per ONNX operator, what became int8.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from kiln.errors import KilnError

MODES = ("int8", "int8-static")
INPUT = "input"
# The ONNX operators each mode turns into int8 kernels.
QUANTIZED_OPS = {"int8": ["MatMul", "Gemm", "LSTM"], "int8-static": ["Conv", "MatMul", "Gemm"]}
# The ONNX operators a module's weights end up in.
MODULE_OPS: list[tuple[type, tuple[str, ...]]] = [
    (nn.Conv2d, ("Conv",)), (nn.Linear, ("MatMul", "Gemm")), (nn.LSTM, ("LSTM",)), (nn.GRU, ("GRU",)),
    (nn.RNN, ("RNN",)), (nn.Embedding, ("Gather",)),
]
CALIBRATION_SAMPLES = 512
# Why an operator stays float in a mode that does not quantize it.
FLOAT_REASONS = {
    ("int8", "Conv"): "dynamic int8 leaves convolutions in float (ONNX Runtime's ConvInteger is slower than float "
                      "on CPUs); --quantize int8-static makes them int8",
    ("int8-static", "LSTM"): "ONNX Runtime has no statically quantized LSTM kernel; --quantize int8 makes it int8",
    ("int8", "GRU"): "ONNX Runtime has no int8 kernel for GRU",
    ("int8-static", "GRU"): "ONNX Runtime has no int8 kernel for GRU",
    ("int8", "RNN"): "ONNX Runtime has no int8 kernel for RNN",
    ("int8-static", "RNN"): "ONNX Runtime has no int8 kernel for RNN",
}


def check_available() -> None:
    missing = [m for m in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(m) is None]
    if missing:
        raise KilnError(f"--quantize needs {', '.join(missing)}: pip install 'kiln[compress]'")


@contextlib.contextmanager
def _quiet():
    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(logging.ERROR)  # onnxruntime.quantization logs advice through the root logger
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def export_float(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    """The model (model input -> raw outputs) as ONNX, any batch size."""
    batch = torch.export.Dim("batch", min=1, max=65536)
    with _quiet():
        try:
            torch.onnx.export(model.eval(), (example[:2],), str(path), input_names=[INPUT], output_names=["logits"],
                              dynamic_shapes=({0: batch},), opset_version=18, dynamo=True, external_data=False)
        except Exception as e:
            raise KilnError(f"the ONNX exporter cannot export this model, so it cannot be quantized: "
                            f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200]}") from None


class _Calibration:
    """Batches of training samples (model input) for ``quantize_static``'s activation ranges."""

    def __init__(self, samples: torch.Tensor, batch: int = 64) -> None:
        self.batches = [samples[i:i + batch].numpy() for i in range(0, len(samples), batch)]

    def get_next(self) -> dict[str, np.ndarray] | None:
        return {INPUT: self.batches.pop(0)} if self.batches else None

    def rewind(self) -> None:  # some onnxruntime versions rewind before a second pass
        pass


def quantize(model: nn.Module, mode: str, example: torch.Tensor, calibration: torch.Tensor, out: Path,
             work: Path) -> dict[str, Any]:
    """Write the int8 graph of ``model`` (an unfused KilnModel) to ``out``; returns the report. ``example`` and
    ``calibration`` are model-input batches (calibration: training samples, used by int8-static)."""
    if mode not in MODES:
        raise KilnError(f"--quantize must be {' or '.join(MODES)}, not {mode!r}")
    check_available()
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    float_path, folded = work / "float.onnx", work / "folded.onnx"
    export_float(model, example, float_path)
    with _quiet():
        try:
            quant_pre_process(str(float_path), str(folded), skip_symbolic_shape=True)
        except Exception:  # pre-processing only helps; quantize the exported graph as it is
            folded = float_path
        ops = QUANTIZED_OPS[mode]
        try:
            if mode == "int8":
                quantize_dynamic(str(folded), str(out), weight_type=QuantType.QUInt8, op_types_to_quantize=ops)
            else:
                quantize_static(str(folded), str(out), _Calibration(calibration[:CALIBRATION_SAMPLES]),
                                quant_format=QuantFormat.QDQ, op_types_to_quantize=ops,
                                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, reduce_range=True,
                                per_channel=False, calibrate_method=CalibrationMethod.MinMax)
        except Exception as e:
            raise KilnError(f"ONNX Runtime could not quantize this model ({mode}): {type(e).__name__}: "
                            f"{str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}") from None
    _strip(out)
    return report(model, mode, folded, out)


def _strip(path: Path) -> None:
    """Drop what only documents the graph: the exporter's per-node metadata (PyTorch module paths and stack
    frames, often larger than a small model's int8 weights) and the intermediate shapes ONNX Runtime infers."""
    import onnx

    model = onnx.load(str(path))
    del model.graph.value_info[:]
    for node in model.graph.node:
        node.doc_string = ""
        del node.metadata_props[:]
    path.write_bytes(model.SerializeToString())


def _weighted_nodes(graph) -> dict[str, str]:
    """name -> op type of the nodes that read a constant weight (Conv, MatMul, Gemm, LSTM, GRU, RNN, Gather)."""
    constants = {i.name for i in graph.initializer}
    weighted = {"Conv": 1, "MatMul": 1, "Gemm": 1, "LSTM": 1, "GRU": 1, "RNN": 1, "Gather": 0}
    return {n.name: n.op_type for n in graph.node
            if n.op_type in weighted and len(n.input) > 1 and n.input[weighted[n.op_type]] in constants
            and (n.op_type != "Gather" or _is_table(graph, n.input[0]))}


def _is_table(graph, name: str) -> bool:
    init = next((i for i in graph.initializer if i.name == name), None)
    return init is not None and len(init.dims) == 2


def report(model: nn.Module, mode: str, float_path: Path, int8_path: Path) -> dict[str, Any]:
    """What became int8: per ONNX operator (weighted nodes before, and how many are int8 after), and per block
    (int8, or kept in float and why)."""
    import onnx

    before = _weighted_nodes(onnx.load(str(float_path)).graph)
    after = onnx.load(str(int8_path)).graph
    nodes = {n.name: n for n in after.node}
    dequantized = {o for n in after.node if n.op_type == "DequantizeLinear" for o in n.output}
    ops: dict[str, dict[str, int]] = {}
    for name, op in before.items():
        node = nodes.get(name)
        int8 = node is None or node.op_type != op or any(i in dequantized for i in node.input[1:2])
        entry = ops.setdefault(op, {"nodes": 0, "int8": 0})
        entry["nodes"] += 1
        entry["int8"] += int(int8)
    blocks = []
    for i, block in enumerate(getattr(model, "blocks", [])):
        kinds = sorted({op for m in block.modules() for cls, names in MODULE_OPS if type(m) is cls for op in names})
        if not kinds:
            continue
        present = [op for op in kinds if op in ops]
        floats = [op for op in present if ops[op]["int8"] < ops[op]["nodes"]]
        no_kernel = [op for op in kinds if op not in QUANTIZED_OPS[mode] and op in present]
        entry: dict[str, Any] = {"block": i, "type": _block_type(block), "operators": present,
                                 "int8": bool(present) and not floats and not no_kernel}
        if no_kernel:
            entry["reason"] = "kept in float: " + "; ".join(
                FLOAT_REASONS.get((mode, op), f"{mode} quantization has no int8 kernel for {op}") for op in no_kernel)
        elif floats:
            entry["reason"] = f"kept in float (partly): ONNX Runtime left some {', '.join(floats)} nodes in float"
        blocks.append(entry)
    return {"mode": mode, "weights": "QUInt8" if mode == "int8" else "QInt8 (reduce_range)",
            "activations": "QUInt8, per batch at run time" if mode == "int8" else "QUInt8, calibrated",
            "operators": ops, "blocks": blocks,
            "kept_in_float": [b for b in blocks if not b["int8"]]}


def _block_type(block: nn.Module) -> str:
    return type(block).__name__
