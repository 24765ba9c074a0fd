"""A one-layer LSTM's recurrence as one C kernel call per pass (``kiln.nn.native``).

PyTorch's CPU LSTM (oneDNN) runs the seed model's 13 steps of 50 units in 3.1-3.5 ms forward and
backward for a batch of 64 here, and gains nothing from a second thread. The input projection of all
steps is one matrix multiply, which PyTorch does well; what remains is a small matrix-vector product and
the gate arithmetic per step. Here the projection (with both biases) stays a PyTorch ``linear``, so
autograd gives the input, ``weight_ih`` and bias gradients, and the kernel runs the recurrence: forward,
keeping the gate activations and cell states, and backward through time, giving the gradient of the
projection and of ``weight_hh``. Batches are split over OpenMP threads; the ``weight_hh`` gradient is
summed per thread and the sums added in thread order, so one thread count gives one result.

It covers ``nn.LSTM`` with one layer, one direction, biases and no projection, started from zero state,
in float32 on the CPU; anything else, and tracing or exporting, takes PyTorch's LSTM.
The C source is ``kiln/nn/kernels/lstm.c``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kiln.nn import native

MAX_UNITS = 512  # the kernel keeps a step's gates on the stack


def load(units: int):
    """(library, how) of the LSTM kernel for one width."""
    if units > MAX_UNITS:
        return None, f"no native LSTM kernel above {MAX_UNITS} units"
    return native.build("lstm", {"H": units}, {"lstm_forward": "f32 f32 f32 f32 f32 int int int",
                                                "lstm_backward": "f32 f32 f32 f32 f32 int int int"})


def covers(rnn: nn.Module) -> bool:
    """The kernel's kind of LSTM: one layer, one direction, biases, no projection, batch first."""
    return (type(rnn) is nn.LSTM and rnn.num_layers == 1 and not rnn.bidirectional and rnn.bias
            and rnn.batch_first and not rnn.proj_size)


def applies(x: torch.Tensor, rnn: nn.LSTM) -> bool:
    """float32 CPU input and weights (``native.eligible``)."""
    return native.eligible(x, *rnn.parameters()) and load(rnn.hidden_size)[0] is not None


def lstm(x: torch.Tensor, rnn: nn.LSTM) -> torch.Tensor:
    """(B, T, F) -> (B, T, H): every step's output, from zero state, as ``rnn(x)[0]``."""
    xp = F.linear(x, rnn.weight_ih_l0, rnn.bias_ih_l0 + rnn.bias_hh_l0)  # (B, T, 4H)
    return Recurrence.apply(xp, rnn.weight_hh_l0)


def _pad(w: torch.Tensor) -> torch.Tensor:
    """Zero-pad the last dimension to whole vectors of eight, as the kernel reads it."""
    return F.pad(w, (0, -w.shape[-1] % 8)).contiguous()


class Recurrence(torch.autograd.Function):
    """(B, T, 4H) input projection and weight_hh (4H, H) -> (B, T, H) outputs."""

    @staticmethod
    def forward(ctx, xp: torch.Tensor, whh: torch.Tensor) -> torch.Tensor:
        b, t, g = xp.shape
        h = g // 4
        lib, _ = load(h)
        xp = xp.contiguous()
        whh_t = _pad(whh.detach().t().reshape(h, 4, h))  # (H, 4, HP)
        hs = torch.empty(b, t, h)
        acts = torch.empty(b, t, g)
        cs = torch.empty(b, t, h)
        lib.lstm_forward(xp, whh_t, hs, acts, cs, b, t, torch.get_num_threads())
        ctx.save_for_backward(hs, acts, cs, whh_t)  # backward reads weight_hh in the same layout
        return hs

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        hs, acts, cs, whh_t = ctx.saved_tensors
        b, t, g = acts.shape
        h = g // 4
        lib, _ = load(h)
        dy = grad.contiguous()
        dxp = torch.empty(b, t, g)
        lib.lstm_backward(dy, acts, cs, whh_t, dxp, b, t, torch.get_num_threads())
        # weight_hh's gradient: each step's gate gradient times the previous output (zero at the first step)
        dwhh = dxp[:, 1:].reshape(-1, g).t() @ hs[:, :-1].reshape(-1, h)
        return dxp, dwhh
