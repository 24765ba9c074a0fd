"""Per-feature blocks: dense (applied per step on sequences), dropout and normalisation."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, PositiveFloat, PositiveInt
from torch import nn

from kiln.errors import ConfigError
from kiln.nn.base import Activation, BlockSpec, Built, Shape, activation, expect, kind_of
from kiln.registry import BLOCKS


class DenseBlock(nn.Module):
    def __init__(self, linear: nn.Linear, act: nn.Module) -> None:
        super().__init__()
        self.linear = linear
        self.act = act

    def forward(self, x):  # (B, F) or (B, T, F) -> (B, units) or (B, T, units)
        return self.act(self.linear(x))


@BLOCKS.register("dense")
class Dense(BlockSpec):
    """Fully connected layer on the last dimension; on a sequence it applies to each step."""

    type: Literal["dense"] = "dense"
    units: PositiveInt
    activation: Activation = "none"
    bias: bool = True

    example: ClassVar[dict] = {"units": 5, "activation": "relu"}

    def build(self, in_shape: Shape) -> Built:
        expect(
            "dense",
            in_shape,
            ("vector", "sequence"),
            "add `flatten` (one vector per image) or `rows_to_sequence` (one step per row) before it",
        )
        linear = nn.Linear(in_shape[-1], self.units, bias=self.bias)
        steps = in_shape[0] if len(in_shape) == 2 else 1
        out = (*in_shape[:-1], self.units)
        return Built(DenseBlock(linear, activation(self.activation)), out, steps * in_shape[-1] * self.units)


@BLOCKS.register("dropout")
class Dropout(BlockSpec):
    """Zeroes each element with probability ``rate`` during training; identity at evaluation."""

    type: Literal["dropout"] = "dropout"
    rate: float = Field(default=0.5, ge=0.0, lt=1.0)

    example: ClassVar[dict] = {"rate": 0.25}

    def build(self, in_shape: Shape) -> Built:
        return Built(nn.Dropout(self.rate), tuple(in_shape), 0)


class SequenceBatchNorm(nn.Module):
    """BatchNorm1d over the features of (B, T, F): statistics over batch and steps."""

    def __init__(self, features: int, eps: float, momentum: float) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(features, eps=eps, momentum=momentum)

    def forward(self, x):  # (B, T, F)
        return self.norm(x.transpose(1, 2)).transpose(1, 2)


@BLOCKS.register("batchnorm")
class BatchNorm(BlockSpec):
    """Batch normalisation over channels (images) or features (vectors, sequences)."""

    type: Literal["batchnorm"] = "batchnorm"
    eps: PositiveFloat = 1e-5
    momentum: float = Field(default=0.1, gt=0.0, le=1.0)

    example_input: ClassVar[Shape] = (3, 5, 5)

    def build(self, in_shape: Shape) -> Built:
        expect("batchnorm", in_shape, ("image", "sequence", "vector"), "batchnorm takes 1-3 dimensions")
        kind = kind_of(in_shape)
        if kind == "image":
            module: nn.Module = nn.BatchNorm2d(in_shape[0], self.eps, self.momentum)
        elif kind == "sequence":
            module = SequenceBatchNorm(in_shape[1], self.eps, self.momentum)
        else:
            module = nn.BatchNorm1d(in_shape[0], self.eps, self.momentum)
        numel = 1
        for d in in_shape:
            numel *= d
        return Built(module, tuple(in_shape), numel)


@BLOCKS.register("groupnorm")
class GroupNorm(BlockSpec):
    """Group normalisation (Wu and He, 2018) of an image's channels, in ``groups`` groups of channels, over each
    sample alone: unlike batchnorm it does not mix the samples of a batch, so it suits small batches and training
    with differential privacy (``train.privacy``)."""

    type: Literal["groupnorm"] = "groupnorm"
    groups: PositiveInt = 8
    eps: PositiveFloat = 1e-5

    example_input: ClassVar[Shape] = (4, 5, 5)
    example: ClassVar[dict] = {"groups": 2}

    def build(self, in_shape: Shape) -> Built:
        expect("groupnorm", in_shape, ("image",), "groupnorm normalises the channels of images; use layernorm on "
               "vectors and sequences")
        channels = in_shape[0]
        if channels % self.groups:
            raise ConfigError(f"groupnorm.groups: the {channels} channels of its input must divide into "
                              f"groups={self.groups}")
        numel = 1
        for d in in_shape:
            numel *= d
        return Built(nn.GroupNorm(self.groups, channels, self.eps), tuple(in_shape), numel)


@BLOCKS.register("layernorm")
class LayerNorm(BlockSpec):
    """Layer normalisation over the last dimension (the features of each step or vector)."""

    type: Literal["layernorm"] = "layernorm"
    eps: PositiveFloat = 1e-5

    def build(self, in_shape: Shape) -> Built:
        numel = 1
        for d in in_shape:
            numel *= d
        return Built(nn.LayerNorm(in_shape[-1], eps=self.eps), tuple(in_shape), numel)
