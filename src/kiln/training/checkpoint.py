"""Checkpoints as safetensors: model weights, and for resuming, optimiser, scheduler and RNG state.

No pickle anywhere: tensors go in the safetensors body, everything else in its JSON metadata, as one
entry (``kiln``: a JSON object with sorted keys). safetensors writes several metadata entries in a random
order (a hash map), so the same training would write different bytes, and a served model's version (the
file's hash) would change. A training checkpoint is one file, written atomically, so a kill never leaves
weights and optimiser state from two different steps.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save

from kiln.errors import RunDirError
from kiln.training.distributed import full_state, is_writer, load_full_state
from kiln.fsutil import atomic_write_bytes

WEIGHTS_FORMAT = "kiln-weights-2"
CHECKPOINT_FORMAT = "kiln-checkpoint-2"
META_KEY = "kiln"


def _cpu(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu").contiguous().clone()


def _write(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    if not is_writer():  # of several processes, rank 0 writes
        return
    atomic_write_bytes(path, save(tensors, metadata={META_KEY: json.dumps(meta, sort_keys=True)}))


def save_weights(path: Path, model: torch.nn.Module, info: dict[str, Any] | None = None) -> None:
    tensors = {k: _cpu(v) for k, v in full_state(model).items()}  # FSDP: gathered (every rank calls this)
    _write(path, tensors, {"format": WEIGHTS_FORMAT, "info": info or {}})


def read_metadata(path: Path) -> dict[str, Any]:
    """The file's kiln metadata: ``format``, and ``info`` (weights) or ``state`` (checkpoints)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise RunDirError(f"{path} is not a readable safetensors file: {e}") from None
    try:
        found = json.loads(meta[META_KEY])
        if found.get("format") not in (WEIGHTS_FORMAT, CHECKPOINT_FORMAT):
            raise ValueError(f"format {found.get('format')!r}")
        return found
    except (KeyError, ValueError, TypeError, AttributeError) as e:
        raise RunDirError(f"{path} is not a kiln weights file or checkpoint (its metadata: {e}); it may come from "
                          "another program or an older kiln: train the run again") from None


def load_weights(path: Path, model: torch.nn.Module) -> dict[str, Any]:
    """Load weights into ``model`` (strictly: every key must match); return the saved info."""
    meta = read_metadata(path)
    try:
        tensors = load_file(str(path))
    except Exception as e:
        raise RunDirError(f"{path} is not a readable safetensors file: {e}") from None
    if meta.get("format") == CHECKPOINT_FORMAT:
        tensors = {k.removeprefix("model/"): v for k, v in tensors.items() if k.startswith("model/")}
    try:
        if not load_full_state(model, tensors):
            model.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        raise RunDirError(f"{path} does not match the model in the run's config: {e}") from None
    return meta.get("info", {})


def _split_optimizer(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors: dict[str, torch.Tensor] = {}
    plain: dict[str, dict] = {}
    for pid, state in sd["state"].items():
        plain[str(pid)] = {}
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim/{pid}/{key}"] = _cpu(value)
            else:
                plain[str(pid)][key] = value
    return tensors, {"plain": plain, "param_groups": sd["param_groups"]}


def _join_optimizer(tensors: dict[str, torch.Tensor], info: dict) -> dict:
    state: dict[int, dict] = {int(pid): dict(values) for pid, values in info["plain"].items()}
    for name, value in tensors.items():
        _, pid, key = name.split("/", 2)
        state.setdefault(int(pid), {})[key] = value
    return {"state": state, "param_groups": info["param_groups"]}


def save_checkpoint(path: Path, *, model, optimizer, scheduler, scaler, rng: dict[str, torch.Tensor],
                    progress: dict[str, Any], tracked: dict[str, torch.Tensor] | None = None) -> None:
    """Everything needed to continue exactly where training stopped (`tracked`: the loop's own tensors). Without
    model and optimizer (FSDP: torch.distributed.checkpoint saves them sharded), the rest."""
    tensors = {f"model/{k}": _cpu(v) for k, v in model.state_dict().items()} if model is not None else {}
    optim_tensors, optim_info = _split_optimizer(optimizer.state_dict() if optimizer is not None
                                                 else {"state": {}, "param_groups": []})
    tensors.update(optim_tensors)
    tensors.update({f"rng/{k}": _cpu(v) for k, v in rng.items()})
    tensors.update({f"tracked/{k}": _cpu(v) for k, v in (tracked or {}).items()})
    state = {
        "optimizer": optim_info,
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "progress": progress,
    }
    _write(path, tensors, {"format": CHECKPOINT_FORMAT, "state": state})


def load_checkpoint(path: Path, *, model, optimizer, scheduler, scaler
                    ) -> tuple[dict[str, torch.Tensor], dict, dict[str, torch.Tensor]]:
    """Restore model, optimiser, scheduler and scaler in place; return (rng states, progress, tracked)."""
    meta = read_metadata(path)
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise RunDirError(f"{path} is not a kiln training checkpoint")
    tensors = load_file(str(path))
    state = meta["state"]
    if model is not None:
        load_weights(path, model)
        device = next(model.parameters()).device
        optim_tensors = {k: v.to(device) for k, v in tensors.items() if k.startswith("optim/")}
        try:
            optimizer.load_state_dict(_join_optimizer(optim_tensors, state["optimizer"]))
        except ValueError as e:  # torch: a group's parameter count differs (groups made by another kiln version)
            raise RunDirError(f"{path}: its optimiser state does not fit this model's parameter groups ({e}); "
                              "the kiln that wrote it grouped parameters differently (which ones get weight "
                              "decay): resume with that version, or train again") from None
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state["scaler"]:
        scaler.load_state_dict(state["scaler"])
    rng = {k.removeprefix("rng/"): v for k, v in tensors.items() if k.startswith("rng/")}
    tracked = {k.removeprefix("tracked/"): v for k, v in tensors.items() if k.startswith("tracked/")}
    return rng, state["progress"], tracked
