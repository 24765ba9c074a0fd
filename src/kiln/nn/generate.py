"""Generation with a language or sequence-to-sequence model, on token ids: sampling, and incremental decoding
with a key/value cache so that each new token costs one step instead of a pass over the whole context.
(Texts become ids and ids texts in the text kinds of data, :mod:`kiln.data.text`.)

With ``cache=False`` every token recomputes the window from scratch (the reference the cache is tested
against). Once a text is longer than the model's context, both read only the last ``context`` tokens: the
cache then restarts from that window at each step, as absolute positions cannot slide.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from kiln.errors import ConfigError, KilnError
from kiln.nn.base import BlockSpec

# Blocks that work on each step alone; the others that a generating model may hold decode incrementally.
STEPWISE = {"token_embedding", "dense", "dropout", "layernorm", "lm_head"}
INCREMENTAL = {"positional_encoding", "transformer_decoder", "encoder_decoder", "rnn", "lstm", "gru"}


def check_left_to_right(specs: list[BlockSpec]) -> None:
    """Refuse a language model in which a step could see later steps (its training would be pointless)."""
    for i, spec in enumerate(specs):
        recurrent_ok = spec.type not in ("rnn", "lstm", "gru") or (spec.steps == "all" and not spec.bidirectional)
        if (spec.type not in STEPWISE | INCREMENTAL) or not recurrent_ok:
            raise ConfigError(f"model.blocks.{i} ({spec.type}): a text model predicts each token from earlier ones "
                              f"only, so its blocks must not look ahead; use {', '.join(sorted(STEPWISE | INCREMENTAL))}"
                              " (rnn/lstm/gru with steps: all, not bidirectional)")
    if specs[-1].type != "lm_head":
        raise ConfigError(f"model.blocks.{len(specs) - 1} ({specs[-1].type}): a text model ends with lm_head")


class Decoder:
    """Runs a model's blocks on new tokens only, each block keeping its own cache between calls."""

    def __init__(self, model: nn.Module) -> None:
        self.blocks = list(model.blocks)
        self.reset()

    def reset(self) -> None:
        self.caches: list[dict] = [{} for _ in self.blocks]
        self.pos = 0  # tokens seen so far

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:  # (B, t) new token ids -> logits (B, t, vocab)
        x = ids
        for block, cache in zip(self.blocks, self.caches, strict=True):
            x = block.decode(x, cache, self.pos) if hasattr(block, "decode") else block(x)
        self.pos += ids.shape[1]
        return x


@dataclass
class Sampling:
    max_new_tokens: int = 200
    temperature: float = 1.0  # 0: greedy (always the most likely token)
    top_k: int | None = None  # sample among the k most likely tokens only
    top_p: float | None = None  # sample among the fewest tokens whose probabilities sum to p (nucleus)
    seed: int | None = None
    stop: list[str] = field(default_factory=list)  # end the text at the first of these strings

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0 or self.temperature < 0:
            raise KilnError("max_new_tokens and temperature must not be negative")
        if self.top_k is not None and self.top_k < 1:
            raise KilnError(f"top_k must be at least 1, not {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise KilnError(f"top_p must be in (0, 1], not {self.top_p}")


def next_token(logits: torch.Tensor, s: Sampling, gen: torch.Generator) -> torch.Tensor:
    """One token per row of logits (B, vocab) -> (B, 1)."""
    if s.temperature == 0:
        return logits.argmax(-1, keepdim=True)
    logits = logits.float() / s.temperature
    if s.top_k is not None:
        kth = torch.topk(logits, min(s.top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p is not None:
        sorted_logits, order = logits.sort(-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) >= s.top_p  # tokens after the nucleus is full
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=gen)


@torch.inference_mode()
def generate_ids(model: nn.Module, prompt: torch.Tensor, s: Sampling, cache: bool = True) -> Iterator[int]:
    """Token ids after ``prompt`` (1-d ids), one at a time."""
    if prompt.numel() == 0:
        raise KilnError("the prompt is empty; give at least one token of text")
    model.eval()
    context = model.input_shape[0]
    device = next(model.parameters()).device
    gen = torch.Generator(device)
    gen.manual_seed(s.seed) if s.seed is not None else gen.seed()
    ids = prompt.to(device).view(1, -1)
    decoder = Decoder(model)
    logits = decoder(ids[:, -context:]) if cache else model(ids[:, -context:])
    for _ in range(s.max_new_tokens):
        token = next_token(logits[:, -1], s, gen)
        ids = torch.cat([ids, token], dim=1)
        yield int(token)
        if cache and decoder.pos < context:
            logits = decoder(token)
        elif cache:
            decoder.reset()
            logits = decoder(ids[:, -context:])
        else:
            logits = model(ids[:, -context:])


@torch.inference_mode()
def translate_ids(model: nn.Module, sources: torch.Tensor, bos: int, eos: int, max_steps: int,
                  cache: bool = True) -> list[list[int]]:
    """Greedy targets for padded sources (N, source_steps), each up to (without) ``<eos>``."""
    model.eval()
    device = next(model.parameters()).device
    sources = sources.to(device)
    prefix = torch.full((len(sources), 1), bos, dtype=torch.int64, device=device)
    decoder = Decoder(model)
    logits = decoder(torch.cat([sources, prefix], dim=1)) if cache else model(torch.cat([sources, prefix], dim=1))
    done = torch.zeros(len(sources), dtype=torch.bool, device=device)
    for step in range(max_steps):
        token = logits[:, -1].argmax(-1, keepdim=True)
        prefix = torch.cat([prefix, token], dim=1)
        done |= token[:, 0] == eos
        if bool(done.all()) or step + 1 == max_steps:
            break
        logits = decoder(token) if cache else model(torch.cat([sources, prefix], dim=1))
    out = []
    for row in prefix[:, 1:].tolist():
        out.append(row[: row.index(eos)] if eos in row else row)
    return out
