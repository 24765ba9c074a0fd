"""Recurrent blocks: rnn, lstm, gru over a sequence (steps, features)."""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar, Literal

import torch
from pydantic import Field, PositiveInt
from torch import nn

from kiln.errors import ConfigError
from kiln.nn.base import BlockSpec, Built, Shape, expect
from kiln.registry import BLOCKS

SEQUENCE_FIX = (
    "a recurrent layer reads a sequence of steps. After conv/pool blocks use `rows_to_sequence` "
    "(instead of `flatten`) so that each image row is one step; a `dense` block after it then works "
    "per step and keeps the sequence"
)
# Gate matrices per cell type: each gate has an input and a recurrent weight.
GATES = {"rnn": 1, "lstm": 4, "gru": 3}


class Recurrent(nn.Module):
    takes_mask = True  # padded steps (mask False) at the end of a sequence are skipped: see ``forward``

    def __init__(self, rnn: nn.RNNBase, steps: str) -> None:
        super().__init__()
        self.rnn = rnn
        self.steps = steps

    def forward(self, x, mask=None):  # (B, T, F), mask (B, T) -> (B, T, H*dirs) or (B, H*dirs)
        if mask is not None:
            return self.masked(x, mask)
        out, state = self.rnn(x)
        if self.steps == "all":
            return out
        h = state[0] if isinstance(state, tuple) else state  # (layers*dirs, B, H)
        if self.rnn.bidirectional:
            return torch.cat([h[-2], h[-1]], dim=-1)
        return h[-1]

    def masked(self, x, mask):
        """Sequences whose real steps come first and padding after (mask True at real steps). One direction reads
        them as they are: a step's output depends only on the steps before it, so the real steps' outputs ignore
        the padding after them, and ``last`` is the output at the last real step. Both directions need the
        backward pass to start at each sequence's own last real step: the batch is packed."""
        lengths = mask.sum(1).clamp(min=1)  # (B,)
        if self.rnn.bidirectional:
            packed = nn.utils.rnn.pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
            out, state = self.rnn(packed)
            if self.steps == "last":
                h = state[0] if isinstance(state, tuple) else state  # (layers*dirs, B, H), in the batch's order
                return torch.cat([h[-2], h[-1]], dim=-1)
            out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])
            return out
        return self.pick(self.rnn(x)[0], lengths)

    def pick(self, out, lengths):  # (B, T, H): all steps, or the output at each sequence's last real step (B, H)
        if self.steps == "all":
            return out
        return out[torch.arange(len(out), device=out.device), lengths - 1]

    def decode(self, x, cache: dict, pos: int):  # new steps (B, t, F), carrying the state between calls
        if self.rnn.bidirectional or self.steps != "all":
            raise ConfigError(f"{type(self.rnn).__name__.lower()}: generating step by step needs steps: all and "
                              "bidirectional: false")
        out, cache["state"] = self.rnn(x, cache.get("state"))
        return out


class _RecurrentSpec(BlockSpec):
    units: PositiveInt
    layers: PositiveInt = 1
    bidirectional: bool = False
    steps: Literal["all", "last"] = "all"  # all: a sequence out; last: the final state as a vector
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)  # between stacked layers

    example: ClassVar[dict] = {"units": 6, "layers": 2, "bidirectional": True}
    cell: ClassVar[Callable[..., nn.RNNBase]]

    def build(self, in_shape: Shape) -> Built:
        expect(self.type, in_shape, ("sequence",), SEQUENCE_FIX)
        if self.dropout and self.layers == 1:
            raise ConfigError(f"{self.type}.dropout applies between stacked layers; set layers >= 2 or dropout: 0")
        t, f = in_shape
        dirs = 2 if self.bidirectional else 1
        rnn = self.cell(f, self.units, num_layers=self.layers, batch_first=True,
                        bidirectional=self.bidirectional, dropout=self.dropout)
        out = (t, self.units * dirs) if self.steps == "all" else (self.units * dirs,)
        macs, width = 0, f
        for _ in range(self.layers):
            macs += dirs * t * GATES[self.type] * self.units * (width + self.units)
            width = self.units * dirs
        return Built(Recurrent(rnn, self.steps), out, macs)


@BLOCKS.register("rnn")
class RNN(_RecurrentSpec):
    """Elman RNN with tanh."""

    type: Literal["rnn"] = "rnn"
    cell: ClassVar[Callable[..., nn.RNNBase]] = nn.RNN


@BLOCKS.register("lstm")
class LSTM(_RecurrentSpec):
    """Long short-term memory (PyTorch's cell: two bias vectors per gate set)."""

    type: Literal["lstm"] = "lstm"
    cell: ClassVar[Callable[..., nn.RNNBase]] = nn.LSTM


@BLOCKS.register("gru")
class GRU(_RecurrentSpec):
    """Gated recurrent unit."""

    type: Literal["gru"] = "gru"
    cell: ClassVar[Callable[..., nn.RNNBase]] = nn.GRU
