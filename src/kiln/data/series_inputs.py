"""Served time-series requests: ``{"history": [{time column: ..., target: ..., covariates...}, ...]}``, the
series' latest rows (at least its lookback), checked as ``kiln predict`` checks a history file (times in
order with the run's step, no duplicates or gaps, numbers finite). Each is answered with the forecast of the
next ``horizon`` steps, with their times, in the series' units.
"""

from __future__ import annotations

from typing import Annotated, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, Strict, create_model

from kiln.data.requests import objects
from kiln.data.table import rows_to_table
from kiln.errors import DataError, InputError

MAX_HISTORY = 10_000  # rows of one history; the model reads only the last lookback (plus the transform's)
MAX_ABS_NUMBER = 1e15
STRICT = ConfigDict(extra="forbid")


class HistoryInputs:
    kind = "history"
    accepts_files = False

    def __init__(self, series) -> None:
        self.series = series  # the run's Timeseries kind
        state, cfg = series.state, series.cfg
        number = Annotated[float, Strict(), Field(allow_inf_nan=False, ge=-MAX_ABS_NUMBER, le=MAX_ABS_NUMBER)]
        time = Annotated[str, Strict(), Field(min_length=1, max_length=64)] | Annotated[int, Strict()]
        fields = {"t": (time, Field(alias=state["time"], description="the step's time, as in the training file"))}
        fields |= {f"c{i}": (number, Field(alias=name)) for i, name in enumerate(state["columns"])}
        row = create_model("HistoryRow", __config__=STRICT, **fields)
        self._model = create_model(
            "HistoryInstance", __config__=STRICT,
            history=(list[row], Field(min_length=series.min_history, max_length=MAX_HISTORY,
                                      description=f"the series' latest rows in time order, at least "
                                                  f"{series.min_history}; forecasts the {cfg.horizon} steps after "
                                                  "the last")))

    def instance_model(self) -> type[BaseModel]:
        return self._model

    def from_instances(self, instances: list[BaseModel]) -> np.ndarray:
        prepared = []
        for i, inst in enumerate(instances):
            rows = [r.model_dump(by_alias=True) for r in inst.history]
            try:
                prepared.append(self.series.prepare(rows_to_table(rows, f"instances.{i}.history")))
            except DataError as e:
                raise InputError(f"instances.{i}.history", str(e)) from None
        return objects(prepared)

    def from_json(self, instances: list[Any]) -> np.ndarray | None:
        return None

    def example(self) -> None:
        return None  # answered eagerly by the kind: nothing to trace

    def describe(self) -> dict[str, Any]:
        state, cfg = self.series.state, self.series.cfg
        return {"kind": "history", "json": '{"history": [{"%s": ..., "%s": ...}, ...]}' % (state["time"],
                                                                                         cfg.target),
                "columns": [state["time"], *state["columns"]], "min_rows": self.series.min_history,
                "frequency": state["frequency"], "horizon": cfg.horizon}
