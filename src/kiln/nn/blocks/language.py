"""The blocks around a Transformer stack in a language model: token embeddings, positions and the head.

A language model reads token ids (steps,) and gives next-token logits (steps, vocab)::

    token_embedding -> positional_encoding (or rotary positions inside the stack) -> transformer_decoder -> lm_head

and a sequence-to-sequence model reads a source and the target so far in one row of ids::

    token_embedding -> positional_encoding -> encoder_decoder -> lm_head

Blocks that mix steps decode incrementally through ``decode(x, cache, pos)``: ``x`` holds only the new
steps, ``cache`` is the block's own dict (keys and values so far), ``pos`` the index of the first new
step. A block without ``decode`` works on each step alone (embeddings, dense, the head).
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import NonNegativeInt, PositiveInt
from torch import nn

from kiln.errors import ConfigError
from kiln.nn.base import BlockSpec, Built, Shape, expect
from kiln.nn.blocks.transformer import INIT_STD, SEQUENCE_FIX, linear
from kiln.registry import BLOCKS

TOKENS_FIX = "give token ids: a text data set (dataset: text or text_pairs) feeds (steps,) ids to token_embedding"


class Embedding(nn.Module):
    reads_codes = True  # token ids: gradients stop at its output (step i of it is token i)

    def __init__(self, vocab: int, width: int, padding: int | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(vocab, width) * INIT_STD)
        self.padding = padding

    def forward(self, ids):  # (B, T) int -> (B, T, C)
        return F.embedding(ids, self.weight)

    def padding_mask(self, ids):  # (B, T) int -> (B, T) bool, True at real tokens; None without a padding id
        return None if self.padding is None else ids != self.padding


@BLOCKS.register("token_embedding")
class TokenEmbedding(BlockSpec):
    """A learned vector per token id. ``vocab`` defaults to the data set's tokenizer size. ``padding`` (set by a
    data set whose texts are padded, such as text_classes) is the id that fills a short text's tail: the model
    then masks those steps in every block after this one (see :class:`kiln.nn.build.KilnModel`)."""

    type: Literal["token_embedding"] = "token_embedding"
    width: PositiveInt
    vocab: PositiveInt | None = None
    padding: NonNegativeInt | None = None

    example: ClassVar[dict] = {"width": 8, "vocab": 11}
    example_input: ClassVar[Shape] = (6,)
    example_tokens: ClassVar[int | None] = 11

    def build(self, in_shape: Shape) -> Built:
        expect("token_embedding", in_shape, ("vector",), TOKENS_FIX)
        if self.vocab is None:
            raise ConfigError("token_embedding.vocab is not set and no text data set gave a vocabulary; set vocab")
        if self.padding is not None and self.padding >= self.vocab:
            raise ConfigError(f"token_embedding.padding {self.padding} must be below vocab ({self.vocab})")
        return Built(Embedding(self.vocab, self.width, self.padding), (in_shape[0], self.width), 0)


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
        self.table = nn.Parameter(torch.randn(steps, width) * INIT_STD)

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


class Head(nn.Module):
    def __init__(self, width: int, vocab: int, tie: bool) -> None:
        super().__init__()
        self.tie = tie
        self.proj = linear(width, vocab, False, INIT_STD)

    def link(self, blocks: list[nn.Module]) -> None:
        """Weight tying: share the token embedding's matrix (Press & Wolf, 2017)."""
        if not self.tie:
            return
        embedding = next((b for b in blocks if isinstance(b, Embedding)), None)
        if embedding is None or embedding.weight.shape != self.proj.weight.shape:
            raise ConfigError("lm_head.tie needs a token_embedding block of the same width and vocabulary before "
                              "it; set tie: false or add one")
        self.proj.weight = embedding.weight

    def forward(self, x):  # (B, T, C) -> (B, T, vocab)
        return self.proj(x)


@BLOCKS.register("lm_head")
class LMHead(BlockSpec):
    """Next-token logits for every step. ``tie`` shares the token embedding's weights (no extra parameters)."""

    type: Literal["lm_head"] = "lm_head"
    vocab: PositiveInt | None = None
    tie: bool = True

    example: ClassVar[dict] = {"vocab": 7, "tie": False}

    def build(self, in_shape: Shape) -> Built:
        expect("lm_head", in_shape, ("sequence",), "a language model's head reads one vector per step")
        if self.vocab is None:
            raise ConfigError("lm_head.vocab is not set and no text data set gave a vocabulary; set vocab")
        t, c = in_shape
        return Built(Head(c, self.vocab, self.tie), (t, self.vocab), t * c * self.vocab)
