"""The ``text`` kind of data (a file or folder of text, for language models), and ``TokenKind``, what it shares
with ``text_pairs`` (:mod:`kiln.data.text_pairs`).

Both fit a tokenizer (``data.tokenizer``: char, byte or bpe) on the text and save it in the run directory,
which is all that generation and prediction need afterwards. Both train step by step on random batches.

``text``: the token stream's first ``1 - val_fraction`` trains, its tail is held out (validation, and the test
split too: a text has no third part). A sample is a window of ``data.context`` tokens at any position; its
targets are the same window shifted by one token.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import Field, PositiveInt

from kiln.data.kind import DataKind, DataSpec, find_data
from kiln.data.requests import objects
from kiln.data.splits import Splits
from kiln.data.text_inputs import PromptInputs
from kiln.data.tokenizers import FILE, fit_tokenizer, load_tokenizer
from kiln.errors import DataError, KilnError
from kiln.nn.base import BlockSpec
from kiln.nn.generate import Sampling, check_left_to_right, generate_ids
from kiln.registry import KINDS
from kiln.rundir import RunDir

IGNORE = -100  # target id that the loss and the metrics skip (padding after <eos>)
TEXT_SUFFIXES = (".txt", ".md", ".text", "")


class TokenSpec(DataSpec):
    # A text file or folder (text), or a TSV of source<TAB>target lines (text_pairs). Needed to train and
    # evaluate; a run imported without its text (`kiln import hf-gpt2`) has none and still generates.
    path: str | None = Field(default=None, max_length=4096)
    tokenizer: Literal["char", "byte", "bpe"] = "char"  # bpe: byte-level BPE trained on the data (kiln[text])
    vocab_size: PositiveInt = 1024  # bpe only: tokens including the 256 bytes
    # A run directory (or its tokenizer.json) whose tokenizer encodes the text instead of one fitted on it:
    # fine-tuning a run's weights (an imported GPT-2's) needs that run's token ids.
    tokenizer_from: str | None = Field(default=None, max_length=4096)


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


def text_lines(paths: list[str | Path]) -> list[str]:
    """The non-empty lines of UTF-8 text files, in order (what `kiln predict` reads for text runs)."""
    lines = []
    for f in paths:
        try:
            lines += [line for line in Path(f).read_text(encoding="utf-8").splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise KilnError(f"{f}: cannot read it as UTF-8 text ({e})") from None
    return lines


class TokenKind(DataKind):
    """Token ids, with a tokenizer fitted on the text or reloaded from the run directory (the text itself is then
    read only when a split is asked for)."""

    run_files: ClassVar[tuple[str, ...]] = (FILE,)
    trains_by_steps: ClassVar[bool] = True
    decodes: ClassVar[bool] = True
    input_name: ClassVar[str] = "tokens"
    specials: ClassVar[tuple[str, ...]] = ()
    class_names: ClassVar[list[str]] = []

    def __init__(self, cfg: TokenSpec, seed: int, run_path: Path | None = None) -> None:
        super().__init__(cfg, seed)
        if run_path is not None:
            self.tokenizer, self.extra = load_tokenizer(RunDir(run_path) / FILE)
        elif cfg.tokenizer_from is not None:
            self.tokenizer = self.reused_tokenizer(Path(cfg.tokenizer_from).expanduser())
            self.extra = self.facts()
        else:
            self.tokenizer = fit_tokenizer(cfg.tokenizer, self.fit_text(), cfg.vocab_size, self.specials)
            self.extra = self.facts()

    def reused_tokenizer(self, path: Path):
        """``data.tokenizer_from``'s tokenizer, which must be of the kind ``data.tokenizer`` names and have this data
        set's special tokens."""
        file = path / FILE if path.is_dir() else path
        if not file.is_file():
            raise DataError(f"data.tokenizer_from {str(path)!r}: no {file} (give a run directory that holds a "
                            f"{FILE}, or that file)")
        tokenizer, _ = load_tokenizer(file)
        if tokenizer.kind != self.cfg.tokenizer:
            raise DataError(f"data.tokenizer_from {str(path)!r} holds a {tokenizer.kind} tokenizer but data.tokenizer "
                            f"is {self.cfg.tokenizer}; set data.tokenizer: {tokenizer.kind}")
        if tokenizer.specials != list(self.specials):
            raise DataError(f"data.tokenizer_from {str(path)!r}: its special tokens {tokenizer.specials} are not the "
                            f"{list(self.specials)} a {self.name} data set needs")
        return tokenizer

    @cached_property
    def source(self) -> Path:
        return find_data(self.cfg.path, self.cfg.root, "a text file or folder")

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

    def check_model(self, specs: list[BlockSpec]) -> None:
        check_left_to_right(specs)

    def save(self, run_path: Path) -> None:
        self.tokenizer.save(run_path / FILE, self.extra)

    def checksums(self) -> dict[str, str]:
        return {self.source.name: hashlib.sha256(self.text.encode("utf-8")).hexdigest()}

    def to_input(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def as_stored(self, x: torch.Tensor) -> torch.Tensor:
        raise KilnError(f"predict takes images or table rows; a {self.description} run answers texts: {self.usage}")

    def random_inputs(self, n: int, gen: torch.Generator) -> torch.Tensor:
        return torch.randint(0, self.tokenizer.vocab_size, (n, *self.input_shape), generator=gen)


class TextData(TokenSpec):
    dataset: Literal["text"] = "text"
    context: PositiveInt = 256  # tokens a language model reads at once (its window)


@KINDS.register("text")
class Text(TokenKind):
    """A language model's text: it learns to predict each token from the ones before it."""

    Config = TextData
    description: ClassVar[str] = "language-model"
    usage: ClassVar[str] = "use `kiln generate RUN --prompt TEXT`, or Run.generate"
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
            raise DataError(f"{self.source}: {len(train)} training and {len(val)} validation tokens; each part needs "
                            f"at least data.context + 1 = {need}. Lower data.context or give more text")
        empty = torch.empty(0, dtype=torch.int64)
        return Splits(train, empty, val, empty, val, empty, self.checksums())

    def report(self) -> list[str]:
        return [f"text {self.source}: {len(self.text):,} characters, {self.tokenizer.kind} tokenizer with "
                f"{self.tokenizer.vocab_size:,} tokens"]

    # A stored split is one token stream; a sample is the window that starts at a position of it.

    def samples(self, x: torch.Tensor) -> int:
        return len(x) - self.cfg.context

    def gather(self, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        window = x[idx[:, None] + torch.arange(self.cfg.context + 1, device=x.device)]  # (B, T + 1)
        return window[:, :-1], window[:, 1:]

    def eval_batches(self, x: torch.Tensor, y: torch.Tensor, size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The stream cut into consecutive non-overlapping windows of the context, the last one shorter: every
        token after the first is predicted once (the exact loss of the split, not an estimate from random
        windows; each window starts without context, as a random one does)."""
        t = self.cfg.context
        n = (len(x) - 1) // t
        xs, ys = x[: n * t].view(n, t), x[1: n * t + 1].view(n, t)
        for start in range(0, n, size):
            yield xs[start:start + size], ys[start:start + size]
        if n * t + 1 < len(x):  # the tail shorter than a window
            yield x[n * t: -1].view(1, -1), x[n * t + 1:].view(1, -1)

    # ---- inference -----------------------------------------------------------------------------------

    def generate(self, model: torch.nn.Module, prompt: str, sampling: Sampling, cache: bool = True) -> str:
        """The text generated after ``prompt`` (without the prompt), cut before the first stop string."""
        tok = self.tokenizer
        out: list[int] = []
        for token in generate_ids(model, torch.tensor(tok.encode(prompt), dtype=torch.int64), sampling, cache):
            out.append(token)
            if sampling.stop:
                text = tok.decode(out)
                found = [text.find(stop) for stop in sampling.stop if stop in text]
                if found:
                    return text[: min(found)]
        return tok.decode(out)

    def inputs(self) -> PromptInputs:
        return PromptInputs(self.tokenizer, self.cfg.context)

    def decode_batch(self, run, batch: np.ndarray) -> np.ndarray:
        """Each prompt with its own sampling settings (``Run.generate`` keyword arguments)."""
        return objects([run.generate(**request) for request in batch])
