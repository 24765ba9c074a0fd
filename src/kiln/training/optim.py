"""Optimisers and learning-rate schedules, each in its registry under the name a config uses."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable

import torch

from kiln.errors import ConfigError
from kiln.registry import OPTIMIZERS, SCHEDULES
from kiln.training.transfer import scale_groups


def fused_or_foreach(device: torch.device) -> dict:
    # One fused kernel for all parameters instead of a loop of small ones per parameter. On CPU too: a
    # seed-model Adam step here takes 0.23 ms fused against 0.88 ms foreach (1 thread, 71k parameters).
    return {"fused": True} if device.type in ("cuda", "cpu") else {"foreach": True}


class _Eager:
    """torch.optim's optimisers, without the guards that torch.optim puts around them for torch.compile.

    ``step``, ``zero_grad``, ``add_param_group``, ``state_dict`` and ``load_state_dict`` are wrapped in guards
    whose first call imports torch._dynamo: about 2.8 s of every training run on a 2-core CPU, spent before the
    first step, for a compiler kiln does not use on the optimiser. These call the functions inside the wrappers
    (``inspect.unwrap``), so the update and the state dict are torch's own (tests/test_training_parts.py
    checks both bit for bit).
    """

    def add_param_group(self, param_group: dict) -> None:
        inspect.unwrap(torch.optim.Optimizer.add_param_group)(self, param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        inspect.unwrap(torch.optim.Optimizer.zero_grad)(self, set_to_none)

    def state_dict(self) -> dict:
        return inspect.unwrap(torch.optim.Optimizer.state_dict)(self)

    def load_state_dict(self, state_dict: dict) -> None:
        inspect.unwrap(torch.optim.Optimizer.load_state_dict)(self, state_dict)

    def step(self, closure=None):
        with torch.no_grad():  # what the guard does for an optimiser that is not differentiable
            return inspect.unwrap(super().step)(self, closure)


class Adam(_Eager, torch.optim.Adam):
    pass


class AdamW(_Eager, torch.optim.AdamW):
    pass


class SGD(_Eager, torch.optim.SGD):
    pass


class Muon(_Eager, torch.optim.Muon):
    pass


@OPTIMIZERS.register("adam")
def adam(params, cfg, device):
    return Adam(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, **fused_or_foreach(device))


@OPTIMIZERS.register("adamw")
def adamw(params, cfg, device):
    return AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, **fused_or_foreach(device))


@OPTIMIZERS.register("sgd")
def sgd(params, cfg, device):
    return SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
               weight_decay=cfg.weight_decay, **fused_or_foreach(device))


def make_optimizer(model: torch.nn.Module, cfg, device: torch.device) -> torch.optim.Optimizer:
    make = OPTIMIZERS.get(cfg.name)
    if getattr(make, "takes_model", False):  # muon (kiln.training.muon) picks its matrices from the modules
        if getattr(cfg, "lr_scale", None):
            raise ConfigError("train.optimizer.lr_scale: per-block learning rates are not supported with muon "
                              "(it makes its own parameter groups); use adamw, or drop lr_scale")
        return make(model, cfg, device)
    groups = param_groups(model, cfg.weight_decay)
    if getattr(cfg, "lr_scale", None):  # per-block learning rates (kiln.training.transfer)
        groups = scale_groups(groups, model, cfg.lr, cfg.lr_scale)
    return make([g for g in groups if g["params"]], cfg, device)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices and embeddings only, not on biases and normalisation scales (as GPT-2 and
    nanoGPT train): pulling those towards zero does not regularise, it only shrinks the layer's output.

    A module names its own parameters that are scales or offsets whatever their shape in ``no_weight_decay``
    (a TabM ensemble's per-member scalings, which start at one; the per-number embeddings of a table's numbers,
    which rtdl's reference code also leaves undecayed); those skip it too."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not weight_decay:
        return [{"params": params}]
    free = {id(getattr(m, name)) for m in model.modules() for name in getattr(m, "no_weight_decay", ())}
    return [{"params": [p for p in params if p.dim() >= 2 and id(p) not in free]},
            {"params": [p for p in params if p.dim() < 2 or id(p) in free], "weight_decay": 0.0}]


# A schedule maps (step, total_steps, cfg) to a multiplier of the base learning rate.
Multiplier = Callable[[int], float]


def _warmup(step: int, warmup_steps: int, start: float) -> float:
    """Linear warm-up of the first ``warmup_steps`` steps from ``start``. From 0, step s gets (s + 1) / (warmup + 1)
    as nanoGPT's get_lr gives: the first step already learns (0 / warmup would spend it at learning rate 0)."""
    if start == 0.0:
        return (step + 1) / (warmup_steps + 1)
    return start + (1.0 - start) * step / max(1, warmup_steps)


def _cosine(progress: float, final: float) -> float:
    return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


@SCHEDULES.register("constant")
def constant(total: int, cfg) -> Multiplier:
    warm = round(cfg.warmup * total)
    return lambda s: _warmup(s, warm, 0.0) if s < warm else 1.0


@SCHEDULES.register("cosine")
def cosine(total: int, cfg) -> Multiplier:
    warm = round(cfg.warmup * total)

    def mult(s: int) -> float:
        if s < warm:
            return _warmup(s, warm, 0.0)
        return _cosine((s - warm) / max(1, total - warm), cfg.final_lr_fraction)

    return mult


@SCHEDULES.register("onecycle")
def onecycle(total: int, cfg) -> Multiplier:
    """Warm up from lr/25 to lr (a quarter of the steps unless ``warmup`` says), then cosine down."""
    warm = round((cfg.warmup or 0.25) * total)

    def mult(s: int) -> float:
        if s < warm:
            return _warmup(s, warm, 1.0 / 25)
        return _cosine((s - warm) / max(1, total - warm), cfg.final_lr_fraction)

    return mult


def make_scheduler(optimizer: torch.optim.Optimizer, cfg, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, SCHEDULES.get(cfg.name)(total_steps, cfg))


def backward_and_step(loss: torch.Tensor, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                      scheduler, scaler: torch.amp.GradScaler | None, grad_clip: float | None) -> None:
    """One optimiser step from a loss: backward (loss-scaled for fp16), clip, step, advance the schedule."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
    else:
        loss.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    scheduler.step()
