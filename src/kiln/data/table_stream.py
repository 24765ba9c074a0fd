"""The ``tabular_stream`` kind: a table too big for memory, as shards (Parquet or CSV) read as a stream.

It is the ``tabular`` kind (same preprocessing file, the same model input, so predict, serve, export and
explain work unchanged on its runs) with three differences:

- the preprocessing statistics are fitted in one streaming pass over the training shards (``fit_streaming``):
  means and standard deviations exactly (merged per record batch), category and class counts exactly, and the
  piecewise-linear bins (``numeric_encoding: ple``) from the quantiles of a uniform random sample of
  ``data.sample_rows`` rows (bottom-k sampling with seeded keys: the same sample for the same seed);
- validation and test data are whole shards: the last ``data.test_shards`` shards (in sorted order) are the
  test split, the ``data.val_shards`` before them the validation split; they are read into memory;
- training rows are never all in memory: the trainer's ``stream`` plan draws batches from
  :func:`kiln.data.shards.stream_rows` (``data.stream: false`` reads them into memory instead, the same rows).
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from kiln.data.kind import DataSpec
from kiln.data.preprocess import (
    REGRESSION_MIN_VALUES,
    Column,
    Preprocessing,
    Target,
    piecewise_linear,
)
from kiln.data.shards import ShardSet, reader_shards, stream_rows, table_reader
from kiln.data.splits import Splits
from kiln.data.tabular import Tabular
from kiln.errors import DataError
from kiln.registry import KINDS, did_you_mean

ID_FRACTION = 0.5  # as kiln.data.preprocess: a text column with more distinct values per row is an id


class TabularStreamData(DataSpec):
    dataset: Literal["tabular_stream"] = "tabular_stream"
    # A folder, a glob ("data/part-*.parquet"), a comma-separated list of files, or an fsspec URL of them
    # ("s3://bucket/table/"; needs the filesystem's package, e.g. s3fs, gcsfs).
    path: str = Field(max_length=4096)
    format: Literal["auto", "parquet", "csv"] = "auto"  # auto: from the files' suffixes
    target: str
    task: Literal["auto", "binary", "multiclass", "regression"] = "auto"
    positive: str | None = None
    columns: dict[str, Literal["numeric", "categorical", "boolean", "drop"]] = {}
    numeric_encoding: Literal["standard", "ple"] = "standard"
    bins: int = Field(default=16, ge=2, le=256)
    val_shards: int = Field(default=1, ge=0)  # the shards before the test shards, in sorted order
    test_shards: int = Field(default=1, ge=1)  # the last shards in sorted order
    stream: bool = True  # false: read the training shards into memory (data that fits; the same rows)
    shuffle_rows: int = Field(default=65_536, ge=1)  # rows per shuffled block of the stream
    sample_rows: int = Field(default=100_000, ge=100)  # the random sample that PLE quantiles come from
    # Reader threads a training process streams with, each with its own shards (kiln.training.stream_plan).
    workers: int = Field(default=1, ge=1, le=64)

    @model_validator(mode="after")
    def _no_fraction(self) -> TabularStreamData:
        if self.val_fraction != DataSpec.model_fields["val_fraction"].default:  # a saved config holds the default
            raise ValueError("data.val_fraction: a streamed table holds out whole shards; set data.val_shards")
        return self


class ArrowTransform:
    """:class:`Preprocessing`'s transform on Arrow record batches, vectorised: the same model input as
    ``Preprocessing.transform`` of the same rows read as text."""

    def __init__(self, prep: Preprocessing) -> None:
        self.prep = prep
        self.columns = [c.name for c in prep.numeric + prep.categorical] + [prep.target.name]
        self._sets: dict[str, Any] = {}

    def _values(self, name: str, values: list):
        import pyarrow as pa

        if name not in self._sets:
            self._sets[name] = pa.array(values, type=pa.string())
        return self._sets[name]

    def __call__(self, batch) -> tuple[np.ndarray, np.ndarray]:
        import pyarrow.compute as pc

        prep, n = self.prep, batch.num_rows
        values, indicators = [], []
        for c in prep.numeric:
            x = _floats(batch.column(c.name), c)
            missing = np.isnan(x)
            if c.edges:
                values.extend(piecewise_linear(np.where(missing, c.mean, x), c.edges).T)
            else:
                values.append(np.where(missing, 0.0, (x - c.mean) / c.std))
            if c.indicator:
                indicators.append(missing.astype(np.float64))
        codes = []
        for c in prep.categorical:
            index = pc.index_in(_text(batch.column(c.name)), value_set=self._values(c.name, c.categories),
                                skip_nulls=False)
            codes.append(pc.fill_null(pc.add(index, 1), 0).to_numpy(zero_copy_only=False).astype(np.float64))
        parts = values + indicators + codes
        x = np.stack(parts, axis=1).astype(np.float32) if parts else np.zeros((n, 0), np.float32)
        return x, self.target(batch)

    def target(self, batch) -> np.ndarray:
        import pyarrow.compute as pc

        t = self.prep.target
        column = batch.column(t.name)
        if column.null_count:
            raise DataError(f"target column {t.name!r} is empty in a row of the shards; every row needs a target")
        if t.task == "regression":
            return ((_floats(column, Column(t.name, "numeric")) - t.mean) / t.std).astype(np.float32)
        index = pc.index_in(_text(column), value_set=self._values(t.name, t.classes))
        if index.null_count:
            unknown = pc.filter(_text(column), pc.is_null(index))[0].as_py()
            raise DataError(f"target column {t.name!r} holds {unknown!r}, which is not one of the training classes "
                            f"({', '.join(t.classes)})")
        return index.to_numpy(zero_copy_only=False).astype(np.int64)


def _text(column):
    """A column as the strings a table reads (``kiln.data.table.cell``: stripped)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if pa.types.is_boolean(column.type):
        return pc.if_else(column, "True", "False")
    return pc.utf8_trim_whitespace(column.cast(pa.string()))


def _floats(column, c: Column) -> np.ndarray:
    import pyarrow as pa
    import pyarrow.compute as pc

    if c.type == "boolean":
        text = pc.utf8_lower(_text(column))
        x = pc.if_else(pc.equal(text, c.true_value), 1.0, pc.if_else(pc.equal(text, c.false_value), 0.0, None))
    elif pa.types.is_integer(column.type) or pa.types.is_floating(column.type) or pa.types.is_decimal(column.type):
        x = column.cast(pa.float64())
    else:
        raise DataError(f"column {c.name!r} is numeric in training but the shards hold {column.type} values")
    return pc.fill_null(x, math.nan).to_numpy(zero_copy_only=False).astype(np.float64)


class _Moments:
    """Count, mean and sum of squared deviations, merged batch by batch (Chan et al.), in float64."""

    def __init__(self) -> None:
        self.n, self.mean, self.m2 = 0, 0.0, 0.0

    def add(self, x: np.ndarray) -> None:
        if not len(x):
            return
        n, mean = len(x), float(x.mean())
        m2 = float(((x - mean) ** 2).sum())
        total = self.n + n
        delta = mean - self.mean
        self.mean += delta * n / total
        self.m2 += m2 + delta * delta * self.n * n / total
        self.n = total

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / self.n) if self.n else 1.0


def fit_streaming(shards: ShardSet, owned: list[int], cfg: TabularStreamData, seed: int) -> Preprocessing:
    """The preprocessing of the training shards ``owned``, fitted in one pass (see the module's description)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    schema = shards.schema
    if cfg.target not in schema.names:
        raise DataError(f"data.target: the shards have no column {cfg.target!r}{did_you_mean(cfg.target, schema.names)}"
                        f"; their columns: {', '.join(schema.names)}")
    for name in cfg.columns:
        if name not in schema.names:
            raise DataError(f"data.columns.{name}: the shards have no column {name!r}"
                            f"{did_you_mean(name, schema.names)}; columns: {', '.join(schema.names)}")
    types: dict[str, str] = {}
    for f in schema:
        if f.name == cfg.target:
            continue
        if f.name in cfg.columns:
            types[f.name] = cfg.columns[f.name]
        elif pa.types.is_boolean(f.type):
            types[f.name] = "boolean"
        elif pa.types.is_integer(f.type) or pa.types.is_floating(f.type) or pa.types.is_decimal(f.type):
            types[f.name] = "numeric"
        else:
            types[f.name] = "categorical"
    used = [n for n, t in types.items() if t != "drop"]
    moments = {n: _Moments() for n in used if types[n] in ("numeric", "boolean")}
    missing = Counter()
    counts: dict[str, Counter] = {n: Counter() for n in used if types[n] in ("categorical", "boolean")}
    target_counts: Counter = Counter()
    target_moments, target_numeric = _Moments(), pa.types.is_integer(schema.field(cfg.target).type) or \
        pa.types.is_floating(schema.field(cfg.target).type)
    sample_rows = cfg.sample_rows if cfg.numeric_encoding == "ple" else 0
    sample_keys, sample = np.zeros(0), {n: np.zeros(0) for n in moments}
    keys_rng = np.random.default_rng(np.random.SeedSequence([seed, 7]))
    rows = 0
    for index in owned:
        for batch in shards.batches(index, columns=used + [cfg.target]):
            rows += batch.num_rows
            y = batch.column(cfg.target)
            if y.null_count:
                raise DataError(f"shard {shards.shards[index].path}: target column {cfg.target!r} is empty in "
                                f"{y.null_count} rows; every training row needs a target value")
            target_counts.update(_value_counts(_text(y)))
            if target_numeric:
                target_moments.add(y.cast(pa.float64()).to_numpy(zero_copy_only=False))
            for n, counter in counts.items():
                counter.update(_value_counts(_text(batch.column(n))))
            for n in used:
                missing[n] += batch.column(n).null_count
            columns = {}
            for n, moment in moments.items():
                if types[n] == "numeric" and not (pa.types.is_integer(batch.column(n).type)
                                                  or pa.types.is_floating(batch.column(n).type)):
                    raise DataError(f"data.columns.{n}: numeric, but the shards hold {batch.column(n).type} values")
                if types[n] == "boolean":
                    continue  # after the pass: the true value is known only then
                x = pc.fill_null(batch.column(n).cast(pa.float64()), math.nan).to_numpy(zero_copy_only=False)
                columns[n] = x
                moment.add(x[~np.isnan(x)])
            if sample_rows:
                keys = keys_rng.random(batch.num_rows)
                sample_keys = np.concatenate([sample_keys, keys])
                keep = np.argsort(sample_keys, kind="stable")[:sample_rows]
                sample_keys = sample_keys[keep]
                for n in columns:
                    sample[n] = np.concatenate([sample[n], columns[n]])[keep]
    if not rows:
        raise DataError(f"data.path {cfg.path!r}: the training shards hold no rows")
    target = _target(cfg, target_counts, target_moments)
    kept = []
    for n in used:
        c = Column(n, types[n], "set in data.columns" if n in cfg.columns else f"{schema.field(n).type} column",
                   missing=missing[n], indicator=missing[n] > 0)
        if c.type == "boolean":
            distinct = sorted({str(v).lower() for v in counts[n] if v is not None})
            if len(distinct) > 2:
                raise DataError(f"data.columns.{n}: boolean, but the shards hold {len(distinct)} values")
            c.true_value = next((t for t in ("true", "yes", "y", "t", "1") if t in distinct), distinct[-1])
            c.false_value = next((v for v in distinct if v != c.true_value), None)
            present = sum(k for v, k in counts[n].items() if v is not None)
            ones = sum(k for v, k in counts[n].items() if v is not None and v.lower() == c.true_value)
            c.mean = ones / present if present else 0.0
            c.std = math.sqrt(c.mean * (1 - c.mean)) or 1.0
        elif c.type == "numeric":
            m = moments[n]
            c.mean, c.std = (m.mean, m.std or 1.0) if m.n else (0.0, 1.0)
            if sample_rows:
                present = sample[n][~np.isnan(sample[n])]
                if len(present):
                    edges = np.unique(np.quantile(present, np.linspace(0.0, 1.0, cfg.bins + 1)))
                    c.edges = [float(e) for e in edges] if len(edges) > 2 else []
        else:
            k = counts[n]
            if len(k) > ID_FRACTION * rows and rows >= 20 and n not in cfg.columns:
                c.type, c.reason = "drop", f"{len(k)} distinct texts in {rows} rows (an id or free text)"
            c.categories = sorted(k, key=lambda v: (-k[v], v is None, v or ""))
        if c.type != "drop":
            kept.append(c)
    if not kept:
        raise DataError(f"data.path {cfg.path!r}: no column is left to predict {cfg.target!r} from")
    return Preprocessing(target, kept, cfg.bins if cfg.numeric_encoding == "ple" else None)


def _value_counts(column) -> dict:
    import pyarrow.compute as pc

    return {d["values"]: d["counts"] for d in pc.value_counts(column).to_pylist()}


def _target(cfg: TabularStreamData, counts: Counter, moments: _Moments) -> Target:
    task = cfg.task
    if len(counts) < 2:
        raise DataError(f"target column {cfg.target!r} has one value only in the training shards")
    if task == "auto":
        task = "regression" if moments.n and len(counts) > REGRESSION_MIN_VALUES else (
            "binary" if len(counts) == 2 else "multiclass")
    if task == "regression":
        if not moments.n:
            raise DataError(f"data.task is regression but target column {cfg.target!r} is not numeric")
        return Target(cfg.target, "regression", mean=moments.mean, std=moments.std or 1.0)
    if task == "binary" and len(counts) != 2:
        raise DataError(f"data.task is binary but target column {cfg.target!r} has {len(counts)} classes")
    classes = sorted(counts)
    if task == "binary":
        if cfg.positive is not None and cfg.positive not in counts:
            raise DataError(f"data.positive {cfg.positive!r} is not a value of target column {cfg.target!r} "
                            f"({', '.join(classes)})")
        pos = cfg.positive or min(classes, key=lambda c: (counts[c], c))
        classes = [c for c in classes if c != pos] + [pos]
    return Target(cfg.target, task, classes, [counts[c] for c in classes])


def rebatch(blocks, batch_size: int):
    """Blocks of (inputs, targets) arrays as StreamBatches of ``batch_size`` rows (the last one may be shorter)."""
    carry: list[tuple[np.ndarray, np.ndarray]] = []
    held = 0
    for x, y in blocks:
        carry.append((x, y))
        held += len(x)
        if held < batch_size:
            continue
        x, y = (np.concatenate(a) for a in zip(*carry, strict=True)) if len(carry) > 1 else carry[0]
        full = held - held % batch_size
        for s in range(0, full, batch_size):
            yield StreamBatch(torch.from_numpy(x[s:s + batch_size]), torch.from_numpy(y[s:s + batch_size]))
        carry, held = ([(x[full:], y[full:])] if held > full else []), held - full
    if held:
        x, y = (np.concatenate(a) for a in zip(*carry, strict=True))
        yield StreamBatch(torch.from_numpy(x), torch.from_numpy(y))


class StreamBatch:
    """One training batch drawn from the stream (what the trainer hands back to ``gather``)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)


@KINDS.register("tabular_stream")
class TabularStream(Tabular):
    Config = TabularStreamData
    streams: ClassVar[bool] = True

    def __init__(self, cfg: TabularStreamData, seed: int, run_path: Path | None = None) -> None:
        self.cfg, self.seed, self.dropped, self._table = cfg, seed, [], None
        self._shards: ShardSet | None = None
        self.streams = cfg.stream
        if run_path is not None:
            Tabular.__init__(self, cfg, seed, run_path)  # reads the saved preprocessing only
            self.transform = ArrowTransform(self.prep)
            return
        shards = self.shard_set()
        held = cfg.val_shards + cfg.test_shards
        if len(shards) <= held:
            raise DataError(f"data.path {cfg.path!r}: {len(shards)} shards leave none for training after "
                            f"{cfg.val_shards} validation and {cfg.test_shards} test shards; give more shards or "
                            "lower data.val_shards")
        self.prep = fit_streaming(shards, self.parts["train"], cfg, seed)
        self.transform = ArrowTransform(self.prep)

    def shard_set(self) -> ShardSet:
        if self._shards is None:
            self._shards = ShardSet(self.cfg.path, self.cfg.format)
        return self._shards

    @property
    def parts(self) -> dict[str, list[int]]:
        """Shard indices of each split: test the last ones, validation those before, training the rest."""
        n, v, t = len(self.shard_set()), self.cfg.val_shards, self.cfg.test_shards
        return {"train": list(range(n - v - t)), "val": list(range(n - v - t, n - t)), "test": list(range(n - t, n))}

    def rows(self, split: str) -> int:
        shards = self.shard_set().shards
        return sum(shards[i].rows for i in self.parts[split])

    def training_rows(self) -> int | None:
        """From the shards' metadata, also when reopened from saved files (another rank's fit under --nproc, or a
        resumed run): nothing of the rows themselves is read."""
        return self.rows("train")

    def read(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """A whole split into memory as model input and targets."""
        transform, xs, ys = self.transform, [], []
        for i in self.parts[split]:
            for batch in self.shard_set().batches(i, columns=transform.columns):
                x, y = transform(batch)
                xs.append(x), ys.append(y)
        if not xs:
            return torch.zeros(0, *self.input_shape), torch.zeros(0, dtype=self._target_dtype())
        return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))

    def _target_dtype(self) -> torch.dtype:
        return torch.float32 if self.task == "regression" else torch.int64

    def load(self, progress=None) -> Splits:
        if self.cfg.stream:
            # Training rows stay in the shards: a (rows, 0) tensor holds their count and nothing else.
            n = self.rows("train")
            train = (torch.empty(n, 0), torch.empty(n, 0, dtype=self._target_dtype()))
        else:
            train = self.read("train")
        names = {Path(s.path).name: f"{s.rows} rows" for s in self.shard_set().shards}
        return Splits(*train, *self.read("val"), *self.read("test"), checksums=names)

    def stream(self, *, seed: int, epoch: int, start: int, batch_size: int, rank: int = 0, world_size: int = 1,
               worker: int = 0, workers: int = 1):
        """Training batches of ``batch_size`` rows for reader (rank, worker) in epoch ``epoch``, from the reader's
        row ``start`` on (see :mod:`kiln.data.shards`)."""
        owned = reader_shards(self.parts["train"], rank, world_size, worker, workers)
        read = table_reader(self.shard_set(), self.transform, self.transform.columns)
        counts = [s.rows for s in self.shard_set().shards]
        blocks = stream_rows(read, counts, owned, seed=seed, epoch=epoch, reader=rank * workers + worker,
                             block_rows=self.cfg.shuffle_rows, start=start)
        return rebatch(blocks, batch_size)

    @property
    def workers(self) -> int:
        """Readers per training process (``data.workers``)."""
        return self.cfg.workers

    def reader_rows(self, rank: int = 0, world_size: int = 1, worker: int = 0, workers: int = 1) -> int:
        shards = self.shard_set().shards
        return sum(shards[i].rows for i in reader_shards(self.parts["train"], rank, world_size, worker, workers))

    def gather(self, x: torch.Tensor, y: torch.Tensor, idx) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(idx, StreamBatch):
            return idx.x, idx.y
        return x[idx], y[idx]

    def eval_batches(self, x: torch.Tensor, y: torch.Tensor, size: int):
        if x.dim() == 2 and x.shape[1] == 0 and self.input_shape[0]:
            raise DataError("a streamed table's training rows are not held in memory; evaluate the val or test split "
                            "(or train with data.stream: false)")
        return super().eval_batches(x, y, size)

    def column_values(self, split: str, name: str) -> list[str | None]:
        raise DataError("a streamed table's columns are not held in memory; fairness groups and audits need the "
                        "tabular kind (one file)")

    def shown(self, split: str, x: torch.Tensor, idx: list[int]) -> list[dict[str, Any]]:
        return [{} for _ in idx]
