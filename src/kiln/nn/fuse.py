"""Faster execution of a built model, applied from outside (model code stays plain).

The rewrite keeps every parameter and state-dict key, so weights load either way, and computes
the same function up to float rounding.

- conv2d (+ReLU) followed by max-pooling, where the convolution sees few values per output
  (a first layer on grey images: 1 channel x 3 x 3), runs as one matrix multiply over image patches
  that writes channels-last output; max-pooling reads that layout directly, and the ReLU runs after
  the pool (max-pooling and ReLU commute) on a quarter of the elements. On this project's 2-core
  CPUs this front end of the seed model is about 2x faster forward and backward than
  conv2d -> ReLU -> max_pool2d, mostly from avoiding layout copies.
- Where the pool's stride is its size and the input needs no gradient (a first layer, in float32 on
  the CPU), the convolution, the pool and the ReLU run in one pass of the C kernel of ``kiln.nn.native``
  instead: about 1.2 against 7.7 ms forward and backward for a batch of 64 here (2 threads).
  Tracing and exporting always see the PyTorch operators.
- A one-layer LSTM runs its recurrence with the C kernel of ``kiln.nn.native_lstm`` (float32 CPU): 2.1-3.2
  against 3.4-4.4 ms forward and backward for the seed model's batch of 64 here (2 threads).
- Self-attention of transformer encoder layers mixes its heads with the C kernel of
  ``kiln.nn.native_attention`` where it applies (float32 CPU, no dropout, up to 64 steps): 0.7 against
  2.2-2.4 ms forward and backward for the seed model's batch of 64 here (2 threads).
- Post-norm encoder layers run each residual add and LayerNorm with the C kernel of ``kiln.nn.native_norm``
  where it applies (float32 CPU, no dropout in training).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kiln.nn import native, native_attention, native_lstm, native_norm
from kiln.nn.blocks.conv import ConvBlock
from kiln.nn.blocks.recurrent import Recurrent
from kiln.nn.blocks.transformer import Attention, EncoderLayer

MAX_PATCH = 32  # values per convolution output (C * kh * kw) up to which the patch matmul wins


class ConvPool(nn.Module):
    """conv2d (+ReLU) and max-pool as patch matmul -> channels-last max-pool -> ReLU."""

    def __init__(self, conv: nn.Conv2d, relu: bool, pool: nn.MaxPool2d) -> None:
        super().__init__()
        self.conv = conv  # the same module and name as in ConvBlock: state-dict keys are unchanged
        self.relu = relu
        self.pool = pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, F, H'', W''), channels-last
        if _native_applies(x, self.conv, self.pool):
            y = NativeConvPool.apply(x.contiguous(), self.conv.weight, self.conv.bias,
                                     _pair(self.pool.kernel_size)[0], self.relu)
            return y.permute(0, 3, 1, 2)
        b, c, h, w = x.shape
        kh, kw = self.conv.kernel_size
        oh, ow = h - kh + 1, w - kw + 1
        x = x.contiguous()
        patches = x.as_strided((b, oh, ow, c, kh, kw), (c * h * w, w, 1, h * w, w, 1))
        # A contiguous (C*kh*kw, F) copy of the weight makes autograd compute its gradient as
        # patches^T @ grad, about 4x faster here than the transposed form it picks for a .t() view.
        weight = self.conv.weight.reshape(self.conv.out_channels, c * kh * kw).t().contiguous()
        flat = patches.reshape(b * oh * ow, c * kh * kw)
        y = torch.addmm(self.conv.bias, flat, weight) if self.conv.bias is not None else flat @ weight
        y = y.view(b, oh, ow, -1).permute(0, 3, 1, 2)  # NCHW view of channels-last memory
        y = F.max_pool2d(y, self.pool.kernel_size, self.pool.stride)
        return torch.relu(y) if self.relu else y


def _native_applies(x: torch.Tensor, conv: nn.Conv2d, pool: nn.MaxPool2d) -> bool:
    """The C kernel covers CPU float32 inputs that need no gradient (a first layer, ``native.eligible``);
    everything else takes the PyTorch path."""
    params = [conv.weight] if conv.bias is None else [conv.weight, conv.bias]
    return native.eligible(x, *params) and not x.requires_grad and _native_kernel(conv, pool)[0] is not None


def _native_kernel(conv: nn.Conv2d, pool: nn.MaxPool2d):
    """(library or None, how) for this layer pair: the kernel covers square pools whose stride is their size."""
    size, stride = _pair(pool.kernel_size), _pair(pool.stride or pool.kernel_size)
    if size != stride or size[0] != size[1]:
        return None, "no native kernel for overlapping or non-square pools"
    return native.load(conv.in_channels, *conv.kernel_size, conv.out_channels, size[0])


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


class NativeConvPool(torch.autograd.Function):
    """conv2d (stride 1, no padding), max-pool (stride = size) and, if ``relu``, ReLU with the C kernel of
    ``kiln.nn.native``; gives the pooled map channels-last (B, H'', W'', F)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, p: int,
                relu: bool) -> torch.Tensor:
        b, c, h, w = x.shape
        f, _, kh, kw = weight.shape
        lib, _ = native.load(c, kh, kw, f, p)
        wt = weight.detach().reshape(f, c * kh * kw).t().contiguous()
        bias_t = bias.detach().contiguous() if bias is not None else torch.zeros(f)
        out = torch.empty(b, (h - kh + 1) // p, (w - kw + 1) // p, f)
        arg = torch.empty(out.shape, dtype=torch.uint8)
        lib.convpool_forward(x, wt, bias_t, out, arg, b, h, w, torch.get_num_threads(), relu)
        ctx.save_for_backward(x, arg, out)
        ctx.p, ctx.weight_shape, ctx.has_bias, ctx.relu = p, weight.shape, bias is not None, relu
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, arg, out = ctx.saved_tensors
        b, c, h, w = x.shape
        f, _, kh, kw = ctx.weight_shape
        lib, _ = native.load(c, kh, kw, f, ctx.p)
        g = grad.contiguous()
        dw = torch.empty(c * kh * kw, f)
        db = torch.empty(f)
        lib.convpool_backward(x, g, arg, out, dw, db, b, h, w, torch.get_num_threads(), ctx.relu)
        return None, dw.t().reshape(ctx.weight_shape), db if ctx.has_bias else None, None, None


def _fusable(conv_block: nn.Module, pool: nn.Module) -> bool:
    if not isinstance(conv_block, ConvBlock) or not isinstance(pool, nn.MaxPool2d):
        return False
    conv = conv_block.conv
    kh, kw = conv.kernel_size
    return (
        isinstance(conv_block.act, nn.ReLU | nn.Identity)
        and conv.stride == (1, 1) and conv.padding == (0, 0) and conv.dilation == (1, 1) and conv.groups == 1
        and conv.in_channels * kh * kw <= MAX_PATCH
        and pool.padding in (0, (0, 0)) and pool.dilation in (1, (1, 1)) and not pool.ceil_mode
    )


class NativeSelfAttention(Attention):
    """The self-attention of a transformer_encoder layer (bidirectional, no positions, no cache), its heads mixed
    by the C kernel where it applies; the same module otherwise."""

    def mix(self, qkv: torch.Tensor, cache: dict | None = None, pos: int = 0,
            mask: torch.Tensor | None = None) -> torch.Tensor:
        if mask is None and native_attention.applies(qkv, self.heads, self.dropout, self.training):
            return native_attention.NativeAttention.apply(qkv, self.heads)
        return super().mix(qkv, cache, pos, mask)


class NativeEncoderLayer(EncoderLayer):
    """A post-norm encoder layer whose residual adds and LayerNorms run in the C kernel where it applies
    (no dropout in training); the same module otherwise."""

    def residual(self, x: torch.Tensor, norm: nn.LayerNorm, sublayer) -> torch.Tensor:  # (B, T, C) -> (B, T, C)
        if (self.training and self.drop.p) or not native_norm.applies(x, norm):
            return super().residual(x, norm, sublayer)
        return native_norm.AddNorm.apply(x, sublayer(x), norm.weight, norm.bias, norm.eps)


class NativeRecurrent(Recurrent):
    """A one-layer LSTM block whose recurrence runs in the C kernel where it applies; the same module otherwise.
    (Step-by-step decoding carries state between calls and keeps PyTorch's LSTM.)"""

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if not native_lstm.applies(x, self.rnn):
            return super().forward(x, mask)
        out = native_lstm.lstm(x, self.rnn)  # (B, T, H)
        if mask is not None:  # one direction: padding after the real steps leaves their outputs alone
            return self.pick(out, mask.sum(1).clamp(min=1))
        return out if self.steps == "all" else out[:, -1]


def fuse(model: nn.Module) -> list[str]:
    """Rewrite ``model.blocks`` in place; return a line per rewrite, for the log and the manifest."""
    done = []
    blocks = model.blocks
    for i in range(len(blocks) - 1):
        if _fusable(blocks[i], blocks[i + 1]):
            conv, pool = blocks[i].conv, blocks[i + 1]
            blocks[i] = ConvPool(conv, isinstance(blocks[i].act, nn.ReLU), pool)
            blocks[i + 1] = nn.Identity()
            # Nothing is compiled here: a run loaded for serving may never call the kernel.
            done.append(f"blocks {i}-{i + 1}: conv2d+maxpool2d fused; a first layer in one pass of a C kernel where "
                        "it applies (float32 CPU, pool stride = size; built at first use), else patch matmul, "
                        "channels-last pool, ReLU after pool")
    for name, module in model.named_modules():
        if type(module) is Recurrent and native_lstm.covers(module.rnn):
            module.__class__ = NativeRecurrent  # same parameters and keys; only `forward` differs
            done.append(f"{name}: LSTM recurrence in a C kernel where it applies (float32 CPU, up to "
                        f"{native_lstm.MAX_UNITS} units), else PyTorch's LSTM")
        if type(module) is EncoderLayer and module.post_norm:
            module.__class__ = NativeEncoderLayer  # same parameters and keys; only `residual` differs
            done.append(f"{name}: residual adds and LayerNorms in a C kernel where it applies (float32 CPU, no "
                        f"dropout, width up to {native_norm.MAX_WIDTH}), else PyTorch's")
        if isinstance(module, EncoderLayer) and type(module.attn) is Attention:  # not the stacks' layers
            module.attn.__class__ = NativeSelfAttention  # same parameters and keys; only `mix` differs
            done.append(f"{name}.attn: attention heads mixed by a C kernel where it applies (float32 CPU, no "
                        f"dropout, up to {native_attention.MAX_STEPS} steps), else scaled_dot_product_attention")
    return done
