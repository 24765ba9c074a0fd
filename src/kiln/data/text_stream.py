"""The ``text_stream`` kind: a language model's text too big for memory, as text files (shards) read as a stream.

It is the ``text`` kind (the same tokenizer file and windows, so generate, serve and export work on its runs)
with these differences:

- the tokenizer is fitted in one streaming pass over the training shards (``char``: the characters they hold;
  ``byte`` needs no fitting; ``bpe`` only through ``data.tokenizer_from``, an existing run's tokenizer), which
  also counts each shard's tokens;
- validation and test are whole shards (the last ``data.test_shards`` in sorted order are the test split, the
  ``data.val_shards`` before them validation), read into memory as token ids; so is the start of the training
  text, ``data.estimate_tokens`` tokens, from which the train-loss estimates draw their random windows;
- training never holds the training text: each shard is cut into consecutive windows of ``data.context + 1``
  tokens (a window and its targets, one token of overlap), and the ``stream`` plan draws batches of windows
  through :func:`kiln.data.shards.stream_rows` (shuffled shard order and blocks of ``data.shuffle_windows``
  windows, per pass over the data; a new pass begins where the last ends, with its own order).
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
import torch
from pydantic import Field

from kiln.data.kind import DataSpec
from kiln.data.shards import list_shards, read_bytes, reader_shards, stream_rows
from kiln.data.splits import Splits
from kiln.data.table_stream import StreamBatch, rebatch
from kiln.data.text import TEXT_SUFFIXES, Text, TextData
from kiln.errors import ConfigError, DataError
from kiln.registry import KINDS

SEPARATOR = "\n\n"  # between shards joined into one split (as the text kind joins a folder's files)


class TextStreamData(TextData):
    dataset: Literal["text_stream"] = "text_stream"
    val_shards: int = Field(default=1, ge=0)
    test_shards: int = Field(default=1, ge=1)
    shuffle_windows: int = Field(default=4096, ge=1)  # windows per shuffled block
    estimate_tokens: int = Field(default=1_000_000, ge=0)  # training tokens held for the train-loss estimates
    workers: int = Field(default=1, ge=1, le=64)  # reader threads a training process streams with


@KINDS.register("text_stream")
class TextStream(Text):
    Config = TextStreamData
    streams: ClassVar[bool] = True

    def __init__(self, cfg: TextStreamData, seed: int, run_path: Path | None = None) -> None:
        if cfg.val_fraction != DataSpec.model_fields["val_fraction"].default:
            raise ConfigError("data.val_fraction: a streamed text holds out whole files; set data.val_shards")
        if run_path is None and cfg.tokenizer == "bpe" and cfg.tokenizer_from is None:
            raise ConfigError("data.tokenizer: bpe is trained on the whole text, which a streamed text never holds; "
                              "use char or byte, or data.tokenizer_from a run whose BPE tokenizer to reuse")
        self._counts: dict[int, int] = {}
        super().__init__(cfg, seed, run_path)

    # ---- shards ---------------------------------------------------------------------------------------

    @cached_property
    def shards(self) -> tuple[object, list[str]]:
        fs, paths = list_shards(self.cfg.path or "", tuple(s for s in TEXT_SUFFIXES if s))
        held = self.cfg.val_shards + self.cfg.test_shards
        if len(paths) <= held:
            raise DataError(f"data.path {self.cfg.path!r}: {len(paths)} text files leave none for training after "
                            f"{self.cfg.val_shards} validation and {self.cfg.test_shards} test files")
        return fs, paths

    @property
    def parts(self) -> dict[str, list[int]]:
        n, v, t = len(self.shards[1]), self.cfg.val_shards, self.cfg.test_shards
        return {"train": list(range(n - v - t)), "val": list(range(n - v - t, n - t)), "test": list(range(n - t, n))}

    def read(self, index: int) -> str:
        fs, paths = self.shards
        try:
            return read_bytes(fs, paths[index]).decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"shard {paths[index]}: not UTF-8 text ({e})") from None

    def ids(self, text: str) -> np.ndarray:
        tok = self.tokenizer
        if tok.kind == "char":  # vectorised: the vocabulary is sorted by code point
            codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
            vocab = np.frombuffer(tok.chars.encode("utf-32-le"), dtype=np.uint32)
            ids = np.searchsorted(vocab, codes)
            bad = (ids >= len(vocab)) | (vocab[np.minimum(ids, len(vocab) - 1)] != codes)
            if bad.any():
                tok.encode(text[int(np.argmax(bad))])  # raises, naming the character
            return ids.astype(np.int64)
        return np.asarray(tok.encode(text), dtype=np.int64)

    def fit_text(self) -> str:
        """One pass over the training shards: the characters they hold (what a char tokenizer is fitted on) and
        each shard's token count (for char and byte tokenizers, known without the tokenizer)."""
        chars: set[str] = set()
        for i in self.parts["train"]:
            text = self.read(i)
            chars.update(text)
            if self.cfg.tokenizer in ("char", "byte"):
                self._counts[i] = len(text) if self.cfg.tokenizer == "char" else len(text.encode("utf-8"))
        return "".join(sorted(chars))

    def tokens(self, index: int) -> int:
        if index not in self._counts:
            self._counts[index] = len(self.ids(self.read(index)))
        return self._counts[index]

    def windows(self, index: int) -> int:
        return max((self.tokens(index) - 1) // self.cfg.context, 0)

    def _read_windows(self, index: int, skip: int):
        t = self.cfg.context
        ids = self.ids(self.read(index))
        n = max((len(ids) - 1) // t, 0)
        starts = np.arange(skip, n) * t
        window = ids[starts[:, None] + np.arange(t + 1)]  # (n - skip, T + 1)
        yield window[:, :-1], window[:, 1:]

    # ---- splits ---------------------------------------------------------------------------------------

    def split_ids(self, split: str, limit: int | None = None) -> torch.Tensor:
        parts, held = [], 0
        sep = self.ids(SEPARATOR) if self.tokenizer.kind != "char" or set(SEPARATOR) <= set(self.tokenizer.chars) \
            else np.zeros(0, np.int64)
        for i in self.parts[split]:
            if limit is not None and held >= limit:
                break
            ids = self.ids(self.read(i))
            parts += [sep, ids] if parts else [ids]
            held += len(ids)
        ids = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        return torch.from_numpy(ids[:limit] if limit is not None else ids)

    def load(self, progress=None) -> Splits:
        need = self.cfg.context + 1
        train = self.split_ids("train", self.cfg.estimate_tokens)
        val, test = self.split_ids("val"), self.split_ids("test")
        if sum(self.windows(i) for i in self.parts["train"]) == 0:
            raise DataError(f"data.path {self.cfg.path!r}: no training file holds data.context + 1 = {need} tokens")
        if len(train) < need:  # the estimates need one window
            train = torch.cat([train, train.new_zeros(need - len(train))]) if len(train) else train.new_zeros(need)
        for name, ids in (("validation", val), ("test", test)):
            if 0 < len(ids) < need:
                raise DataError(f"the {name} files hold {len(ids)} tokens; they need at least data.context + 1 = "
                                f"{need}. Lower data.context or give more text")
        empty = torch.empty(0, dtype=torch.int64)
        return Splits(train, empty, val, empty, test, empty, self.checksums())

    def checksums(self) -> dict[str, str]:
        return {Path(p).name: f"{self.tokens(i)} tokens" for i, p in enumerate(self.shards[1])
                if i in self._counts}

    def report(self) -> list[str]:
        files = {k: len(v) for k, v in self.parts.items()}
        return [f"text {self.cfg.path}: {files['train']} training, {files['val']} validation, {files['test']} test "
                f"files streamed, {self.tokenizer.kind} tokenizer with {self.tokenizer.vocab_size:,} tokens"]

    # ---- the stream -----------------------------------------------------------------------------------

    def stream_blocks(self, *, seed: int, epoch: int, start: int, rank: int = 0, world_size: int = 1,
                      worker: int = 0, workers: int = 1):
        owned = reader_shards(self.parts["train"], rank, world_size, worker, workers)
        counts = {i: self.windows(i) for i in owned}
        return stream_rows(self._read_windows, counts, owned, seed=seed, epoch=epoch, reader=rank * workers + worker,
                           block_rows=self.cfg.shuffle_windows, start=start)

    def stream(self, *, batch_size: int, **where):
        return rebatch(self.stream_blocks(**where), batch_size)

    @property
    def workers(self) -> int:
        """Readers per training process (``data.workers``)."""
        return self.cfg.workers

    def reader_rows(self, rank: int = 0, world_size: int = 1, worker: int = 0, workers: int = 1) -> int:
        return sum(self.windows(i) for i in reader_shards(self.parts["train"], rank, world_size, worker, workers))

    def gather(self, x: torch.Tensor, y: torch.Tensor, idx) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(idx, StreamBatch):
            return idx.x, idx.y
        return super().gather(x, y, idx)
