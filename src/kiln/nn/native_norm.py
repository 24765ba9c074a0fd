"""A residual add and LayerNorm as one C kernel call per pass (``kiln.nn.native``): ``norm(x + y)``.

A post-norm transformer layer ends each half with this. PyTorch runs it as an add, then a LayerNorm whose
kernels are built for wide rows; at the seed model's width of 50, forward and backward of one of them took
0.44 ms for a batch of 128 here, most of it fixed costs of the three operators and their reductions. This
kernel keeps each row in registers (widths up to ``MAX_WIDTH``) and writes the output and, backward, the
input gradient once; the gradients of the scale and shift are summed per thread over a fixed range of rows
and added in thread order, so one thread count gives one result.

It covers float32 on the CPU; anything else, and tracing or exporting, takes the PyTorch operators.
The C source is ``kiln/nn/kernels/addnorm.c``.
"""

from __future__ import annotations

import torch

from kiln.nn import native

MAX_WIDTH = 256  # a row lives in registers and on the stack


def load(width: int, eps: float):
    """(library, how) of the add-and-norm kernel for one width and epsilon."""
    if width > MAX_WIDTH:
        return None, f"no native add-and-norm kernel above width {MAX_WIDTH}"
    return native.build("addnorm", {"C": width, "EPS": float(eps)},
                        {"addnorm_forward": "f32 f32 f32 f32 f32 f32 f32 int int",
                         "addnorm_backward": "f32 f32 f32 f32 f32 f32 f32 int int"})


def applies(x: torch.Tensor, norm: torch.nn.LayerNorm) -> bool:
    """The kernel covers float32 CPU rows x (``native.eligible``), normalised over the last dimension with a scale
    and a shift."""
    if len(norm.normalized_shape) != 1 or norm.weight is None or norm.bias is None:
        return False
    return native.eligible(x, norm.weight, norm.bias) and load(x.shape[-1], norm.eps)[0] is not None


class AddNorm(torch.autograd.Function):
    """norm(x + y) for a LayerNorm over the last dimension, with its scale ``weight`` and shift ``bias``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                eps: float) -> torch.Tensor:
        c = x.shape[-1]
        lib, _ = load(c, eps)
        x, y = x.contiguous(), y.contiguous()
        rows = x.numel() // c
        w, b = weight.detach().contiguous(), bias.detach().contiguous()
        out = torch.empty_like(x)
        xhat = torch.empty_like(x)
        rstd = torch.empty(rows)
        lib.addnorm_forward(x, y, w, b, out, xhat, rstd, rows, torch.get_num_threads())
        ctx.save_for_backward(xhat, rstd, weight)
        ctx.eps = eps
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        xhat, rstd, weight = ctx.saved_tensors
        c = xhat.shape[-1]
        lib, _ = load(c, ctx.eps)
        g, w = grad.contiguous(), weight.detach().contiguous()
        dx = torch.empty_like(xhat)
        dw = torch.empty(c)
        db = torch.empty(c)
        lib.addnorm_backward(g, xhat, rstd, w, dx, dw, db, xhat.numel() // c, torch.get_num_threads())
        return dx, dx, dw, db, None
