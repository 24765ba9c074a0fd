"""Table blocks: encoders of a preprocessed row, and the regression head.

A row arrives as one vector (see :mod:`kiln.data.preprocess`): ``numeric`` standardised values and
is-missing indicators, then one category code per categorical column (0 = unknown, 1.. = categories).
``numeric`` and ``categories`` (each categorical column's category count, unknown included) are filled
from the data set's saved preprocessing when the config leaves them unset.
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, NonNegativeInt, PositiveFloat, PositiveInt
from torch import nn

from kiln.errors import ConfigError
from kiln.nn.base import BlockSpec, Built, Shape, ShapeError, expect
from kiln.registry import BLOCKS

TABLE_FIX = "table blocks read the preprocessed row vector: put them first, with data.dataset: tabular"


def category_codes(x: torch.Tensor, numeric: int, cards: torch.Tensor) -> torch.Tensor:
    """(B, numeric + n_cat) -> (B, n_cat) int64 codes; a code outside 0..card-1 becomes 0 (unknown)."""
    codes = x[:, numeric:].round().long()
    return torch.where((codes >= 0) & (codes < cards), codes, torch.zeros_like(codes))


def _offsets(cards: list[int]) -> torch.Tensor:
    """Start of each column's rows in one shared table: [0, c0, c0+c1, ...]."""
    return torch.tensor([0, *cards[:-1]], dtype=torch.int64).cumsum(0)


class _TableSpec(BlockSpec):
    numeric: NonNegativeInt | None = None  # numeric inputs (values and missing indicators); from the data
    categories: list[PositiveInt] | None = None  # category count per categorical column; from the data

    example_input: ClassVar[Shape] = (5,)

    def layout(self, in_shape: Shape) -> tuple[int, list[int]]:
        expect(self.type, in_shape, ("vector",), TABLE_FIX)
        if self.numeric is None or self.categories is None:
            raise ConfigError(f"{self.type}.numeric and .categories are not set and no table data set gave them; "
                              "use data.dataset: tabular, or set both")
        if self.numeric + len(self.categories) != in_shape[0]:
            raise ShapeError(f"{self.type} expects {self.numeric} numeric inputs and {len(self.categories)} "
                             f"category codes, but the row has {in_shape[0]} values. Fix: {TABLE_FIX}")
        return self.numeric, list(self.categories)


class PeriodicEmbedding(nn.Module):
    """Each of ``n`` numbers to ``dim`` values: ReLU(Linear([cos(2 pi c v), sin(2 pi c v)])) with ``k`` learned
    frequencies c and a linear layer of its own per number ("PLR", Gorishniy et al. 2022)."""

    no_weight_decay = ("frequencies", "weight", "bias")  # kiln.training.optim.param_groups: a number's own encoding

    def __init__(self, n: int, k: int, scale: float, dim: int) -> None:
        super().__init__()
        self.frequencies = nn.Parameter(torch.randn(n, k) * scale)
        bound = 1 / math.sqrt(2 * k)  # nn.Linear's initialisation, per number
        self.weight = nn.Parameter(torch.empty(n, 2 * k, dim).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(n, dim).uniform_(-bound, bound))

    def forward(self, v):  # (B, n) -> (B, n * dim)
        z = 2 * math.pi * v[..., None] * self.frequencies  # (B, n, k)
        z = torch.cat([torch.cos(z), torch.sin(z)], dim=-1)  # (B, n, 2k)
        return F.relu(torch.einsum("bnk,nkd->bnd", z, self.weight) + self.bias).flatten(1)

    def sources(self) -> torch.Tensor:
        """Each output's input position."""
        n, dim = self.bias.shape
        return torch.arange(n).repeat_interleave(dim)


class NumberEmbedding(nn.Module):
    """Each number's inputs (its standardised value, or its piecewise-linear bins) to ``dim`` values through a
    linear layer of its own ("L" of Gorishniy et al. 2022; with ``relu``, "LR"); on piecewise-linear bins this is
    the embedding TabM-mini-dagger uses (Gorishniy et al. 2024). The ``numeric`` inputs after the numbers'
    (is-missing indicators) pass through as they are."""

    no_weight_decay = ("weight", "bias")  # kiln.training.optim.param_groups: a number's own encoding

    def __init__(self, widths: list[int], numeric: int, dim: int, relu: bool) -> None:
        super().__init__()
        self.relu, self.used, self.numeric = relu, sum(widths), numeric
        longest = max(widths)
        index = torch.full((len(widths), longest), self.used, dtype=torch.int64)  # padding reads an appended 0
        start = 0
        for i, w in enumerate(widths):
            index[i, :w] = torch.arange(start, start + w)
            start += w
        self.register_buffer("index", index, persistent=False)
        bound = 1 / torch.tensor(widths, dtype=torch.float32).sqrt()[:, None, None]  # nn.Linear's, per number
        real = (index < self.used).float()[..., None]  # padded rows stay 0 (their input is always 0)
        self.weight = nn.Parameter((torch.rand(len(widths), longest, dim) * 2 - 1) * bound * real)
        self.bias = nn.Parameter((torch.rand(len(widths), dim) * 2 - 1) * bound[:, 0])

    def forward(self, v):  # (B, numeric) -> (B, n * dim + numeric - sum(widths))
        bins = F.pad(v[:, :self.used], (0, 1))[:, self.index]  # (B, n, longest)
        z = torch.einsum("bnw,nwd->bnd", bins, self.weight) + self.bias
        return torch.cat([(F.relu(z) if self.relu else z).flatten(1), v[:, self.used:]], dim=1)

    def sources(self) -> torch.Tensor:
        """Each output's input position: a number's values go back to its first input."""
        first = self.index[:, 0].cpu().repeat_interleave(self.bias.shape[1])
        return torch.cat([first, torch.arange(self.used, self.numeric)])


class TableEncoder(nn.Module):
    reads_codes = True  # its input holds category codes: gradients stop there (attributions start at its output)

    def __init__(self, numeric: int, cards: list[int], onehot_max: int, dim: int,
                 periodic: PeriodicEmbedding | None = None, linear: NumberEmbedding | None = None) -> None:
        super().__init__()
        self.numeric = numeric
        self.periodic = periodic  # at most one of the two (their names are their weights' names in saved runs)
        self.linear = linear
        self.register_buffer("cards", torch.tensor(cards, dtype=torch.int64), persistent=False)
        onehot = [i for i, c in enumerate(cards) if c <= onehot_max]
        embedded = [i for i, c in enumerate(cards) if c > onehot_max]
        self.register_buffer("onehot", torch.tensor(onehot, dtype=torch.int64), persistent=False)
        self.register_buffer("embedded", torch.tensor(embedded, dtype=torch.int64), persistent=False)
        self.register_buffer("onehot_start", _offsets([cards[i] for i in onehot]), persistent=False)
        self.register_buffer("embed_start", _offsets([cards[i] for i in embedded]), persistent=False)
        self.onehot_width = sum(cards[i] for i in onehot)
        self.embedding = nn.Embedding(sum(cards[i] for i in embedded), dim) if embedded else None

    @property
    def numbers(self) -> PeriodicEmbedding | NumberEmbedding | None:
        """The numbers' embedding, if any."""
        return self.periodic if self.periodic is not None else self.linear

    def output_sources(self) -> torch.Tensor:
        """For each output value, the input position it comes from: (width,) int64 (a number's periodic values,
        a one-hot column's categories and an embedded column's vector each go back to that number or column)."""
        parts = [self.numbers.sources() if self.numbers is not None else torch.arange(self.numeric)]
        cards = self.cards.cpu()
        for i in self.onehot.tolist():
            parts.append(torch.full((int(cards[i]),), self.numeric + i))
        if self.embedding is not None:
            dim = self.embedding.embedding_dim
            parts.append((self.numeric + self.embedded.cpu()).repeat_interleave(dim))
        return torch.cat(parts).to(torch.int64)

    def forward(self, x):  # (B, numeric + n_cat) -> (B, numeric + onehot_width + n_embedded * dim)
        codes = category_codes(x, self.numeric, self.cards)
        values = x[:, :self.numeric]
        numbers = self.numbers
        parts = [numbers(values) if numbers is not None else values]
        if self.onehot_width:
            hot = F.one_hot(codes[:, self.onehot] + self.onehot_start, self.onehot_width)  # (B, n_onehot, width)
            parts.append(hot.sum(1).to(x.dtype))
        if self.embedding is not None:
            parts.append(self.embedding(codes[:, self.embedded] + self.embed_start).flatten(1))
        return torch.cat(parts, dim=1)


@BLOCKS.register("tabular_encoder")
class TabularEncoder(_TableSpec):
    """A preprocessed table row to one vector: numeric inputs as they are, or each number as ``numeric_dim``
    learned values (``numeric_embedding``: ``periodic``, a periodic embedding of its value; ``linear`` or
    ``linear_relu``, a linear layer of its own on its value or its piecewise-linear bins; ``auto``, linear on a
    table of 5,120 training rows or more, else none); then each categorical column one-hot (at most
    ``onehot_max`` categories) or as a learned embedding of ``embed_dim`` values."""

    type: Literal["tabular_encoder"] = "tabular_encoder"
    numbers: list[PositiveInt] | None = None  # each number's inputs (1, or its bins); from the data
    onehot_max: NonNegativeInt = 12  # categories (unknown included) up to which a column is one-hot
    embed_dim: PositiveInt = 8
    # auto: linear from 5,120 training rows, else none (kiln.data.preprocess.auto_number_embedding); the run's
    # config.yaml keeps the choice
    numeric_embedding: Literal["none", "periodic", "linear", "linear_relu", "auto"] = "none"
    frequencies: PositiveInt = 48  # periodic: learned frequencies per number
    frequency_scale: PositiveFloat = 0.01  # periodic: std of the frequencies' initial values (per standard deviation)
    numeric_dim: PositiveInt = 24  # periodic, linear: values per number

    example: ClassVar[dict] = {"numeric": 3, "categories": [3, 14], "onehot_max": 4, "embed_dim": 2,
                               "numeric_embedding": "periodic", "frequencies": 4, "numeric_dim": 3}

    def build(self, in_shape: Shape) -> Built:
        numeric, cards = self.layout(in_shape)
        if self.numeric_embedding == "auto":
            raise ConfigError("tabular_encoder.numeric_embedding: auto follows the training rows, which only a table "
                              "data set being trained on gives; set none or linear")
        periodic = linear = None
        if self.numeric_embedding == "periodic" and numeric:
            periodic = PeriodicEmbedding(numeric, self.frequencies, self.frequency_scale, self.numeric_dim)
        elif self.numeric_embedding.startswith("linear") and numeric:
            widths = self.numbers if self.numbers is not None else [1] * numeric  # unset: each input a number
            if not widths or sum(widths) > numeric:
                raise ShapeError(f"tabular_encoder.numbers: {widths} (the inputs of each number) must add up to "
                                 f"at most numeric ({numeric}); leave it unset to take the data's")
            linear = NumberEmbedding(widths, numeric, self.numeric_dim, self.numeric_embedding == "linear_relu")
        module = TableEncoder(numeric, cards, self.onehot_max, self.embed_dim, periodic, linear)
        if periodic is not None:
            width, flops = numeric * self.numeric_dim, numeric * self.frequencies * 2 * self.numeric_dim
        elif linear is not None:
            width = len(linear.index) * self.numeric_dim + numeric - linear.used
            flops = linear.index.numel() * self.numeric_dim
        else:
            width, flops = numeric, 0
        width += module.onehot_width + sum(c > self.onehot_max for c in cards) * self.embed_dim
        return Built(module, (width,), flops)


class FeatureTokens(nn.Module):
    """One token per column plus a learned [CLS] token at the end (FT-Transformer's feature tokenizer)."""

    reads_codes = True  # its input holds category codes; token i of its output is input position i

    def __init__(self, numeric: int, cards: list[int], width: int) -> None:
        super().__init__()
        self.numeric = numeric
        bound = 1 / math.sqrt(width)  # the FT-Transformer initialisation: uniform in +-1/sqrt(width)

        def table(*shape: int) -> nn.Parameter:
            return nn.Parameter(torch.empty(*shape).uniform_(-bound, bound))

        self.register_buffer("cards", torch.tensor(cards, dtype=torch.int64), persistent=False)
        self.register_buffer("start", _offsets(cards), persistent=False)
        self.num_weight = table(numeric, width) if numeric else None
        self.num_bias = table(numeric, width) if numeric else None
        self.embedding = nn.Embedding(sum(cards), width) if cards else None
        if self.embedding is not None:
            nn.init.uniform_(self.embedding.weight, -bound, bound)
        self.cat_bias = table(len(cards), width) if cards else None
        self.cls = table(width)

    def forward(self, x):  # (B, numeric + n_cat) -> (B, numeric + n_cat + 1, width)
        tokens = []
        if self.num_weight is not None:
            tokens.append(x[:, :self.numeric, None] * self.num_weight + self.num_bias)  # (B, numeric, width)
        if self.embedding is not None:
            codes = category_codes(x, self.numeric, self.cards)
            tokens.append(self.embedding(codes + self.start) + self.cat_bias)  # (B, n_cat, width)
        tokens.append(self.cls.expand(x.shape[0], 1, -1))
        return torch.cat(tokens, dim=1)


@BLOCKS.register("feature_tokenizer")
class FeatureTokenizer(_TableSpec):
    """A preprocessed table row to a sequence: one ``width``-wide token per column (numeric: value times a
    learned vector plus a bias; categorical: an embedding) and a learned summary token last. Follow it with
    `transformer_encoder` blocks and `seq_pool` (mode: last) for an FT-Transformer."""

    type: Literal["feature_tokenizer"] = "feature_tokenizer"
    width: PositiveInt = 32

    example: ClassVar[dict] = {"numeric": 3, "categories": [3, 4], "width": 8}

    def build(self, in_shape: Shape) -> Built:
        numeric, cards = self.layout(in_shape)
        steps = numeric + len(cards) + 1
        return Built(FeatureTokens(numeric, cards, self.width), (steps, self.width), numeric * self.width)


@BLOCKS.register("regressor")
class Regressor(BlockSpec):
    """Linear layer to one predicted value (regression tasks; the target is standardised in training)."""

    type: Literal["regressor"] = "regressor"

    example_input: ClassVar[Shape] = (6,)

    def build(self, in_shape: Shape) -> Built:
        expect("regressor", in_shape, ("vector",),
               "reduce to a vector first: `seq_pool` after a sequence, `flatten` after an image")
        return Built(nn.Linear(in_shape[0], 1), (1,), in_shape[0])


class MemberHeads(nn.Module):
    """One linear head per member of an ensemble (TabM's k heads): (B, k, in) -> (B, k, out), member m through
    its own weights ``weight[m]`` (out, in) and ``bias[m]``. Built in place of the shared head that a
    ``classifier`` or ``regressor`` gives, each member's weights drawn as that head's are."""

    no_weight_decay = ("bias",)  # kiln.training.optim.param_groups: biases, though (k, out) is a matrix's shape

    def __init__(self, members: int, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        heads = [nn.Linear(in_features, out_features) for _ in range(members)]
        self.weight = nn.Parameter(torch.stack([h.weight.detach() for h in heads]))  # (k, out, in)
        self.bias = nn.Parameter(torch.stack([h.bias.detach() for h in heads]))  # (k, out)

    def forward(self, x):
        return torch.einsum("bki,koi->bko", x, self.weight) + self.bias


class SharedMembers(nn.Module):
    """k MLPs that share their weights and differ by a multiplicative vector on their input (random signs at
    first) and one on their output (ones at first): TabM-mini's parameter-efficient ensemble (Gorishniy et al.
    2024, "TabM: Advancing Tabular Deep Learning with Parameter-Efficient Ensembling").

    Every member sees every row: (B, F) -> (B, k, units), one output per member. The blocks after it work on
    the last dimension (a linear head gives each member's own logits, (B, k, C)); ``members`` tells the model
    (``KilnModel``) to average the members' outputs in evaluation. With ``heads == "own"`` the model builder
    (kiln.nn.build) gives each member its own head (``MemberHeads``) in place of the shared one after it."""

    no_weight_decay = ("r", "s")  # kiln.training.optim.param_groups: scalings around one, not weights

    def __init__(self, width: int, members: int, units: int, layers: int, dropout: float,
                 heads: str = "shared", batches: str = "shared") -> None:
        super().__init__()
        self.members = members
        self.heads, self.batches = heads, batches
        self.r = nn.Parameter(torch.randint(0, 2, (members, width)).float() * 2 - 1)
        self.s = nn.Parameter(torch.ones(members, units))
        mlp: list[nn.Module] = []
        for i in range(layers):
            mlp += [nn.Linear(width if i == 0 else units, units), nn.ReLU(), nn.Dropout(dropout)]
        self.mlp = nn.Sequential(*mlp)

    def forward(self, x):  # (B, F) -> (B, k, units): every member on every row
        if self.batches == "own" and self.training:  # (k * B, F): member m's own rows at m * B ... (m + 1) * B - 1
            if x.shape[0] % self.members:
                raise ValueError(f"ensemble_mlp with batches: own trains on {self.members} batches of equal size "
                                 f"side by side, one per member, but got {x.shape[0]} rows")
            return self.mlp(x.view(self.members, -1, x.shape[1]).transpose(0, 1) * self.r) * self.s
        return self.mlp(x[:, None, :] * self.r) * self.s


@BLOCKS.register("ensemble_mlp")
class EnsembleMLP(BlockSpec):
    """A cheap ensemble of ``members`` MLPs (``layers`` dense layers of ``units``, ReLU, dropout) that share their
    weights and differ by a learned scaling of their input and of their output (TabM-mini). Each member
    predicts every row through the head after it (``classifier`` or ``regressor``): applied to each member
    (``heads: shared``), or one head per member, as TabM has (``heads: own``: the head must follow, dropout
    may come between);
    training minimises the mean of the members' losses; in evaluation (metrics, predict, serving, export) the
    model's output is the mean of the members' logits (or regression values), one prediction per row."""

    type: Literal["ensemble_mlp"] = "ensemble_mlp"
    members: PositiveInt = 8
    units: PositiveInt = 256
    layers: PositiveInt = 2
    dropout: float = Field(default=0.1, ge=0.0, lt=1.0)
    heads: Literal["shared", "own"] = "shared"  # one head for all members, or each member its own
    batches: Literal["shared", "own"] = "shared"  # training: every member on the same batches, or each its own

    example: ClassVar[dict] = {"members": 3, "units": 4, "layers": 2}
    example_input: ClassVar[Shape] = (6,)

    def build(self, in_shape: Shape) -> Built:
        expect("ensemble_mlp", in_shape, ("vector",), "give it one vector per row: put it after `tabular_encoder`")
        module = SharedMembers(in_shape[0], self.members, self.units, self.layers, self.dropout, self.heads,
                               self.batches)
        macs = self.members * (in_shape[0] * self.units + (self.layers - 1) * self.units ** 2)
        return Built(module, (self.units,), macs)  # the shape of one member's output
