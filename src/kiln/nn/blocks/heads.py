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


@BLOCKS.register("forecaster")
class Forecaster(BlockSpec):
    """Linear layer to ``horizon`` values: the next steps of a series (scaled, as the data scales the target).
    ``horizon`` defaults to the data's. After a sequence it reads every step (flattened), so a window can go
    straight in: a linear autoregression on the lookback is ``[forecaster]`` alone."""

    type: Literal["forecaster"] = "forecaster"
    horizon: PositiveInt | None = None

    example: ClassVar[dict] = {"horizon": 3}
    example_input: ClassVar[Shape] = (6,)

    def build(self, in_shape: Shape) -> Built:
        expect("forecaster", in_shape, ("vector", "sequence"),
               "end the model on a vector or a sequence (`seq_pool` or `lstm` with steps: last for a vector)")
        if self.horizon is None:
            raise ConfigError("forecaster.horizon is not set and no data set gave one; set horizon")
        features = 1
        for d in in_shape:
            features *= d
        layer = nn.Sequential(nn.Flatten(), nn.Linear(features, self.horizon)) if len(in_shape) > 1 else \
            nn.Linear(features, self.horizon)
        return Built(layer, (self.horizon,), features * self.horizon)
