"""Image blocks: 2-D convolution and pooling, on (channels, height, width)."""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar, Literal

from pydantic import Field, NonNegativeInt, PositiveInt
from torch import nn

from kiln.errors import ConfigError
from kiln.nn.base import Activation, BlockSpec, Built, Shape, ShapeError, activation, expect
from kiln.registry import BLOCKS
from kiln.schema import PositivePair

IMAGE_FIX = "image blocks must come before `flatten` or `rows_to_sequence`"


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _out_size(size: int, kernel: int, stride: int, pad: int) -> int:
    return (size + 2 * pad - kernel) // stride + 1


def _check_positive(block: str, in_shape: Shape, out_hw: tuple[int, int]) -> None:
    if min(out_hw) < 1:
        raise ShapeError(
            f"{block} would shrink the image {tuple(in_shape)} to nothing (height, width = {out_hw}). "
            "Fix: use a smaller kernel, padding: same, or fewer pooling blocks before it"
        )


class ConvBlock(nn.Module):
    def __init__(self, conv: nn.Conv2d, act: nn.Module) -> None:
        super().__init__()
        self.conv = conv
        self.act = act

    def forward(self, x):  # (B, C, H, W) -> (B, filters, H', W')
        return self.act(self.conv(x))


@BLOCKS.register("conv2d")
class Conv2d(BlockSpec):
    """2-D convolution. ``padding``: valid (none), same (keeps height and width; stride 1), or pixels."""

    type: Literal["conv2d"] = "conv2d"
    filters: PositiveInt
    kernel: PositiveInt | PositivePair = 3
    stride: PositiveInt = 1
    padding: Literal["valid", "same"] | NonNegativeInt = Field(default="valid")
    activation: Activation = "none"
    bias: bool = True

    example_input: ClassVar[Shape] = (2, 9, 9)
    example: ClassVar[dict] = {"filters": 4, "activation": "relu"}

    def build(self, in_shape: Shape) -> Built:
        expect("conv2d", in_shape, ("image",), IMAGE_FIX)
        c, h, w = in_shape
        kh, kw = _pair(self.kernel)
        if self.padding == "same":
            if self.stride != 1 or kh % 2 == 0 or kw % 2 == 0:
                raise ConfigError("conv2d padding: same needs stride 1 and an odd kernel")
            pad = (kh // 2, kw // 2)
        elif self.padding == "valid":
            pad = (0, 0)
        else:
            pad = (int(self.padding), int(self.padding))
        oh = _out_size(h, kh, self.stride, pad[0])
        ow = _out_size(w, kw, self.stride, pad[1])
        _check_positive("conv2d", in_shape, (oh, ow))
        conv = nn.Conv2d(c, self.filters, (kh, kw), self.stride, pad, bias=self.bias)
        macs = self.filters * oh * ow * c * kh * kw
        return Built(ConvBlock(conv, activation(self.activation)), (self.filters, oh, ow), macs)


class _Pool(BlockSpec):
    size: PositiveInt | PositivePair = 2
    stride: PositiveInt | None = None  # default: the pool size (non-overlapping windows)

    example_input: ClassVar[Shape] = (2, 8, 8)
    pool_class: ClassVar[Callable[..., nn.Module]]

    def build(self, in_shape: Shape) -> Built:
        expect(self.type, in_shape, ("image",), IMAGE_FIX)
        c, h, w = in_shape
        kh, kw = _pair(self.size)
        stride = self.stride or (kh, kw)
        sh, sw = _pair(stride)
        oh, ow = _out_size(h, kh, sh, 0), _out_size(w, kw, sw, 0)
        _check_positive(self.type, in_shape, (oh, ow))
        return Built(self.pool_class((kh, kw), (sh, sw)), (c, oh, ow), c * oh * ow * kh * kw)


@BLOCKS.register("maxpool2d")
class MaxPool2d(_Pool):
    """Max over each size x size window; windows do not overlap unless ``stride`` is smaller."""

    type: Literal["maxpool2d"] = "maxpool2d"
    pool_class: ClassVar[Callable[..., nn.Module]] = nn.MaxPool2d


@BLOCKS.register("avgpool2d")
class AvgPool2d(_Pool):
    """Mean over each size x size window."""

    type: Literal["avgpool2d"] = "avgpool2d"
    pool_class: ClassVar[Callable[..., nn.Module]] = nn.AvgPool2d


@BLOCKS.register("flatten")
class Flatten(BlockSpec):
    """Any shape to a vector (features,)."""

    type: Literal["flatten"] = "flatten"
    example_input: ClassVar[Shape] = (2, 3, 3)

    def build(self, in_shape: Shape) -> Built:
        n = 1
        for d in in_shape:
            n *= d
        return Built(nn.Flatten(), (n,), 0)
