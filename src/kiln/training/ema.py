"""``train.ema``: an exponential moving average of the weights, which every evaluation uses.

After each optimiser step the average moves towards the weights: ``avg = d * avg + (1 - d) * w``, with
``d = min(decay, (1 + t) / (10 + t))`` at update ``t`` (from 0) so that early on, while the weights still move
far, the average forgets its random start quickly (the warm-up TensorFlow's and timm's averages use). Floating-
point parameters and buffers are averaged; other buffers (counters) are copied.

Validation at each epoch's end (and a text run's estimates), early stopping, the best epoch's weights, the
final ``model.safetensors`` and the test metrics all use the averaged weights: for an evaluation they are
swapped into the model and the training weights swapped back after. The average is saved in every checkpoint
so that ``--resume`` continues it exactly. Under DDP every process holds the same weights after each step, so
each keeps the same average; FSDP shards the weights and is refused.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from pydantic import Field

from kiln.errors import ConfigError
from kiln.schema import StrictModel

PREFIX = "ema/"  # the average's tensors in a checkpoint's `tracked` section


class EmaConfig(StrictModel):
    """``train.ema``: e.g. ``{decay: 0.99}``; null (the default) trains without an average."""

    decay: float = Field(default=0.99, gt=0.0, lt=1.0)  # per optimiser step, after the warm-up above


class Ema:
    def __init__(self, model: torch.nn.Module, cfg: EmaConfig, fsdp: bool = False) -> None:
        if fsdp:
            raise ConfigError("train.ema averages whole weights, which train.parallel: fsdp shards over the "
                              "processes: use train.parallel: ddp (every process keeps the same average), or drop "
                              "train.ema")
        self.decay, self.updates = cfg.decay, 0
        state = dict(model.named_parameters()) | dict(model.named_buffers())
        self.names = [k for k, v in state.items() if v.is_floating_point()]
        self.live = [state[k] for k in self.names]  # the model's own tensors, updated in place by training
        self.avg = [v.detach().clone() for v in self.live]

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self) -> None:
        """Move the average towards the weights (after an optimiser step)."""
        torch._foreach_lerp_(self.avg, [v.detach() for v in self.live], 1.0 - self.current_decay())
        self.updates += 1

    @contextmanager
    @torch.no_grad()
    def swapped(self) -> Iterator[None]:
        """Within: the model holds the averaged weights; after: its training weights again."""
        saved = [v.detach().clone() for v in self.live]
        torch._foreach_copy_([v.data for v in self.live], self.avg)
        try:
            yield
        finally:
            torch._foreach_copy_([v.data for v in self.live], saved)

    @torch.no_grad()
    def apply(self) -> None:
        """Put the averaged weights into the model for good (when training ends)."""
        torch._foreach_copy_([v.data for v in self.live], self.avg)

    def state(self) -> dict[str, torch.Tensor]:
        out = {PREFIX + k: v for k, v in zip(self.names, self.avg, strict=True)}
        out[PREFIX + "#updates"] = torch.tensor(self.updates, dtype=torch.int64)
        return out

    @torch.no_grad()
    def restore(self, tracked: dict[str, torch.Tensor]) -> None:
        for k, v in zip(self.names, self.avg, strict=True):
            v.copy_(tracked[PREFIX + k])
        self.updates = int(tracked[PREFIX + "#updates"])


@contextmanager
def averaged(ema: Ema | None) -> Iterator[None]:
    """The averaged weights within, if there is an average; else nothing changes."""
    if ema is None:
        yield
    else:
        with ema.swapped():
            yield
