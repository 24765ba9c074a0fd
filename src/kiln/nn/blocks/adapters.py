"""Blocks that change the kind of a shape: image rows to a sequence, a sequence to a vector."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from torch import nn

from kiln.nn.base import BlockSpec, Built, Shape, expect
from kiln.registry import BLOCKS


class RowsAsSequence(nn.Module):
    def forward(self, x):  # (B, C, H, W) -> (B, H, W*C): step = image row, features = (column, channel)
        b, c, h, w = x.shape
        return x.permute(0, 2, 3, 1).reshape(b, h, w * c)


@BLOCKS.register("rows_to_sequence")
class RowsToSequence(BlockSpec):
    """Image (C, H, W) to a sequence of H steps, each the row's W*C values (column-major within a row,
    as Keras's Reshape of a channels-last image)."""

    type: Literal["rows_to_sequence"] = "rows_to_sequence"
    example_input: ClassVar[Shape] = (2, 4, 5)

    def build(self, in_shape: Shape) -> Built:
        expect("rows_to_sequence", in_shape, ("image",), "put it right after the conv/pool blocks")
        c, h, w = in_shape
        return Built(RowsAsSequence(), (h, w * c), 0)


class Pool(nn.Module):
    takes_mask = True  # with a mask (B, T), over the real steps only

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode

    def forward(self, x, mask=None):  # (B, T, F), mask (B, T) True at real steps -> (B, F)
        if mask is not None:
            return self.masked(x, mask)
        if self.mode == "mean":
            return x.mean(dim=1)
        if self.mode == "max":
            return x.amax(dim=1)
        return x[:, -1]

    def masked(self, x, mask):
        keep = mask[..., None]  # (B, T, 1)
        if self.mode == "mean":
            return (x * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1)
        if self.mode == "max":
            return x.masked_fill(~keep, float("-inf")).amax(dim=1)
        last = mask.sum(1).clamp(min=1) - 1  # real steps come first: the last real one (B,)
        return x[torch.arange(len(x), device=x.device), last]


@BLOCKS.register("seq_pool")
class SeqPool(BlockSpec):
    """Sequence (T, F) to a vector (F,): mean or max over steps, or the last step; over a padded text's real
    steps only (mean, max, or its last real step)."""

    type: Literal["seq_pool"] = "seq_pool"
    mode: Literal["mean", "max", "last"] = "mean"

    def build(self, in_shape: Shape) -> Built:
        expect("seq_pool", in_shape, ("sequence",), "seq_pool goes after a sequence block (lstm, transformer_encoder)")
        t, f = in_shape
        return Built(Pool(self.mode), (f,), 0 if self.mode == "last" else t * f)
