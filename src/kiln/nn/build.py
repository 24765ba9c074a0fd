"""Config blocks to an ``nn.Module``, inferring each block's input shape from the one before."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

import kiln.nn.blocks  # noqa: F401  (registers every block)
from kiln.errors import ConfigError
from kiln.hardware import memory_bytes
from kiln.nn.base import BlockSpec, Shape, count_params
from kiln.nn.blocks.tabular import MemberHeads, SharedMembers


@dataclass(frozen=True)
class LayerInfo:
    index: int
    type: str
    out_shape: Shape
    params: int
    macs: int


class KilnModel(nn.Module):
    """The blocks in order. Input: float tensor (B, *input_shape); output: (B, *output_shape).

    Padded token ids: a block with a ``padding_mask`` (a token_embedding given a padding id) marks the real steps
    of its input, (B, T) bool; each later block that ``takes_mask`` (recurrent, transformer_encoder, seq_pool) is
    then called with ``mask=`` and ignores the padded steps, so a text's output does not depend on how far it was
    padded. Blocks without ``takes_mask`` work on each step alone.

    Ensembles: a block with ``members`` (``ensemble_mlp``) gives one output per member, (B, k, ...), and the
    blocks after it work on each member alone; in training the model's output keeps the members,
    (B, k, *output_shape), each member's own prediction; in evaluation it is their mean, (B, *output_shape)."""

    def __init__(self, blocks: list[nn.Module], input_shape: Shape, layers: list[LayerInfo]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.input_shape = tuple(input_shape)
        self.layers = layers
        self.ensemble = any(getattr(block, "members", None) for block in blocks)
        # Batches a training step holds side by side: k for ensemble_mlp's batches: own (each member its own,
        # kiln.training.plans), else 1
        self.member_batches = next((block.members for block in blocks
                                    if isinstance(block, SharedMembers) and block.batches == "own"), 1)

    @property
    def output_shape(self) -> Shape:
        return self.layers[-1].out_shape if self.layers else self.input_shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = None  # (B, T) bool, True at real steps, once a block has read padded token ids
        for block in self.blocks:
            if mask is not None and getattr(block, "takes_mask", False):
                x = block(x, mask=mask)
                continue
            if hasattr(block, "padding_mask"):
                mask = block.padding_mask(x)
            x = block(x)
        if self.ensemble and not self.training:
            x = x.mean(1)  # the members' mean: logits (or regression values)
        elif self.member_batches > 1:  # members' own batches: (B, k, ...) to one prediction per input row, member-major
            x = x.transpose(0, 1).flatten(0, 1)
        return x


def build_model(specs: list[BlockSpec], input_shape: Shape) -> KilnModel:
    """Build each block on the shape the previous one produces; errors name the block's config path.

    The model is first built without memory (on PyTorch's meta device, which draws no random numbers), so
    that a size no machine could hold is an error naming the block rather than an allocator failure."""
    if not specs:
        raise ConfigError("model.blocks: the model has no blocks; list at least one")
    if torch.get_default_device().type != "meta":
        with torch.device("meta"):
            _check_size(_build(specs, input_shape))
    return _build(specs, input_shape)


def _check_size(model: KilnModel) -> None:
    weights = 4 * sum(layer.params for layer in model.layers)  # bytes of float32 weights
    limit = memory_bytes()
    if weights > limit:
        biggest = max(model.layers, key=lambda layer: layer.params)
        raise ConfigError(f"model.blocks.{biggest.index} ({biggest.type}): the model would have "
                          f"{weights // 4:.3g} parameters ({weights / 2**30:,.1f} GiB of float32 weights, "
                          f"{biggest.params:.3g} in this block), more than the {limit / 2**30:.1f} GiB of memory "
                          "here; make its sizes smaller")


def next_block(specs: list[BlockSpec], i: int, skip: tuple[str, ...] = ("dropout",)) -> int:
    """The index of the first block after block i whose type is not in ``skip``; ``len(specs)`` if none."""
    j = i + 1
    while j < len(specs) and specs[j].type in skip:
        j += 1
    return j


def _build(specs: list[BlockSpec], input_shape: Shape) -> KilnModel:
    shape = tuple(input_shape)
    modules: list[nn.Module] = []
    layers: list[LayerInfo] = []
    for i, spec in enumerate(specs):
        try:
            built = spec.build(shape)
        except ConfigError as e:
            raise type(e)(f"model.blocks.{i} ({spec.type}): {e}") from None
        modules.append(built.module)
        layers.append(LayerInfo(i, spec.type, built.out_shape, count_params(built.module), built.macs))
        shape = built.out_shape
    for i, module in enumerate(modules):
        if hasattr(module, "link"):  # a block that shares weights with one before it (lm_head's tying)
            try:
                module.link(modules[:i])
            except ConfigError as e:
                raise type(e)(f"model.blocks.{i} ({specs[i].type}): {e}") from None
    for i, module in enumerate(modules):
        if isinstance(module, SharedMembers) and module.heads == "own":  # ensemble_mlp: each member its own head
            j = next_block(specs, i)
            if j == len(specs) or specs[j].type not in ("classifier", "regressor"):
                raise ConfigError(f"model.blocks.{i} ({specs[i].type}): heads: own gives each member its own "
                                  "classifier or regressor, so one must follow it (dropout may come between); "
                                  "use heads: shared before other blocks")
            head = modules[j]
            modules[j] = MemberHeads(module.members, head.in_features, head.out_features)
            layers[j] = replace(layers[j], params=count_params(modules[j]))
    return KilnModel(modules, input_shape, layers)
