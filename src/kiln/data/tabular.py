"""The ``tabular`` data set: a CSV or Parquet file, a target column, stratified splits or k folds.

Training reads the file, splits it, and fits the preprocessing on the training rows only; the run
directory keeps that preprocessing (``preprocessing.json``), and everything after training reopens the
data set from it, so rows are turned into model input exactly as in training.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

from kiln.data.datasets import Dataset, Splits, holdout, stratified_folds, stratified_holdout
from kiln.data.preprocess import Column, Preprocessing, fit, fit_target
from kiln.data.table import Table, find_table, read_table, rows_to_table
from kiln.errors import ConfigError, DataError, RunDirError
from kiln.registry import DATASETS

PREPROCESSING = "preprocessing.json"  # in the run directory


def split_indices(table: Table, target: str, task: str, cfg, seed: int) -> tuple[list[int], list[int], list[int]]:
    """Row indices (train, val, test). Classification splits are stratified by the target.

    With ``cfg.folds`` the test rows are fold ``cfg.fold`` of k stratified folds; otherwise a held-out
    ``test_fraction``. Validation rows are ``val_fraction`` of what remains.
    """
    raw = table.columns[target]
    labels = raw if task != "regression" else [0] * len(raw)
    if cfg.folds:
        test = stratified_folds(labels, cfg.folds, seed)[cfg.fold]
        mask = torch.ones(len(raw), dtype=torch.bool)
        mask[test] = False
        rest = torch.nonzero(mask).flatten()
    else:
        rest, test = stratified_holdout(labels, cfg.test_fraction, seed)
    part, val = stratified_holdout([labels[i] for i in rest], cfg.val_fraction, seed + 1)
    return rest[part].tolist(), rest[val].tolist(), test.sort().values.tolist()


@DATASETS.register("tabular")
class Tabular(Dataset):
    def __init__(self, cfg, seed: int, run_path: Path | None = None) -> None:
        super().__init__(cfg, seed)
        if cfg.path is None or cfg.target is None:
            raise ConfigError("data: the tabular data set needs data.path (a CSV or Parquet file) and data.target "
                              "(the column to predict)")
        self.dropped: list[Column] = []
        self._table: Table | None = None
        saved = run_path / PREPROCESSING if run_path is not None else None
        if saved is not None:
            if not saved.is_file():
                raise RunDirError(f"{run_path} has no {PREPROCESSING}: it is not a finished table run")
            self.prep = Preprocessing.load(saved)
            return
        table = self.table()
        full = fit_target(table, cfg.target, cfg.task, cfg.positive)  # the task and positive class, from all rows
        task = full.task
        self.rows = split_indices(table, cfg.target, task, cfg, seed)
        if not self.rows[0]:
            raise DataError(f"data: {table.source} has {len(table)} rows, which leaves no training rows; "
                            "lower data.test_fraction or data.val_fraction")
        positive = full.classes[1] if task == "binary" else None
        self.prep, self.dropped = fit(table.take(self.rows[0]), cfg.target, task, cfg.columns, positive)

    def table(self) -> Table:
        if self._table is None:
            self._table = read_table(find_table(self.cfg.path, self.cfg.root))
        return self._table

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

    def block_fields(self) -> dict[str, dict[str, Any]]:
        layout = {"numeric": self.prep.numeric_inputs, "categories": self.prep.cardinalities}
        return {"classifier": {"classes": len(self.class_names)}, "tabular_encoder": layout,
                "feature_tokenizer": layout}

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

    def save(self, run_path: Path) -> None:
        self.prep.save(run_path / PREPROCESSING)

    def report(self) -> list[str]:
        return self.prep.describe(self.dropped)


def rows_to_input(rows: list[dict], run_path: str | Path) -> torch.Tensor:
    """Raw rows (column name -> value, as a client sends them) to the model input of a finished run,
    float32 (N, features), using only the run directory's saved preprocessing."""
    return Preprocessing.load(Path(run_path) / PREPROCESSING).transform(rows_to_table(rows))
