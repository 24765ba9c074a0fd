"""Training that starts from another run: ``train.init_from``, ``train.freeze`` and per-block learning rates
(``train.optimizer.lr_scale``).

Blocks are named as everywhere in kiln, by their place in ``model.blocks`` (``0``, ``-1`` for the last), by
an inclusive range (``"0-3"``) or by their type (``lstm``: every lstm block). Weights are matched by their
state-dict name (``blocks.<index>.<tensor>``) and shape, so a run whose model has a different head (another
number of classes) gives everything but the head, and the head starts new; ``train.init_exclude`` names blocks
that start new anyway (a head with as many classes as the source's, that mean something else).

Weights are read with safetensors (no code in a weights file runs) from a run directory's
``model.safetensors``, a kiln checkpoint, or any safetensors file whose names follow kiln's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from kiln.errors import ConfigError
from kiln.registry import did_you_mean
from kiln.rundir import RunDir

SHOWN = 6  # names listed on each side when nothing matches


# ---- naming blocks ---------------------------------------------------------------------------------------


def block_list(model: nn.Module) -> str:
    """'0 conv2d, 1 maxpool2d, ...': how errors list a model's blocks."""
    return ", ".join(f"{layer.index} {layer.type}" for layer in model.layers)


def select_blocks(model: nn.Module, selector: int | str, where: str) -> list[int]:
    """The block indices one selector names: an index (negative from the end), ``"a-b"`` (inclusive), or a block
    type. Anything that names no block is a ConfigError naming ``where`` and listing the model's blocks."""
    n = len(model.blocks)
    types = [layer.type for layer in model.layers]

    def index(i: int) -> int:
        if not -n <= i < n:
            raise ConfigError(f"{where}: block {i} does not exist; the model has blocks 0-{n - 1} "
                              f"({block_list(model)})")
        return i % n

    if isinstance(selector, int):
        return [index(selector)]
    text = selector.strip().removeprefix("blocks.")
    if text.lstrip("-").isdigit():
        return [index(int(text))]
    first, dash, last = text.partition("-")
    if dash and first.isdigit() and last.isdigit():
        a, b = index(int(first)), index(int(last))
        if a > b:
            raise ConfigError(f"{where}: the range {selector!r} is empty; write the lower block first, e.g. '{b}-{a}'")
        return list(range(a, b + 1))
    chosen = [i for i, t in enumerate(types) if t == text]
    if not chosen:
        raise ConfigError(f"{where}: {selector!r} names no block{did_you_mean(text, sorted(set(types)))}; give an "
                          f"index, a range such as '0-3', or a block type; the model's blocks: {block_list(model)}")
    return chosen


def selected(model: nn.Module, selectors: list[int | str], where: str) -> list[int]:
    return sorted({i for s in selectors for i in select_blocks(model, s, where)})


# ---- init_from -------------------------------------------------------------------------------------------


@dataclass
class TransferReport:
    """What ``init_from`` did to each tensor of the model, and which blocks ``freeze`` holds; ``transfer.json``."""

    source: str
    loaded: list[dict[str, Any]] = field(default_factory=list)  # name, shape
    new: list[dict[str, Any]] = field(default_factory=list)  # name, shape, reason
    skipped: list[dict[str, Any]] = field(default_factory=list)  # source tensors not used: name, shape, reason
    frozen: list[dict[str, Any]] = field(default_factory=list)  # index, type, parameters
    blocks: list[dict[str, Any]] = field(default_factory=list)  # per block: index, type, status, counts

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source, "blocks": self.blocks, "loaded": self.loaded, "new": self.new,
                "skipped": self.skipped, "frozen": self.frozen}

    def manifest(self) -> dict[str, Any]:
        """What a run's manifest keeps (transfer.json has every tensor)."""
        return {"transfer": {"init_from": self.source or None, "loaded": len(self.loaded), "new": len(self.new),
                             "skipped": len(self.skipped), "frozen": [b["index"] for b in self.frozen]}}

    def lines(self) -> list[str]:
        """The table printed at the start of training."""
        out = []
        if self.source:
            out.append(f"init_from {self.source}:")
            out.append(f"  {'block':>5}  {'type':<20} {'status':<8} {'parameters':>10}  note")
            for b in self.blocks:
                out.append(f"  {b['index']:>5}  {b['type']:<20} {b['status']:<8} {b['parameters']:>10,}  "
                           f"{b['note']}".rstrip())
            loaded = sum(numel(t["shape"]) for t in self.loaded)
            total = loaded + sum(numel(t["shape"]) for t in self.new)
            out.append(f"  loaded {len(self.loaded)} tensors ({loaded:,} of {total:,} values), {len(self.new)} new, "
                       f"{len(self.skipped)} of the source's tensors skipped")
            out += [f"  skipped {t['name']} {tuple(t['shape'])}: {t['reason']}" for t in self.skipped[:SHOWN]]
            if len(self.skipped) > SHOWN:
                out.append(f"  ... and {len(self.skipped) - SHOWN} more skipped (transfer.json lists them)")
        if self.frozen:
            out.append("frozen (train.freeze): " + ", ".join(f"{b['index']} {b['type']}" for b in self.frozen)
                       + f"; {sum(b['parameters'] for b in self.frozen):,} parameters not trained")
        return out


def numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def weights_file(source: str | Path) -> Path:
    """The safetensors file ``train.init_from`` names: a run directory's final weights, or the file itself."""
    path = Path(source).expanduser()
    if not path.exists():
        raise ConfigError(f"train.init_from: {path} does not exist; give a run directory written by `kiln train` "
                          "or a .safetensors file")
    if path.is_dir():
        run = RunDir(path)
        weights = run / RunDir.WEIGHTS
        if weights.is_file():
            return weights
        last = run / RunDir.LAST
        hint = (f"; its training has not finished: to start from its last checkpoint, give {last}" if last.is_file()
                else "; is it a run directory written by `kiln train`?")
        raise ConfigError(f"train.init_from: {path} has no {RunDir.WEIGHTS}{hint}")
    return path


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The model tensors of a safetensors file (a kiln checkpoint's ``model/`` part; other files as they are)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for files that are not safetensors
        raise ConfigError(f"train.init_from: {path} is not a readable safetensors file ({e})") from None
    try:
        checkpoint = json.loads(meta.get("kiln", "{}")).get("format", "").startswith("kiln-checkpoint")
    except (ValueError, AttributeError):
        checkpoint = False
    if checkpoint:
        return {k.removeprefix("model/"): v for k, v in tensors.items() if k.startswith("model/")}
    return tensors


def _block_of(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[1]) if len(parts) > 2 and parts[0] == "blocks" and parts[1].isdigit() else None


def _listing(tensors: dict[str, torch.Tensor]) -> str:
    shown = [f"{k} {tuple(v.shape)}" for k, v in list(tensors.items())[:SHOWN]]
    more = f", ... ({len(tensors)} in all)" if len(tensors) > SHOWN else ""
    return ", ".join(shown) + more if shown else "(no tensors)"


def init_from(model: nn.Module, source: str | Path, exclude: list[int | str] = ()) -> TransferReport:
    """Copy into ``model`` every tensor of ``source`` whose name and shape match, but those of the blocks
    ``exclude`` names; the rest stays as built."""
    path = weights_file(source)
    found = read_weights(path)
    own = model.state_dict()
    report = TransferReport(str(path))
    excluded = selected(model, exclude, "train.init_exclude")
    for name, target in own.items():
        theirs = found.get(name)
        if _block_of(name) in excluded:
            report.new.append({"name": name, "shape": list(target.shape), "reason": "train.init_exclude"})
            continue
        if theirs is not None and tuple(theirs.shape) == tuple(target.shape):
            report.loaded.append({"name": name, "shape": list(target.shape)})
            continue
        reason = ("not in the source" if theirs is None else
                  f"shape differs: {tuple(theirs.shape)} in the source, {tuple(target.shape)} here")
        report.new.append({"name": name, "shape": list(target.shape), "reason": reason})
    for name, theirs in found.items():
        if _block_of(name) in excluded and name in own:
            report.skipped.append({"name": name, "shape": list(theirs.shape), "reason": "train.init_exclude"})
        elif name not in own:
            report.skipped.append({"name": name, "shape": list(theirs.shape), "reason": "not in this model"})
        elif tuple(theirs.shape) != tuple(own[name].shape):
            report.skipped.append({"name": name, "shape": list(theirs.shape),
                                   "reason": f"shape differs: {tuple(own[name].shape)} here"})
    if not report.loaded:
        raise ConfigError(f"train.init_from: nothing in {path} matches this model by name and shape. The source has "
                          f"{_listing(found)}; this model has {_listing(own)}")
    with torch.no_grad():
        for t in report.loaded:
            own[t["name"]].copy_(found[t["name"]])
    report.blocks = _per_block(model, report)
    return report


def _per_block(model: nn.Module, report: TransferReport) -> list[dict[str, Any]]:
    rows = []
    for layer in model.layers:
        loaded = [t for t in report.loaded if _block_of(t["name"]) == layer.index]
        new = [t for t in report.new if _block_of(t["name"]) == layer.index]
        if not loaded and not new:
            status, note = "-", "no weights"
        else:
            status = "loaded" if not new else "new" if not loaded else "partly"
            grouped = ("not in the source", "train.init_exclude")
            notes = [f"{t['name'].split('.', 2)[2]} {t['reason']}" for t in new if t["reason"] not in grouped]
            for reason in grouped:
                names = [t["name"].split(".", 2)[2] for t in new if t["reason"] == reason]
                notes += [f"{reason}: {', '.join(names)}"] if names else []
            note = "; ".join(notes)
        rows.append({"index": layer.index, "type": layer.type, "status": status,
                     "parameters": sum(numel(t["shape"]) for t in loaded + new), "loaded": len(loaded),
                     "new": len(new), "note": note})
    return rows


# ---- freeze and per-block learning rates -----------------------------------------------------------------


def _stay_in_eval(module: nn.Module, args) -> None:
    """A frozen block runs as in inference: its normalisation statistics stay as loaded, its dropout is off."""
    if module.training:
        module.eval()


def freeze(model: nn.Module, selectors: list[int | str]) -> list[dict[str, Any]]:
    """Stop training the blocks named: no gradients (so the optimiser never sees them) and inference mode."""
    frozen = []
    for i in selected(model, selectors, "train.freeze"):
        block = model.blocks[i]
        for p in block.parameters():
            p.requires_grad_(False)
        block.register_forward_pre_hook(_stay_in_eval)
        frozen.append({"index": i, "type": model.layers[i].type, "parameters": sum(p.numel() for p in block.parameters())})
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError(f"train.freeze: every block with weights is frozen ({', '.join(map(str, selectors))}); "
                          "leave at least one to train")
    return frozen


def scale_groups(groups: list[dict], model: nn.Module, lr: float, lr_scale: dict[int | str, float]) -> list[dict]:
    """Split the optimiser's parameter groups by each block's factor of ``lr`` (1 where none is given).

    Each group's ``lr`` is its own base rate, so a schedule multiplies every group's rate by the same factor.
    Groups at the unscaled rate come first: progress lines and metrics show the first group's rate."""
    factor_of: dict[int, tuple[float, int | str]] = {}
    for selector, factor in lr_scale.items():
        for i in select_blocks(model, selector, f"train.optimizer.lr_scale.{selector}"):
            for p in model.blocks[i].parameters():
                before = factor_of.get(id(p))
                if before and before[0] != factor:
                    raise ConfigError(f"train.optimizer.lr_scale: block {i} ({model.layers[i].type}) is given two "
                                      f"factors, {before[0]} ({before[1]!r}) and {factor} ({selector!r})")
                factor_of[id(p)] = (factor, selector)
    out = []
    for group in groups:
        by_factor: dict[float, list[nn.Parameter]] = {}
        for p in group["params"]:
            by_factor.setdefault(factor_of.get(id(p), (1.0, None))[0], []).append(p)
        out += [{**group, "params": params, "lr": lr * f, "lr_scale": f} for f, params in by_factor.items()]
    return sorted(out, key=lambda g: g["lr_scale"] != 1.0)


def prepare(t, model: nn.Module) -> TransferReport | None:
    """Apply ``train.init_from`` and ``train.freeze`` (``t``: the train section) to a built model; None when the
    config has neither. Every bad name or file is an error here, before a run writes anything."""
    if not t.init_from and not t.freeze:
        if t.init_exclude:
            raise ConfigError("train.init_exclude names blocks not to take from train.init_from; set init_from too")
        return None
    report = init_from(model, t.init_from, t.init_exclude) if t.init_from else TransferReport("")
    report.frozen = freeze(model, t.freeze) if t.freeze else []
    return report
