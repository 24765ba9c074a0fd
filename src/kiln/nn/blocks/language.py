"""Language-model blocks: token embeddings, a causal (decoder-only) Transformer stack and the output head.

A language model reads token ids (steps,) and gives next-token logits (steps, vocab)::

    token_embedding -> positional_encoding (or rotary positions inside the stack) -> transformer_decoder -> lm_head

Blocks that mix steps decode incrementally through ``decode(x, cache, pos)``: ``x`` holds only the new
steps, ``cache`` is the block's own dict (keys and values so far), ``pos`` the index of the first new
step. A block without ``decode`` works on each step alone (embeddings, dense, the head).
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, PositiveInt
from torch import nn

from kiln.errors import ConfigError
from kiln.nn.base import BlockSpec, Built, Shape, expect
from kiln.registry import BLOCKS

TOKENS_FIX = "give token ids: a text data set (dataset: text or text_pairs) feeds (steps,) ids to token_embedding"
INIT_STD = 0.02  # GPT-2's initialisation, as in nanoGPT


def init_linear(layer: nn.Linear, std: float = INIT_STD) -> nn.Linear:
    nn.init.normal_(layer.weight, std=std)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
    return layer


class Embedding(nn.Module):
    def __init__(self, vocab: int, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(vocab, width) * INIT_STD)

    def forward(self, ids):  # (B, T) int -> (B, T, C)
        return F.embedding(ids, self.weight)


@BLOCKS.register("token_embedding")
class TokenEmbedding(BlockSpec):
    """A learned vector per token id. ``vocab`` defaults to the data set's tokenizer size."""

    type: Literal["token_embedding"] = "token_embedding"
    width: PositiveInt
    vocab: PositiveInt | None = None

    example: ClassVar[dict] = {"width": 8, "vocab": 11}
    example_input: ClassVar[Shape] = (6,)
    example_tokens: ClassVar[int | None] = 11

    def build(self, in_shape: Shape) -> Built:
        expect("token_embedding", in_shape, ("vector",), TOKENS_FIX)
        if self.vocab is None:
            raise ConfigError("token_embedding.vocab is not set and no text data set gave a vocabulary; set vocab")
        return Built(Embedding(self.vocab, self.width), (in_shape[0], self.width), 0)


def rotary_table(steps: int, head_dim: int, base: float = 10000.0) -> torch.Tensor:
    """cos and sin of each position's rotation angles: (2, steps, head_dim / 2)."""
    freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.arange(steps, dtype=torch.float32)[:, None] * freq
    return torch.stack([angles.cos(), angles.sin()])


def rotate(x: torch.Tensor, table: torch.Tensor, pos: int) -> torch.Tensor:
    """Rotary position embedding (RoFormer) of x (B, h, T, d) for positions pos..pos+T-1; halves are pairs."""
    cos, sin = table[:, pos: pos + x.shape[2]]
    a, b = x.chunk(2, dim=-1)
    return torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)


class Attention(nn.Module):
    """Multi-head attention. Self-attention is causal when ``causal``; with ``source`` it is cross-attention."""

    def __init__(self, width: int, heads: int, dropout: float, bias: bool, causal: bool, out_std: float,
                 rotary_steps: int = 0, cross: bool = False) -> None:
        super().__init__()
        self.heads, self.dropout, self.causal = heads, dropout, causal
        # Self-attention projects queries, keys and values in one matmul; cross-attention takes keys
        # and values from the source.
        self.qkv = None if cross else init_linear(nn.Linear(width, 3 * width, bias=bias))
        self.q = init_linear(nn.Linear(width, width, bias=bias)) if cross else None
        self.kv = init_linear(nn.Linear(width, 2 * width, bias=bias)) if cross else None
        self.proj = init_linear(nn.Linear(width, width, bias=bias), out_std)
        table = rotary_table(rotary_steps, width // heads) if rotary_steps else torch.empty(0)
        self.register_buffer("rotary", table, persistent=False)

    def split(self, z):  # (B, T, C) -> (B, h, T, d)
        b, t, c = z.shape
        return z.view(b, t, self.heads, c // self.heads).transpose(1, 2)

    def forward(self, x, source=None, cache=None, pos=0):  # (B, T, C) -> (B, T, C)
        b, t, c = x.shape
        if source is not None:  # cross-attention: the source's keys and values are computed once per source
            q = self.split(self.q(x))
            if cache is not None and "k" in cache:
                k, v = cache["k"], cache["v"]
            else:
                k, v = (self.split(z) for z in self.kv(source).split(c, dim=2))
                if cache is not None:
                    cache["k"], cache["v"] = k, v
        else:
            q, k, v = (self.split(z) for z in self.qkv(x).split(c, dim=2))
            if self.rotary.numel():
                q, k = rotate(q, self.rotary, pos), rotate(k, self.rotary, pos)
            if cache is not None:
                if "k" in cache:
                    k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)
                cache["k"], cache["v"] = k, v
        mask, causal = None, self.causal and source is None
        if causal and k.shape[2] != t:  # new steps after cached ones: each sees all the past and itself
            mask = torch.ones(t, k.shape[2], dtype=torch.bool, device=x.device).tril(k.shape[2] - t)
            causal = False
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           dropout_p=self.dropout if self.training else 0.0)  # (B, h, T, d)
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


class MLP(nn.Module):
    def __init__(self, width: int, ff: int, dropout: float, bias: bool, out_std: float) -> None:
        super().__init__()
        self.up = init_linear(nn.Linear(width, ff, bias=bias))
        self.down = init_linear(nn.Linear(ff, width, bias=bias), out_std)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):  # (B, T, C)
        return self.drop(self.down(F.gelu(self.up(x))))


class Layer(nn.Module):
    """Pre-norm Transformer layer: self-attention, optional cross-attention to a source, feed-forward."""

    def __init__(self, width: int, heads: int, ff: int, dropout: float, bias: bool, causal: bool, layers: int,
                 cross: bool = False, rotary_steps: int = 0) -> None:
        super().__init__()
        out_std = INIT_STD / math.sqrt(2 * layers)  # residual projections scaled by depth (GPT-2)
        self.norm1 = nn.LayerNorm(width, bias=bias)
        self.attn = Attention(width, heads, dropout, bias, causal, out_std, rotary_steps)
        self.cross = Attention(width, heads, dropout, bias, False, out_std, cross=True) if cross else None
        self.norm_cross = nn.LayerNorm(width, bias=bias) if cross else None
        self.norm2 = nn.LayerNorm(width, bias=bias)
        self.mlp = MLP(width, ff, dropout, bias, out_std)
        self.drop = nn.Dropout(dropout)

    def forward(self, x, source=None, cache=None, pos=0):  # (B, T, C) -> (B, T, C)
        x = x + self.drop(self.attn(self.norm1(x), cache=None if cache is None else cache.setdefault("self", {}),
                                    pos=pos))
        if self.cross is not None:
            x = x + self.drop(self.cross(self.norm_cross(x), source,
                                         cache=None if cache is None else cache.setdefault("cross", {})))
        return x + self.mlp(self.norm2(x))


class CausalStack(nn.Module):
    def __init__(self, layers: list[Layer], width: int, bias: bool) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.norm = nn.LayerNorm(width, bias=bias)

    def forward(self, x):  # (B, T, C) -> (B, T, C)
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)

    def decode(self, x, cache: dict, pos: int):  # new steps (B, t, C), after pos cached ones
        for i, layer in enumerate(self.layers):
            x = layer(x, cache=cache.setdefault(i, {}), pos=pos)
        return self.norm(x)


def check_width(block: str, width: int, heads: int) -> None:
    if width % heads:
        raise ConfigError(f"{block}.heads: the model width {width} (features of the input) must divide by "
                          f"heads={heads}; change heads or the width of the block before it")


@BLOCKS.register("transformer_decoder")
class TransformerDecoder(BlockSpec):
    """A decoder-only (GPT) stack of pre-norm layers with causal self-attention, then a final layer norm.
    Each step sees only itself and earlier steps. ``position: rotary`` rotates queries and keys by position
    (use it instead of a positional_encoding block)."""

    type: Literal["transformer_decoder"] = "transformer_decoder"
    layers: PositiveInt = 1
    heads: PositiveInt
    ff: PositiveInt | None = None  # feed-forward hidden width; default 4 x the model width
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    bias: bool = True  # biases in linear layers and layer norms
    position: Literal["none", "rotary"] = "none"

    example: ClassVar[dict] = {"layers": 2, "heads": 2, "position": "rotary"}

    def build(self, in_shape: Shape) -> Built:
        expect("transformer_decoder", in_shape, ("sequence",), "put token_embedding (and positional_encoding) first")
        t, c = in_shape
        check_width("transformer_decoder", c, self.heads)
        if self.position == "rotary" and (c // self.heads) % 2:
            raise ConfigError(f"transformer_decoder.position: rotary needs an even head width, not {c // self.heads}")
        ff = self.ff or 4 * c
        rotary = t if self.position == "rotary" else 0
        layers = [Layer(c, self.heads, ff, self.dropout, self.bias, True, self.layers, rotary_steps=rotary)
                  for _ in range(self.layers)]
        macs = self.layers * (t * (4 * c * c + 2 * c * ff) + t * t * c)  # causal: half of the 2*T*T*C scores+mix
        return Built(CausalStack(layers, c, self.bias), (t, c), macs)


class Head(nn.Module):
    def __init__(self, width: int, vocab: int, tie: bool) -> None:
        super().__init__()
        self.tie = tie
        self.proj = init_linear(nn.Linear(width, vocab, bias=False))

    def link(self, blocks: list[nn.Module]) -> None:
        """Weight tying: share the token embedding's matrix (Press & Wolf, 2017)."""
        if not self.tie:
            return
        embedding = next((b for b in blocks if isinstance(b, Embedding)), None)
        if embedding is None or embedding.weight.shape != self.proj.weight.shape:
            raise ConfigError("lm_head.tie needs a token_embedding block of the same width and vocabulary before "
                              "it; set tie: false or add one")
        self.proj.weight = embedding.weight

    def forward(self, x):  # (B, T, C) -> (B, T, vocab)
        return self.proj(x)


@BLOCKS.register("lm_head")
class LMHead(BlockSpec):
    """Next-token logits for every step. ``tie`` shares the token embedding's weights (no extra parameters)."""

    type: Literal["lm_head"] = "lm_head"
    vocab: PositiveInt | None = None
    tie: bool = True

    example: ClassVar[dict] = {"vocab": 7, "tie": False}

    def build(self, in_shape: Shape) -> Built:
        expect("lm_head", in_shape, ("sequence",), "a language model's head reads one vector per step")
        if self.vocab is None:
            raise ConfigError("lm_head.vocab is not set and no text data set gave a vocabulary; set vocab")
        t, c = in_shape
        return Built(Head(c, self.vocab, self.tie), (t, self.vocab), t * c * self.vocab)
