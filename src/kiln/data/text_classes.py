"""The ``text_classes`` kind of data: a CSV or TSV of texts and their labels, for text classification.

One column holds the text, one the label (``binary`` or ``multiclass``), or several 0/1 columns one label each
(``multilabel``: a text may have any number of them). Splits are stratified (by the label, or by a text's set of
labels). The tokenizer (``char``, ``byte`` or ``bpe``) is fitted on the training split only and saved in the run
directory with the classes, so prediction needs nothing else.

A sample is a text's token ids, at most ``max_tokens`` of them: a longer text keeps its first ``max_tokens``
tokens (training counts and reports how many were cut; ``kiln predict`` marks each cut text). Shorter texts are
padded at the end with ``<pad>``, which the model masks (``token_embedding.padding``): recurrent layers, attention
and pooling read the real tokens only, so a text gets the same output alone or beside a longer one. A batch is cut
to its longest text before the model reads it.
"""

from __future__ import annotations

import csv
import hashlib
import io
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import Field, NonNegativeInt, PositiveInt, model_validator

from kiln.data.kind import DataKind, find_data
from kiln.data.splits import Splits, stratified_rows
from kiln.data.table import SNIFF_CHARS, _dialect
from kiln.data.text import TokenKind, TokenSpec, text_lines
from kiln.data.text_class_inputs import TextClassInputs
from kiln.data.tokenizers import FILE, fit_tokenizer, load_tokenizer
from kiln.errors import ConfigError, DataError, KilnError
from kiln.nn.base import BlockSpec
from kiln.registry import KINDS
from kiln.rundir import RunDir

SPECIALS = ("<pad>", "<unk>")  # <unk>: a character the character tokenizer never saw in training
TRUE, FALSE = frozenset({"1", "true", "yes", "y", "t"}), frozenset({"0", "false", "no", "n", "f", ""})
# Blocks that keep a padded text's steps apart from its padding: each step alone, or masked (KilnModel).
PER_STEP = {"token_embedding", "positional_encoding", "dense", "dropout", "layernorm"}
MASKED = {"rnn", "lstm", "gru", "transformer_encoder", "seq_pool"}

Column = str | NonNegativeInt


class TextClassesData(TokenSpec):
    dataset: Literal["text_classes"] = "text_classes"
    path: str  # a CSV or TSV file, relative to root, the current directory or $KILN_DATA
    text: Column = "text"  # the text column: its name, or its index from 0 (the only way with header: false)
    label: Column | list[Column] = "label"  # the label column; a list of 0/1 columns: multilabel
    header: bool = True  # false: the first line is data, and columns are named by index
    delimiter: str | None = Field(default=None, min_length=1, max_length=1)  # default: sniffed (, ; TAB |)
    quoting: bool | None = None  # CSV quotes around fields; default: yes, but not in tab-separated files
    task: Literal["auto", "binary", "multiclass"] = "auto"  # auto: binary for two classes (a label list: multilabel)
    positive: str | None = None  # binary: the positive class (default: the rarer one)
    max_tokens: PositiveInt = 256  # a longer text keeps its first max_tokens tokens
    lowercase: bool = False
    test_fraction: float = Field(default=0.2, gt=0.0, lt=1.0)  # held out for testing (stratified), unless folds
    folds: int | None = Field(default=None, ge=2)  # k-fold cross-validation: test on fold `fold` of `folds`
    fold: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _checks(self) -> TextClassesData:
        if self.folds is not None and self.fold >= self.folds:
            raise ValueError(f"data.fold {self.fold} must be below data.folds ({self.folds}); folds count from 0")
        labels = self.label if isinstance(self.label, list) else [self.label]
        if not labels:
            raise ValueError("data.label: give a column, or a list of at least one 0/1 column (multilabel)")
        if self.text in labels:
            raise ValueError(f"data.text: column {self.text!r} is also a label column")
        if isinstance(self.label, list) and (self.task != "auto" or self.positive is not None):
            raise ValueError("data.task: a list of label columns is multilabel; leave task (and positive) unset")
        return self


def _truth(value: str, where: str, column: str) -> float:
    v = value.strip().lower()
    if v in TRUE:
        return 1.0
    if v in FALSE:
        return 0.0
    raise DataError(f"{where}: label column {column!r} holds {value[:40]!r}; a multilabel column holds 0/1 "
                    "(or true/false, yes/no; empty is 0)")


class TextFile:
    """The texts and raw labels of a CSV/TSV file, read as ``data`` says."""

    def __init__(self, path: Path, cfg: TextClassesData) -> None:
        self.path = path
        try:
            raw = path.read_bytes()
            content = raw.decode("utf-8-sig")
        except OSError as e:
            raise DataError(f"{path}: cannot read it ({e})") from None
        except UnicodeDecodeError as e:
            raise DataError(f"{path} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
        self.digest = hashlib.sha256(raw).hexdigest()
        if not content.strip():
            raise DataError(f"{path} is empty")
        dialect = _dialect(content[:SNIFF_CHARS]) if cfg.delimiter is None else csv.excel
        delimiter = cfg.delimiter or dialect.delimiter
        quoting = cfg.quoting if cfg.quoting is not None else delimiter != "\t"
        reader = csv.reader(io.StringIO(content, newline=""), dialect, delimiter=delimiter,
                            quoting=csv.QUOTE_MINIMAL if quoting else csv.QUOTE_NONE)
        rows, self.where = [], []
        try:
            for row in reader:
                if row and any(v.strip() for v in row):
                    rows.append(row)
                    self.where.append(f"{path.name}, line {reader.line_num}")
        except csv.Error as e:
            raise DataError(f"{path}, line {reader.line_num}: not valid CSV: {e}") from None
        if cfg.header:
            if not rows:
                raise DataError(f"{path} is empty")
            self.columns = [h.strip() for h in rows[0]]
            rows, self.where = rows[1:], self.where[1:]
        else:
            self.columns = [str(j) for j in range(max((len(r) for r in rows), default=0))]
        if not rows:
            raise DataError(f"{path} names its columns ({', '.join(self.columns)[:200]}) but holds no rows")
        self.text_index = self.index(cfg.text, "data.text", cfg, delimiter)
        labels = cfg.label if isinstance(cfg.label, list) else [cfg.label]
        self.label_indices = [self.index(c, "data.label", cfg, delimiter) for c in labels]
        self.label_names = [self.columns[j] for j in self.label_indices]
        need = max(self.text_index, *self.label_indices) + 1
        self.texts: list[str] = []
        self.labels: list[list[str]] = []
        for row, where in zip(rows, self.where, strict=True):
            if len(row) < need:
                raise DataError(f"{where}: {len(row)} fields, but column {self.columns[need - 1]!r} is field {need}. "
                                f"Fix: give every row its text and label (delimiter {delimiter!r})")
            text = row[self.text_index]
            if not text.strip():
                raise DataError(f"{where}: the text (column {self.columns[self.text_index]!r}) is empty; remove the "
                                "row or give it a text")
            self.texts.append(text.lower() if cfg.lowercase else text)
            self.labels.append([row[j].strip() for j in self.label_indices])

    def index(self, column: Column, field: str, cfg: TextClassesData, delimiter: str) -> int:
        if isinstance(column, int):
            if column >= len(self.columns):
                raise ConfigError(f"{field}: column index {column}, but {self.path} has {len(self.columns)} columns "
                                  f"(delimiter {delimiter!r}); indices count from 0")
            return column
        if not cfg.header:
            raise ConfigError(f"{field}: {column!r} names a column, but data.header is false (the file has no header "
                              "line); give the column's index from 0")
        if column not in self.columns:
            raise ConfigError(f"{field}: no column {column!r} in {self.path} (its columns: "
                              f"{', '.join(map(repr, self.columns))[:300]}; delimiter {delimiter!r})")
        return self.columns.index(column)


@KINDS.register("text_classes")
class TextClasses(TokenKind):
    """Texts and their classes (or labels): the model learns a text's class."""

    Config = TextClassesData
    description: ClassVar[str] = "text-classification"
    usage: ClassVar[str] = "use `kiln predict RUN --text TEXT` or `kiln predict RUN texts.txt` (one text a line), " \
                           "or Run.predict_texts"
    trains_by_steps: ClassVar[bool] = False
    decodes: ClassVar[bool] = False
    specials = SPECIALS

    def __init__(self, cfg: TextClassesData, seed: int, run_path: Path | None = None) -> None:
        DataKind.__init__(self, cfg, seed)
        if run_path is not None:
            self.tokenizer, self.extra = load_tokenizer(RunDir(run_path) / FILE)
        elif cfg.tokenizer_from is not None:
            self.extra = self.facts()
            self.tokenizer = self.reused_tokenizer(Path(cfg.tokenizer_from).expanduser())
        else:
            self.extra = self.facts()  # the task and classes first: the split is stratified by them
            self.tokenizer = fit_tokenizer(cfg.tokenizer, self.fit_text(), cfg.vocab_size, self.specials)
        self.truncated: list[int] = [0, 0, 0]  # texts cut to max_tokens, per split (counted by load)

    # ---- what the data is ------------------------------------------------------------------------

    @cached_property
    def file(self) -> TextFile:
        return TextFile(find_file(self.cfg), self.cfg)

    @cached_property
    def source(self) -> Path:
        return self.file.path

    def facts(self) -> dict[str, Any]:
        """The task and classes, decided on the whole file (saved with the tokenizer)."""
        f, cfg = self.file, self.cfg
        if isinstance(cfg.label, list):
            for j, name in enumerate(f.label_names):
                for labels, where in zip(f.labels, f.where, strict=True):
                    _truth(labels[j], where, name)
            return {"task": "multilabel", "classes": f.label_names}
        values = [labels[0] for labels in f.labels]
        for value, where in zip(values, f.where, strict=True):
            if not value:
                raise DataError(f"{where}: the label (column {f.label_names[0]!r}) is empty; give every text its label")
        counts = {v: values.count(v) for v in sorted(set(values))}
        if len(counts) < 2:
            raise DataError(f"{f.path}: the label column {f.label_names[0]!r} holds one class "
                            f"({next(iter(counts))!r}); a classifier needs at least two")
        task = cfg.task if cfg.task != "auto" else ("binary" if len(counts) == 2 else "multiclass")
        if task == "binary" and len(counts) != 2:
            raise ConfigError(f"data.task: binary, but column {f.label_names[0]!r} holds {len(counts)} classes "
                              f"({', '.join(list(counts)[:10])}); use multiclass")
        classes = list(counts)
        if task == "binary":
            positive = cfg.positive or min(classes, key=lambda c: (counts[c], c))
            if positive not in counts:
                raise ConfigError(f"data.positive: {positive!r} is not a class of {f.label_names[0]!r} "
                                  f"({', '.join(classes)})")
            classes = [next(c for c in classes if c != positive), positive]
        elif cfg.positive is not None:
            raise ConfigError("data.positive applies to binary tasks only")
        return {"task": task, "classes": classes}

    @property
    def task(self) -> str:  # type: ignore[override]
        return self.extra["task"]

    @property
    def class_names(self) -> list[str]:  # type: ignore[override]
        return list(self.extra["classes"])

    @property
    def input_shape(self) -> tuple[int, ...]:  # type: ignore[override]
        return (self.cfg.max_tokens,)

    @property
    def pad(self) -> int:
        return self.tokenizer.special("<pad>")

    def stratum(self, labels: list[str]) -> str:
        return "\t".join(str(int(_truth(v, "", ""))) for v in labels) if self.task == "multilabel" else labels[0]

    @cached_property
    def rows(self) -> tuple[list[int], list[int], list[int]]:
        """Row indices (train, val, test), stratified by the label (multilabel: by a text's set of labels)."""
        cfg, seed = self.cfg, self.seed
        strata = [self.stratum(labels) for labels in self.file.labels]
        rows = stratified_rows(strata, cfg.test_fraction, cfg.val_fraction, seed, cfg.folds, cfg.fold)
        for indices, name, fix in ((rows[0], "training", "lower data.test_fraction or data.val_fraction"),
                                   (rows[2], "test", "raise data.test_fraction, or give more rows")):
            if not indices:
                raise DataError(f"data: {self.source} has {len(strata)} texts, which leaves no {name} texts; {fix}")
        return rows

    def fit_text(self) -> str:
        """The training split's texts only: validation and test texts stay unseen, as new texts will be. (BPE learns
        line by line; characters are joined without a separator that would enter the vocabulary.)"""
        return ("" if self.cfg.tokenizer == "char" else "\n").join(self.file.texts[i] for i in self.rows[0])

    def block_fields(self) -> dict[str, dict[str, Any]]:
        return {"token_embedding": {"vocab": self.tokenizer.vocab_size, "padding": self.pad},
                "classifier": {"classes": len(self.class_names)}}

    def check_model(self, specs: list[BlockSpec]) -> None:
        """A padded text's steps must never mix with its padding: token ids first, then blocks that work on each
        step alone or honour the mask, until the sequence becomes one vector (seq_pool, or a recurrent layer
        with steps: last)."""
        if specs[0].type != "token_embedding":
            raise ConfigError(f"model.blocks.0 ({specs[0].type}): a text classifier reads token ids; start with "
                              "token_embedding")
        for i, spec in enumerate(specs):
            if spec.type not in PER_STEP | MASKED:
                raise ConfigError(f"model.blocks.{i} ({spec.type}): this block would mix a text's tokens with its "
                                  f"padding; before the text is pooled to a vector use {', '.join(sorted(PER_STEP))} "
                                  f"or {', '.join(sorted(MASKED))}")
            if spec.type == "seq_pool" or getattr(spec, "steps", "all") == "last":
                return
        raise ConfigError(f"model.blocks: a text classifier pools the text to one vector before its head; add "
                          f"seq_pool after block {len(specs) - 2}, or give the recurrent layer steps: last")

    def report(self) -> list[str]:
        n = [len(r) for r in self.rows]
        names = self.class_names
        lines = [f"texts {self.source}: {sum(n):,} ({n[0]:,} train, {n[1]:,} val, {n[2]:,} test), task {self.task}, "
                 f"{len(names)} {'labels' if self.task == 'multilabel' else 'classes'}: {', '.join(names[:20])}"
                 + (f" (positive: {names[1]})" if self.task == "binary" else ""),
                 f"{self.tokenizer.kind} tokenizer fitted on the training texts: {self.tokenizer.vocab_size:,} tokens "
                 f"(with {', '.join(SPECIALS)}); texts padded or cut to data.max_tokens = {self.cfg.max_tokens}"]
        if any(self.truncated):
            lines.append(f"{sum(self.truncated):,} texts longer than {self.cfg.max_tokens} tokens keep their first "
                         f"{self.cfg.max_tokens} (train {self.truncated[0]}, val {self.truncated[1]}, test "
                         f"{self.truncated[2]}); raise data.max_tokens to keep more")
        return lines

    # ---- data ----------------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """A text's ids, all of them (a character the character tokenizer never saw is <unk>)."""
        tok = self.tokenizer
        if self.cfg.lowercase:
            text = text.lower()
        if tok.kind == "char":
            unk = tok.special("<unk>")
            return [tok.index.get(c, unk) for c in text]
        return tok.encode(text)

    def encode_texts(self, texts: list[str]) -> tuple[torch.Tensor, list[bool]]:
        """Texts to padded ids (N, max_tokens) and whether each was cut to max_tokens."""
        width = self.cfg.max_tokens
        out = torch.full((len(texts), width), self.pad, dtype=torch.int64)
        cut = []
        for i, text in enumerate(texts):
            ids = self.encode(text)
            cut.append(len(ids) > width)
            ids = ids[:width]
            out[i, : len(ids)] = torch.tensor(ids, dtype=torch.int64)
        return out, cut

    def targets(self, rows: list[int]) -> torch.Tensor:
        labels = [self.file.labels[i] for i in rows]
        if self.task == "multilabel":
            names = self.file.label_names
            return torch.tensor([[_truth(v, self.file.where[i], names[j]) for j, v in enumerate(ls)]
                                 for i, ls in zip(rows, labels, strict=True)], dtype=torch.float32)
        index = {c: k for k, c in enumerate(self.class_names)}
        unknown = [(self.file.where[i], ls[0]) for i, ls in zip(rows, labels, strict=True) if ls[0] not in index]
        if unknown:
            raise DataError(f"{unknown[0][0]}: label {unknown[0][1]!r} is not one of this run's classes "
                            f"({', '.join(self.class_names)})")
        return torch.tensor([index[ls[0]] for ls in labels], dtype=torch.int64)

    def load(self, progress=None) -> Splits:
        parts = []
        for k, rows in enumerate(self.rows):
            x, cut = self.encode_texts([self.file.texts[i] for i in rows])
            self.truncated[k] = sum(cut)
            parts += [x, self.targets(rows)]
        # kept in the run directory (tokenizer.json's facts of the data set), beside the training log's line
        self.extra["truncated"] = dict(zip(("train", "val", "test"), self.truncated, strict=True))
        return Splits(*parts, checksums={self.source.name: self.file.digest})

    def shown(self, split: str, x: torch.Tensor, idx: list[int]) -> list[dict[str, Any]]:
        """Each text as the file holds it."""
        rows = self.rows[("train", "val", "test").index(split)]
        return [{"text": self.file.texts[rows[i]]} for i in idx]

    def checksums(self) -> dict[str, str]:
        return {self.source.name: self.file.digest}

    def to_input(self, x: torch.Tensor) -> torch.Tensor:
        """Ids cut to the batch's longest text: padding after it would only be masked. A traced or exported graph
        keeps every max_tokens column (its shapes cannot depend on the data; the mask gives the same outputs)."""
        if torch.jit.is_tracing() or torch.compiler.is_compiling():
            return x
        longest = int((x != self.pad).sum(1).max()) if len(x) else 1
        return x[:, : max(longest, 1)]

    def as_stored(self, x) -> torch.Tensor:
        """A text, a list of texts, or token ids as stored (N, max_tokens)."""
        if isinstance(x, str):
            x = [x]
        if isinstance(x, list | tuple) and all(isinstance(t, str) for t in x):
            return self.encode_texts(check_texts(list(x)))[0]
        x = torch.as_tensor(x)
        return x[None] if x.dim() == 1 else x

    def random_inputs(self, n: int, gen: torch.Generator) -> torch.Tensor:
        """Texts of random length (1 to max_tokens) of random tokens, padded."""
        width = self.cfg.max_tokens
        ids = torch.randint(0, self.tokenizer.base_size, (n, width), generator=gen)
        lengths = torch.randint(1, width + 1, (n, 1), generator=gen)
        return torch.where(torch.arange(width) < lengths, ids, self.pad)

    # ---- inference -----------------------------------------------------------------------------------

    def inputs(self) -> TextClassInputs:
        return TextClassInputs(self)

    def predict_texts(self, run, texts: list[str]) -> list[dict[str, Any]]:
        """One record per text: the text, its class (multilabel: its labels) and every class's probability."""
        texts = check_texts(texts)
        x, cut = self.encode_texts(texts)
        probs = run.predict(x)
        records = []
        for text, row, was_cut in zip(texts, probs.tolist(), cut, strict=True):
            records.append({"text": text, **self.answer(row, run.threshold), "truncated": was_cut})
        return records

    def answer(self, row: list[float], threshold: float) -> dict[str, Any]:
        """One text's probabilities as an answer with class names."""
        names = self.class_names
        probabilities = {n: round(p, 6) for n, p in zip(names, row, strict=True)}
        if self.task == "multilabel":
            return {"labels": [n for n, p in zip(names, row, strict=True) if p >= 0.5], "probabilities": probabilities}
        if self.task == "binary":
            k = 1 if row[1] >= threshold else 0
        else:
            k = int(np.argmax(row))
        return {"label": names[k], "probability": round(row[k], 6), "probabilities": probabilities}

    def predict_files(self, run, paths: list[str | Path]) -> list[dict[str, Any]]:
        """Each non-empty line of each file is a text."""
        texts = text_lines(paths)
        if not texts:
            raise KilnError(f"{', '.join(map(str, paths))}: no text lines to classify")
        return self.predict_texts(run, texts)

    explains: ClassVar[str | None] = "tokens"

    def explain_inputs(self, paths: list[str | Path]) -> tuple[torch.Tensor, list[dict[str, Any]]]:
        """Each non-empty line of each file is a text; its tokens as the tokenizer cut it (up to max_tokens)."""
        texts = text_lines(paths)
        if not texts:
            raise KilnError(f"{', '.join(map(str, paths))}: no text lines to explain")
        return self.explain_texts(texts)

    def explain_texts(self, texts: list[str]) -> tuple[torch.Tensor, list[dict[str, Any]]]:
        x, cut = self.encode_texts(check_texts(texts))
        items = []
        for i, (text, ids, was_cut) in enumerate(zip(texts, x.tolist(), cut, strict=True)):
            tokens = [self.tokenizer.decode([t]) for t in ids if t != self.pad]
            items.append({"name": f"text{i + 1}", "text": text, "tokens": tokens, "truncated": was_cut})
        return x, items

    def explain_baseline(self, x: torch.Tensor) -> torch.Tensor:
        """Padding ids (attributed at the embedding layer: the padding's vector at each of the text's tokens)."""
        return torch.full_like(x, self.pad)

    def render(self, records: list[dict[str, Any]]) -> str:
        """A line per text: its label(s), the probability, then the text (``[cut]`` when it was truncated)."""
        lines = []
        for r in records:
            shown = r["text"].replace("\n", " ").replace("\t", " ")
            cut = " [cut]" if r["truncated"] else ""
            if "labels" in r:
                found = ",".join(r["labels"]) or "-"
                lines.append(f"{found}\t{shown}{cut}")
            else:
                lines.append(f"{r['label']}\t{r['probability']:.4f}\t{shown}{cut}")
        return "\n".join(lines) + "\n"


def check_texts(texts: list[str]) -> list[str]:
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise KilnError(f"text {i + 1}: expected a string, got {type(text).__name__}")
        if not text.strip():
            raise KilnError(f"text {i + 1} is empty; give some text to classify")
    return texts


def find_file(cfg: TextClassesData) -> Path:
    path = find_data(cfg.path, cfg.root, "a CSV or TSV file of texts and labels")
    if not path.is_file():
        raise DataError(f"data.path {cfg.path!r}: {path} is not a file; give a CSV or TSV file")
    return path

