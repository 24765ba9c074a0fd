"""The Transformer: one attention module and one layer, stacked three ways.

- ``transformer_encoder``: one bidirectional layer on its own (post- or pre-norm, PyTorch's initialisation),
  over image rows, table columns or any other sequence;
- ``transformer_decoder``: a decoder-only (GPT) stack of causal pre-norm layers, for language models;
- ``encoder_decoder``: a bidirectional encoder and a causal decoder that also attends to the encoded
  source, for sequence-to-sequence models.

Read top to bottom: the layer's settings, rotary positions, Attention, MLP, Layer, the stacks, then the
blocks that build them. Shapes: B batch, T steps (S of a source), C width, h heads of d = C / h features.
The stacks that generate text decode step by step through ``decode(x, cache, pos)``, the protocol that
``kiln.nn.blocks.language`` describes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, PositiveFloat, PositiveInt
from torch import nn

from kiln.errors import ConfigError
from kiln.nn.base import BlockSpec, Built, Shape, activation, expect
from kiln.registry import BLOCKS

INIT_STD = 0.02  # GPT-2's initialisation, as in nanoGPT
SEQUENCE_FIX = "attention reads a sequence of steps; use `rows_to_sequence` after conv/pool blocks, not `flatten`"


@dataclass(frozen=True)
class LayerConfig:
    """What a layer is made of; each block at the end of this file fills it from its own fields."""

    width: int  # C: features per step
    heads: int  # h
    ff: int  # hidden units of the feed-forward network
    dropout: float = 0.0  # on attention weights and on each sublayer's output before its residual add
    dropout_hidden: bool = False  # on the feed-forward's hidden units too, as PyTorch's encoder layer does
    norm: Literal["pre", "post"] = "pre"  # LayerNorm on each sublayer's input (GPT-2) or on each residual sum
    activation: str = "gelu"
    bias: bool = True  # in linear layers and layer norms
    init_std: float | None = INIT_STD  # GPT-2: weights N(0, init_std), biases 0; None: PyTorch's default init
    depth: int = 1  # layers in the whole model, which scales the init of residual projections (GPT-2)
    rotary_steps: int = 0  # rotary positions in self-attention for up to this many steps; 0: none
    norm_eps: float = 1e-5  # added to the variance in every LayerNorm (PyTorch's and GPT-2's default)
    head_dim: int | None = None  # d, features per head; None: width / heads (kiln compress sets it pruning heads)

    @property
    def head_width(self) -> int:
        return self.head_dim or self.width // self.heads

    @property
    def residual_std(self) -> float | None:
        """Init of the projections that write into the residual stream. Their sum grows with depth (two writes
        per layer), so GPT-2 scales them by 1 / sqrt(2 * depth)."""
        return None if self.init_std is None else self.init_std / math.sqrt(2 * self.depth)


def linear(n_in: int, n_out: int, bias: bool, std: float | None) -> nn.Linear:
    """``nn.Linear``, re-initialised as GPT-2 does (weights N(0, std), biases 0) unless std is None."""
    layer = nn.Linear(n_in, n_out, bias=bias)
    if std is not None:
        nn.init.normal_(layer.weight, std=std)
        if bias:
            nn.init.zeros_(layer.bias)
    return layer


def rotary_table(steps: int, head_dim: int, base: float = 10000.0) -> torch.Tensor:
    """cos and sin of each position's rotation angles: (2, steps, head_dim / 2)."""
    freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.arange(steps, dtype=torch.float32)[:, None] * freq
    return torch.stack([angles.cos(), angles.sin()])


def rotate(x: torch.Tensor, table: torch.Tensor, pos: int | torch.Tensor) -> torch.Tensor:
    """Rotary position embedding (RoFormer) of x (B, h, T, d) for positions pos..pos+T-1; halves are pairs.
    ``pos`` may be a tensor (B,): each row's own first position (rows of different lengths decoded together)."""
    if isinstance(pos, torch.Tensor):
        cos, sin = table[:, pos[:, None] + torch.arange(x.shape[2], device=pos.device)][:, :, None]  # (B, 1, T, d/2)
    else:
        cos, sin = table[:, pos: pos + x.shape[2]]
    a, b = x.chunk(2, dim=-1)
    return torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)


def sub_cache(cache: dict | None, key) -> dict | None:
    """The part of a decoding cache that belongs to ``key`` (a layer, or one attention of it); None when the
    whole sequence is computed at once."""
    return None if cache is None else cache.setdefault(key, {})


class Attention(nn.Module):
    """Multi-head attention. Self-attention mixes the steps of x, each with only itself and earlier ones when
    ``causal``; cross-attention (``cross``) lets every step of x read a source sequence instead. While
    decoding, ``cache`` keeps the keys and values of earlier calls and ``pos`` is the position of x's first step."""

    def __init__(self, cfg: LayerConfig, causal: bool = False, cross: bool = False) -> None:
        super().__init__()
        self.heads, self.dropout, self.causal = cfg.heads, cfg.dropout, causal
        c, a = cfg.width, cfg.heads * cfg.head_width  # a: the heads side by side (c unless heads were pruned)
        # Self-attention projects queries, keys and values in one matmul; cross-attention projects the
        # queries from x and the keys and values from the source.
        self.qkv = None if cross else linear(c, 3 * a, cfg.bias, cfg.init_std)
        self.q = linear(c, a, cfg.bias, cfg.init_std) if cross else None
        self.kv = linear(c, 2 * a, cfg.bias, cfg.init_std) if cross else None
        self.proj = linear(a, c, cfg.bias, cfg.residual_std)
        steps = 0 if cross else cfg.rotary_steps
        self.register_buffer("rotary", rotary_table(steps, cfg.head_width) if steps else None, persistent=False)

    def forward(self, x, source=None, cache=None, pos=0, mask=None):  # x (B, T, C), source (B, S, C) -> (B, T, C)
        if source is None:
            return self.proj(self.mix(self.qkv(x), cache, pos, mask))
        return self.proj(self.mix_source(x, source, cache))

    def split(self, z):  # (B, T, h * d) -> (B, h, T, d)
        b, t, c = z.shape
        return z.view(b, t, self.heads, c // self.heads).transpose(1, 2)

    def mix(self, qkv, cache=None, pos=0, mask=None):  # (B, T, 3C), mask (B, T) -> (B, T, C): heads side by side
        q, k, v = (self.split(z) for z in qkv.split(qkv.shape[2] // 3, dim=2))  # (B, h, T, d) each
        if self.rotary is not None:  # turn queries and keys by angles that grow with the position
            q, k = rotate(q, self.rotary, pos), rotate(k, self.rotary, pos)
        if cache is not None:  # the new steps' keys and values join those of the steps before them
            if "k" in cache:
                k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)  # (B, h, pos + T, d)
            cache["k"], cache["v"] = k, v
        return self.attend(q, k, v, self.causal, mask)

    def mix_source(self, x, source, cache=None):  # x (B, T, C), source (B, S, C) -> (B, T, C)
        q = self.split(self.q(x))
        if cache is not None and "k" in cache:  # the source's keys and values are computed once per source
            k, v = cache["k"], cache["v"]
        else:
            kv = self.kv(source)
            k, v = (self.split(z) for z in kv.split(kv.shape[2] // 2, dim=2))  # (B, h, S, d) each
            if cache is not None:
                cache["k"], cache["v"] = k, v
        return self.attend(q, k, v, False)

    def attend(self, q, k, v, causal: bool, keys=None):  # q (B, h, T, d), k and v (B, h, S, d) -> (B, T, C)
        """``keys`` (B, S) bool: the keys a step may attend to (False: padding); a padded key gets no weight."""
        b, h, t, d = q.shape
        mask = None
        if causal and (k.shape[2] != t or keys is not None):  # each step sees all the past and itself
            mask = torch.ones(t, k.shape[2], dtype=torch.bool, device=q.device).tril(k.shape[2] - t)
            causal = False
        if keys is not None:
            mask = keys[:, None, None, :] if mask is None else mask & keys[:, None, None, :]  # (B, 1, T or 1, S)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           dropout_p=self.dropout if self.training else 0.0)  # (B, h, T, d)
        return y.transpose(1, 2).reshape(b, t, h * d)


class MLP(nn.Module):
    """The feed-forward network, on each step alone: widen to ``ff`` hidden units, activate, narrow back."""

    def __init__(self, cfg: LayerConfig) -> None:
        super().__init__()
        self.up = linear(cfg.width, cfg.ff, cfg.bias, cfg.init_std)
        self.act = activation(cfg.activation)
        self.drop = nn.Dropout(cfg.dropout if cfg.dropout_hidden else 0.0)
        self.down = linear(cfg.ff, cfg.width, cfg.bias, cfg.residual_std)

    def forward(self, x):  # (B, T, C) -> (B, T, C)
        return self.down(self.drop(self.act(self.up(x))))  # (B, T, ff) in between


class Layer(nn.Module):
    """One Transformer layer: self-attention, then (with ``cross``) attention to a source, then the MLP; each
    sublayer adds its output to the residual stream x."""

    def __init__(self, cfg: LayerConfig, causal: bool = False, cross: bool = False) -> None:
        super().__init__()
        self.post_norm = cfg.norm == "post"
        self.norm1 = nn.LayerNorm(cfg.width, eps=cfg.norm_eps, bias=cfg.bias)
        self.attn = Attention(cfg, causal=causal)
        self.cross = Attention(cfg, cross=True) if cross else None
        self.norm_cross = nn.LayerNorm(cfg.width, eps=cfg.norm_eps, bias=cfg.bias) if cross else None
        self.norm2 = nn.LayerNorm(cfg.width, eps=cfg.norm_eps, bias=cfg.bias)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, source=None, cache=None, pos=0, mask=None):  # x (B, T, C), source (B, S, C) -> (B, T, C)
        """``mask`` (B, T) bool: x's real steps; self-attention gives padded steps (False) no weight."""
        x = self.residual(x, self.norm1, lambda h: self.attn(h, cache=sub_cache(cache, "self"), pos=pos, mask=mask))
        if self.cross is not None:
            x = self.residual(x, self.norm_cross, lambda h: self.cross(h, source, cache=sub_cache(cache, "cross")))
        return self.residual(x, self.norm2, self.mlp)

    def residual(self, x, norm, sublayer):  # (B, T, C) -> (B, T, C)
        """x plus the sublayer's output. Pre-norm normalises the sublayer's input and leaves the residual stream
        alone, which trains deep stacks stably (GPT-2); post-norm normalises the sum (the original Transformer)."""
        if self.post_norm:
            return norm(x + self.drop(sublayer(x)))
        return x + self.drop(sublayer(norm(x)))


class EncoderLayer(Layer):
    """The module of a ``transformer_encoder`` block: one bidirectional Layer on its own (and the only layer to
    which ``kiln.nn.fuse`` gives its attention and add+norm kernels). It keeps the parameter order this block
    has always had. Padded steps of its input (``mask``) get no attention."""

    takes_mask = True

    def __init__(self, cfg: LayerConfig) -> None:
        super().__init__(cfg)
        # This block has always listed its attention's parameters before its norms'. Parameter order is the
        # order in which gradient clipping sums and a checkpoint keys the optimizer's state, so it stays:
        # registering these again puts them after the attention.
        for name in ("norm1", "norm2", "mlp"):
            module = getattr(self, name)
            delattr(self, name)
            setattr(self, name, module)


def run_layers(layers: nn.ModuleList, norm: nn.LayerNorm, x, source=None, cache=None, pos=0):  # (B, T, C)
    """Pre-norm layers in turn, then the final LayerNorm such a stack needs (its layers never normalise the
    residual stream itself); while decoding, ``cache`` holds a dict per layer."""
    for i, layer in enumerate(layers):
        x = layer(x, source, sub_cache(cache, i), pos)
    return norm(x)


class CausalStack(nn.Module):
    """Causal layers and a final norm: a decoder-only (GPT) Transformer."""

    def __init__(self, layers: list[Layer], width: int, bias: bool, eps: float = 1e-5) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.norm = nn.LayerNorm(width, eps=eps, bias=bias)

    def forward(self, x):  # (B, T, C) -> (B, T, C)
        return run_layers(self.layers, self.norm, x)

    def decode(self, x, cache: dict, pos: int):  # new steps (B, t, C), after pos cached ones -> (B, t, C)
        return run_layers(self.layers, self.norm, x, cache=cache, pos=pos)


class EncoderDecoder(nn.Module):
    """A sample is one row: the source (``source_steps`` of it, padded) followed by the target so far
    (``<bos>`` and the target). The encoder reads the source with bidirectional self-attention; the decoder
    reads the target with causal self-attention and cross-attention to the encoded source. Only the target's
    steps come out, one vector per step, for ``lm_head``."""

    def __init__(self, source_steps: int, encoder: list[Layer], decoder: list[Layer], width: int, bias: bool) -> None:
        super().__init__()
        self.source_steps = source_steps
        self.encoder = nn.ModuleList(encoder)
        self.encoder_norm = nn.LayerNorm(width, bias=bias)
        self.decoder = nn.ModuleList(decoder)
        self.decoder_norm = nn.LayerNorm(width, bias=bias)

    def encode(self, src):  # (B, S, C) -> (B, S, C)
        return run_layers(self.encoder, self.encoder_norm, src)

    def forward(self, x):  # (B, S + T, C) -> (B, T, C)
        memory = self.encode(x[:, : self.source_steps])
        return run_layers(self.decoder, self.decoder_norm, x[:, self.source_steps:], memory)

    def decode(self, x, cache: dict, pos: int):
        """The first call gets the source and the target's first steps; later ones only new target steps."""
        if "memory" not in cache:
            cache["memory"] = self.encode(x[:, : self.source_steps])
            x = x[:, self.source_steps:]
            pos = 0
        else:
            pos -= self.source_steps
        return run_layers(self.decoder, self.decoder_norm, x, cache["memory"], cache, pos)


def check_width(block: str, width: int, heads: int) -> None:
    if width % heads:
        raise ConfigError(f"{block}.heads: the model width {width} (features of the input) must divide by "
                          f"heads={heads}; change heads or the width of the block before it")


@BLOCKS.register("transformer_encoder")
class TransformerEncoder(BlockSpec):
    """One encoder layer: multi-head self-attention and a feed-forward network, each with a residual.
    The model width is the input's feature count; it must divide by ``heads``."""

    type: Literal["transformer_encoder"] = "transformer_encoder"
    heads: PositiveInt
    ff: PositiveInt  # feed-forward hidden width
    norm: Literal["post", "pre"] = "post"
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    activation: Literal["relu", "gelu"] = "relu"
    # Features per head; default: the model width / heads. `kiln compress --prune` sets it when it removes heads
    # (fewer heads of the same width: the attention is then narrower than the model).
    head_dim: PositiveInt | None = None

    example: ClassVar[dict] = {"heads": 2, "ff": 12, "norm": "pre"}

    def build(self, in_shape: Shape) -> Built:
        expect("transformer_encoder", in_shape, ("sequence",), SEQUENCE_FIX)
        t, c = in_shape
        if self.head_dim is None:
            check_width("transformer_encoder", c, self.heads)
        cfg = LayerConfig(c, self.heads, self.ff, self.dropout, dropout_hidden=True, norm=self.norm,
                          activation=self.activation, init_std=None, head_dim=self.head_dim)
        a = self.heads * cfg.head_width
        macs = t * (4 * c * a + 2 * c * self.ff) + 2 * t * t * a  # projections, feed-forward, scores and mix
        return Built(EncoderLayer(cfg), (t, c), macs)


@BLOCKS.register("transformer_decoder")
class TransformerDecoder(BlockSpec):
    """A decoder-only (GPT) stack of pre-norm layers with causal self-attention, then a final layer norm.
    Each step sees only itself and earlier steps. ``position: rotary`` rotates queries and keys by position
    (use it instead of a positional_encoding block). ``activation: gelu_tanh`` and ``norm_eps`` exist for
    GPT-2's own settings (its gelu_new and layer_norm_epsilon; see ``kiln import hf-gpt2``)."""

    type: Literal["transformer_decoder"] = "transformer_decoder"
    layers: PositiveInt = 1
    heads: PositiveInt
    ff: PositiveInt | None = None  # feed-forward hidden width; default 4 x the model width
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    bias: bool = True  # biases in linear layers and layer norms
    position: Literal["none", "rotary"] = "none"
    activation: Literal["gelu", "gelu_tanh", "relu", "silu"] = "gelu"  # of the feed-forward's hidden units
    norm_eps: PositiveFloat = 1e-5  # of every LayerNorm

    example: ClassVar[dict] = {"layers": 2, "heads": 2, "position": "rotary"}

    def build(self, in_shape: Shape) -> Built:
        expect("transformer_decoder", in_shape, ("sequence",), "put token_embedding (and positional_encoding) first")
        t, c = in_shape
        check_width("transformer_decoder", c, self.heads)
        if self.position == "rotary" and (c // self.heads) % 2:
            raise ConfigError(f"transformer_decoder.position: rotary needs an even head width, not {c // self.heads}")
        ff = self.ff or 4 * c
        cfg = LayerConfig(c, self.heads, ff, self.dropout, bias=self.bias, activation=self.activation,
                          depth=self.layers, rotary_steps=t if self.position == "rotary" else 0,
                          norm_eps=self.norm_eps)
        layers = [Layer(cfg, causal=True) for _ in range(self.layers)]
        macs = self.layers * (t * (4 * c * c + 2 * c * ff) + t * t * c)  # causal: half of the 2*T*T*C scores+mix
        return Built(CausalStack(layers, c, self.bias, self.norm_eps), (t, c), macs)


@BLOCKS.register("encoder_decoder")
class EncoderDecoderSpec(BlockSpec):
    """Transformer encoder-decoder (pre-norm): the first ``source_steps`` steps are the source (set by a
    text_pairs data set), the rest the target; gives one vector per target step."""

    type: Literal["encoder_decoder"] = "encoder_decoder"
    heads: PositiveInt
    layers: PositiveInt = 2  # encoder layers
    decoder_layers: PositiveInt | None = None  # default: as many as the encoder
    ff: PositiveInt | None = None  # feed-forward hidden width; default 4 x the model width
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    bias: bool = True
    source_steps: PositiveInt | None = None

    example: ClassVar[dict] = {"heads": 2, "layers": 1, "source_steps": 5}
    example_input: ClassVar[Shape] = (9, 8)

    def build(self, in_shape: Shape) -> Built:
        expect("encoder_decoder", in_shape, ("sequence",), "put token_embedding and positional_encoding first")
        steps, c = in_shape
        check_width("encoder_decoder", c, self.heads)
        s = self.source_steps
        if s is None or s >= steps:
            raise ConfigError(f"encoder_decoder.source_steps ({s}) must be set (a text_pairs data set sets it) and "
                              f"below the input's {steps} steps")
        ff, n_dec = self.ff or 4 * c, self.decoder_layers or self.layers
        cfg = LayerConfig(c, self.heads, ff, self.dropout, bias=self.bias, depth=self.layers + n_dec)
        encoder = [Layer(cfg) for _ in range(self.layers)]
        decoder = [Layer(cfg, causal=True, cross=True) for _ in range(n_dec)]
        t = steps - s
        macs = self.layers * (s * (4 * c * c + 2 * c * ff) + 2 * s * s * c) \
            + n_dec * (t * (6 * c * c + 2 * c * ff) + t * t * c + 2 * t * s * c + 2 * s * c * c)
        return Built(EncoderDecoder(s, encoder, decoder, c, self.bias), (t, c), macs)
