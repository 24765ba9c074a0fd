"""Continuous batching: many texts of different lengths decoded together, one new token each per step, each
with its own key/value cache; a text can join between steps and leave when it is done.

The rows are left-padded to one length, so that the new step's keys and values append at the same index of
every row (what :class:`kiln.nn.blocks.transformer.Attention` does while decoding); a key mask gives the padding
no weight, and each row keeps its own position (the positional table and rotary angles are read per row).
A text is first read alone (``prefill``: its prompt in one pass, no padding), then joins the batch.

Models made of step-wise blocks, a positional table and a decoder-only Transformer stack are batched; any
other text model (recurrent ones) is not: :func:`batchable` says which.
"""

from __future__ import annotations

import torch
from torch import nn

from kiln.nn.blocks.language import LearnedPosition, SinusoidalPosition
from kiln.nn.blocks.transformer import CausalStack, sub_cache

POSITIONS = (LearnedPosition, SinusoidalPosition)


def batchable(model: nn.Module) -> bool:
    """Whether :class:`BatchDecoder` can decode this model's texts together."""
    return all(isinstance(b, (*POSITIONS, CausalStack)) or not hasattr(b, "decode") for b in model.blocks)


class BatchDecoder:
    """The rows being decoded: per decoding block a cache of (B, h, L, d) keys and values, a key mask (B, L)
    that is False at each row's left padding, and each row's next position (B,)."""

    def __init__(self, model: nn.Module) -> None:
        self.blocks = list(model.blocks if hasattr(model, "blocks") else model)
        self.device = next(model.parameters()).device
        self.caches: list[dict] = [{} for _ in self.blocks]
        self.mask = torch.zeros(0, 0, dtype=torch.bool, device=self.device)
        self.pos = torch.zeros(0, dtype=torch.int64, device=self.device)

    def __len__(self) -> int:
        return len(self.pos)

    @property
    def length(self) -> int:
        """L: the steps held per row, padding included."""
        return self.mask.shape[1]

    @torch.inference_mode()
    def prefill(self, ids: torch.Tensor) -> tuple[list[dict], torch.Tensor]:
        """One text's prompt (1-d ids) read alone: its caches and the logits after its last token (vocab,)."""
        x = ids.to(self.device).view(1, -1)
        caches: list[dict] = [{} for _ in self.blocks]
        for block, cache in zip(self.blocks, caches, strict=True):
            x = block.decode(x, cache, 0) if hasattr(block, "decode") else block(x)
        return caches, x[0, -1]

    @torch.inference_mode()
    def add(self, caches: list[dict], steps: int) -> None:
        """A prefilled text (its caches from :meth:`prefill`, ``steps`` tokens) joins as the last row."""
        length = max(self.length, steps)
        pad_old, pad_new = length - self.length, length - steps
        for mine, theirs in zip(self.caches, caches, strict=True):
            for path, new in _tensors(theirs):
                old = _get(mine, path)
                new = _pad_left(new, pad_new)
                _set(mine, path, new if old is None else torch.cat([_pad_left(old, pad_old), new]))
        row = torch.zeros(1, length, dtype=torch.bool, device=self.device)
        row[0, pad_new:] = True
        self.mask = torch.cat([_pad_left(self.mask, pad_old, dim=1), row])
        self.pos = torch.cat([self.pos, torch.tensor([steps], device=self.device)])

    @torch.inference_mode()
    def keep(self, rows: list[int]) -> None:
        """Only these rows stay (in this order); padding that no row needs any more is dropped."""
        if not rows:
            self.__init__(nn.ModuleList(self.blocks))  # type: ignore[misc]
            return
        index = torch.tensor(rows, dtype=torch.int64, device=self.device)
        self.mask, self.pos = self.mask[index], self.pos[index]
        used = self.mask.any(0).nonzero()
        start = int(used[0]) if len(used) else self.length
        self.mask = self.mask[:, start:]
        for cache in self.caches:
            for path, t in _tensors(cache):
                _set(cache, path, t[index][:, :, start:])

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """One new token per row (B,) -> the logits after it (B, vocab)."""
        x = tokens.to(self.device).view(-1, 1)
        mask = torch.cat([self.mask, torch.ones(len(x), 1, dtype=torch.bool, device=self.device)], dim=1)
        keys = None if bool(mask.all()) else mask  # no padding: attention as when decoding one text alone
        for block, cache in zip(self.blocks, self.caches, strict=True):
            if isinstance(block, POSITIONS):
                x = x + block.table[self.pos][:, None]
            elif isinstance(block, CausalStack):
                for i, layer in enumerate(block.layers):
                    x = layer(x, None, sub_cache(cache, i), self.pos, keys)
                x = block.norm(x)
            else:
                x = block(x)
        self.mask, self.pos = mask, self.pos + 1
        return x[:, -1]


def _tensors(cache: dict, path: tuple = ()):
    """(path, tensor) of every tensor in a nested cache dict."""
    for key, value in list(cache.items()):
        if isinstance(value, dict):
            yield from _tensors(value, (*path, key))
        elif isinstance(value, torch.Tensor):
            yield (*path, key), value


def _get(cache: dict, path: tuple):
    for key in path:
        if key not in cache:
            return None
        cache = cache[key]
    return cache


def _set(cache: dict, path: tuple, value) -> None:
    for key in path[:-1]:
        cache = cache.setdefault(key, {})
    cache[path[-1]] = value


def _pad_left(t: torch.Tensor, n: int, dim: int = 2) -> torch.Tensor:
    """``n`` zero (or False) steps before t's along ``dim`` (keys and values: (B, h, L, d); masks: (B, L))."""
    if n == 0:
        return t
    shape = list(t.shape)
    shape[dim] = n
    return torch.cat([torch.zeros(shape, dtype=t.dtype, device=t.device), t], dim=dim)
