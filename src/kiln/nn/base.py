"""The contract every block follows, and shape helpers shared by all blocks.

A block is a pydantic spec (its documented fields, nothing else) with a ``build`` method that
takes the input shape (without the batch dimension) and returns the module, the output shape
and the multiply-adds of one sample. Shapes come in three kinds:

- image:    (channels, height, width)
- sequence: (steps, features)
- vector:   (features,)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from torch import nn

from kiln.errors import ConfigError
from kiln.schema import StrictModel

Shape = tuple[int, ...]
Activation = Literal["none", "relu", "gelu", "gelu_tanh", "tanh", "sigmoid", "silu"]

KIND_BY_NDIM = {3: "image", 2: "sequence", 1: "vector"}
DIMS_BY_KIND = {
    "image": "(channels, height, width)",
    "sequence": "(steps, features)",
    "vector": "(features,)",
}


class ShapeError(ConfigError):
    """A block cannot take the shape that the block before it produces."""


@dataclass
class Built:
    module: nn.Module
    out_shape: Shape
    macs: int  # multiply-adds for one sample, forward pass


class BlockSpec(StrictModel):
    """Base of every block spec. Subclasses set ``type`` to a Literal of their registry key."""

    type: str
    # For the registry-wide test harness: an input shape and fields that build this block.
    example_input: ClassVar[Shape] = (8, 16)
    example: ClassVar[dict[str, Any]] = {}
    example_tokens: ClassVar[int | None] = None  # the block reads token ids below this, not floats

    def build(self, in_shape: Shape) -> Built:
        raise NotImplementedError


def kind_of(shape: Shape) -> str:
    return KIND_BY_NDIM.get(len(shape), f"{len(shape)}-d tensor")


def describe(shape: Shape) -> str:
    """'a sequence (steps, features) = (13, 64)' — how error messages name a shape."""
    kind = kind_of(shape)
    dims = DIMS_BY_KIND.get(kind, "")
    return f"{kind} {dims} = {tuple(shape)}".replace("  ", " ")


def expect(block: str, shape: Shape, kinds: tuple[str, ...], fix: str) -> None:
    """Raise a ShapeError naming the block, the shape it got, the shape it needs, and the fix."""
    if kind_of(shape) in kinds:
        return
    needed = " or ".join(f"{k} {DIMS_BY_KIND[k]}" for k in kinds)
    raise ShapeError(f"{block} needs {needed} but got {describe(shape)}. Fix: {fix}")


def activation(name: Activation) -> nn.Module:
    return {
        "none": nn.Identity,
        "relu": nn.ReLU,
        "gelu": nn.GELU,
        "gelu_tanh": lambda: nn.GELU(approximate="tanh"),  # GPT-2's gelu_new
        "tanh": nn.Tanh,
        "sigmoid": nn.Sigmoid,
        "silu": nn.SiLU,
    }[name]()


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
