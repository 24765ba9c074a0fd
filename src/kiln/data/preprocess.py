"""Table preprocessing: infer each column's type, fit statistics on the training rows, turn rows into tensors.

The fitted :class:`Preprocessing` is plain data saved as JSON in the run directory, so evaluate,
predict and a server apply exactly what training fitted. Model input is one float vector per row::

    [numeric values ..., is-missing indicators ..., category codes ...]

A numeric column is one standardised value, or with ``numeric_encoding: ple`` (piecewise-linear encoding,
Gorishniy et al. 2022, "On Embeddings for Numerical Features in Tabular Deep Learning") one value per bin
between quantiles of the training rows: 0 below the bin, 1 above it, the position within it in between. A
network then sees where a number lies in its distribution, as a tree's splits do. A category code is 1 + the category's index in the training vocabulary; 0 means "unknown" (a value
never seen in training). The tabular blocks (:mod:`kiln.nn.blocks.tabular`) read this layout.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, get_type_hints

import numpy as np
import torch
from pydantic import TypeAdapter, ValidationError

from kiln.data.table import Table
from kiln.errors import DataError
from kiln.fsutil import atomic_write_text
from kiln.registry import did_you_mean

ColumnType = Literal["numeric", "categorical", "boolean", "drop"]
Task = Literal["binary", "multiclass", "regression"]
FORMAT = "kiln-tabular-2"
OLD_FORMATS = ("kiln-tabular-1",)  # read too: the same fields but ``edges`` (their numbers were standardised)
BOOLEAN_PAIRS = ({"false", "true"}, {"no", "yes"}, {"n", "y"}, {"f", "t"}, {"0", "1"})
ID_FRACTION = 0.5  # text columns with more distinct values than this fraction of rows are ids or free text
REGRESSION_MIN_VALUES = 20  # a numeric target with more distinct values than this is a regression target
# ``data.bins: auto``: about ROWS_PER_BIN training rows per quantile bin, between AUTO_BINS[0] and AUTO_BINS[1]
ROWS_PER_BIN = 80
AUTO_BINS = (16, 128)
EMBED_FROM_ROWS = 5_120  # ``tabular_encoder.numeric_embedding: auto``: linear from this many training rows


def auto_bins(rows: int) -> int:
    """The number of quantile bins ``data.bins: auto`` gives a table with ``rows`` training rows: rows / 80, at
    least 16, at most 128.

    A bin's slope is learnt from the training rows that fall in it, so a small table wants few bins and a large
    one can afford many. Measured with benchmarks/bench_tables.py (TabM-mini on PLE numbers, 5 folds; README,
    "Imbalanced tables"): on German credit (720 training rows) 16 bins beat 9 with each of 3 seeds (mean ROC-AUC
    0.7929 against 0.7880) and 32 and 64 bins scored lower (0.7971, 0.7902 against 0.7986 at 16; a dense network
    lost more: 0.7888 at 16, 0.7770 at 64, 0.7630 at 255); on bank marketing (about 29,650 training rows) 64 bins
    beat 16 (0.8009 against 0.7989), and with today's recipe (weight averaging) 128 beat 64 with each of seeds 0 to
    4 (mean 0.8023 against 0.8018; README, the lever table). The divisor places the growth between those two
    sizes (16 bins up to 1,280 training rows, 128 from 10,240), where no table was measured."""
    return min(max(rows // ROWS_PER_BIN, AUTO_BINS[0]), AUTO_BINS[1])


def auto_number_embedding(rows: int) -> str:
    """What ``tabular_encoder.numeric_embedding: auto`` becomes for a table with ``rows`` training rows: ``linear``
    (a linear layer of each number's own on its inputs) from 5,120 training rows (where ``data.bins: auto`` gives
    64 bins), ``none`` below (the numbers' inputs go to the next block as they are).

    Measured with benchmarks/bench_tables.py (TabM-mini on PLE numbers, 5 folds, seeds 0 1 2 with the same folds;
    README, "Imbalanced tables"): on bank marketing (about 29,650 training rows) per-number embeddings of 16
    values gave a mean ROC-AUC of 0.8022 against 0.8015 without (higher with 2 of the 3 seeds, and a third of
    the seed-to-seed spread); on German credit (720 training rows) they lowered it with each of 5 seeds (0.7857
    against 0.7923). No table between the two sizes was measured: the threshold only places the change between
    them."""
    return "linear" if rows >= EMBED_FROM_ROWS else "none"


def as_number(text: str) -> float | None:
    try:
        value = float(text.replace("_", "x"))  # float() accepts "1_000"; a table cell should not
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def infer_type(values: list[str | None]) -> tuple[ColumnType, str]:
    """The type of a column from its raw values, and why (shown to the user)."""
    present = [v for v in values if v is not None]
    distinct = set(present)
    if not present:
        return "drop", "no values"
    if len(distinct) == 1:
        return "drop", f"one value only ({present[0]!r})"
    if {v.lower() for v in distinct} in BOOLEAN_PAIRS:
        return "boolean", "two values: " + "/".join(sorted(distinct))
    numbers = sum(as_number(v) is not None for v in distinct)
    if numbers == len(distinct):
        return "numeric", f"{len(distinct)} distinct numbers"
    if numbers >= 0.9 * len(distinct):
        return "numeric", "mostly numbers"  # the text among them is reported as an error by fit()
    if len(distinct) > ID_FRACTION * len(present) and len(present) >= 20:
        return "drop", f"{len(distinct)} distinct texts in {len(present)} rows (an id or free text)"
    return "categorical", f"{len(distinct)} categories"


@dataclass
class Column:
    """One input column as fitted on the training rows."""

    name: str
    type: ColumnType
    reason: str = ""
    missing: int = 0  # missing values in the training rows
    mean: float = 0.0  # numeric and boolean: statistics of the training rows, used to standardise
    std: float = 1.0
    indicator: bool = False  # an is-missing input exists (missing values were seen in training)
    true_value: str | None = None  # boolean: the lowercased text meaning true
    false_value: str | None = None  # boolean: the lowercased text meaning false
    categories: list[str | None] = field(default_factory=list)  # categorical: training vocabulary
    edges: list[float] = field(default_factory=list)  # numeric, piecewise-linear encoding: bin edges (quantiles of
    # the training rows, increasing); empty: one standardised value

    @property
    def width(self) -> int:
        """Model inputs of the column's value (its is-missing indicator aside)."""
        return max(len(self.edges) - 1, 1)


@dataclass
class Target:
    name: str
    task: Task
    classes: list[str] = field(default_factory=list)  # classification; binary: [negative, positive]
    counts: list[int] = field(default_factory=list)  # training rows per class
    mean: float = 0.0  # regression: targets are standardised for training
    std: float = 1.0


@dataclass
class Preprocessing:
    target: Target
    columns: list[Column]
    bins: int | None = None  # numeric_encoding ple: the quantile bins asked per number (data.bins, auto resolved)

    # ---- layout ------------------------------------------------------------------------------------

    @property
    def numeric(self) -> list[Column]:
        return [c for c in self.columns if c.type in ("numeric", "boolean")]

    @property
    def categorical(self) -> list[Column]:
        return [c for c in self.columns if c.type == "categorical"]

    @property
    def numeric_inputs(self) -> int:
        """Inputs before the category codes: standardised values and is-missing indicators."""
        return sum(c.width for c in self.numeric) + sum(c.indicator for c in self.numeric)

    @property
    def cardinalities(self) -> list[int]:
        """Per categorical column: its training categories plus one for "unknown"."""
        return [len(c.categories) + 1 for c in self.categorical]

    @property
    def input_shape(self) -> tuple[int]:
        return (self.numeric_inputs + len(self.categorical),)

    # ---- applying ----------------------------------------------------------------------------------

    def check_complete(self, table: Table) -> None:
        """Refuse a missing value in a column that had none in the training rows: the model never learnt what one
        means there (a server refuses such a row too). Columns that had missing values take them."""
        for c in self.columns:
            values = table.columns.get(c.name)
            if c.missing or values is None:
                continue
            for i, v in enumerate(values):
                if v is None:
                    raise DataError(f"{table.source}, {table.where[i]}: column {c.name!r} is empty, and it had no "
                                    "missing values in training: give a value")

    def transform(self, table: Table) -> torch.Tensor:
        """Raw rows to model input, float32 (N, features); unseen categories become "unknown"."""
        for c in self.numeric + self.categorical:
            if c.name not in table.columns:
                raise DataError(f"{table.source} has no column {c.name!r}{did_you_mean(c.name, list(table.columns))}, "
                                f"which the model was trained on; columns given: {', '.join(table.columns)}")
        values, indicators = [], []
        for c in self.numeric:
            x = _numbers(c, table)
            missing = np.isnan(x)
            if c.edges:
                values.extend(piecewise_linear(np.where(missing, c.mean, x), c.edges).T)  # missing: the mean
            else:
                values.append(np.where(missing, 0.0, (x - c.mean) / c.std))  # missing -> the training mean
            if c.indicator:
                indicators.append(missing.astype(np.float64))
        codes = []
        for c in self.categorical:
            index = {v: i + 1 for i, v in enumerate(c.categories)}
            codes.append(np.array([index.get(v, 0) for v in table.columns[c.name]], dtype=np.float64))
        parts = values + indicators + codes
        if not parts:
            return torch.zeros(len(table), 0)
        return torch.from_numpy(np.stack(parts, axis=1).astype(np.float32))

    def input_groups(self) -> list[tuple[str, list[int]]]:
        """Each input column's positions in a row of model input: its value (one, or its piecewise-linear bins),
        its is-missing indicator, its category code; in the columns' order."""
        groups: dict[str, list[int]] = {c.name: [] for c in self.numeric + self.categorical}
        pos = 0
        for c in self.numeric:
            groups[c.name] += range(pos, pos + c.width)
            pos += c.width
        for c in self.numeric:
            if c.indicator:
                groups[c.name].append(pos)
                pos += 1
        for c in self.categorical:
            groups[c.name].append(pos)
            pos += 1
        return list(groups.items())

    def baseline(self) -> torch.Tensor:
        """The model input (features,) of a row whose numbers sit at their training means, present, and whose
        categories are all unknown (code 0): the "absent" row that explanations measure from."""
        values: list[np.ndarray] = []
        for c in self.numeric:
            values.append(piecewise_linear(np.array([c.mean]), c.edges)[0] if c.edges else np.zeros(1))
        rest = sum(c.indicator for c in self.numeric) + len(self.categorical)
        row = np.concatenate([*values, np.zeros(rest)]) if values or rest else np.zeros(0)
        return torch.from_numpy(row.astype(np.float32))

    def encode_target(self, table: Table) -> torch.Tensor:
        """Class indices (int64) or standardised values (float32)."""
        t = self.target
        raw = _target_values(table, t.name)
        if t.task == "regression":
            x = _numbers(Column(t.name, "numeric"), table)
            return torch.from_numpy(((x - t.mean) / t.std).astype(np.float32))
        index = {c: i for i, c in enumerate(t.classes)}
        for i, v in enumerate(raw):
            if v not in index:
                raise DataError(f"{table.source}, {table.where[i]}: target column {t.name!r} holds {v!r}, "
                                f"which is not one of the training classes ({', '.join(t.classes)})")
        return torch.tensor([index[v] for v in raw], dtype=torch.int64)

    # ---- saving ------------------------------------------------------------------------------------

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, "target": asdict(self.target), "bins": self.bins,
                           "columns": [asdict(c) for c in self.columns]}, indent=2) + "\n"

    def save(self, path: Path) -> None:
        atomic_write_text(path, self.to_json())

    @classmethod
    def from_json(cls, text: str, source: str = "preprocessing") -> Preprocessing:
        try:
            raw = json.loads(text)
            if not isinstance(raw, dict) or raw.get("format") not in (FORMAT, *OLD_FORMATS):
                raise ValueError(f"format is {raw.get('format') if isinstance(raw, dict) else None!r}, not {FORMAT!r}")
            if not isinstance(raw.get("columns"), list):
                raise ValueError("columns must be a list")
            if raw["format"] != FORMAT:
                raw["columns"] = [{"edges": [], **c} if isinstance(c, dict) else c for c in raw["columns"]]
            bins = raw.get("bins")  # absent from files written before data.bins: auto
            if bins is not None and (not isinstance(bins, int) or isinstance(bins, bool) or bins < 2):
                raise ValueError(f"bins must be an integer of at least 2 or null (found {bins!r:.40})")
            return cls(_record(Target, raw.get("target"), "target"),
                       [_record(Column, c, f"columns.{i}") for i, c in enumerate(raw["columns"])], bins)
        except ValueError as e:  # pydantic's ValidationError and json's errors are ValueErrors too
            raise DataError(f"{source} is not a kiln table preprocessing file: {e}") from None

    @classmethod
    def load(cls, path: Path) -> Preprocessing:
        try:
            return cls.from_json(path.read_text(encoding="utf-8"), str(path))
        except FileNotFoundError:
            raise DataError(f"{path}: no such file") from None

    def describe(self, dropped: list[Column]) -> list[str]:
        """Lines telling the user what was inferred: types, missing values, class balance."""
        lines = [f"{c.name}: {c.type} ({c.reason}){f', {c.missing} missing' if c.missing else ''}"
                 f"{f', {c.width} quantile bins' if c.edges else ''}" for c in self.columns + dropped]
        t = self.target
        if t.task == "regression":
            lines.append(f"target {t.name}: regression (mean {t.mean:.4g}, std {t.std:.4g})")
        else:
            total = sum(t.counts)
            balance = ", ".join(f"{c} {n} ({n / total:.0%})" for c, n in zip(t.classes, t.counts, strict=True))
            lines.append(f"target {t.name}: {t.task} classification; training rows {balance}")
        return lines


def _record(cls, raw: Any, where: str):
    """A saved Target or Column with every field present and of its type: a field left out of the file is an
    error, not a default (a missing mean would silently shift every value)."""
    names = [f.name for f in fields(cls)]
    if not isinstance(raw, dict):
        raise ValueError(f"{where} must be an object")
    missing, unknown = [n for n in names if n not in raw], [k for k in raw if k not in names]
    if missing or unknown:
        raise ValueError(f"{where}: " + "; ".join(f"{what} {', '.join(map(repr, keys))}" for what, keys in (
            ("missing", missing), ("unknown", unknown)) if keys))
    hints, values = get_type_hints(cls), {}
    for n in names:
        try:
            values[n] = TypeAdapter(hints[n]).validate_python(raw[n], strict=True)
        except ValidationError as e:
            raise ValueError(f"{where}.{n}: {e.errors()[0]['msg'].lower()} (found {raw[n]!r:.40})") from None
    return cls(**values)


def fit(table: Table, target: str, task: str, overrides: dict[str, str], positive: str | None,
        numeric_encoding: str = "standard", bins: int = 16) -> tuple[Preprocessing, list[Column]]:
    """Infer types (``overrides`` win) and fit statistics on ``table`` (the training rows only); with
    ``numeric_encoding`` ``ple``, also up to ``bins`` quantile bins per numeric column.

    Returns the preprocessing and the columns it drops (with the reason, for the report).
    """
    check_target(table, target)
    for name in overrides:
        if name not in table.columns:
            raise DataError(f"data.columns.{name}: {table.source} has no column {name!r}"
                            f"{did_you_mean(name, list(table.columns))}; columns: {', '.join(table.columns)}")
    kept, dropped = [], []
    for name, values in table.columns.items():
        if name == target:
            continue
        kind, reason = (overrides[name], "set in data.columns") if name in overrides else infer_type(values)
        column = _fit_column(Column(name, kind, reason, missing=sum(v is None for v in values)), table,
                             bins if numeric_encoding == "ple" else 0)
        (dropped if kind == "drop" else kept).append(column)
    if not kept:
        why = "; ".join(f"{c.name}: {c.reason}" for c in dropped) or "the target is its only column"
        raise DataError(f"{table.source}: no column is left to predict {target!r} from ({why}); give input "
                        "columns, or declare one's type with data.columns")
    return Preprocessing(fit_target(table, target, task, positive), kept,
                         bins if numeric_encoding == "ple" else None), dropped


def check_target(table: Table, target: str) -> None:
    if target not in table.columns:
        raise DataError(f"data.target: {table.source} has no column {target!r}{did_you_mean(target, list(table.columns))}; "
                        f"its columns are {', '.join(table.columns)}")


def fit_target(table: Table, name: str, task: str, positive: str | None) -> Target:
    raw = _target_values(table, name)
    counts = Counter(raw)
    if len(counts) < 2:
        raise DataError(f"target column {name!r} of {table.source} has one value only ({raw[0]!r} in all "
                        f"{len(raw)} rows); a model needs at least two classes (or varying values) to learn from")
    if task == "auto":
        numeric = all(as_number(v) is not None for v in counts)
        task = "regression" if numeric and len(counts) > REGRESSION_MIN_VALUES else (
            "binary" if len(counts) == 2 else "multiclass")
    if task == "regression":
        x = _numbers(Column(name, "numeric"), table)
        return Target(name, "regression", mean=float(x.mean()), std=float(x.std()) or 1.0)
    if task == "binary" and len(counts) != 2:
        raise DataError(f"data.task is binary but target column {name!r} has {len(counts)} classes "
                        f"({', '.join(sorted(counts)[:10])}); use task: multiclass")
    classes = sorted(counts)
    if task == "binary":
        # The positive class goes last (index 1): the one named, else the rarer one.
        if positive is not None and positive not in counts:
            raise DataError(f"data.positive {positive!r} is not a value of target column {name!r} "
                            f"({', '.join(classes)})")
        pos = positive or min(classes, key=lambda c: (counts[c], c))
        classes = [c for c in classes if c != pos] + [pos]
    return Target(name, task, classes, [counts[c] for c in classes])


def _target_values(table: Table, name: str) -> list[str]:
    check_target(table, name)
    raw = table.columns[name]
    for i, v in enumerate(raw):
        if v is None:
            raise DataError(f"{table.source}, {table.where[i]}: target column {name!r} is empty; "
                            "every training row needs a target value (remove the row or fill it)")
    return raw  # type: ignore[return-value]


def _fit_column(c: Column, table: Table, bins: int = 0) -> Column:
    if c.type in ("numeric", "boolean"):
        if c.type == "boolean":
            distinct = sorted({v.lower() for v in table.columns[c.name] if v is not None})
            c.true_value = next((t for t in ("true", "yes", "y", "t", "1") if t in distinct), distinct[-1])
            c.false_value = next((v for v in distinct if v != c.true_value), None)
        x = _numbers(c, table)
        present = x[~np.isnan(x)]
        c.mean = float(present.mean()) if len(present) else 0.0
        c.std = float(present.std()) or 1.0 if len(present) else 1.0
        c.indicator = c.missing > 0
        if bins and c.type == "numeric" and len(present):
            edges = np.unique(np.quantile(present, np.linspace(0.0, 1.0, bins + 1)))
            c.edges = [float(e) for e in edges] if len(edges) > 2 else []  # two values: the plain value says it
    elif c.type == "categorical":
        counts = Counter(table.columns[c.name])
        c.categories = sorted(counts, key=lambda v: (-counts[v], v is None, v or ""))  # most frequent first
    return c


def piecewise_linear(x: np.ndarray, edges: list[float]) -> np.ndarray:
    """(N,) values to (N, bins): per bin, 0 below it, 1 above it, linear within it (values outside the training
    range sit at 0 or 1 of the outer bins)."""
    e = np.asarray(edges)
    return np.clip((x[:, None] - e[:-1]) / (e[1:] - e[:-1]), 0.0, 1.0)


def _numbers(c: Column, table: Table) -> np.ndarray:
    """A numeric or boolean column as float64 with NaN for missing; text that is not a number is an error."""
    out = np.empty(len(table))
    for i, v in enumerate(table.columns[c.name]):
        if v is None:
            out[i] = np.nan
        elif c.type == "boolean":
            # A value first seen after training is neither: it counts as missing (imputed), like an
            # unknown category, rather than silently as false.
            text = v.lower()
            out[i] = 1.0 if text == c.true_value else 0.0 if text == c.false_value else np.nan
        else:
            number = as_number(v)
            if number is None:
                raise DataError(
                    f"{table.source}, {table.where[i]}: column {c.name!r} is numeric but holds {v!r}. Fix the value "
                    f"(leave it empty if it is missing), or declare the column categorical with "
                    f"`data.columns: {{{c.name}: categorical}}`")
            out[i] = number
    return out


def summarise(prep: Preprocessing) -> dict[str, Any]:
    """What the block specs need to know about the input layout (filled into the config by resolve)."""
    return {"numeric": prep.numeric_inputs, "categories": prep.cardinalities}
