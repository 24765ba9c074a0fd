"""GPT-2 as Hugging Face ``transformers`` saves it (``GPT2LMHeadModel``) and as kiln blocks: the config fields
of one and the other, and the names and layout of the weights.

GPT-2 is kiln's language-model stack with these settings::

    token_embedding (wte) -> positional_encoding: learned (wpe) [-> dropout: embd_pdrop]
    -> transformer_decoder (pre-norm layers h.*, final ln_f; activation gelu_new = gelu_tanh,
       layer_norm_epsilon = norm_eps, attention scaled by 1/sqrt(head width))
    -> lm_head (tied to wte unless tie_word_embeddings is false)

Its linear layers are ``Conv1D`` modules whose weights are stored (in, out), the transpose of ``nn.Linear``'s
(out, in); its attention projects queries, keys and values in one matrix (``c_attn``: q, k, v side by side), as
kiln's does (``qkv``), with the heads in the same order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from kiln.errors import KilnError

# transformers' activation names -> transformer_decoder.activation, and back
ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": None, "gelu": "gelu",
               "relu": "relu", "silu": "silu", "swish": "silu"}
HF_ACTIVATIONS = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu", "silu": "silu"}
# Old checkpoints hold the attention's causal mask as tensors; they are rebuilt, not learned.
BUFFERS = (".attn.bias", ".attn.masked_bias")
PREFIX = "transformer."
HEAD = "lm_head.weight"


@dataclass(frozen=True)
class GPT2:
    """The sizes and settings of a GPT-2 model, in both vocabularies."""

    vocab: int
    positions: int  # n_positions: the longest context
    width: int  # n_embd
    layers: int  # n_layer
    heads: int  # n_head
    ff: int  # n_inner, default 4 x width
    eps: float  # layer_norm_epsilon
    activation: str  # kiln's name
    tied: bool  # lm_head shares wte
    dropout: float  # resid_pdrop (and attn_pdrop: kiln has one rate for both)
    embd_dropout: float  # embd_pdrop

    def blocks(self) -> list[dict[str, Any]]:
        """kiln's model.blocks for this GPT-2."""
        blocks: list[dict[str, Any]] = [
            {"type": "token_embedding", "width": self.width, "vocab": self.vocab},
            {"type": "positional_encoding", "kind": "learned", "max_steps": self.positions},
        ]
        if self.embd_dropout:
            blocks.append({"type": "dropout", "rate": self.embd_dropout})
        blocks += [
            {"type": "transformer_decoder", "layers": self.layers, "heads": self.heads, "ff": self.ff,
             "dropout": self.dropout, "bias": True, "activation": self.activation, "norm_eps": self.eps},
            {"type": "lm_head", "vocab": self.vocab, "tie": self.tied},
        ]
        return blocks

    def hf_config(self, bos: int | None, eos: int | None) -> dict[str, Any]:
        """config.json for ``transformers.GPT2LMHeadModel``."""
        return {
            "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
            "vocab_size": self.vocab, "n_positions": self.positions, "n_embd": self.width,
            "n_layer": self.layers, "n_head": self.heads, "n_inner": None if self.ff == 4 * self.width else self.ff,
            "activation_function": HF_ACTIVATIONS[self.activation], "layer_norm_epsilon": self.eps,
            "resid_pdrop": self.dropout, "attn_pdrop": self.dropout, "embd_pdrop": self.embd_dropout,
            "initializer_range": 0.02, "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False, "add_cross_attention": False, "tie_word_embeddings": self.tied,
            "bos_token_id": bos, "eos_token_id": eos, "use_cache": True, "dtype": "float32",
        }


def _positive_int(cfg: dict, field: str, where: str, default: int | None = None) -> int:
    value = cfg.get(field, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise KilnError(f"{where}: {field} must be a positive integer, not {value!r}")
    return value


def _rate(cfg: dict, field: str, where: str) -> float:
    value = cfg.get(field, 0.1)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value < 1.0:
        raise KilnError(f"{where}: {field} must be a dropout rate in [0, 1), not {value!r}")
    return float(value)


def read_config(cfg: Any, where: str) -> tuple[GPT2, list[str]]:
    """A GPT-2 from config.json's fields (``where`` names the file in errors), and notes on what kiln changes."""
    if not isinstance(cfg, dict):
        raise KilnError(f"{where}: expected a JSON object of model settings")
    model_type = cfg.get("model_type")
    if model_type != "gpt2":
        arch = ", ".join(cfg.get("architectures") or []) or "no architectures listed"
        raise KilnError(f"{where}: model_type {model_type!r} ({arch}) is not GPT-2; kiln imports GPT-2-family "
                        "checkpoints only (model_type gpt2, GPT2LMHeadModel)")
    refused = [(cfg.get("scale_attn_weights", True) is not True,
                "scale_attn_weights false (attention without the 1/sqrt(head width) scale)"),
               (bool(cfg.get("scale_attn_by_inverse_layer_idx", False)),
                "scale_attn_by_inverse_layer_idx true (attention scaled by 1/layer)"),
               (bool(cfg.get("add_cross_attention", False)), "add_cross_attention true (an encoder-decoder GPT-2)")]
    for bad, what in refused:
        if bad:
            raise KilnError(f"{where}: {what} is not supported by kiln's transformer_decoder")
    act = cfg.get("activation_function", "gelu_new")
    if ACTIVATIONS.get(act) is None:
        known = ", ".join(k for k, v in ACTIVATIONS.items() if v)
        raise KilnError(f"{where}: activation_function {act!r} is not supported (kiln reads {known})")
    width, heads = _positive_int(cfg, "n_embd", where), _positive_int(cfg, "n_head", where)
    if width % heads:
        raise KilnError(f"{where}: n_embd {width} does not divide by n_head {heads}")
    ff = cfg.get("n_inner")
    eps = cfg.get("layer_norm_epsilon", 1e-5)
    if isinstance(eps, bool) or not isinstance(eps, int | float) or not eps > 0:
        raise KilnError(f"{where}: layer_norm_epsilon must be a positive number, not {eps!r}")
    notes = []
    resid, attn = _rate(cfg, "resid_pdrop", where), _rate(cfg, "attn_pdrop", where)
    if resid != attn:
        notes.append(f"attn_pdrop {attn} differs from resid_pdrop {resid}: kiln's transformer_decoder has one "
                     f"dropout rate for both, set to {resid}")
    model = GPT2(vocab=_positive_int(cfg, "vocab_size", where), positions=_positive_int(cfg, "n_positions", where),
                 width=width, layers=_positive_int(cfg, "n_layer", where), heads=heads,
                 ff=4 * width if ff is None else _positive_int(cfg, "n_inner", where), eps=float(eps),
                 activation=ACTIVATIONS[act], tied=bool(cfg.get("tie_word_embeddings", True)), dropout=resid,
                 embd_dropout=_rate(cfg, "embd_pdrop", where))
    return model, notes


def weight_names(model: GPT2, decoder: int, head: int) -> list[tuple[str, str, bool]]:
    """(kiln name, GPT-2 name, transposed) for every weight; ``decoder`` and ``head`` are the indices of the
    transformer_decoder and lm_head blocks. The tied head's weight is wte's (it appears once in GPT-2's file)."""
    d = f"blocks.{decoder}"
    names = [("blocks.0.weight", PREFIX + "wte.weight", False), ("blocks.1.table", PREFIX + "wpe.weight", False)]
    for i in range(model.layers):
        k, h = f"{d}.layers.{i}", f"{PREFIX}h.{i}"
        for kiln, hf, conv in (("norm1", "ln_1", False), ("attn.qkv", "attn.c_attn", True),
                               ("attn.proj", "attn.c_proj", True), ("norm2", "ln_2", False),
                               ("mlp.up", "mlp.c_fc", True), ("mlp.down", "mlp.c_proj", True)):
            names += [(f"{k}.{kiln}.weight", f"{h}.{hf}.weight", conv), (f"{k}.{kiln}.bias", f"{h}.{hf}.bias", False)]
    names += [(f"{d}.norm.weight", PREFIX + "ln_f.weight", False), (f"{d}.norm.bias", PREFIX + "ln_f.bias", False)]
    names.append((f"blocks.{head}.proj.weight", PREFIX + "wte.weight" if model.tied else HEAD, False))
    return names


def normalise_names(tensors: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """GPT-2's tensors keyed as GPT2LMHeadModel names them (``transformer.h.0...``, ``lm_head.weight``), without
    the rebuilt attention masks; a GPT2Model saves its names without ``transformer.``. Tensors of other heads
    (a classifier's ``score``) are refused."""
    bare = not any(name.startswith(PREFIX) for name in tensors)
    out = {}
    for name, tensor in tensors.items():
        if name.endswith(BUFFERS):
            continue
        key = name if name == HEAD or not bare else PREFIX + name
        out[key] = tensor
    unknown = sorted(k for k in out if not (k.startswith(PREFIX) or k == HEAD))
    if unknown:
        raise KilnError(f"{where}: tensors {', '.join(unknown[:4])} are not GPT2LMHeadModel's: kiln imports GPT-2 "
                        "language models, not other heads")
    return out


def to_kiln(tensors: dict[str, torch.Tensor], model: GPT2, expected: dict[str, torch.Size], decoder: int, head: int,
            where: str) -> dict[str, torch.Tensor]:
    """The kiln state dict (float32) from GPT-2's tensors; ``expected`` holds the kiln model's shapes. A missing,
    left-over or misshapen tensor is an error that names it."""
    state: dict[str, torch.Tensor] = {}
    used = set()
    for kiln, hf, conv in weight_names(model, decoder, head):
        if hf not in tensors:
            raise KilnError(f"{where}: no tensor {hf}, which a GPT-2 with config.json's n_layer {model.layers} needs"
                            + (" (tie_word_embeddings is false)" if hf == HEAD else ""))
        t = tensors[hf].t() if conv else tensors[hf]
        if t.shape != expected[kiln]:
            need = tuple(expected[kiln])[::-1] if conv else tuple(expected[kiln])
            raise KilnError(f"{where}: {hf} has shape {tuple(tensors[hf].shape)}, but config.json's sizes (n_embd "
                            f"{model.width}, n_inner {model.ff}, vocab_size {model.vocab}, n_positions "
                            f"{model.positions}) need {need}")
        state[kiln] = t.to(torch.float32).contiguous()
        used.add(hf)
    extra = sorted(set(tensors) - used - ({HEAD} if model.tied else set()))
    if extra:
        raise KilnError(f"{where}: tensors {', '.join(extra[:4])} do not belong to a GPT-2 with config.json's "
                        f"n_layer {model.layers}")
    return state


def to_hf(state: dict[str, torch.Tensor], model: GPT2, decoder: int, head: int) -> dict[str, torch.Tensor]:
    """GPT-2's tensors from a kiln state dict. A stack built with ``bias: false`` has no biases: GPT-2's are then
    zeros (one per output of the layer or feature of the norm), which compute the same."""
    out = {}
    for kiln, hf, conv in weight_names(model, decoder, head):
        if hf in out:
            continue
        if kiln.endswith(".bias") and kiln not in state:
            t = torch.zeros(state[kiln.removesuffix("bias") + "weight"].shape[0])
        else:
            t = state[kiln].detach().to("cpu", torch.float32)
        out[hf] = (t.t() if conv else t).contiguous().clone()
    return out
