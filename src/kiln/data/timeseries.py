"""The ``timeseries`` kind of data: a CSV with a time column and one or more series; windows of ``lookback``
steps predicting the next ``horizon`` steps of the target.

The series is split in time, never shuffled: the test part is the last ``test_size`` steps, validation the
steps before it, training everything earlier. With ``folds`` (``kiln train --folds K``) fold k tests on the
k-th of K consecutive blocks at the end and trains on everything before that block (walk-forward, an
expanding window). The target transform and the scaling are fitted on the training part only; a window's
input holds only steps up to its forecast origin. A stored sample is that origin (an index into the series);
``to_input`` gathers its window. Metrics are in the series' units, beside naive, seasonal-naive and linear
autoregression forecasts (:mod:`kiln.data.forecasting`). ``series.json`` in the run directory keeps what
prediction needs: columns, frequency, transform, scaling.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import Field, PositiveInt, model_validator

import kiln.data.forecasting as fc
from kiln.data.kind import DataKind, DataSpec, find_data
from kiln.data.series import (CALENDAR, FREQUENCIES, TRANSFORMS, Times, advance, calendar_features, check_transform,
                              dropped, invert, read_times, stages, transform_steps)
from kiln.data.splits import Splits
from kiln.data.table import Table, read_table, rows_to_table
from kiln.errors import ConfigError, DataError, RunDirError
from kiln.registry import KINDS
from kiln.rundir import RunDir

SERIES = "series.json"  # in the run directory


class TimeseriesData(DataSpec):
    dataset: Literal["timeseries"] = "timeseries"
    path: str  # a CSV (or Parquet) file, relative to root, the current directory or $KILN_DATA
    target: str  # the column to forecast
    time: str | None = None  # the time column (default: the first column)
    covariates: list[str] = []  # other numeric columns the model reads (their past only)
    calendar: list[Literal[CALENDAR]] = []  # known-future features: each input step carries the calendar (sine and
    # cosine) of the step `horizon` after it, so the last `horizon` input steps carry the forecast steps' calendar
    frequency: Literal[FREQUENCIES] = "auto"  # the step of the series; auto: from the times
    allow_gaps: bool = False  # take each row as the next step even where times are missing (trading days)
    lookback: PositiveInt  # steps the model reads
    horizon: PositiveInt = 1  # steps it forecasts
    season: PositiveInt = 1  # steps per season (12 for monthly data): seasonal naive, MASE, seasonal_diff
    target_transform: Literal[tuple(TRANSFORMS)] = "none"  # log, diff, log_return, seasonal_diff, log_seasonal_diff
    test_size: PositiveInt | None = None  # steps at the end held out for testing (default: test_fraction of them)
    test_fraction: float = Field(default=0.2, gt=0.0, lt=1.0)
    folds: int | None = Field(default=None, ge=2)  # walk-forward: test on block `fold` of `folds` blocks at the end
    fold: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _consistent(self) -> TimeseriesData:
        if self.folds is not None and self.fold >= self.folds:
            raise ValueError(f"data.fold {self.fold} must be below data.folds ({self.folds}); folds count from 0")
        if self.target in self.covariates:
            raise ValueError(f"data.covariates: {self.target!r} is the target; it is read already")
        if self.target_transform in ("seasonal_diff", "log_seasonal_diff") and self.season < 2:
            raise ValueError(f"data.season: {self.target_transform} needs the season's length (e.g. 12 for "
                             "monthly data)")
        return self


def split_bounds(n: int, cfg: TimeseriesData) -> tuple[int, int, int, int]:
    """(val_start, test_start, test_end, test_size) as row indices: train [0, val_start), val [val_start,
    test_start), test [test_start, test_end). With folds, test blocks of ``test_size`` tile the end of the
    series and fold k is the k-th of them. Validation is ``val_fraction`` of the steps before the test block,
    and at least ``horizon`` of them (one window) unless ``val_fraction`` is 0."""
    size = cfg.test_size or max(round(n * cfg.test_fraction / (cfg.folds or 1)), 1)
    blocks = cfg.folds or 1
    if size * blocks >= n:
        raise DataError(f"data.test_size: {blocks} test block(s) of {size} steps leave no training steps in a series "
                        f"of {n}; lower data.test_size or data.folds")
    test_end = n - (blocks - 1 - (cfg.fold if cfg.folds else 0)) * size
    test_start = test_end - size
    val = max(round(test_start * cfg.val_fraction), cfg.horizon) if cfg.val_fraction else 0  # one window at least
    return test_start - val, test_start, test_end, size


@KINDS.register("timeseries")
class Timeseries(DataKind):
    Config = TimeseriesData
    description: ClassVar[str] = "time-series"
    usage: ClassVar[str] = "use `kiln predict RUN history.csv` (the series' latest rows, at least its lookback), " \
                           "or Run.forecast"
    run_files: ClassVar[tuple[str, ...]] = (SERIES,)
    decodes: ClassVar[bool] = True  # a forecast is undone per history (transform, timestamps): the kind answers
    input_name: ClassVar[str] = "windows"
    task = "forecast"

    def __init__(self, cfg: TimeseriesData, seed: int, run_path: Path | None = None) -> None:
        super().__init__(cfg, seed)
        self.steps = transform_steps(cfg.target_transform)
        self.drop = dropped(self.steps, cfg.season)
        self._features: dict[torch.device, torch.Tensor] = {}
        self._baselines: dict[bytes, dict] = {}
        if run_path is not None:
            saved = RunDir(run_path) / SERIES
            if not saved.is_file():
                raise RunDirError(f"{run_path} has no {SERIES}: it is not a finished time-series run")
            self.state = RunDir(run_path).read_json(SERIES)
            return
        self.state = self._fit()

    # ---- reading ------------------------------------------------------------------------------------

    def _read(self, table: Table, frequency: str) -> tuple[Times, np.ndarray, np.ndarray, list[str]]:
        """(times, target (n,), covariates (n, k), where each row is) in time order, every value checked."""
        cfg = self.cfg
        time_col = self.state["time"] if hasattr(self, "state") else cfg.time or next(iter(table.columns))
        columns = [cfg.target, *cfg.covariates]
        for j, name in enumerate(columns):
            if name not in table.columns:
                field = "data.target" if j == 0 else "data.covariates"
                raise DataError(f"{field}: {table.source} has no column {name!r}; its columns are "
                                f"{', '.join(table.columns)}")
        times, order = read_times(table, time_col, frequency, cfg.allow_gaps)
        if times.style == "int" and cfg.calendar:
            raise ConfigError(f"data.calendar needs dates in the time column {time_col!r}; it holds integer steps")
        where = [table.where[i] for i in order]
        values = np.empty((len(order), len(columns)), dtype=np.float64)
        for j, name in enumerate(columns):
            cells = table.columns[name]
            for k, i in enumerate(order):
                text = cells[i]
                try:
                    values[k, j] = float(text) if text is not None else np.nan
                except ValueError:
                    raise DataError(f"{table.source}, {table.where[i]}: {text!r} in column {name!r} is not a "
                                    "number") from None
                if not np.isfinite(values[k, j]):
                    raise DataError(f"{table.source}, {table.where[i]}: column {name!r} has no value "
                                    f"({text!r}); a series needs every step (fill or drop the row)")
        check_transform(values[:, 0], self.steps, where, cfg.target_transform)
        return times, values[:, 0], values[:, 1:], where

    def _columns(self, times: Times, y: np.ndarray, cov: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
        """(the target's transform stages, unscaled features (n, features)): the transformed target, the
        covariates, and the calendar features of the time ``horizon`` steps after each row (known in advance;
        past the last row, the times the frequency gives)."""
        levels = stages(y, self.steps, self.cfg.season)
        h = self.cfg.horizon
        ahead = times.values[h:] + [advance(times.values[-1], times.frequency, k) for k in range(1, h + 1)]
        ahead = ahead[:len(times.values)]
        feats = np.hstack([levels[-1][:, None], cov, calendar_features(ahead, list(self.cfg.calendar))])
        return levels, feats

    def _table(self) -> Table:
        path = find_data(self.cfg.path, self.cfg.root, "an existing CSV file")
        if not path.is_file():
            raise DataError(f"data.path {self.cfg.path!r}: {path} is not a file; give a CSV file")
        return read_table(path)

    def _fit(self) -> dict[str, Any]:
        """Read the series, split it, and fit scaling, MASE's scale and the linear autoregression on the
        training part only."""
        cfg = self.cfg
        table = self._table()
        times, y, cov, _ = self._read(table, cfg.frequency)
        n, need = len(y), cfg.lookback + cfg.horizon + self.drop
        if n < need:
            raise DataError(self._too_short(n, "the series"))
        val_start, test_start, test_end, size = split_bounds(n, cfg)
        if size < cfg.horizon:
            raise DataError(f"data.test_size: the test part has {size} steps, fewer than the horizon "
                            f"({cfg.horizon}); raise data.test_size (or data.test_fraction)")
        if val_start < need:
            raise DataError(self._too_short(val_start, f"the training part (up to {times.text(val_start - 1)})"))
        levels, feats = self._columns(times, y, cov)
        train = feats[self.drop:val_start]
        mean, std = train.mean(0), train.std(0)
        calendar = slice(1 + cov.shape[1], None)
        mean[calendar], std[calendar] = 0.0, 1.0  # sine and cosine are in [-1, 1] already
        std = np.where(std > 0, std, 1.0)
        state = {"time": cfg.time or next(iter(table.columns)), "frequency": times.frequency, "style": times.style,
                 "columns": [cfg.target, *cfg.covariates], "mean": mean.tolist(), "std": std.tolist(),
                 "mase_scale": fc.seasonal_scale(y[:val_start], cfg.season), "rows": n,
                 "split": {"val_start": val_start, "test_start": test_start, "test_end": test_end},
                 "last_train_time": times.text(val_start - 1), "first_test_time": times.text(test_start),
                 "last_test_time": times.text(test_end - 1)}
        z = (levels[-1] - mean[0]) / std[0]
        origins = self._origins(self.drop + cfg.lookback - 1, val_start - 1 - cfg.horizon)
        lags = z[origins[:, None] + self._offsets().numpy()[None, :]]
        state["linear_ar"] = fc.fit_linear_ar(lags, self._targets(z, origins)).tolist()
        return state

    def _too_short(self, n: int, what: str) -> str:
        cfg = self.cfg
        extra = f" + the {self.drop} first step(s) the {cfg.target_transform} transform uses" if self.drop else ""
        return (f"data: {what} has {n} steps, fewer than lookback + horizon{extra} = "
                f"{cfg.lookback + cfg.horizon + self.drop} ({cfg.lookback} + {cfg.horizon}"
                f"{' + ' + str(self.drop) if self.drop else ''}); lower data.lookback or data.horizon, or hold out "
                "less for validation and testing (data.val_fraction, data.test_size, --folds)")

    # ---- windows ------------------------------------------------------------------------------------

    def _offsets(self) -> torch.Tensor:
        return torch.arange(-self.cfg.lookback + 1, 1)

    def _origins(self, first: int, last: int) -> np.ndarray:
        return np.arange(max(first, self.drop + self.cfg.lookback - 1), last + 1, dtype=np.int64)

    def _targets(self, z: np.ndarray, origins: np.ndarray) -> np.ndarray:
        return z[origins[:, None] + np.arange(1, self.cfg.horizon + 1)[None, :]]

    def _scaled(self, feats: np.ndarray) -> np.ndarray:
        return (feats - np.asarray(self.state["mean"])) / np.asarray(self.state["std"])

    # ---- what the run is ------------------------------------------------------------------------------

    @property
    def input_shape(self) -> tuple[int, ...]:  # type: ignore[override]
        return (self.cfg.lookback, len(self.state["mean"]))

    @property
    def target_name(self) -> str:
        return self.cfg.target

    def block_fields(self) -> dict[str, dict[str, Any]]:
        return {"forecaster": {"horizon": self.cfg.horizon}}

    def check_model(self, specs) -> None:
        if specs[-1].type != "forecaster":
            raise ConfigError(f"model.blocks.{len(specs) - 1} ({specs[-1].type}): a time-series model ends with "
                              f"`forecaster`, which gives the {self.cfg.horizon} forecast steps (data.horizon)")

    def report(self) -> list[str]:
        s, cfg = self.state, self.cfg
        split = s["split"]
        features = ", ".join([f"{cfg.target} ({cfg.target_transform})", *cfg.covariates,
                              *(f"{c} of the step {cfg.horizon} ahead (sin, cos)" for c in cfg.calendar)])
        return [f"series {cfg.target}: {s['rows']} steps ({s['frequency']}); training to {s['last_train_time']} "
                f"({split['val_start']} steps), validation {split['test_start'] - split['val_start']} steps, "
                f"test {s['first_test_time']} to {s['last_test_time']} ({split['test_end'] - split['test_start']} "
                f"steps)",
                f"windows: {cfg.lookback} steps of {features} -> the next {cfg.horizon} of {cfg.target}; scaled "
                f"with training-part statistics; MASE scale {s['mase_scale']:.6g} (seasonal naive, season "
                f"{cfg.season}, in the training part)"]

    # ---- data -----------------------------------------------------------------------------------------

    def load(self, progress=None) -> Splits:
        cfg, split = self.cfg, self.state["split"]
        table = self._table()
        times, y, cov, _ = self._read(table, self.state["frequency"])
        if len(y) != self.state["rows"]:
            raise DataError(f"data.path: {table.source} has {len(y)} rows; this run was trained on "
                            f"{self.state['rows']}: the file changed")
        levels, feats = self._columns(times, y, cov)
        self.y, self.levels = y, levels
        scaled = self._scaled(feats)
        self.z = scaled[:, 0]
        self.features = torch.from_numpy(np.nan_to_num(scaled).astype(np.float32))
        self._features.clear()
        h = cfg.horizon
        parts = []
        for first, last in ((0, split["val_start"] - 1 - h), (split["val_start"] - 1, split["test_start"] - 1 - h),
                            (split["test_start"] - 1, split["test_end"] - 1 - h)):
            origins = self._origins(first, last) if last >= first else np.zeros(0, dtype=np.int64)
            parts += [torch.from_numpy(origins), torch.from_numpy(self._targets(self.z, origins).astype(np.float32))]
        digest = hashlib.sha256(Path(table.source).read_bytes()).hexdigest()
        return Splits(*parts, checksums={Path(table.source).name: digest})

    def save(self, run_path: Path) -> None:
        RunDir(run_path).write_json(SERIES, self.state)

    def to_input(self, x: torch.Tensor) -> torch.Tensor:
        """Origins (int64, (B,)) to their windows (B, lookback, features); windows as they are."""
        if x.dtype.is_floating_point:
            return x.to(torch.float32)
        if x.device not in self._features:
            self._features[x.device] = self.features.to(x.device)
        return self._features[x.device][x[:, None] + self._offsets().to(x.device)[None, :]]

    def standalone(self, x: torch.Tensor) -> torch.Tensor:
        return self.to_input(x)  # the windows (scaled): an exported graph reads them, not origins into this series

    def random_inputs(self, n: int, gen: torch.Generator) -> torch.Tensor:
        return torch.randn((n, *self.input_shape), generator=gen)

    def as_stored(self, x: torch.Tensor) -> torch.Tensor:
        return x[None] if x.dim() == 2 else x

    # ---- metrics ---------------------------------------------------------------------------------------

    def metrics(self, xs: list[torch.Tensor], outputs: torch.Tensor, y: torch.Tensor) -> dict[str, Any] | None:
        """Loss on the scaled targets; MAE, RMSE, MASE, sMAPE and directional accuracy in the series' units,
        overall and per step, beside the naive, seasonal-naive and linear-AR forecasts of the same windows."""
        origins = torch.cat(xs).cpu().numpy() if xs else np.zeros(0, dtype=np.int64)
        if not len(origins) or origins.dtype.kind not in "iu":
            return {"loss": float("nan"), "samples": 0} if not len(origins) else None
        cfg, scale = self.cfg, self.state["mase_scale"]
        loss = float(((outputs.double() - y.double()) ** 2).mean())
        truth = self.y[origins[:, None] + np.arange(1, cfg.horizon + 1)[None, :]]
        last = self.y[origins]
        model = fc.forecast_metrics(self._units(outputs.double().numpy(), origins), truth, last, scale)
        key = origins.tobytes()
        if key not in self._baselines:
            lags = self.z[origins[:, None] + self._offsets().numpy()[None, :]]
            ar = fc.apply_linear_ar(np.asarray(self.state["linear_ar"]), lags)
            self._baselines = {} if len(self._baselines) > 3 else self._baselines
            self._baselines[key] = {
                "naive": fc.forecast_metrics(fc.naive(self.y, origins, cfg.horizon), truth, last, scale, False),
                "seasonal_naive": fc.forecast_metrics(fc.seasonal_naive(self.y, origins, cfg.horizon, cfg.season),
                                                      truth, last, scale, cfg.season > 1),
                "linear_ar": fc.forecast_metrics(self._units(ar, origins), truth, last, scale)}
        return fc.report(model, self._baselines[key], truth, last, loss)

    def _units(self, scaled: np.ndarray, origins: np.ndarray, levels: list[np.ndarray] | None = None) -> np.ndarray:
        """Scaled, transformed forecasts back in the series' units."""
        z = scaled * self.state["std"][0] + self.state["mean"][0]
        return invert(levels if levels is not None else self.levels, self.steps, self.cfg.season, origins, z)

    # ---- forecasting from a history ----------------------------------------------------------------------

    @property
    def min_history(self) -> int:
        return self.cfg.lookback + self.drop

    def prepare(self, table: Table) -> dict[str, Any]:
        """A recent history (a table with the run's time, target and covariate columns) to the model's window and
        what turns its forecast into an answer."""
        times, y, cov, _ = self._read(table, self.state["frequency"])
        if len(y) < self.min_history:
            raise DataError(f"{table.source}: {len(y)} rows; a forecast reads the last {self.cfg.lookback} steps"
                            + (f" and the {self.drop} before them ({self.cfg.target_transform})" if self.drop else "")
                            + f": give at least {self.min_history} rows")
        levels, feats = self._columns(times, y, cov)
        window = self._scaled(feats[-self.cfg.lookback:]).astype(np.float32)
        return {"window": window, "levels": levels, "times": times.after(self.cfg.horizon)}

    def answer(self, prepared: list[dict[str, Any]], outputs: np.ndarray) -> list[dict[str, Any]]:
        out = []
        for item, scaled in zip(prepared, outputs, strict=True):
            origin = np.array([len(item["levels"][0]) - 1])
            values = self._units(scaled[None].astype(np.float64), origin, item["levels"])[0]
            out.append({"forecast": [{"time": t, "value": float(v)} for t, v in zip(item["times"], values,
                                                                                     strict=True)]})
        return out

    def forecast_tables(self, run, tables: list[Table]) -> list[dict[str, Any]]:
        prepared = [self.prepare(t) for t in tables]
        windows = torch.from_numpy(np.stack([p["window"] for p in prepared]))
        return self.answer(prepared, run.outputs(windows).numpy())

    def forecast(self, run, history: list[dict[str, Any]]) -> dict[str, Any]:
        """The forecast after a history given as rows (column name -> value): ``{"forecast": [{time, value}]}``."""
        return self.forecast_tables(run, [rows_to_table(history, "history")])[0]

    def predict_files(self, run, paths: list[str | Path]) -> list[dict[str, Any]]:
        """One record per forecast step of each history file: file, step, time, the forecast value."""
        tables = [read_table(Path(p)) for p in paths]
        records = []
        for path, answer in zip(paths, self.forecast_tables(run, tables), strict=True):
            for h, step in enumerate(answer["forecast"], start=1):
                records.append({"file": str(path), "step": h, self.state["time"]: step["time"],
                                self.cfg.target: step["value"]})
        return records

    def render(self, records: list[dict[str, Any]]) -> str:
        buffer = io.StringIO()
        names = list(records[0]) if records else []
        buffer.write(",".join(names) + "\n")
        for r in records:
            buffer.write(",".join(f"{r[n]:.6g}" if isinstance(r[n], float) else str(r[n]) for n in names) + "\n")
        return buffer.getvalue()

    def inputs(self):
        from kiln.data.series_inputs import HistoryInputs

        return HistoryInputs(self)

    def decode_batch(self, run, batch: np.ndarray) -> np.ndarray:
        """Served histories (prepared by :class:`HistoryInputs`) to their forecasts, in one forward pass."""
        from kiln.data.requests import objects

        prepared = list(batch)
        windows = torch.from_numpy(np.stack([p["window"] for p in prepared]))
        return objects(self.answer(prepared, run.outputs(windows).numpy()))
