"""Served table rows: JSON objects, checked against the run's saved preprocessing (:mod:`kiln.data.preprocess`).

An instance is one object of the run's input columns, by name. Numeric columns take numbers, categorical
ones strings (a category training never saw counts as "unknown", as in ``kiln predict``), boolean ones
``true``/``false`` or the texts training saw (e.g. ``"yes"``/``"no"``). A column that had missing values in
the training rows may be ``null`` or left out: the preprocessing imputes it as it did in training. The model
never saw a missing value in the other columns, so they are required. Checked rows become model input
through the run's preprocessing itself, so a served row gives the input ``kiln predict`` gives the same row.
"""

from __future__ import annotations

from typing import Annotated, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, Strict, create_model

from kiln.data.preprocess import Column, Preprocessing
from kiln.data.table import cell, rows_to_table
from kiln.errors import InputError

# Largest magnitude of a numeric value. Beyond 2**53 (about 9e15) float64 no longer holds every integer,
# and a value standardised by a small training std would overflow the model's float32 input.
MAX_ABS_NUMBER = 1e15
MAX_TEXT = 1000  # characters of one categorical or boolean value
SHOWN_CATEGORIES = 50  # in the schema's description and GET /v1/model


def _imputed(c: Column) -> str:
    if c.type == "categorical":
        return "read as the missing-value category training saw"
    return "imputed with the training mean" + (", and flagged to the model" if c.indicator else "")


def _categories(c: Column) -> list[str]:
    return [v for v in c.categories if v is not None]


class TableInputs:
    """One JSON object per table row; every column is a field of the published schema, with its type."""

    kind = "table"
    accepts_files = False

    def __init__(self, prep: Preprocessing) -> None:
        self.prep = prep
        self.columns: list[Column] = list(self.prep.columns)
        # Fields are named c0, c1, ... and read by alias: column names need not be Python names.
        self._model = create_model("TableRow", __config__=ConfigDict(extra="forbid"),
                                   **{f"c{i}": self._field(c) for i, c in enumerate(self.columns)})

    @staticmethod
    def _field(c: Column) -> tuple[Any, Any]:
        text = Annotated[str, Strict(), Field(max_length=MAX_TEXT)]
        if c.type == "numeric":
            kind: Any = Annotated[float, Strict(), Field(allow_inf_nan=False, ge=-MAX_ABS_NUMBER, le=MAX_ABS_NUMBER)]
            about, example = f"numeric (training mean {c.mean:.6g}, std {c.std:.6g})", round(c.mean, 4)
        elif c.type == "boolean":
            kind = Annotated[bool, Strict()] | text
            about, example = f"boolean: true/false, or {c.true_value!r}/{c.false_value!r}", True
        else:
            shown = _categories(c)
            more = f", ... ({len(shown)} in all)" if len(shown) > SHOWN_CATEGORIES else ""
            about = (f"categorical: {', '.join(map(repr, shown[:SHOWN_CATEGORIES]))}{more}; another value counts as "
                     "unknown")
            kind, example = text, shown[0] if shown else "unknown"
        if c.missing:
            kind = kind | None
            about += f". May be null or left out (missing in {c.missing} training rows): {_imputed(c)}"
        return kind, Field(None if c.missing else ..., alias=c.name, title=c.name, description=about,
                           examples=[example])

    def instance_model(self) -> type[BaseModel]:
        return self._model

    def from_instances(self, instances: list[BaseModel]) -> np.ndarray:
        rows = []
        for i, inst in enumerate(instances):
            row: dict[str, Any] = {}
            for j, c in enumerate(self.columns):
                value = getattr(inst, f"c{j}")
                if isinstance(value, bool):
                    value = c.true_value if value else c.false_value
                if value is not None and cell(value) is None:  # "", "NA", "?": read as missing, as in a CSV
                    if not c.missing:
                        raise InputError(f"instances.{i}.{c.name}", f"{value!r} means a missing value, and this "
                                                                  "column had none in training: give a value")
                row[c.name] = value
            rows.append(row)
        return self.prep.transform(rows_to_table(rows, "instances")).numpy()

    def from_json(self, instances: list[Any]) -> np.ndarray | None:
        """Always ``None``: a row has few fields, so the schema checks it about as fast as numpy would."""
        return None

    def example(self) -> np.ndarray:
        """A row of model input (zeros: standardised numbers at their training means, piecewise-linear ones at
        their lowest bin, categories unknown), to warm a backend with."""
        return np.zeros((1, *self.prep.input_shape), dtype=np.float32)

    def describe(self) -> dict[str, Any]:
        columns = []
        for c in self.columns:
            info: dict[str, Any] = {"name": c.name, "type": c.type, "required": not c.missing}
            if c.type == "categorical":
                info["categories"] = _categories(c)[:SHOWN_CATEGORIES]
            elif c.type == "boolean":
                info["values"] = [c.true_value, c.false_value]
            columns.append(info)
        return {"kind": "table", "columns": columns,
                "json": "one object per row: column name -> value (numbers, strings, or true/false)"}
