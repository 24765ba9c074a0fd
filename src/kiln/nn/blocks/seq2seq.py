"""The encoder-decoder Transformer for sequence-to-sequence models.

A sample is one row of token ids: the source (``source_steps`` of them, padded) followed by the target
so far (``<bos>`` and the target). The embedding blocks before this one see the whole row; this block
encodes the source with bidirectional self-attention and decodes the target with causal self-attention
and cross-attention to the encoded source. Only the target's steps come out, one vector per step, for
``lm_head``::

    token_embedding -> positional_encoding -> encoder_decoder -> lm_head
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, PositiveInt
from torch import nn

from kiln.errors import ConfigError
from kiln.nn.base import BlockSpec, Built, Shape, expect
from kiln.nn.blocks.language import Layer, check_width
from kiln.registry import BLOCKS


class EncoderDecoder(nn.Module):
    def __init__(self, source_steps: int, encoder: list[Layer], decoder: list[Layer], width: int, bias: bool) -> None:
        super().__init__()
        self.source_steps = source_steps
        self.encoder = nn.ModuleList(encoder)
        self.encoder_norm = nn.LayerNorm(width, bias=bias)
        self.decoder = nn.ModuleList(decoder)
        self.decoder_norm = nn.LayerNorm(width, bias=bias)

    def encode(self, src):  # (B, S, C) -> (B, S, C)
        for layer in self.encoder:
            src = layer(src)
        return self.encoder_norm(src)

    def forward(self, x):  # (B, S + T, C) -> (B, T, C)
        memory, y = self.encode(x[:, : self.source_steps]), x[:, self.source_steps:]
        for layer in self.decoder:
            y = layer(y, memory)
        return self.decoder_norm(y)

    def decode(self, x, cache: dict, pos: int):
        """The first call gets the source and the target's first steps; later ones only new target steps."""
        if "memory" not in cache:
            cache["memory"] = self.encode(x[:, : self.source_steps])
            x = x[:, self.source_steps:]
            pos = 0
        else:
            pos -= self.source_steps
        for i, layer in enumerate(self.decoder):
            x = layer(x, cache["memory"], cache=cache.setdefault(i, {}), pos=pos)
        return self.decoder_norm(x)


@BLOCKS.register("encoder_decoder")
class EncoderDecoderSpec(BlockSpec):
    """Transformer encoder-decoder (pre-norm): the first ``source_steps`` steps are the source (set by a
    text_pairs data set), the rest the target; gives one vector per target step."""

    type: Literal["encoder_decoder"] = "encoder_decoder"
    heads: PositiveInt
    layers: PositiveInt = 2  # encoder layers
    decoder_layers: PositiveInt | None = None  # default: as many as the encoder
    ff: PositiveInt | None = None  # feed-forward hidden width; default 4 x the model width
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    bias: bool = True
    source_steps: PositiveInt | None = None

    example: ClassVar[dict] = {"heads": 2, "layers": 1, "source_steps": 5}
    example_input: ClassVar[Shape] = (9, 8)

    def build(self, in_shape: Shape) -> Built:
        expect("encoder_decoder", in_shape, ("sequence",), "put token_embedding and positional_encoding first")
        steps, c = in_shape
        check_width("encoder_decoder", c, self.heads)
        s = self.source_steps
        if s is None or s >= steps:
            raise ConfigError(f"encoder_decoder.source_steps ({s}) must be set (a text_pairs data set sets it) and "
                              f"below the input's {steps} steps")
        ff, n_dec = self.ff or 4 * c, self.decoder_layers or self.layers
        total = self.layers + n_dec
        encoder = [Layer(c, self.heads, ff, self.dropout, self.bias, False, total) for _ in range(self.layers)]
        decoder = [Layer(c, self.heads, ff, self.dropout, self.bias, True, total, cross=True) for _ in range(n_dec)]
        t = steps - s
        macs = self.layers * (s * (4 * c * c + 2 * c * ff) + 2 * s * s * c) \
            + n_dec * (t * (6 * c * c + 2 * c * ff) + t * t * c + 2 * t * s * c + 2 * s * c * c)
        return Built(EncoderDecoder(s, encoder, decoder, c, self.bias), (t, c), macs)
