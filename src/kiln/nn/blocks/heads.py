"""Output heads."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import PositiveInt
from torch import nn

from kiln.errors import ConfigError
from kiln.nn.base import BlockSpec, Built, Shape, expect
from kiln.registry import BLOCKS


@BLOCKS.register("classifier")
class Classifier(BlockSpec):
    """Linear layer to one logit per class. ``classes`` defaults to the data set's class count."""

    type: Literal["classifier"] = "classifier"
    classes: PositiveInt | None = None

    example: ClassVar[dict] = {"classes": 3}
    example_input: ClassVar[Shape] = (6,)

    def build(self, in_shape: Shape) -> Built:
        expect(
            "classifier",
            in_shape,
            ("vector",),
            "reduce to a vector first: `seq_pool` after a sequence, `flatten` after an image",
        )
        if self.classes is None:
            raise ConfigError("classifier.classes is not set and no data set gave a class count; set classes")
        return Built(nn.Linear(in_shape[0], self.classes), (self.classes,), in_shape[0] * self.classes)
