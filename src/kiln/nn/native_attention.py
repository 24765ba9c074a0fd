"""Multi-head self-attention over short sequences as one C kernel call per pass (``kiln.nn.native``).

Written with PyTorch operators, attention over the seed model's 13 steps is about twenty small
operators forward and backward: split, view and transpose q, k and v, copies to contiguous memory,
two batched matrix multiplies of 13 x 13 x 25 per head, a softmax, and the same again with a concat
for the gradient. Each moves a few kilobytes, so their fixed costs dominate: 1.9 ms forward and
backward for a batch of 64 on one thread here. This kernel reads the (B, T, 3C) output of the qkv
projection as it is, writes (B, T, C) for the output projection, keeps the attention weights
(B, heads, T, T) for the backward pass, and writes the (B, T, 3C) gradient in one pass.

It covers attention without a mask and without dropout in float32 on the CPU, for up to
``MAX_STEPS`` steps; anything else, and tracing or exporting, takes the PyTorch operators.
The C source is ``kiln/nn/kernels/attention.c``.
"""

from __future__ import annotations

import torch

from kiln.nn import native

MAX_STEPS = 64  # the kernel keeps a (T, T) block of scores on the stack


def load(steps: int, heads: int, head_dim: int):
    """(library, how) of the attention kernel for one shape."""
    if steps > MAX_STEPS:
        return None, f"no native attention kernel above {MAX_STEPS} steps"
    return native.build("attention", {"T": steps, "NH": heads, "D": head_dim},
                        {"attention_forward": "f32 f32 f32 int int", "attention_backward": "f32 f32 f32 f32 int int"})


def applies(qkv: torch.Tensor, heads: int, dropout: float, training: bool) -> bool:
    """The kernel covers float32 CPU attention without dropout (``native.eligible``)."""
    if not native.eligible(qkv) or (dropout and training):
        return False
    b, t, c3 = qkv.shape
    return load(t, heads, c3 // 3 // heads)[0] is not None


class NativeAttention(torch.autograd.Function):
    """(B, T, 3C) output of the qkv projection -> (B, T, C) attention output, heads side by side."""

    @staticmethod
    def forward(ctx, qkv: torch.Tensor, heads: int) -> torch.Tensor:
        b, t, c3 = qkv.shape
        lib, _ = load(t, heads, c3 // 3 // heads)
        qkv = qkv.contiguous()
        y = torch.empty(b, t, c3 // 3)
        p = torch.empty(b, heads, t, t)
        lib.attention_forward(qkv, y, p, b, torch.get_num_threads())
        ctx.save_for_backward(qkv, p)
        ctx.heads = heads
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        qkv, p = ctx.saved_tensors
        b, t, c3 = qkv.shape
        lib, _ = load(t, ctx.heads, c3 // 3 // ctx.heads)
        g = grad.contiguous()
        dqkv = torch.empty_like(qkv)
        lib.attention_backward(qkv, p, g, dqkv, b, torch.get_num_threads())
        return dqkv, None
