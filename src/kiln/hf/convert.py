"""``kiln import hf-gpt2 DIR`` and ``kiln export RUN --format hf``: a Hugging Face GPT-2 folder to a kiln run, and a
kiln language-model run to such a folder.

A folder is what ``transformers`` writes with ``save_pretrained``: ``config.json``, ``model.safetensors`` (or
shards listed in ``model.safetensors.index.json``) and the tokenizer (``tokenizer.json``, or ``vocab.json`` +
``merges.txt``). Weights are read from safetensors only: a ``pytorch_model.bin`` is a pickle, which can run code
when it is loaded.

The imported run is a finished ``text`` run without training data: it generates, serves and exports like any
other (``kiln generate``, ``kiln serve``), and its ``config.yaml`` trains the same model on a text given as
``data.path``, encoded with the imported tokenizer (``data.tokenizer_from``).
"""

from __future__ import annotations

import hashlib
import json
import platform
import re
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save

from kiln.config import Config, load_config
from kiln.data.kind import find_data, open_kind
from kiln.data.tokenizers import FILE as KILN_TOKENIZER
from kiln.data.tokenizers import BPETokenizer
from kiln.errors import KilnError, RunDirError
from kiln.fsutil import atomic_write_bytes, atomic_write_text
from kiln.hf.gpt2 import GPT2, normalise_names, read_config, to_hf, to_kiln
from kiln.hf.tokenizer import read_tokenizer, special_id, write_tokenizer
from kiln.nn import build_model
from kiln.rundir import RunDir, open_run_dir
from kiln.training.checkpoint import load_weights, save_weights
from kiln.version import __version__

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
PICKLED = ("pytorch_model.bin", "pytorch_model.bin.index.json")


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise KilnError(f"{path.parent} has no {path.name}: give the folder `save_pretrained` wrote")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise KilnError(f"{path} is not valid JSON: {e}") from None


def _load(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for a corrupt header or body
        raise KilnError(f"{path} is not a readable safetensors file: {e}") from None


def read_weights(folder: Path) -> tuple[dict[str, torch.Tensor], str]:
    """Every tensor of the folder's safetensors file(s), and how to name them in errors."""
    if (folder / WEIGHTS).is_file():
        return _load(folder / WEIGHTS), str(folder / WEIGHTS)
    if (folder / INDEX).is_file():
        index = _read_json(folder / INDEX)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise KilnError(f"{folder / INDEX} has no weight_map of tensor names to files")
        tensors: dict[str, torch.Tensor] = {}
        for name in sorted(set(weight_map.values())):
            shard = folder / name
            if Path(name).name != name or not shard.is_file():
                raise KilnError(f"{folder / INDEX} lists {name!r}, which is not a file in {folder}")
            tensors.update(_load(shard))
        return tensors, f"{folder}'s safetensors shards"
    pickled = [name for name in PICKLED if (folder / name).is_file()]
    if pickled:
        raise KilnError(f"{folder} holds {pickled[0]}, a pickle (loading one can run code); kiln reads safetensors "
                        f"only. Convert it where you trust it: GPT2LMHeadModel.from_pretrained(DIR)"
                        ".save_pretrained(NEW_DIR, safe_serialization=True)")
    raise KilnError(f"{folder} has no {WEIGHTS} (nor {INDEX}): give the folder `save_pretrained` wrote")


def _run_name(folder: Path) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", folder.resolve().name).strip("._") or "gpt2"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def import_gpt2(folder: str | Path, out: str | Path | None = None, name: str | None = None,
                data: str | None = None) -> dict[str, Any]:
    """Make a kiln run in ``out`` (default ``runs/<folder name>``) from a Hugging Face GPT-2 folder. ``data`` (a
    text file or folder) becomes the run's ``data.path``: what `kiln evaluate` measures and a further training
    reads; without it the run generates but has no text to evaluate on.

    Everything is read and checked (config, every tensor's name and shape, the tokenizer) before anything is
    written. Returns {run, parameters, tokenizer (the file(s) it came from), notes}."""
    folder = Path(folder)
    if not folder.is_dir():
        raise KilnError(f"{folder} is not a directory; give the folder a GPT-2 checkpoint was saved in")
    raw = _read_json(folder / CONFIG)
    gpt2, notes = read_config(raw, str(folder / CONFIG))
    tokenizer, tokenizer_source = read_tokenizer(folder)
    if tokenizer.vocab_size > gpt2.vocab:
        raise KilnError(f"{folder}: the tokenizer has {tokenizer.vocab_size} tokens but config.json's vocab_size is "
                        f"{gpt2.vocab}; they belong to different models")
    if tokenizer.vocab_size < gpt2.vocab:
        notes.append(f"the tokenizer has {tokenizer.vocab_size} tokens, the model {gpt2.vocab} (padded); kiln never "
                     "decodes the ids beyond the tokenizer's")
    tensors, where = read_weights(folder)
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values()})
    if dtypes != ["float32"]:
        notes.append(f"weights stored as {', '.join(dtypes)} were converted to float32")
    if data is not None:
        find_data(data, None, "a text file or folder")  # a wrong --data is said now, not at the first evaluation
    run_dir = RunDir(out or Path("runs") / _run_name(folder))
    run_dir.check_new()
    cfg = load_config({
        "name": name or _run_name(folder),
        "data": {"dataset": "text", "path": data, "tokenizer": "bpe", "vocab_size": tokenizer.vocab_size,
                 "context": gpt2.positions, "tokenizer_from": str(run_dir.path.resolve())},
        "model": {"blocks": gpt2.blocks()},
    })
    types = [b.type for b in cfg.blocks]
    decoder, head = types.index("transformer_decoder"), types.index("lm_head")
    model = build_model(cfg.blocks, (gpt2.positions,))
    expected = {k: v.shape for k, v in model.state_dict().items()}
    state = to_kiln(normalise_names(tensors, where), gpt2, expected, decoder, head, where)
    model.load_state_dict(state, strict=True)
    del tensors, state

    run_dir.create()
    tokenizer.save(run_dir / KILN_TOKENIZER)
    atomic_write_text(run_dir / RunDir.CONFIG, cfg.to_yaml())
    save_weights(run_dir / RunDir.WEIGHTS, model, {"imported": "hf-gpt2"})
    source = {"format": "hf-gpt2", "folder": str(folder.resolve()), "tokenizer": tokenizer_source,
              "transformers_version": raw.get("transformers_version"), "notes": notes,
              "files": {p.name: _sha256(p) for p in sorted(folder.iterdir())
                        if p.is_file() and (p.suffix == ".safetensors" or p.name == CONFIG)}}
    parameters = sum(p.numel() for p in model.parameters())
    run_dir.write_json(RunDir.RESULTS, {"val": {}, "test": {}, "task": "lm", "threshold": 0.5, "imported": source})
    run_dir.write_json(RunDir.MANIFEST, {
        "kiln": __version__, "torch": torch.__version__, "python": platform.python_version(),
        "platform": platform.platform(), "seed": cfg.seed, "device": "cpu", "precision": "fp32",
        "parameters": parameters, "data_checksums": {}, "samples": {}, "command": " ".join(sys.argv),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "status": "completed",
        "imported": source,
    })
    return {"run": str(run_dir.path), "parameters": parameters, "tokenizer": tokenizer_source, "notes": notes}


def _gpt2_of(cfg: Config, vocab: int) -> tuple[GPT2, list[str]]:
    """The GPT-2 a run's blocks make, or an error naming the block that GPT-2 has no equivalent for."""
    specs = cfg.blocks
    types = [s.type for s in specs]
    shapes = (["token_embedding", "positional_encoding", "transformer_decoder", "lm_head"],
              ["token_embedding", "positional_encoding", "dropout", "transformer_decoder", "lm_head"])
    if types not in shapes:
        raise KilnError(f"a GPT-2 checkpoint is token_embedding, positional_encoding, [dropout,] transformer_decoder, "
                        f"lm_head; this run's blocks are {', '.join(types)}")
    emb, pos, dec, head = specs[0], specs[1], specs[-2], specs[-1]
    if dec.position != "none":
        raise KilnError(f"model.blocks.{len(specs) - 2} (transformer_decoder): position {dec.position}; GPT-2 has "
                        "learned (or fixed) positions added to the embedding, not rotary ones")
    if emb.padding is not None:
        raise KilnError("model.blocks.0 (token_embedding): a padding id; GPT-2 has none")
    notes = [] if dec.bias else ["the run has no biases (bias: false): GPT-2's are written as zeros"]
    if pos.kind == "sinusoidal":
        notes.append("fixed sinusoidal positions are written as GPT-2's learned table (wpe)")
    c = emb.width
    gpt2 = GPT2(vocab=vocab, positions=pos.max_steps or cfg.data.context, width=c, layers=dec.layers,
                heads=dec.heads, ff=dec.ff or 4 * c, eps=dec.norm_eps, activation=dec.activation, tied=head.tie,
                dropout=dec.dropout, embd_dropout=specs[2].rate if len(specs) == 5 else 0.0)
    return gpt2, notes


def export_gpt2(run_path: str | Path, out: str | Path | None = None) -> dict[str, Any]:
    """Write a language-model run as a Hugging Face GPT-2 folder (default ``<run>/hf``): config.json,
    model.safetensors and, for a BPE tokenizer, GPT-2's tokenizer files. ``transformers.GPT2LMHeadModel
    .from_pretrained(folder)`` loads it. Returns {path, files, tokenizer (bool), notes}."""
    run_dir = open_run_dir(run_path)
    cfg = load_config(run_dir / RunDir.CONFIG)
    kind = open_kind(cfg.data, cfg.seed, run_dir.path)
    if kind.task != "lm":
        raise KilnError(f"{run_dir.path} is a {kind.description} run; `--format hf` writes language models "
                        "(data.dataset: text) as GPT-2 checkpoints")
    vocab = cfg.blocks[0].vocab
    gpt2, notes = _gpt2_of(cfg, vocab)
    model = build_model(cfg.blocks, kind.input_shape)
    if not (run_dir / RunDir.WEIGHTS).is_file():
        raise RunDirError(f"{run_dir.path} has no {RunDir.WEIGHTS}: its training did not finish")
    load_weights(run_dir / RunDir.WEIGHTS, model)
    decoder, head = len(cfg.blocks) - 2, len(cfg.blocks) - 1
    state = dict(model.state_dict())
    state["blocks.1.table"] = model.blocks[1].table  # a sinusoidal table is a buffer the state dict leaves out
    tensors = to_hf(state, gpt2, decoder, head)
    folder = Path(out) if out is not None else run_dir / RunDir.HF_EXPORT
    if folder.exists() and not folder.is_dir():
        raise KilnError(f"--out {folder} is a file; give a folder for the checkpoint")
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = kind.tokenizer
    gpt_bpe = isinstance(tokenizer, BPETokenizer) and not tokenizer.specials
    eos = special_id(tokenizer) if gpt_bpe else None
    atomic_write_text(folder / CONFIG, json.dumps(gpt2.hf_config(eos, eos), indent=2) + "\n")
    atomic_write_bytes(folder / WEIGHTS, save(tensors, metadata={"format": "pt"}))
    files = [CONFIG, WEIGHTS]
    if gpt_bpe:
        files += write_tokenizer(tokenizer, folder, gpt2.positions)
    else:
        notes.append(f"a {tokenizer.kind} tokenizer has no GPT-2 equivalent: no tokenizer files were written; "
                     f"token ids are those of the run's {KILN_TOKENIZER}")
    return {"path": str(folder), "files": files, "tokenizer": gpt_bpe, "notes": notes}
