"""GPT-2's byte-level BPE tokenizer, read from a Hugging Face folder into kiln's BPE tokenizer and written back.

A folder holds it as ``tokenizer.json`` (the ``tokenizers`` library's file: model, pre-tokenizer, decoder, added
tokens) or as GPT-2's original pair ``vocab.json`` (token -> id) and ``merges.txt`` (the merges in order). The
pair says nothing of the rest, so it gets GPT-2's: byte-level pre-tokenization without a prefix space, the
byte-level decoder, and ``<|endoftext|>`` as a special token where the vocabulary has it.
"""

from __future__ import annotations

import json
from pathlib import Path

from kiln.data.tokenizers import BPETokenizer
from kiln.errors import KilnError
from kiln.fsutil import atomic_write_text

TOKENIZER = "tokenizer.json"
VOCAB = "vocab.json"
MERGES = "merges.txt"
TOKENIZER_CONFIG = "tokenizer_config.json"
ENDOFTEXT = "<|endoftext|>"  # GPT-2's one special token: begins, ends and pads


def _tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise KilnError("GPT-2's tokenizer needs the `tokenizers` library: pip install 'kiln[hf]'") from None
    return tokenizers


def read_tokenizer(folder: Path) -> tuple[BPETokenizer, str]:
    """The folder's tokenizer and the file(s) it came from."""
    tk = _tokenizers()
    if (folder / TOKENIZER).is_file():
        path = folder / TOKENIZER
        try:
            hf = tk.Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception for a file it cannot parse
            raise KilnError(f"{path} is not a tokenizer file of the `tokenizers` library: {e}") from None
        if type(hf.model).__name__ != "BPE":
            raise KilnError(f"{path} holds a {type(hf.model).__name__} tokenizer; GPT-2's is byte-level BPE")
        return BPETokenizer(hf), TOKENIZER
    missing = [name for name in (VOCAB, MERGES) if not (folder / name).is_file()]
    if missing:
        raise KilnError(f"{folder} has no {TOKENIZER} and no {' and no '.join(missing)}: give GPT-2's tokenizer as "
                        f"{TOKENIZER}, or as {VOCAB} + {MERGES}")
    try:
        model = tk.models.BPE.from_file(str(folder / VOCAB), str(folder / MERGES))
    except Exception as e:
        raise KilnError(f"{folder}: {VOCAB} + {MERGES} are not a BPE vocabulary and merges: {e}") from None
    hf = tk.Tokenizer(model)
    hf.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=_prefix_space(folder))
    hf.decoder = tk.decoders.ByteLevel()
    hf.post_processor = tk.processors.ByteLevel(trim_offsets=False)
    if ENDOFTEXT in hf.get_vocab():
        hf.add_special_tokens([tk.AddedToken(ENDOFTEXT, special=True)])
    return BPETokenizer(hf), f"{VOCAB} + {MERGES}"


def _prefix_space(folder: Path) -> bool:
    """``add_prefix_space`` of tokenizer_config.json, where there is one (GPT-2's is false)."""
    try:
        return bool(json.loads((folder / TOKENIZER_CONFIG).read_text(encoding="utf-8")).get("add_prefix_space"))
    except (OSError, ValueError, AttributeError):
        return False


def special_id(tokenizer: BPETokenizer) -> int | None:
    """The id of ``<|endoftext|>``, None when the vocabulary lacks it."""
    return tokenizer.hf.token_to_id(ENDOFTEXT)


def write_tokenizer(tokenizer: BPETokenizer, folder: Path, max_length: int) -> list[str]:
    """``tokenizer.json``, ``vocab.json`` + ``merges.txt`` and ``tokenizer_config.json`` in ``folder``: what
    ``transformers.AutoTokenizer.from_pretrained`` and GPT-2's tokenizer classes read. Returns the names."""
    state = json.loads(tokenizer.hf.to_str())
    atomic_write_text(folder / TOKENIZER, json.dumps(state, ensure_ascii=False) + "\n")
    model = state["model"]
    atomic_write_text(folder / VOCAB, json.dumps(model["vocab"], ensure_ascii=False) + "\n")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]  # tokenizers < 0.20 wrote "a b"
    atomic_write_text(folder / MERGES, "#version: 0.2\n" + "".join(m + "\n" for m in merges))
    config: dict = {"model_max_length": max_length, "add_prefix_space": _writes_prefix_space(state)}
    if special_id(tokenizer) is not None:
        config.update(tokenizer_class="GPT2Tokenizer", bos_token=ENDOFTEXT, eos_token=ENDOFTEXT, unk_token=ENDOFTEXT)
    else:  # GPT2Tokenizer would add <|endoftext|> as a new token; the generic class keeps the vocabulary as it is
        config.update(tokenizer_class="PreTrainedTokenizerFast")
    atomic_write_text(folder / TOKENIZER_CONFIG, json.dumps(config, indent=2) + "\n")
    return [TOKENIZER, VOCAB, MERGES, TOKENIZER_CONFIG]


def _writes_prefix_space(state: dict) -> bool:
    pre = state.get("pre_tokenizer") or {}
    return bool(pre.get("add_prefix_space", False))
