"""Transformer blocks: an encoder layer on ``scaled_dot_product_attention`` and positional encodings."""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, PositiveInt
from torch import nn

from kiln.errors import ConfigError
from kiln.nn.base import BlockSpec, Built, Shape, activation, expect
from kiln.registry import BLOCKS

SEQUENCE_FIX = "attention reads a sequence of steps; use `rows_to_sequence` after conv/pool blocks, not `flatten`"


class SelfAttention(nn.Module):
    def __init__(self, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x):  # (B, T, C)
        return self.proj(self.mix(self.qkv(x)))

    def mix(self, qkv):  # (B, T, 3C) -> (B, T, C): each head's attention, heads side by side
        b, t, c = qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3
        q, k, v = qkv.split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))  # (B, h, T, d)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return y.transpose(1, 2).reshape(b, t, c)


class EncoderLayer(nn.Module):
    def __init__(self, width: int, heads: int, ff: int, dropout: float, act: str, pre_norm: bool) -> None:
        super().__init__()
        self.pre_norm = pre_norm
        self.attn = SelfAttention(width, heads, dropout)
        self.norm1 = nn.LayerNorm(width)
        self.norm2 = nn.LayerNorm(width)
        self.ff = nn.Sequential(nn.Linear(width, ff), activation(act), nn.Dropout(dropout), nn.Linear(ff, width))
        self.drop = nn.Dropout(dropout)

    def forward(self, x):  # (B, T, C) -> (B, T, C)
        if self.pre_norm:
            x = x + self.drop(self.attn(self.norm1(x)))
            return x + self.drop(self.ff(self.norm2(x)))
        x = self.norm1(x + self.drop(self.attn(x)))
        return self.norm2(x + self.drop(self.ff(x)))


@BLOCKS.register("transformer_encoder")
class TransformerEncoder(BlockSpec):
    """One encoder layer: multi-head self-attention and a feed-forward network, each with a residual.
    The model width is the input's feature count; it must divide by ``heads``."""

    type: Literal["transformer_encoder"] = "transformer_encoder"
    heads: PositiveInt
    ff: PositiveInt  # feed-forward hidden width
    norm: Literal["post", "pre"] = "post"
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    activation: Literal["relu", "gelu"] = "relu"

    example: ClassVar[dict] = {"heads": 2, "ff": 12, "norm": "pre"}

    def build(self, in_shape: Shape) -> Built:
        expect("transformer_encoder", in_shape, ("sequence",), SEQUENCE_FIX)
        t, c = in_shape
        if c % self.heads:
            raise ConfigError(
                f"transformer_encoder.heads: the model width {c} (features of the input) must divide by "
                f"heads={self.heads}; change heads or the width of the block before it"
            )
        layer = EncoderLayer(c, self.heads, self.ff, self.dropout, self.activation, self.norm == "pre")
        macs = t * (4 * c * c + 2 * c * self.ff) + 2 * t * t * c  # projections, feed-forward, scores and mix
        return Built(layer, (t, c), macs)


class SinusoidalPosition(nn.Module):
    def __init__(self, steps: int, width: int) -> None:
        super().__init__()
        pos = torch.arange(steps, dtype=torch.float32)[:, None]
        freq = torch.exp(torch.arange(0, width, 2, dtype=torch.float32) * (-math.log(10000.0) / width))
        table = torch.zeros(steps, width)
        table[:, 0::2] = torch.sin(pos * freq)
        table[:, 1::2] = torch.cos(pos * freq[: width // 2])
        self.register_buffer("table", table, persistent=False)

    def forward(self, x):  # (B, T, C)
        return x + self.table[: x.shape[1]]

    def decode(self, x, cache: dict, pos: int):  # new steps (B, t, C) at positions pos..pos+t-1
        return x + self.table[pos: pos + x.shape[1]]


class LearnedPosition(nn.Module):
    def __init__(self, steps: int, width: int) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(steps, width) * 0.02)

    def forward(self, x):  # (B, T, C)
        return x + self.table[: x.shape[1]]

    def decode(self, x, cache: dict, pos: int):  # new steps (B, t, C) at positions pos..pos+t-1
        return x + self.table[pos: pos + x.shape[1]]


@BLOCKS.register("positional_encoding")
class PositionalEncoding(BlockSpec):
    """Adds position information to each step: fixed sinusoids or a learned table."""

    type: Literal["positional_encoding"] = "positional_encoding"
    kind: Literal["sinusoidal", "learned"] = "sinusoidal"
    max_steps: PositiveInt | None = None  # default: the input's step count

    example: ClassVar[dict] = {"kind": "learned"}

    def build(self, in_shape: Shape) -> Built:
        expect("positional_encoding", in_shape, ("sequence",), SEQUENCE_FIX)
        t, c = in_shape
        steps = self.max_steps or t
        if steps < t:
            raise ConfigError(f"positional_encoding.max_steps={steps} is shorter than the sequence ({t} steps)")
        module = SinusoidalPosition(steps, c) if self.kind == "sinusoidal" else LearnedPosition(steps, c)
        return Built(module, (t, c), 0)
