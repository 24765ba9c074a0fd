"""The ``text_pairs`` kind of data: a TSV of source<TAB>target lines, for sequence-to-sequence models.

``test_fraction`` of the pairs are held out for testing and ``val_fraction`` of the rest for validation. A
sample is the source padded to the longest source, then ``<bos>`` and the target padded to the longest
target + 1; the targets are the target tokens and ``<eos>``, then ``IGNORE`` (left out of loss and metrics).
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import Field

from kiln.data.requests import objects
from kiln.data.splits import Splits, holdout
from kiln.data.text import IGNORE, TokenKind, TokenSpec, text_lines
from kiln.data.text_inputs import SourceInputs
from kiln.data.tokenizers import SEQ2SEQ_SPECIALS
from kiln.errors import DataError
from kiln.nn.generate import translate_ids
from kiln.registry import KINDS


class TextPairsData(TokenSpec):
    dataset: Literal["text_pairs"] = "text_pairs"
    test_fraction: float = Field(default=0.2, gt=0.0, lt=1.0)  # of the pairs, held out for testing


@KINDS.register("text_pairs")
class TextPairs(TokenKind):
    """Source and target texts: the model learns to write the target of a source."""

    Config = TextPairsData
    description: ClassVar[str] = "text-pairs"
    usage: ClassVar[str] = "use `kiln predict RUN sources.txt` (one source per line), or Run.translate"
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

    def report(self) -> list[str]:
        return [f"pairs {self.source}: {len(self.pairs):,} source/target pairs, {self.tokenizer.kind} tokenizer with "
                f"{self.tokenizer.vocab_size:,} tokens, sources up to {self.source_steps} and targets up to "
                f"{self.target_steps - 1} tokens"]

    # ---- data ----------------------------------------------------------------------------------------

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

    def exact_matches(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
        """How many rows' greedy translation equals their target exactly."""
        eos = self.tokenizer.special("<eos>")
        predicted = translate_ids(model, x[:, : self.source_steps], self.tokenizer.special("<bos>"), eos,
                                  self.target_steps)
        targets = [row[: row.index(eos)] for row in y.tolist()]
        return sum(p == t for p, t in zip(predicted, targets, strict=True))

    # ---- inference -----------------------------------------------------------------------------------

    def translate(self, model: torch.nn.Module, sources: list[str], batch_size: int = 256,
                  cache: bool = True) -> list[str]:
        """Greedy target text for each source text."""
        tok = self.tokenizer
        out: list[str] = []
        for i in range(0, len(sources), batch_size):
            ids = self.encode_sources(sources[i:i + batch_size])
            out += [tok.decode(row) for row in translate_ids(model, ids, tok.special("<bos>"), tok.special("<eos>"),
                                                             self.target_steps, cache)]
        return out

    def inputs(self) -> SourceInputs:
        return SourceInputs(self.tokenizer, self.source_steps)

    def decode_batch(self, run, batch: np.ndarray) -> np.ndarray:
        return objects(run.translate(batch.tolist()))

    def predict_files(self, run, paths: list[str | Path]) -> list[dict[str, Any]]:
        """Each line of each file is a source (a TSV line's first column)."""
        sources = [line.split("\t", 1)[0] for line in text_lines(paths)]
        return [{"source": s, "target": t} for s, t in zip(sources, run.translate(sources), strict=True)]

    def render(self, records: list[dict[str, Any]]) -> str:
        return "".join(f"{r['source']}\t{r['target']}\n" for r in records)
