"""Structured pruning with Torch-Pruning: whole channels of convolutions, units of dense layers and hidden units of
transformer feed-forward networks are removed, so the layers really shrink (and run faster), unlike masks.

Which widths can shrink is declared per block type in ``PRUNABLE``: the config field that holds the width and the
layer whose output channels it counts. Everything else is kept as it is and reported: recurrent layers (Torch-
Pruning cannot shrink an LSTM's hidden units: VainF/Torch-Pruning#404), attention (q/k/v are ignored), embeddings,
and the output head. A block's input widths follow the blocks before it, so the pruned model's config is the
original config with the new widths, and the run rebuilds from config + safetensors like any other: each
candidate block is first pruned alone on a copy and kept unpruned when that copy does not rebuild (a reshape
Torch-Pruning cannot follow, such as ``rows_to_sequence``'s), and the final model is checked the same way.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from kiln.config import Config, load_config
from kiln.errors import KilnError
from kiln.nn import KilnModel, build_model

# block type -> (config field of the width, path of the layer whose output channels are that width)
PRUNABLE: dict[str, tuple[str, str]] = {
    "conv2d": ("filters", "conv"),
    "dense": ("units", "linear"),
    "transformer_encoder": ("ff", "mlp.up"),
}


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


def _prune(model: KilnModel, example: torch.Tensor, ratio: float, chosen: set[int], specs: list) -> None:
    """Prune the output channels of the chosen blocks' layers by ``ratio`` (L2 magnitude), in place."""
    tp = _tp()
    keep = {id(_layer(model.blocks[i], PRUNABLE[specs[i].type][1])) for i in chosen}
    ignored = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d, nn.RNNBase, nn.Embedding))
               and id(m) not in keep]
    pruner = tp.pruner.MagnitudePruner(model, example, importance=tp.importance.MagnitudeImportance(p=2),
                                       pruning_ratio=ratio, ignored_layers=ignored, global_pruning=False)
    pruner.step()


def _rebuilt(cfg: Config, model: KilnModel, input_shape) -> tuple[Config, KilnModel]:
    """The config with the pruned model's widths, and the model built from it holding the pruned weights;
    a KilnError when the pruned weights do not fit what the config builds."""
    raw = cfg.to_dict()
    for i, spec in enumerate(cfg.blocks):
        if spec.type in PRUNABLE:
            name, path = PRUNABLE[spec.type]
            raw["model"]["blocks"][i][name] = _width(_layer(model.blocks[i], path))
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

    def fresh() -> KilnModel:
        model = build_model(specs, input_shape)
        model.load_state_dict(state)
        return model.eval()

    last = max(i for i, block in enumerate(fresh().blocks) if any(True for _ in block.parameters()))
    kept: list[dict[str, Any]] = []
    candidates: list[int] = []
    for i, spec in enumerate(specs):
        if i == last:
            kept.append({"block": i, "type": spec.type, "reason": "the output layer: its width is the task's"})
        elif spec.type in PRUNABLE:
            candidates.append(i)
        elif any(True for _ in fresh().blocks[i].parameters()):
            kept.append({"block": i, "type": spec.type, "reason": _why_kept(spec.type)})
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
    if chosen:
        _prune(model, example, ratio, set(chosen), specs)
    new_cfg, rebuilt = _rebuilt(cfg, model, input_shape)
    pruned = []
    for i in chosen:
        name = PRUNABLE[specs[i].type][0]
        before, after = getattr(specs[i], name), getattr(new_cfg.blocks[i], name)
        pruned.append({"block": i, "type": specs[i].type, "field": name, "before": before, "after": after}
                      | ({"note": "attention q/k/v and the residual width are kept"}
                         if specs[i].type == "transformer_encoder" else {}))
    return PruneResult(rebuilt, new_cfg, pruned, sorted(kept, key=lambda k: k["block"]))


def _why_kept(block_type: str) -> str:
    if block_type in ("lstm", "gru", "rnn"):
        return "recurrent hidden units are kept (Torch-Pruning cannot shrink them: VainF/Torch-Pruning#404)"
    if block_type in ("transformer_encoder",):
        return "attention q/k/v are kept"
    return f"kiln does not prune {block_type} blocks"

