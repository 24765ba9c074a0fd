"""Recommendation blocks: score candidate items for a user.

Input: int64 ids (B, 1 + M): a user code, then M candidate item codes. Output: (B, M), one score per candidate
(a logit to rank by, or a standardised rating). ``users``, ``items`` and ``features`` come from the data set when
the config leaves them unset.

When every row has the same candidates (ranking all items for many users) the item side is computed once for the
M items instead of once per row: the same scores, B times less work.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import NonNegativeInt, PositiveInt
from torch import nn

from kiln.errors import ConfigError
from kiln.nn.base import BlockSpec, Built, Shape, ShapeError, expect
from kiln.registry import BLOCKS

FIX = "recommendation blocks read (user, item, item, ...) ids: put one first, with data.dataset: interactions"
INIT_STD = 0.1  # embeddings start small: a dot product of `dim` N(0, 1) entries would start with scores of ~dim


def _ids(spec: BlockSpec, in_shape: Shape) -> int:
    """The candidate count M of an input (1 + M,)."""
    expect(spec.type, in_shape, ("vector",), FIX)
    if in_shape[0] < 2:
        raise ShapeError(f"{spec.type} needs a user and at least one item per row, got {in_shape[0]} ids. Fix: {FIX}")
    if spec.users is None or spec.items is None:
        raise ConfigError(f"{spec.type}.users and .items are not set and no interactions data set gave them; use "
                          "data.dataset: interactions, or set both")
    return in_shape[0] - 1


def _shared(items: torch.Tensor) -> bool:
    """Whether every row scores the same candidates (B, M)."""
    return len(items) > 1 and bool((items == items[:1]).all())


def _embedding(n: int, dim: int) -> nn.Embedding:
    table = nn.Embedding(n, dim)
    nn.init.normal_(table.weight, std=INIT_STD)
    return table


class MF(nn.Module):
    def __init__(self, users: int, items: int, dim: int, biases: bool) -> None:
        super().__init__()
        self.user, self.item = _embedding(users, dim), _embedding(items, dim)
        self.user_bias = nn.Embedding(users, 1) if biases else None
        self.item_bias = nn.Embedding(items, 1) if biases else None
        self.bias = nn.Parameter(torch.zeros(())) if biases else None
        for table in (self.user_bias, self.item_bias):
            if table is not None:
                nn.init.zeros_(table.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 1 + M) ids -> (B, M)
        user, items = x[:, 0], x[:, 1:]
        u = self.user(user)  # (B, D)
        if _shared(items):
            scores = u @ self.item(items[0]).T  # (B, M)
        else:
            scores = torch.einsum("bd,bmd->bm", u, self.item(items))
        if self.bias is not None:
            scores = scores + self.user_bias(user) + self.item_bias(items)[..., 0] + self.bias
        return scores


@BLOCKS.register("matrix_factorization")
class MatrixFactorization(BlockSpec):
    """Matrix factorisation: score = user vector . item vector (+ user, item and global biases)."""

    type: Literal["matrix_factorization"] = "matrix_factorization"
    users: PositiveInt | None = None  # from the data
    items: PositiveInt | None = None  # from the data
    dim: PositiveInt = 32  # the length of each user and item vector
    biases: bool = True

    example: ClassVar[dict] = {"users": 6, "items": 6, "dim": 4}
    example_input: ClassVar[Shape] = (5,)
    example_tokens: ClassVar[int | None] = 6

    def build(self, in_shape: Shape) -> Built:
        m = _ids(self, in_shape)
        return Built(MF(self.users, self.items, self.dim, self.biases), (m,), m * self.dim)


class Tower(nn.Sequential):
    """vector (B..., D) -> (B..., out): Linear, ReLU, Linear."""

    def __init__(self, dim: int, hidden: int, out: int) -> None:
        super().__init__(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, out))


class TwoTowerModule(nn.Module):
    def __init__(self, users: int, items: int, features: int, dim: int, hidden: int, out: int) -> None:
        super().__init__()
        self.user = _embedding(users, dim)
        self.item = _embedding(items, dim)
        self.user_tower, self.item_tower = Tower(dim, hidden, out), Tower(dim, hidden, out)
        self.feature = nn.Linear(features, dim, bias=False) if features else None
        # Each item's side features (multi-hot categories), set by the data before training and saved with the
        # weights; ones until then (any fixed value: the block's own tests need features that carry a gradient).
        self.register_buffer("item_features", torch.ones(items, features))

    def set_item_features(self, features: torch.Tensor) -> None:
        if features.shape != self.item_features.shape:
            raise ConfigError(f"two_tower has {tuple(self.item_features.shape)} item features (items, features) but "
                              f"the data gives {tuple(features.shape)}")
        self.item_features.copy_(features)

    def items(self, items: torch.Tensor) -> torch.Tensor:  # (..., ) ids -> (..., out)
        v = self.item(items)
        if self.feature is not None:
            v = v + self.feature(self.item_features[items])
        return self.item_tower(v)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 1 + M) ids -> (B, M)
        u = self.user_tower(self.user(x[:, 0]))  # (B, out)
        items = x[:, 1:]
        if _shared(items):
            return u @ self.items(items[0]).T
        return torch.einsum("bd,bmd->bm", u, self.items(items))


@BLOCKS.register("two_tower")
class TwoTower(BlockSpec):
    """Two towers: a user tower (user embedding -> MLP) and an item tower (item embedding plus a projection of the
    item's side features, e.g. genres -> MLP); score = the dot product of their outputs."""

    type: Literal["two_tower"] = "two_tower"
    users: PositiveInt | None = None  # from the data
    items: PositiveInt | None = None  # from the data
    features: NonNegativeInt | None = None  # side features per item (0: none); from the data
    dim: PositiveInt = 32  # embedding size
    hidden: PositiveInt = 64  # each tower's hidden layer
    out: PositiveInt = 32  # the size of the vectors whose dot product is the score

    example: ClassVar[dict] = {"users": 6, "items": 6, "features": 3, "dim": 4, "hidden": 5, "out": 3}
    example_input: ClassVar[Shape] = (5,)
    example_tokens: ClassVar[int | None] = 6

    def build(self, in_shape: Shape) -> Built:
        m = _ids(self, in_shape)
        features = self.features or 0
        module = TwoTowerModule(self.users, self.items, features, self.dim, self.hidden, self.out)
        per_vector = self.dim * self.hidden + self.hidden * self.out
        return Built(module, (m,), (m + 1) * per_vector + m * (features * self.dim + self.out))
