"""``optimizer: {name: muon}``: torch's Muon for the hidden matrices, AdamW for everything else.

Muon (Keller Jordan, 2024; ``torch.optim.Muon``) orthogonalises each 2-D update by a few Newton-Schulz iterations;
it suits the matrices inside a network, not embeddings, the output head or 1-D parameters (norm scales, biases).
Here it takes the weight of every ``nn.Linear`` except a language model's head; AdamW (kiln's, with its
weight-decay groups) takes the rest. Both use ``optimizer.lr``: Muon's step is scaled to AdamW's RMS
(``adjust_lr_fn="match_rms_adamw"``), so one learning rate and one schedule serve both. ``optimizer.momentum`` is
Muon's (nanoGPT speedruns use 0.95); ``optimizer.betas`` AdamW's.

One optimiser object for the trainer: its ``param_groups`` are Muon's and then AdamW's (a schedule sets the learning
rate of all of them), its ``state`` holds both, and its state dict round-trips for resume.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from kiln.nn.blocks.language import Head
from kiln.registry import OPTIMIZERS
from kiln.training.optim import AdamW, Muon, fused_or_foreach, param_groups


def hidden_matrices(model: nn.Module) -> list[nn.Parameter]:
    """The weights Muon trains: those of every nn.Linear except a language model's head (tied or not)."""
    heads = {id(p) for m in model.modules() if isinstance(m, Head) for p in m.parameters()}
    seen, out = set(), []
    for m in model.modules():
        if isinstance(m, nn.Linear) and m.weight.requires_grad and id(m.weight) not in heads | seen:
            seen.add(id(m.weight))
            out.append(m.weight)
    return out


class MuonAdamW(torch.optim.Optimizer):
    def __init__(self, model: nn.Module, cfg, device: torch.device) -> None:
        matrices = hidden_matrices(model)
        muon_ids = {id(p) for p in matrices}
        rest = [{**g, "params": [p for p in g["params"] if id(p) not in muon_ids]}
                for g in param_groups(model, cfg.weight_decay)]
        rest = [g for g in rest if g["params"]]
        self._parts = []
        if matrices:
            self._parts.append(Muon(matrices, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum,
                                    adjust_lr_fn="match_rms_adamw"))
        if rest:
            self._parts.append(AdamW(rest, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay,
                                     **fused_or_foreach(device)))
        self._sizes = [len(o.param_groups) for o in self._parts]
        # The same group dicts as the optimisers inside: a schedule that sets this one's learning rates sets theirs
        super().__init__([g for o in self._parts for g in o.param_groups], {"lr": cfg.lr})
        self._link()

    def _link(self) -> None:
        """Hand each optimiser inside its slice of this one's groups, and this one's state (which holds both)."""
        i = 0
        for o, n in zip(self._parts, self._sizes, strict=True):
            o.param_groups, o.state = self.param_groups[i:i + n], self.state
            i += n

    def add_param_group(self, param_group: dict) -> None:
        inspect.unwrap(torch.optim.Optimizer.add_param_group)(self, param_group)

    def step(self, closure=None):
        for o in self._parts:
            o.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self._parts:
            o.zero_grad(set_to_none)

    def state_dict(self) -> dict:
        return inspect.unwrap(torch.optim.Optimizer.state_dict)(self)

    def load_state_dict(self, state_dict: dict) -> None:
        inspect.unwrap(torch.optim.Optimizer.load_state_dict)(self, state_dict)
        self._link()


@OPTIMIZERS.register("muon")
def muon(model: nn.Module, cfg, device: torch.device) -> MuonAdamW:
    return MuonAdamW(model, cfg, device)


muon.takes_model = True  # make_optimizer passes the model (Muon's choice of matrices needs its modules)
