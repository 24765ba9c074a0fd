"""The ``tabular`` kind of data: a CSV or Parquet file, a target column, stratified splits or k folds.

Training reads the file, splits it, and fits the preprocessing on the training rows only; the run
directory keeps that preprocessing (``preprocessing.json``), and everything after training reopens the
kind from it, so rows are turned into model input exactly as in training.
"""

from __future__ import annotations

import csv
import hashlib
import io
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import torch
from pydantic import Field, model_validator

from kiln.data.kind import DataKind, DataSpec, find_data
from kiln.data.preprocess import (AUTO_BINS, ROWS_PER_BIN, Column, Preprocessing, auto_bins, auto_number_embedding,
                                  fit, fit_target)
from kiln.data.splits import Splits, stratified_rows
from kiln.data.table import Table, read_table, rows_to_table
from kiln.data.table_inputs import TableInputs
from kiln.errors import DataError, RunDirError
from kiln.registry import KINDS, did_you_mean
from kiln.rundir import RunDir

PREPROCESSING = "preprocessing.json"  # in the run directory


def _saved_training_rows(run_path: Path) -> int | None:
    """The training rows a run's manifest records (what ``auto`` settings followed), or None."""
    try:
        rows = RunDir(run_path).read_json(RunDir.MANIFEST).get("samples", {}).get("train")
    except RunDirError:
        return None
    return rows if isinstance(rows, int) else None


class TabularData(DataSpec):
    dataset: Literal["tabular"] = "tabular"
    path: str  # a CSV or Parquet file, relative to root, the current directory or $KILN_DATA
    target: str  # the column to predict
    task: Literal["auto", "binary", "multiclass", "regression"] = "auto"  # auto: from the target's values
    positive: str | None = None  # binary: the positive class (default: the rarer one)
    columns: dict[str, Literal["numeric", "categorical", "boolean", "drop"]] = {}  # overrides of inferred types
    # A numeric column as one standardised value, or piecewise-linear over up to `bins` quantile bins (ple).
    numeric_encoding: Literal["standard", "ple"] = "standard"
    # auto: training rows / 80, between 16 and 128 (kiln.data.preprocess.auto_bins: a bin's slope is learnt from
    # the rows in it; small tables lose with many bins, large ones gain); the run's config.yaml and
    # preprocessing.json keep the number chosen, so predict and serve encode with the same edges.
    bins: Literal["auto"] | Annotated[int, Field(ge=2, le=256)] = "auto"
    test_fraction: float = Field(default=0.2, gt=0.0, lt=1.0)  # held out for testing (stratified), unless folds
    folds: int | None = Field(default=None, ge=2)  # k-fold cross-validation: test on fold `fold` of `folds`
    fold: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _fold_in_range(self) -> TabularData:
        if self.folds is not None and self.fold >= self.folds:
            raise ValueError(f"data.fold {self.fold} must be below data.folds ({self.folds}); folds count from 0")
        return self


def split_indices(table: Table, target: str, task: str, cfg: TabularData, seed: int
                  ) -> tuple[list[int], list[int], list[int]]:
    """Row indices (train, val, test). Classification splits are stratified by the target.

    With ``cfg.folds`` the test rows are fold ``cfg.fold`` of k stratified folds; otherwise a held-out
    ``test_fraction``. Validation rows are ``val_fraction`` of what remains.
    """
    raw = table.columns[target]
    labels = raw if task != "regression" else [0] * len(raw)
    return stratified_rows(labels, cfg.test_fraction, cfg.val_fraction, seed, cfg.folds, cfg.fold)


@KINDS.register("tabular")
class Tabular(DataKind):
    Config = TabularData
    description: ClassVar[str] = "table"
    usage: ClassVar[str] = "use `kiln predict RUN rows.csv` (CSV or Parquet rows), or Run.predict_rows"
    run_files: ClassVar[tuple[str, ...]] = (PREPROCESSING,)
    input_name: ClassVar[str] = "rows"

    def __init__(self, cfg: TabularData, seed: int, run_path: Path | None = None) -> None:
        super().__init__(cfg, seed)
        self.dropped: list[Column] = []
        self._table: Table | None = None
        if run_path is not None:
            saved = RunDir(run_path) / PREPROCESSING
            if not saved.is_file():
                raise RunDirError(f"{run_path} has no {PREPROCESSING}: it is not a finished table run")
            self.prep = Preprocessing.load(saved)
            self.saved_rows = _saved_training_rows(run_path)
            return
        table = self.table()
        full = fit_target(table, cfg.target, cfg.task, cfg.positive)  # the task and positive class, from all rows
        task = full.task
        self.rows = split_indices(table, cfg.target, task, cfg, seed)
        for rows, part, fix in ((self.rows[0], "training", "lower data.test_fraction or data.val_fraction"),
                                (self.rows[2], "test", "raise data.test_fraction, or give more rows")):
            if not rows:
                raise DataError(f"data: {table.source} has {len(table)} rows, which leaves no {part} rows; {fix}")
        positive = full.classes[1] if task == "binary" else None
        bins = auto_bins(len(self.rows[0])) if cfg.bins == "auto" else cfg.bins
        self.prep, self.dropped = fit(table.take(self.rows[0]), cfg.target, task, cfg.columns, positive,
                                      cfg.numeric_encoding, bins)

    def table(self) -> Table:
        if self._table is None:
            path = find_data(self.cfg.path, self.cfg.root, "an existing CSV or Parquet file")
            if not path.is_file():
                raise DataError(f"data.path {self.cfg.path!r}: {path} is not a file; give a CSV or Parquet file")
            self._table = read_table(path)
        return self._table

    # ---- what the run is -------------------------------------------------------------------------

    @property
    def task(self) -> str:  # type: ignore[override]
        return self.prep.target.task

    @property
    def input_shape(self) -> tuple[int, ...]:  # type: ignore[override]
        return self.prep.input_shape

    @property
    def class_names(self) -> list[str]:  # type: ignore[override]
        return list(self.prep.target.classes)

    @property
    def target_scale(self) -> tuple[float, float]:
        return (self.prep.target.mean, self.prep.target.std)

    @property
    def target_name(self) -> str:
        return self.prep.target.name

    def block_fields(self) -> dict[str, dict[str, Any]]:
        layout = {"numeric": self.prep.numeric_inputs, "categories": self.prep.cardinalities}
        numbers = [c.width for c in self.prep.numeric]
        return {"classifier": {"classes": len(self.class_names)}, "feature_tokenizer": layout,
                "tabular_encoder": {**layout, **({"numbers": numbers} if numbers else {})}}

    def training_rows(self) -> int | None:
        """Rows the preprocessing was fitted on (a reopened run's: from its manifest; None if it has none)."""
        return len(self.rows[0]) if hasattr(self, "rows") else self.saved_rows

    def auto_fields(self) -> dict[str, dict[str, Any]]:
        rows = self.training_rows()
        return {} if rows is None else {"tabular_encoder": {"numeric_embedding": auto_number_embedding(rows)}}

    def data_fields(self) -> dict[str, Any]:
        return {"bins": self.prep.bins} if self.cfg.bins == "auto" and self.prep.bins is not None else {}

    def report(self) -> list[str]:
        auto = ([f"data.bins auto: {self.prep.bins} quantile bins per number ({len(self.rows[0]):,} training rows, "
                 f"about {ROWS_PER_BIN} a bin, {AUTO_BINS[0]} to {AUTO_BINS[1]})"]
                if self.cfg.bins == "auto" and self.prep.bins is not None and hasattr(self, "rows") else [])
        return self.prep.describe(self.dropped) + auto

    # ---- data ----------------------------------------------------------------------------------------

    def load(self, progress=None) -> Splits:
        table = self.table()
        if not hasattr(self, "rows"):
            target = self.prep.target
            self.rows = split_indices(table, target.name, target.task, self.cfg, self.seed)
        parts = []
        for rows in self.rows:
            subset = table.take(rows)
            parts += [self.prep.transform(subset), self.prep.encode_target(subset)]
        digest = hashlib.sha256(Path(table.source).read_bytes()).hexdigest()
        return Splits(*parts, checksums={Path(table.source).name: digest})

    def column_values(self, split: str, name: str) -> list[str | None]:
        table = self.table()
        if name not in table.columns:
            names = list(table.columns)
            raise DataError(f"no column {name!r} in {table.source}{did_you_mean(name, names)}; its columns: "
                            f"{', '.join(names)}")
        if not hasattr(self, "rows"):
            target = self.prep.target
            self.rows = split_indices(table, target.name, target.task, self.cfg, self.seed)
        values = table.columns[name]
        return [values[i] for i in self.rows[("train", "val", "test").index(split)]]

    def save(self, run_path: Path) -> None:
        self.prep.save(run_path / PREPROCESSING)

    def shown(self, split: str, x: torch.Tensor, idx: list[int]) -> list[dict[str, Any]]:
        """Each row as the file holds it (``load`` has drawn the splits' rows)."""
        rows = self.table().take([self.rows[("train", "val", "test").index(split)][i] for i in idx])
        return [{"row": {name: values[k] for name, values in rows.columns.items()}} for k in range(len(idx))]

    # ---- inference -----------------------------------------------------------------------------------

    def random_inputs(self, n: int, gen: torch.Generator) -> torch.Tensor:
        """Standardised values; a category code rounds to a category or to unknown."""
        return torch.randn((n, *self.input_shape), generator=gen)

    def inputs(self) -> TableInputs:
        return TableInputs(self.prep)

    def predict_table(self, run, table: Table) -> list[dict[str, Any]]:
        """One dict per row: ``prediction`` and, for classification, ``probability_<class>`` per class.
        A binary prediction is the positive class when its probability reaches the run's threshold."""
        self.prep.check_complete(table)
        x = self.prep.transform(table)
        out = run.predict(x)
        if self.task == "regression":
            return [{"prediction": float(v)} for v in out]
        names = self.class_names
        # The run's threshold (from results.json), or its per-group thresholds when enabled (fairness.json).
        positive = run.positive(out[:, 1].numpy(), x.numpy(), table.columns) if self.task == "binary" else None
        results = []
        for i, row in enumerate(out):
            if positive is not None:
                label = names[1] if positive[i] else names[0]
            else:
                label = names[int(row.argmax())]
            results.append({"prediction": label,
                            **{f"probability_{n}": round(float(v), 6) for n, v in zip(names, row, strict=True)}})
        return results

    def predict_rows(self, run, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Predictions for raw rows as a client sends them (column name -> value)."""
        return self.predict_table(run, rows_to_table(rows))

    def predict_files(self, run, paths: list[str | Path]) -> list[dict[str, Any]]:
        """Each row of each CSV or Parquet file as it was read, with the prediction columns after it."""
        records = []
        for path in paths:
            table = read_table(Path(path))
            for i, extra in enumerate(self.predict_table(run, table)):
                records.append({**{n: values[i] or "" for n, values in table.columns.items()}, **extra})
        return records

    explains: ClassVar[str | None] = "columns"

    def explain_inputs(self, paths: list[str | Path]) -> tuple[torch.Tensor, list[dict[str, Any]]]:
        """Each row of each CSV or Parquet file, with the values of the model's columns as the file holds them."""
        xs, items = [], []
        names = [c.name for c in self.prep.numeric + self.prep.categorical]
        for path in paths:
            table = read_table(Path(path))
            self.prep.check_complete(table)
            xs.append(self.prep.transform(table))
            for i, where in enumerate(table.where):
                items.append({"name": f"{Path(path).stem}_row{i + 1}", "file": str(path), "row": where,
                              "values": {n: table.columns[n][i] for n in names}})
        return torch.cat(xs), items

    def explain_baseline(self, x: torch.Tensor) -> torch.Tensor:
        """Every number at its training mean, every category unknown."""
        return self.prep.baseline().to(x.device).expand_as(x).clone()

    def feature_groups(self) -> list[tuple[str, list[int]]] | None:
        return self.prep.input_groups()

    def render(self, records: list[dict[str, Any]]) -> str:
        """The records as CSV: the files' columns, then the prediction columns."""
        buffer = io.StringIO()
        names = list(dict.fromkeys(k for r in records for k in r))
        writer = csv.DictWriter(buffer, names, restval="", lineterminator="\n")
        writer.writeheader()
        writer.writerows(records)
        return buffer.getvalue()


def rows_to_input(rows: list[dict], run_path: str | Path) -> torch.Tensor:
    """Raw rows (column name -> value, as a client sends them) to the model input of a finished run,
    float32 (N, features), using only the run directory's saved preprocessing."""
    return Preprocessing.load(RunDir(run_path) / PREPROCESSING).transform(rows_to_table(rows))
