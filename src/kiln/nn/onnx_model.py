"""A model that is an ONNX graph run by ONNX Runtime: what a quantized run (``kiln compress --quantize``) predicts
with. It takes and gives what a built :class:`kiln.nn.KilnModel` takes and gives (model input -> raw outputs), so
evaluation, prediction and serving treat it like any model; it has no parameters and trains no further.

ONNX Runtime computes outside PyTorch: the graph cannot be traced (TorchScript, ``torch.export``), so serving
runs it eagerly and ``kiln export`` writes it to ONNX by putting the data's input conversion in front of it
(:func:`with_stored_input`), never by tracing it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from kiln.errors import KilnError


def _ort():
    try:
        import onnxruntime as ort
    except ImportError:
        raise KilnError("this run predicts with an int8 ONNX model, which needs onnxruntime: "
                        "pip install 'kiln[serve]'") from None
    return ort


def ort_session(path: Path, threads: int | None = None):
    """An ONNX Runtime CPU session of ``path`` with ``threads`` intra-op threads (default: PyTorch's count)."""
    ort = _ort()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # a corrupt or foreign file: onnxruntime raises its own kinds
        raise KilnError(f"{path} is not an ONNX model ONNX Runtime can run: {str(e)[:300]}") from None


class OnnxModel(nn.Module):
    """An ONNX graph (model input -> raw outputs) as a module; ``path`` is kept for exporting it."""

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        super().__init__()
        self.path = Path(path)
        self.session = ort_session(self.path, threads)
        graph_input = self.session.get_inputs()[0]
        self.input_name = graph_input.name
        self.input_type = graph_input.type

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_tracing() or torch.compiler.is_compiling() or _is_fake(x):
            raise KilnError(f"{self.path.name} runs in ONNX Runtime and cannot be traced or exported by PyTorch; "
                            "it runs as it is")
        array = x.detach().cpu().contiguous().numpy()
        if self.input_type == "tensor(float)" and array.dtype != np.float32:
            array = array.astype(np.float32)
        out = self.session.run(None, {self.input_name: array})[0]
        return torch.from_numpy(out).to(x.device)


def _is_fake(x: torch.Tensor) -> bool:
    return type(x).__name__ in ("FakeTensor", "FunctionalTensor") or x.device.type == "meta"


def with_stored_input(graph_path: Path, prefix: nn.Module, example: torch.Tensor, out: Path, input_name: str) -> None:
    """Write to ``out`` one ONNX graph: ``prefix`` (stored input -> model input, exported by PyTorch's ONNX
    exporter) followed by the graph at ``graph_path`` (model input -> raw outputs)."""
    import onnx
    from onnx import compose

    graph = onnx.load(str(graph_path))
    batch = torch.export.Dim("batch", min=1, max=65536)
    program = torch.onnx.export(prefix, (example,), None, input_names=[input_name], output_names=["model_input"],
                                dynamic_shapes=({0: batch},), opset_version=_opset(graph), dynamo=True)
    head = program.model_proto
    head = compose.add_prefix(head, "stored_", rename_inputs=False, rename_outputs=True)
    graph = compose.add_prefix(graph, "model_", rename_inputs=True, rename_outputs=False)
    head.ir_version = graph.ir_version = max(head.ir_version, graph.ir_version)
    domains = {o.domain: o.version for o in list(head.opset_import) + list(graph.opset_import)}
    for m in (head, graph):
        del m.opset_import[:]
        m.opset_import.extend(onnx.helper.make_opsetid(d, v) for d, v in domains.items())
    if not head.graph.node:  # the conversion is the identity (float rows): the graph alone, its input renamed
        merged = graph
        old = graph.graph.input[0].name
        for node in merged.graph.node:
            node.input[:] = [input_name if i == old else i for i in node.input]
        merged.graph.input[0].name = input_name
    else:
        merged = compose.merge_models(head, graph, io_map=[(head.graph.output[0].name, graph.graph.input[0].name)])
    onnx.checker.check_model(merged)
    out.write_bytes(merged.SerializeToString())


def _opset(model) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 18)
