"""Forecast metrics and the baselines every time-series report shows beside the model.

All in the series' own units (the target transform undone), per horizon step and overall:

- MAE, RMSE;
- MASE: MAE divided by the in-sample MAE of the seasonal-naive forecast on the training part (Hyndman and
  Koehler 2006): below 1 beats what repeating last season did in training;
- sMAPE in percent, 0 to 200: mean of 2 |F - A| / (|F| + |A|) (0 where both are 0);
- directional accuracy: the share of forecasts that move the same way from the last observed value as the
  truth does, over the steps where the truth moved; ``up_fraction`` is the share of those that went up (what
  "always up" scores).

Baselines: naive (the last value), seasonal naive (the value one season earlier) and a linear autoregression
(least squares on the same lookback windows of the transformed, scaled target).
"""

from __future__ import annotations

import numpy as np

from kiln.errors import DataError

BASELINES = ("naive", "seasonal_naive", "linear_ar")
PER_STEP = ("mae", "rmse", "mase", "smape", "directional_accuracy")


def seasonal_scale(y_train: np.ndarray, season: int) -> float:
    """MASE's denominator: the mean absolute change over one season within the training part."""
    if len(y_train) <= season:
        raise DataError(f"data.season: the training part has {len(y_train)} steps, not more than the season "
                        f"({season}), so MASE has no scale; lower data.season or give a longer series")
    scale = float(np.mean(np.abs(y_train[season:] - y_train[:-season])))
    if not scale > 0:
        raise DataError("data: the target does not change over the training part, so MASE has no scale")
    return scale


def naive(y: np.ndarray, origins: np.ndarray, horizon: int) -> np.ndarray:
    return np.repeat(y[origins][:, None], horizon, axis=1)


def seasonal_naive(y: np.ndarray, origins: np.ndarray, horizon: int, season: int) -> np.ndarray:
    """Step h ahead of t: the value at t + h - season * ceil(h / season), the last observed one of that season."""
    h = np.arange(1, horizon + 1)
    back = h - season * np.ceil(h / season).astype(np.int64)
    return y[origins[:, None] + back[None, :]]


def fit_linear_ar(lags: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Least squares (minimum norm) of ``targets`` (n, horizon) on ``lags`` (n, lookback) and a constant:
    coefficients (lookback + 1, horizon)."""
    design = np.hstack([lags, np.ones((len(lags), 1))])
    coef, *_ = np.linalg.lstsq(design, targets, rcond=None)
    return coef


def apply_linear_ar(coef: np.ndarray, lags: np.ndarray) -> np.ndarray:
    return np.hstack([lags, np.ones((len(lags), 1))]) @ coef


def forecast_metrics(pred: np.ndarray, truth: np.ndarray, last: np.ndarray, scale: float,
                     direction: bool = True) -> tuple[dict[str, float], dict[str, list[float]]]:
    """(overall, per horizon step) metrics of forecasts ``pred`` against ``truth`` (both (n, horizon), units);
    ``last``: each window's last observed value (n,); ``scale``: MASE's denominator."""
    err = pred - truth
    ae = np.abs(err)
    denom = np.abs(pred) + np.abs(truth)
    sape = np.where(denom > 0, 2.0 * ae / np.where(denom > 0, denom, 1.0), 0.0) * 100.0
    overall = {"mae": float(ae.mean()), "rmse": float(np.sqrt((err ** 2).mean())), "mase": float(ae.mean() / scale),
               "smape": float(sape.mean())}
    step = {"mae": ae.mean(0), "rmse": np.sqrt((err ** 2).mean(0)), "mase": ae.mean(0) / scale,
            "smape": sape.mean(0)}
    if direction:
        moved = np.sign(truth - last[:, None])
        counted = moved != 0
        right = (np.sign(pred - last[:, None]) == moved) & counted
        overall["directional_accuracy"] = float(right.sum() / max(counted.sum(), 1))
        step["directional_accuracy"] = right.sum(0) / np.maximum(counted.sum(0), 1)
    return overall, {k: [float(v) for v in values] for k, values in step.items()}


def report(model: tuple[dict, dict], baselines: dict[str, tuple[dict, dict]], truth: np.ndarray,
           last: np.ndarray, loss: float) -> dict:
    """One flat dict for results.json and the summary line: the model's metrics, each baseline's under its name
    (``naive_mase``), their names in ``baselines``, and everything per horizon step under ``per_step``."""
    moved = np.sign(truth - last[:, None])
    out: dict = {"loss": loss, **model[0], "up_fraction": float((moved > 0).sum() / max((moved != 0).sum(), 1))}
    for name, (overall, _) in baselines.items():
        out |= {f"{name}_{k}": v for k, v in overall.items()}
    out["baselines"] = list(baselines)
    out["per_step"] = {"model": model[1], **{name: steps for name, (_, steps) in baselines.items()}}
    out["samples"] = len(truth)
    return out
