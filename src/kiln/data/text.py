"""Text data sets: ``text`` (a file or folder of text, for language models) and ``text_pairs`` (a TSV of
source<TAB>target lines, for sequence-to-sequence models).

Both fit a tokenizer (``data.tokenizer``: char, byte or bpe) on the text and save it in the run
directory, which is all that generation and prediction need afterwards.

- ``text``: the token stream's first ``1 - val_fraction`` trains, its tail is held out (validation, and the
  test split too: a text has no third part). A sample is a window of ``data.context`` tokens; its targets
  are the same window shifted by one token.
- ``text_pairs``: ``test_fraction`` of the pairs are held out for testing and ``val_fraction`` of the rest
  for validation. A sample is the source padded to the longest source, then ``<bos>`` and the target
  padded to the longest target + 1; the targets are the target tokens and ``<eos>``.
"""

from __future__ import annotations

import hashlib
import os
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from kiln.data.datasets import Dataset, Splits, holdout
from kiln.data.tokenizers import FILE, SEQ2SEQ_SPECIALS, Tokenizer, fit_tokenizer, load_tokenizer
from kiln.errors import ConfigError, DataError
from kiln.registry import DATASETS

TEXT_DATASETS = ("text", "text_pairs")  # trained step by step by kiln.train.text_loop
IGNORE = -100  # target id that the loss and the metrics skip (padding after <eos>)
TEXT_SUFFIXES = (".txt", ".md", ".text", "")


def find_text(path: str | None, root: str | None) -> Path:
    """``path`` as given when it exists, else under ``root``, else under $KILN_DATA."""
    if path is None:
        raise ConfigError("data.path: text data needs a file or folder (relative to data.root or $KILN_DATA)")
    given = Path(path).expanduser()
    candidates = [given] if given.is_absolute() else [
        *([Path(root).expanduser() / given] if root else []),
        given,
        *([Path(os.environ["KILN_DATA"]) / given] if os.environ.get("KILN_DATA") else []),
    ]
    for candidate in candidates:
        if candidate.exists():
            return candidate
    raise DataError(f"data.path {path!r}: not found (looked at {', '.join(map(str, candidates))}); give a text "
                    "file or folder relative to data.root, the current directory or $KILN_DATA")


def read_text(path: Path) -> str:
    """A file's text, or a folder's text files (by sorted name) joined by blank lines."""
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES) if path.is_dir() \
        else [path]
    if not files:
        raise DataError(f"{path} holds no text files ({', '.join(s or 'no suffix' for s in TEXT_SUFFIXES)})")
    try:
        return "\n\n".join(f.read_text(encoding="utf-8") for f in files)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e})") from None


class TokenData(Dataset):
    """What both text data sets share: a tokenizer fitted on the text, or reloaded from the run directory (the
    text itself is then read only when a split is asked for)."""

    class_names: list[str] = []
    specials: tuple[str, ...] = ()

    def __init__(self, cfg, seed: int, run_path: Path | None = None) -> None:
        super().__init__(cfg, seed)
        if run_path is not None:
            self.tokenizer, self.extra = load_tokenizer(run_path / FILE)
        else:
            self.tokenizer = fit_tokenizer(cfg.tokenizer, self.fit_text(), cfg.vocab_size, self.specials)
            self.extra = self.facts()

    @cached_property
    def source(self) -> Path:
        return find_text(self.cfg.path, self.cfg.root)

    @cached_property
    def text(self) -> str:
        return read_text(self.source)

    def fit_text(self) -> str:
        return self.text

    def facts(self) -> dict[str, Any]:
        """What the data decided beyond the tokenizer, saved with it."""
        return {}

    def block_fields(self) -> dict[str, dict[str, Any]]:
        vocab = {"vocab": self.tokenizer.vocab_size}
        return {"token_embedding": vocab, "lm_head": vocab}

    def to_input(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def save(self, run_path: Path) -> None:
        self.tokenizer.save(run_path / FILE, self.extra)

    def checksums(self) -> dict[str, str]:
        return {self.source.name: hashlib.sha256(self.text.encode("utf-8")).hexdigest()}


@DATASETS.register("text")
class Text(TokenData):
    task = "lm"

    @property
    def input_shape(self) -> tuple[int, ...]:  # type: ignore[override]
        return (self.cfg.context,)

    def load(self, progress=None) -> Splits:
        ids = torch.tensor(self.tokenizer.encode(self.text), dtype=torch.int64)
        n_train = int(len(ids) * (1.0 - self.cfg.val_fraction))
        train, val = ids[:n_train], ids[n_train:]
        need = self.cfg.context + 1  # one window and its shifted targets
        if len(train) < need or 0 < len(val) < need:
            raise DataError(f"{self.source}: {len(train)} training and {len(val)} validation tokens; each part needs at "
                            f"least data.context + 1 = {need}. Lower data.context or give more text")
        empty = torch.empty(0, dtype=torch.int64)
        return Splits(train, empty, val, empty, val, empty, self.checksums())

    def report(self) -> list[str]:
        return [f"text {self.source}: {len(self.text):,} characters, {self.tokenizer.kind} tokenizer with "
                f"{self.tokenizer.vocab_size:,} tokens"]


@DATASETS.register("text_pairs")
class TextPairs(TokenData):
    task = "seq2seq"
    specials = SEQ2SEQ_SPECIALS

    @cached_property
    def pairs(self) -> list[tuple[str, str]]:
        pairs = []
        for n, line in enumerate(self.text.splitlines(), 1):
            if not line.strip():
                continue
            source, tab, target = line.partition("\t")
            if not tab:
                raise DataError(f"{self.source}:{n}: expected source<TAB>target, found no tab")
            pairs.append((source, target))
        if len(pairs) < 3:
            raise DataError(f"{self.source} has {len(pairs)} source/target pairs; a split needs at least 3")
        return pairs

    def facts(self) -> dict[str, Any]:
        return {"source_steps": max(len(self.tokenizer.encode(s)) for s, _ in self.pairs),
                "target_steps": max(len(self.tokenizer.encode(t)) for _, t in self.pairs) + 1}

    def fit_text(self) -> str:
        return self.text.replace("\t", "\n")

    @property
    def source_steps(self) -> int:
        return self.extra["source_steps"]

    @property
    def target_steps(self) -> int:
        return self.extra["target_steps"]

    @property
    def input_shape(self) -> tuple[int, ...]:  # type: ignore[override]
        return (self.source_steps + self.target_steps,)

    def block_fields(self) -> dict[str, dict[str, Any]]:
        return {**super().block_fields(), "encoder_decoder": {"source_steps": self.source_steps}}

    def encode_sources(self, sources: list[str]) -> torch.Tensor:
        """Source texts to padded ids (N, source_steps)."""
        pad = self.tokenizer.special("<pad>")
        out = torch.full((len(sources), self.source_steps), pad, dtype=torch.int64)
        for i, source in enumerate(sources):
            ids = self.tokenizer.encode(source)
            if len(ids) > self.source_steps:
                raise DataError(f"source {source[:40]!r} has {len(ids)} tokens; this model reads at most "
                                f"{self.source_steps} (the longest source it was trained on)")
            out[i, : len(ids)] = torch.tensor(ids, dtype=torch.int64)
        return out

    def encode_pairs(self, pairs: list[tuple[str, str]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Model input (N, source_steps + target_steps) and targets (N, target_steps)."""
        tok, t = self.tokenizer, self.target_steps
        bos, eos, pad = tok.special("<bos>"), tok.special("<eos>"), tok.special("<pad>")
        x_tgt = torch.full((len(pairs), t), pad, dtype=torch.int64)
        y = torch.full((len(pairs), t), IGNORE, dtype=torch.int64)
        for i, (_, target) in enumerate(pairs):
            ids = tok.encode(target)
            x_tgt[i, : len(ids) + 1] = torch.tensor([bos, *ids])
            y[i, : len(ids) + 1] = torch.tensor([*ids, eos])
        return torch.cat([self.encode_sources([s for s, _ in pairs]), x_tgt], dim=1), y

    def load(self, progress=None) -> Splits:
        cfg = self.cfg
        rest, test = holdout(len(self.pairs), cfg.test_fraction, self.seed)
        part, val = holdout(len(rest), cfg.val_fraction, self.seed + 1)
        splits = [[self.pairs[i] for i in rest[part]], [self.pairs[i] for i in rest[val]],
                  [self.pairs[i] for i in test]]
        tensors = [t for pairs in splits for t in self.encode_pairs(pairs)]
        return Splits(*tensors, self.checksums())

    def report(self) -> list[str]:
        return [f"pairs {self.source}: {len(self.pairs):,} source/target pairs, {self.tokenizer.kind} tokenizer with "
                f"{self.tokenizer.vocab_size:,} tokens, sources up to {self.source_steps} and targets up to "
                f"{self.target_steps - 1} tokens"]
