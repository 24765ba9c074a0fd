"""Blocks of ResNet-style image models: the residual block and global pooling over height and width."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field, PositiveInt
from torch import nn

from kiln.nn.base import BlockSpec, Built, Shape, expect
from kiln.nn.blocks.conv import IMAGE_FIX, _check_positive
from kiln.registry import BLOCKS


class ResidualUnit(nn.Module):
    """relu(bn(conv(relu(bn(conv(x))))) + shortcut(x)); the shortcut is x, or a strided 1x1 conv + bn when the
    shape changes (He et al. 2016, the basic block)."""

    def __init__(self, channels: int, filters: int, stride: int, kernel: int, dropout: float) -> None:
        super().__init__()
        pad = kernel // 2
        self.conv1 = nn.Conv2d(channels, filters, kernel, stride, pad, bias=False)
        self.bn1 = nn.BatchNorm2d(filters)
        self.conv2 = nn.Conv2d(filters, filters, kernel, 1, pad, bias=False)
        self.bn2 = nn.BatchNorm2d(filters)
        self.drop = nn.Dropout2d(dropout) if dropout else nn.Identity()
        self.shortcut = nn.Identity() if stride == 1 and channels == filters else nn.Sequential(
            nn.Conv2d(channels, filters, 1, stride, bias=False), nn.BatchNorm2d(filters))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, filters, H / stride, W / stride)
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(self.drop(y)))
        return torch.relu(y + self.shortcut(x))


@BLOCKS.register("residual")
class Residual(BlockSpec):
    """A residual block of two convolutions with batch normalisation; ``stride: 2`` halves height and width."""

    type: Literal["residual"] = "residual"
    filters: PositiveInt
    stride: Literal[1, 2] = 1
    kernel: Literal[3, 5] = 3
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)  # between the two convolutions (channels dropped)

    example_input: ClassVar[Shape] = (2, 8, 8)
    example: ClassVar[dict] = {"filters": 4, "stride": 2}

    def build(self, in_shape: Shape) -> Built:
        expect("residual", in_shape, ("image",), IMAGE_FIX)
        c, h, w = in_shape
        oh, ow = (h - 1) // self.stride + 1, (w - 1) // self.stride + 1
        _check_positive("residual", in_shape, (oh, ow))
        k2 = self.kernel * self.kernel
        macs = oh * ow * self.filters * (c * k2 + self.filters * k2 + (c if self.stride != 1 or c != self.filters
                                                                         else 0))
        return Built(ResidualUnit(c, self.filters, self.stride, self.kernel, self.dropout),
                     (self.filters, oh, ow), macs)


class GlobalPoolModule(nn.Module):
    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C)
        return x.mean(dim=(2, 3)) if self.mode == "avg" else x.amax(dim=(2, 3))


@BLOCKS.register("global_pool")
class GlobalPool(BlockSpec):
    """Mean (``avg``) or maximum (``max``) of each channel over height and width: an image to a vector (C,)."""

    type: Literal["global_pool"] = "global_pool"
    mode: Literal["avg", "max"] = "avg"

    example_input: ClassVar[Shape] = (3, 4, 4)

    def build(self, in_shape: Shape) -> Built:
        expect("global_pool", in_shape, ("image",), IMAGE_FIX)
        c, h, w = in_shape
        return Built(GlobalPoolModule(self.mode), (c,), c * h * w)
