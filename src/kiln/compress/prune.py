"""Structured pruning: whole channels of convolutions, units of dense layers, hidden units of transformer feed-forward
networks and of TabM-mini ensembles, and whole attention heads are removed, so the layers really shrink (and run
faster), unlike masks.

Torch-Pruning does most of it (L2 magnitude). Three cuts it cannot follow are made here by hand, first:

- attention heads of ``transformer_encoder`` blocks (Torch-Pruning cannot split q/k/v into heads): each head is
  ranked by the L2 norm of its weights (its rows of the q, k and v projections and its columns of the output
  projection), and the lowest ``ratio`` of them lose those rows and columns; the block's ``heads`` (and
  ``head_dim``, the width per head, which stays) go into the new config;
- the output channels of a ``conv2d`` whose image reaches a dense layer through ``rows_to_sequence`` (only
  pooling or dropout in between): that reshape makes channel c of a W-column image the features w*C + c
  (w = 0..W-1) of each step, which Torch-Pruning maps wrongly; the filters are ranked by their L2 norm;
- the hidden units of an ``ensemble_mlp`` (TabM-mini), whose members' output scalings are a bare parameter
  Torch-Pruning does not follow: every layer of the shared MLP loses the same number of units (the config has
  one ``units``), each layer's lowest by the L2 norm of their weight rows; the next layer's inputs, the
  members' output scalings and the input columns of the dense layer or head that reads the block follow.

Which widths Torch-Pruning shrinks is declared per block type in ``PRUNABLE``: the config field that holds the width
and the layer whose output channels it counts. Everything else is kept as it is and reported: recurrent layers
(Torch-Pruning cannot shrink an LSTM's hidden units: VainF/Torch-Pruning#404), embeddings, residual widths and the
output head. A block's input widths follow the blocks before it, so the pruned model's config is the original
config with the new widths, and the run rebuilds from config + safetensors like any other: each Torch-Pruning
candidate is first pruned alone on a copy and kept unpruned when that copy does not rebuild, and the final model is
checked the same way. Each pruned entry lists the indices it removed (channels, units or heads of the layer as it
was before the step), so removing them can be checked against zeroing them.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from kiln.config import Config, load_config
from kiln.errors import KilnError
from kiln.nn import KilnModel, build_model, next_block
from kiln.nn.blocks.tabular import MemberHeads, SharedMembers
from kiln.nn.blocks.transformer import Attention

# block type -> (config field of the width, path of the layer whose output channels are that width)
PRUNABLE: dict[str, tuple[str, str]] = {
    "conv2d": ("filters", "conv"),
    "dense": ("units", "linear"),
    "transformer_encoder": ("ff", "mlp.up"),
}


# image blocks that keep the channels and have no weights: a conv's channels pass through them unchanged
PASS_THROUGH = ("maxpool2d", "avgpool2d", "dropout")
HEAD_IMPORTANCE = "L2 norm of the head's q, k and v rows and output-projection columns"


@dataclass
class PruneResult:
    model: KilnModel
    config: Config
    pruned: list[dict[str, Any]] = field(default_factory=list)  # {block, type, field, before, after}
    kept: list[dict[str, Any]] = field(default_factory=list)  # {block, type, reason}


def _tp():
    if importlib.util.find_spec("torch_pruning") is None:
        raise KilnError("structured pruning needs Torch-Pruning: pip install 'kiln[compress]'")
    import torch_pruning as tp

    return tp


def _layer(block: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        block = getattr(block, part)
    return block


def _width(layer: nn.Module) -> int:
    return layer.out_channels if isinstance(layer, nn.Conv2d) else layer.out_features


def _replace(layer: nn.Module, name: str, value: torch.Tensor) -> None:
    setattr(layer, name, nn.Parameter(value.detach().clone(), requires_grad=getattr(layer, name).requires_grad))


def _removed(n: int, ratio: float) -> int:
    """How many of n channels (or heads) a ratio removes: rounded down, at least one kept."""
    return min(int(n * ratio), n - 1)


def lowest(scores: torch.Tensor, ratio: float) -> list[int]:
    """The indices of the ``ratio`` lowest scores (rounded down, at least one index kept), sorted."""
    return sorted(torch.argsort(scores, stable=True)[:_removed(len(scores), ratio)].tolist())


def head_scores(attn: Attention) -> torch.Tensor:
    """Each head's importance: the L2 norm of its q, k and v rows and its output-projection columns, (heads,)."""
    h, a = attn.heads, attn.proj.in_features
    d = a // h
    rows = attn.qkv.weight if attn.qkv is not None else torch.cat([attn.q.weight, attn.kv.weight])
    per_head = rows.detach().reshape(3, h, d, -1).pow(2).sum((0, 2, 3))
    cols = attn.proj.weight.detach().reshape(-1, h, d).pow(2).sum((0, 2))
    return (per_head + cols).sqrt()


def prune_heads(attn: Attention, remove: list[int]) -> None:
    """Remove the heads ``remove`` from ``attn`` in place: their rows of q, k and v and their columns of the
    output projection. The width per head stays; the rest of the model is untouched."""
    h, a = attn.heads, attn.proj.in_features
    d = a // h
    keep = [j for j in range(h) if j not in set(remove)]
    if not keep:
        raise KilnError("pruning must keep at least one attention head")
    cols = torch.tensor([j * d + k for j in keep for k in range(d)])
    for layer, parts in ((attn.qkv, 3), (attn.q, 1), (attn.kv, 2)):
        if layer is None:
            continue
        rows = torch.cat([p * a + cols for p in range(parts)])
        _replace(layer, "weight", layer.weight[rows])
        if layer.bias is not None:
            _replace(layer, "bias", layer.bias[rows])
        layer.out_features = len(rows)
    _replace(attn.proj, "weight", attn.proj.weight[:, cols])
    attn.proj.in_features = len(cols)
    attn.heads = len(keep)


def _rows_reader(specs: list, i: int) -> int | None:
    """The dense block that reads conv2d block i's channels through ``rows_to_sequence`` (only pooling or dropout
    between them), or None."""
    j = next_block(specs, i, PASS_THROUGH)
    if j + 1 < len(specs) and specs[j].type == "rows_to_sequence" and specs[j + 1].type == "dense":
        return j + 1
    return None


def prune_conv_into_rows(conv: nn.Conv2d, reader: nn.Linear, remove: list[int]) -> None:
    """Remove output channels ``remove`` of ``conv`` in place, and the features they become after
    ``rows_to_sequence`` from ``reader``'s input: an image (C, H, W) becomes H steps of W*C features, feature
    w*C + c holding channel c of column w (kiln.nn.blocks.adapters.RowsAsSequence)."""
    c = conv.out_channels
    keep = [k for k in range(c) if k not in set(remove)]
    if not keep:
        raise KilnError("pruning must keep at least one channel")
    if reader.in_features % c:
        raise KilnError(f"the layer after rows_to_sequence reads {reader.in_features} features, not a multiple of "
                        f"the {c} channels")
    width = reader.in_features // c  # W, the image's columns
    features = torch.tensor([w * c + k for w in range(width) for k in keep])
    _replace(conv, "weight", conv.weight[keep])
    if conv.bias is not None:
        _replace(conv, "bias", conv.bias[keep])
    conv.out_channels = len(keep)
    _replace(reader, "weight", reader.weight[:, features])
    reader.in_features = len(features)


def _reader(model: KilnModel, specs: list, i: int) -> nn.Module | None:
    """The linear layer that reads block i's output features: the next block with weights, when it is a dense
    layer or a head, shared or the members' own (dropout may come between); else None."""
    j = next_block(specs, i)
    if j == len(specs):
        return None
    block = model.blocks[j]
    if isinstance(block, (nn.Linear, MemberHeads)):  # a head: classifier, regressor
        return block
    return block.linear if specs[j].type == "dense" else None


def prune_members(members: SharedMembers, reader: nn.Module, ratio: float) -> list[list[int]]:
    """Remove the ``ratio`` lowest hidden units (L2 norm of their weight rows) of every layer of a TabM-mini
    block's shared MLP, in place, with what reads them: the next layer's input columns, the members' output
    scalings ``s`` and ``reader``'s input columns after the last layer. The units each layer lost."""
    linears = [m for m in members.mlp if isinstance(m, nn.Linear)]
    removed = []
    for n, layer in enumerate(linears):
        remove = lowest(layer.weight.detach().norm(dim=1), ratio)
        gone = set(remove)
        keep = [j for j in range(layer.out_features) if j not in gone]
        _replace(layer, "weight", layer.weight[keep])
        if layer.bias is not None:
            _replace(layer, "bias", layer.bias[keep])
        layer.out_features = len(keep)
        after = linears[n + 1] if n + 1 < len(linears) else reader
        _replace(after, "weight", after.weight[..., keep])  # (out, in), or (k, out, in): the members' own heads
        after.in_features = len(keep)
        if n + 1 == len(linears):
            members.s = nn.Parameter(members.s.detach()[:, keep].clone())
        removed.append(remove)
    return removed


def _by_hand(model: KilnModel, specs: list, ratio: float, last: int) -> list[dict[str, Any]]:
    """The cuts Torch-Pruning cannot follow (heads; conv channels read through rows_to_sequence), in place."""
    done = []
    for i, spec in enumerate(specs):
        if i == last:
            continue
        block = model.blocks[i]
        if spec.type == "transformer_encoder":
            attn = block.attn
            h, d = attn.heads, attn.proj.in_features // attn.heads
            remove = lowest(head_scores(attn), ratio)
            if remove:
                prune_heads(attn, remove)
                done.append({"block": i, "type": spec.type, "field": "heads", "before": h, "after": attn.heads,
                             "head_dim": d, "removed": remove, "importance": HEAD_IMPORTANCE})
        elif spec.type == "conv2d" and (j := _rows_reader(specs, i)) is not None and j != last:
            conv = block.conv
            c = conv.out_channels
            remove = lowest(conv.weight.detach().flatten(1).norm(dim=1), ratio)
            if remove:
                prune_conv_into_rows(conv, model.blocks[j].linear, remove)
                done.append({"block": i, "type": spec.type, "field": "filters", "before": c,
                             "after": conv.out_channels, "removed": remove,
                             "note": "by hand: each channel's features of every step after rows_to_sequence "
                                     "leave the next dense layer's input"})
        elif spec.type == "ensemble_mlp" and (reader := _reader(model, specs, i)) is not None \
                and _removed(spec.units, ratio) > 0:
            removed = prune_members(block, reader, ratio)
            done.append({"block": i, "type": spec.type, "field": "units", "before": spec.units,
                         "after": block.s.shape[1], "removed": removed[0], "removed_per_layer": removed,
                         "note": "by hand: the same number of units from each layer of the members' shared MLP; "
                                 "their output scalings and the next layer's inputs follow"})
    return done


def _prune(model: KilnModel, example: torch.Tensor, ratio: float, chosen: set[int], specs: list) -> dict[int, list]:
    """Prune the output channels of the chosen blocks' layers by ``ratio`` (L2 magnitude), in place; the channels
    each chosen block's layer lost."""
    tp = _tp()
    keep = {id(_layer(model.blocks[i], PRUNABLE[specs[i].type][1])) for i in chosen}
    ignored = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d, nn.RNNBase, nn.Embedding))
               and id(m) not in keep]
    pruner = tp.pruner.MagnitudePruner(model, example, importance=tp.importance.MagnitudeImportance(p=2),
                                       pruning_ratio=ratio, ignored_layers=ignored, global_pruning=False)
    removed: dict[int, list] = {}
    for group in pruner.step(interactive=True):
        dep, idxs = group[0]
        removed[id(dep.target.module)] = sorted(int(k) for k in idxs)
        group.prune()
    return {i: removed.get(id(_layer(model.blocks[i], PRUNABLE[specs[i].type][1])), []) for i in chosen}


def _rebuilt(cfg: Config, model: KilnModel, input_shape) -> tuple[Config, KilnModel]:
    """The config with the pruned model's widths, and the model built from it holding the pruned weights;
    a KilnError when the pruned weights do not fit what the config builds."""
    raw = cfg.to_dict()
    for i, spec in enumerate(cfg.blocks):
        if spec.type in PRUNABLE:
            name, path = PRUNABLE[spec.type]
            raw["model"]["blocks"][i][name] = _width(_layer(model.blocks[i], path))
        if spec.type == "ensemble_mlp":
            raw["model"]["blocks"][i]["units"] = model.blocks[i].s.shape[1]
        if spec.type == "transformer_encoder":
            attn = model.blocks[i].attn
            d = attn.proj.in_features // attn.heads
            if (attn.heads, d) != (spec.heads, spec.head_dim or attn.proj.out_features // spec.heads):
                raw["model"]["blocks"][i].update(heads=attn.heads, head_dim=d)
    new_cfg = load_config(raw)
    rebuilt = build_model(new_cfg.blocks, input_shape)
    try:
        rebuilt.load_state_dict(model.state_dict(), strict=True)
    except RuntimeError as e:
        raise KilnError(f"the pruned weights do not fit the config's blocks: {str(e).splitlines()[-1][:200]}") from None
    with torch.no_grad():
        rebuilt.eval()
    return new_cfg, rebuilt


def prune(cfg: Config, state: dict[str, torch.Tensor], input_shape, example: torch.Tensor,
          ratio: float) -> PruneResult:
    """The model of ``cfg`` with weights ``state``, its prunable blocks' widths cut by ``ratio`` (a fraction of
    channels removed from each, at least one kept); ``example`` is a model-input batch to trace the graph with."""
    if not 0.0 < ratio < 1.0:
        raise KilnError(f"--prune must be a fraction of channels to remove, between 0 and 1 (exclusive), not {ratio}")
    specs = cfg.blocks

    def built() -> KilnModel:
        model = build_model(specs, input_shape)
        model.load_state_dict(state)
        return model.eval()

    last = max(i for i, block in enumerate(built().blocks) if any(True for _ in block.parameters()))
    by_hand: list[dict[str, Any]] = []

    def fresh() -> KilnModel:  # the model after the cuts made by hand
        model = built()
        by_hand[:] = _by_hand(model, specs, ratio, last)
        return model

    fresh()
    hand = {(p["block"], p["field"]) for p in by_hand}
    kept: list[dict[str, Any]] = []
    candidates: list[int] = []
    for i, spec in enumerate(specs):
        if i == last:
            kept.append({"block": i, "type": spec.type, "reason": "the output layer: its width is the task's"})
        elif spec.type in PRUNABLE and (i, PRUNABLE[spec.type][0]) not in hand:
            candidates.append(i)
        elif spec.type not in PRUNABLE and not any(p["block"] == i for p in by_hand) \
                and any(True for _ in built().blocks[i].parameters()):
            kept.append({"block": i, "type": spec.type, "reason": _why_kept(spec.type)})
        if spec.type == "transformer_encoder" and (i, "heads") not in hand and i != last:
            kept.append({"block": i, "type": spec.type, "reason": f"its attention heads are kept ({spec.heads} "
                         f"head{'s' if spec.heads > 1 else ''} x {ratio:g} rounds down to none removed; one is always "
                         "kept)"})
    chosen: list[int] = []
    for i in candidates:  # each alone on a copy: does it prune into something the config rebuilds?
        trial = fresh()
        try:
            _prune(trial, example, ratio, {i}, specs)
            _rebuilt(cfg, trial, input_shape)
            trial(example)
        except Exception as e:  # Torch-Pruning raises many kinds on graphs it cannot follow
            reason = str(e) if isinstance(e, KilnError) else f"Torch-Pruning cannot prune it: {type(e).__name__}"
            kept.append({"block": i, "type": specs[i].type, "reason": reason})
            continue
        chosen.append(i)
    model = fresh()
    removed = _prune(model, example, ratio, set(chosen), specs) if chosen else {}
    new_cfg, rebuilt = _rebuilt(cfg, model, input_shape)
    pruned = list(by_hand)
    for i in chosen:
        name = PRUNABLE[specs[i].type][0]
        old, new = getattr(specs[i], name), getattr(new_cfg.blocks[i], name)
        pruned.append({"block": i, "type": specs[i].type, "field": name, "before": old, "after": new,
                       "removed": removed[i]}
                      | ({"note": "the residual width is kept"} if specs[i].type == "transformer_encoder" else {}))
    if not pruned:
        why = "; ".join(f"block {k['block']} ({k['type']}): {k['reason']}"
                        for k in sorted(kept, key=lambda k: k["block"]))
        raise KilnError(f"--prune {ratio:g}: nothing in this model can be pruned: {why}")
    pruned.sort(key=lambda p: (p["block"], p["field"]))
    return PruneResult(rebuilt, new_cfg, pruned, sorted(kept, key=lambda k: k["block"]))


def _why_kept(block_type: str) -> str:
    if block_type in ("lstm", "gru", "rnn"):
        return "recurrent hidden units are kept (Torch-Pruning cannot shrink them: VainF/Torch-Pruning#404)"
    if block_type == "ensemble_mlp":
        return ("its units are kept: kiln prunes an ensemble_mlp read by a dense layer or a head, and by at least "
                "one unit a layer")
    return f"kiln does not prune {block_type} blocks"

