"""Time series (`dataset: timeseries`): no window sees its future (and scaling comes from the training part only),
forecast metrics against hand-computed values, transforms undone exactly, the airline example beating seasonal
naive, a saved run reloading to the same forecasts (`kiln predict`, Run.forecast, serving), walk-forward folds,
and bad series refused with the row or time named."""

from __future__ import annotations

import json
import math
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import kiln
from kiln.cli import main
from kiln.config import load_config
from kiln.data import forecasting as fc
from kiln.data.kind import open_kind
from kiln.data.series import TRANSFORMS, invert, stages
from kiln.errors import KilnError

ROOT = Path(__file__).parent.parent
THREADS = 1


def monthly_csv(path: Path, n: int = 84, seed: int = 0, order: list[int] | None = None) -> Path:
    """A synthetic monthly series (trend, a yearly season, noise) with a covariate, from 2000-01."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        level = 100 + 2 * i + 15 * math.sin(2 * math.pi * i / 12) + rng.gauss(0, 3)
        rows.append(f"{2000 + i // 12}-{i % 12 + 1:02d},{level:.3f},{rng.gauss(0, 1):.3f}")
    order = order if order is not None else list(range(n))
    path.write_text("month,sales,temp\n" + "".join(rows[i] + "\n" for i in order))
    return path


def series_config(path: Path, **data) -> dict:
    return {"name": "ts", "seed": 0,
            "data": {"dataset": "timeseries", "path": str(path), "time": "month", "target": "sales",
                     "covariates": ["temp"], "calendar": ["month"], "lookback": 12, "horizon": 3, "season": 12,
                     "test_size": 12, "val_fraction": 0.2, **data},
            "model": {"blocks": [{"type": "flatten"}, {"type": "dense", "units": 16, "activation": "relu"},
                                 {"type": "forecaster"}]},
            "train": {"epochs": 30, "batch_size": 16, "threads": THREADS, "log_every": 1000}}


def kind_of(config: dict):
    cfg = load_config(config)
    kind = open_kind(cfg.data, cfg.seed)
    return kind, kind.load()


def windows(kind, origins: torch.Tensor) -> torch.Tensor:
    return kind.to_input(origins)


# ---- no leakage -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("transform", ["none", "log_return", "log_seasonal_diff"])
def test_changing_the_future_leaves_earlier_windows_and_the_scaling_unchanged(tmp_path: Path, transform: str) -> None:
    base = monthly_csv(tmp_path / "a.csv")
    config = series_config(base, target_transform=transform)
    kind, data = kind_of(config)
    cut = kind.state["split"]["val_start"]  # everything from here on is after the training part
    # The future from `cut` on: target and covariate values shuffled among those rows, and the rows of the
    # file in another order.
    lines = base.read_text().splitlines()
    head, body = lines[0], lines[1:]
    rng = random.Random(1)
    future = [line.split(",") for line in body[cut:]]
    sales, temps = [f[1] for f in future], [f[2] for f in future]
    rng.shuffle(sales), rng.shuffle(temps)
    body = body[:cut] + [f"{f[0]},{s},{t}" for f, s, t in zip(future, sales, temps, strict=True)]
    rng.shuffle(body)
    changed = tmp_path / "b.csv"
    changed.write_text("\n".join([head, *body]) + "\n")
    kind2, data2 = kind_of(series_config(changed, target_transform=transform))

    for key in ("mean", "std", "mase_scale", "linear_ar", "split"):
        assert kind2.state[key] == kind.state[key], key  # fitted on the training part only
    assert torch.equal(data2.train_x, data.train_x) and torch.equal(data2.train_y, data.train_y)
    for split in ("train", "val", "test"):
        origins = data.split(split)[0]
        before = origins[origins < cut]  # windows whose inputs end before the change
        assert torch.equal(windows(kind2, before), windows(kind, before)), split
    # The test can fail: the windows that read a changed step differ, and changing the training part moves the scaling.
    later = data.test_x
    assert not torch.equal(windows(kind2, later), windows(kind, later))
    lines = base.read_text().splitlines()
    lines[5] = lines[5].split(",")[0] + ",500.0,0.0"
    early = tmp_path / "c.csv"
    early.write_text("\n".join(lines) + "\n")
    assert kind_of(series_config(early, target_transform=transform))[0].state["mean"] != kind.state["mean"]


def test_windows_hold_only_the_past_of_their_origin(tmp_path: Path) -> None:
    kind, data = kind_of(series_config(monthly_csv(tmp_path / "a.csv"), covariates=[], calendar=[]))
    z = kind.z
    x = windows(kind, data.test_x)
    for origin, window, target in zip(data.test_x.tolist(), x, data.test_y, strict=True):
        assert np.allclose(window[:, 0].numpy(), z[origin - 11:origin + 1], atol=1e-6)  # steps up to the origin
        assert np.allclose(target.numpy(), z[origin + 1:origin + 4], atol=1e-6)  # the 3 steps after it
    split = kind.state["split"]
    assert data.train_x.max() + 3 < split["val_start"]  # training targets stay before validation
    assert data.test_x.min() + 1 == split["test_start"]  # the first test window forecasts the first test step


def test_calendar_features_are_those_of_the_steps_ahead_known_in_advance(tmp_path: Path) -> None:
    kind, data = kind_of(series_config(monthly_csv(tmp_path / "a.csv"), covariates=[], calendar=["month"]))
    x = windows(kind, data.test_x)
    for origin, window in zip(data.test_x.tolist(), x, strict=True):
        months = (np.arange(origin - 11, origin + 1) + 3) % 12  # each input step's month + horizon, from January
        angle = 2 * np.pi * months / 12
        assert np.allclose(window[:, 1].numpy(), np.sin(angle), atol=1e-6)
        assert np.allclose(window[:, 2].numpy(), np.cos(angle), atol=1e-6)


@pytest.mark.parametrize(("times", "frequency", "after"), [
    (["2020-01-31", "2020-02-29", "2020-03-31"], "month", ["2020-04-30", "2020-05-31"]),
    (["2020-01", "2020-02", "2020-03"], "month", ["2020-04", "2020-05"]),
    (["2019-12-31", "2020-03-31", "2020-06-30"], "quarter", ["2020-09-30", "2020-12-31"]),
    (["2024-03-07", "2024-03-08", "2024-03-11"], "business_day", ["2024-03-12", "2024-03-13"]),
    (["2024-03-30", "2024-03-31", "2024-04-01"], "day", ["2024-04-02", "2024-04-03"]),
    (["2024-03-31 00:00", "2024-03-31 01:00", "2024-03-31 02:00"], "hour", ["2024-03-31 03:00:00",
                                                                         "2024-03-31 04:00:00"]),
    (["7", "8", "9"], "step", ["10", "11"]),
])
def test_the_step_of_a_series_is_inferred_and_continued(times: list[str], frequency: str, after: list[str]) -> None:
    from kiln.data.series import read_times
    from kiln.data.table import rows_to_table

    parsed, _ = read_times(rows_to_table([{"t": t} for t in times]), "t", "auto", False)
    assert parsed.frequency == frequency
    assert parsed.after(2) == after


# ---- metrics and transforms -------------------------------------------------------------------------------


def test_metrics_against_hand_computed_values() -> None:
    pred = np.array([[2.0, 4.0], [10.0, 10.0]])
    truth = np.array([[1.0, 5.0], [12.0, 9.0]])
    last = np.array([3.0, 10.0])
    overall, step = fc.forecast_metrics(pred, truth, last, scale=2.0)
    # errors 1, -1, -2, 1: MAE 5/4, RMSE sqrt(7/4); sMAPE 200 * (1/3 + 1/9 + 2/22 + 1/19) / 4
    assert overall["mae"] == pytest.approx(1.25)
    assert overall["rmse"] == pytest.approx(math.sqrt(7 / 4))
    assert overall["mase"] == pytest.approx(1.25 / 2)
    assert overall["smape"] == pytest.approx(200 * (1 / 3 + 1 / 9 + 2 / 22 + 1 / 19) / 4)
    # truth moves down, up, up, down from the last value; the forecasts down, up, flat, flat: 2 of 4 right
    assert overall["directional_accuracy"] == pytest.approx(0.5)
    assert step["mae"] == pytest.approx([1.5, 1.0])
    assert step["directional_accuracy"] == pytest.approx([0.5, 0.5])
    y = np.array([1.0, 2.0, 4.0, 7.0, 11.0])
    assert fc.seasonal_scale(y, 1) == pytest.approx(2.5)  # mean of 1, 2, 3, 4
    assert fc.seasonal_scale(y, 2) == pytest.approx(5.0)  # mean of 3, 5, 7
    assert fc.naive(y, np.array([2]), 2).tolist() == [[4.0, 4.0]]
    assert fc.seasonal_naive(y, np.array([3]), 3, 2).tolist() == [[4.0, 7.0, 4.0]]  # t+1 -> t-1, t+2 -> t, t+3 -> t-1


def test_a_tiny_series_reports_hand_computed_metrics_and_baselines(tmp_path: Path) -> None:
    y = [1, 2, 4, 7, 11, 16, 22, 29, 37, 46, 56, 67]  # each step adds one more than the last
    csv = tmp_path / "tiny.csv"
    csv.write_text("t,y\n" + "".join(f"{i},{v}\n" for i, v in enumerate(y)))
    config = {"name": "tiny", "data": {"dataset": "timeseries", "path": str(csv), "target": "y", "lookback": 2,
                                       "horizon": 1, "test_size": 3, "val_fraction": 0.0},
              "model": {"blocks": [{"type": "forecaster"}]}}
    kind, data = kind_of(config)
    assert data.test_x.tolist() == [8, 9, 10] and kind.state["mase_scale"] == pytest.approx(4.5)  # mean of 1..8
    report = kind.metrics([data.test_x], data.test_y.clone(), data.test_y)  # a perfect forecast
    assert report["loss"] == 0 and report["mae"] < 1e-4 and report["smape"] < 1e-4  # float32 targets
    assert report["directional_accuracy"] == 1 and report["up_fraction"] == 1
    # naive: 37, 46, 56 for 46, 56, 67: errors 9, 10, 11
    assert report["naive_mae"] == pytest.approx(10) and report["naive_mase"] == pytest.approx(10 / 4.5)
    assert report["naive_rmse"] == pytest.approx(math.sqrt((81 + 100 + 121) / 3))
    assert report["naive_smape"] == pytest.approx(200 / 3 * (9 / 83 + 10 / 102 + 11 / 123))
    # y[t+1] = 2 y[t] - y[t-1] + 1 exactly: least squares on two lags and a constant finds it
    assert report["linear_ar_mae"] == pytest.approx(0, abs=1e-6)


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_transforms_are_undone_exactly_from_each_windows_history(name: str) -> None:
    rng = np.random.default_rng(0)
    y = 50 + np.cumsum(rng.uniform(0.1, 2.0, 60)) + 5 * np.sin(np.arange(60))
    steps, season = TRANSFORMS[name], 12
    levels = stages(y, steps, season)
    origins = np.arange(30, 45)
    horizon = 15  # longer than the season: later steps build on forecast ones
    true_future = levels[-1][origins[:, None] + np.arange(1, horizon + 1)]
    back = invert([lv.copy() for lv in levels], steps, season, origins, true_future)
    assert np.allclose(back, y[origins[:, None] + np.arange(1, horizon + 1)])


# ---- training, reload, predict, serve -------------------------------------------------------------------


@pytest.fixture(scope="module")
def airline_run(tmp_path_factory) -> Path:
    if not os.environ.get("KILN_DATA") or not (Path(os.environ["KILN_DATA"]) / "timeseries").is_dir():
        pytest.skip("the airline series is unavailable: set KILN_DATA to a folder with timeseries/ (../shared/data)")
    out = tmp_path_factory.mktemp("air") / "run"
    kiln.train(ROOT / "examples" / "airline.yaml", {"train.threads": THREADS}, out=out, live=False)
    return out


def test_airline_beats_seasonal_naive_on_mase(airline_run: Path) -> None:
    test = kiln.Run.load(airline_run).metrics["test"]
    assert test["samples"] == 13  # forecast origins 1958-12 .. 1959-12, 12 months each
    assert test["mase"] < test["seasonal_naive_mase"]
    assert test["mase"] < test["naive_mase"]
    assert set(test["per_step"]) == {"model", "naive", "seasonal_naive", "linear_ar"}
    assert len(test["per_step"]["model"]["mase"]) == 12


def test_reloaded_run_gives_the_same_metrics_and_forecasts(airline_run: Path, tmp_path: Path, capsys) -> None:
    run = kiln.Run.load(airline_run)
    again = run.evaluate("test")
    saved = run.metrics["test"]
    for key in ("loss", "mae", "mase", "smape", "seasonal_naive_mase", "linear_ar_mase"):
        assert again[key] == pytest.approx(saved[key], rel=1e-6), key
    source = Path(os.environ["KILN_DATA"]) / "timeseries" / "airline-passengers.csv"
    lines = source.read_text().splitlines()
    history = tmp_path / "history.csv"
    history.write_text("\n".join([lines[0], *lines[-36:]]) + "\n")  # 1958-01 .. 1960-12
    every = [{"Month": line.split(",")[0].strip('"'), "Passengers": float(line.split(",")[1])} for line in lines[1:]]
    rows = every[-36:]
    forecast = run.forecast(rows)["forecast"]
    assert [f["time"] for f in forecast] == [f"1961-{m:02d}" for m in range(1, 13)]
    assert all(300 < f["value"] < 800 for f in forecast)  # passengers (thousands), not scaled log differences
    assert kiln.Run.load(airline_run).forecast(rows)["forecast"] == forecast  # reload: identical
    assert main(["predict", str(airline_run), str(history), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert [r["Passengers"] for r in printed] == [f["value"] for f in forecast]
    assert main(["predict", str(airline_run), str(history)]) == 0
    csv_lines = capsys.readouterr().out.splitlines()
    assert csv_lines[0] == "file,step,Month,Passengers" and len(csv_lines) == 13
    # The forecast at the last test origin equals the model's own on its stored window.
    data = run.kind.load()
    origin = data.test_x[-1:]
    units = run.kind._units(run.outputs(origin).double().numpy(), origin.numpy())[0]
    rows_then = every[:-12]  # the history up to 1959-12, the last test origin
    assert [f["value"] for f in run.forecast(rows_then)["forecast"]] == pytest.approx(units.tolist(), rel=1e-5)


def test_too_short_history_and_bad_history_name_the_problem(airline_run: Path) -> None:
    run = kiln.Run.load(airline_run)
    rows = [{"Month": f"1960-{m:02d}", "Passengers": 400.0} for m in range(1, 13)]
    with pytest.raises(KilnError, match="give at least 36 rows"):
        run.forecast(rows)
    gap = [{"Month": f"{1957 + i // 12}-{i % 12 + 1:02d}", "Passengers": 400.0} for i in range(40) if i != 20]
    with pytest.raises(KilnError, match=r"gap.*1958-10.*row 20"):
        run.forecast(gap)


def test_serving_answers_the_forecast_with_its_times(airline_run: Path) -> None:
    pytest.importorskip("fastapi", reason="needs the serve extra: pip install 'kiln[serve]'")
    from fastapi.testclient import TestClient

    from kiln.serve import create_app

    history = [{"Month": f"{1958 + i // 12}-{i % 12 + 1:02d}", "Passengers": 300.0 + 5 * i + 40 * math.sin(i / 2)}
               for i in range(36)]
    expected = kiln.Run.load(airline_run).forecast(history)
    with TestClient(create_app(airline_run)) as client:
        resp = client.post("/v1/predict", json={"instances": [{"history": history}, {"history": history}]})
        assert resp.status_code == 200, resp.text
        predictions = resp.json()["predictions"]
        assert predictions[0] == predictions[1] and predictions[0]["forecast"][0]["time"] == "1961-01"
        assert [p["value"] for p in predictions[0]["forecast"]] == pytest.approx(
            [p["value"] for p in expected["forecast"]], rel=1e-5)
        bad = client.post("/v1/predict", json={"instances": [{"history": history[:10]}]})
        assert bad.status_code == 422 and "instances.0.history" in bad.text
        dup = client.post("/v1/predict", json={"instances": [{"history": history + history[-1:]}]})
        assert dup.status_code == 422 and "1960-12 twice" in dup.text
        info = client.get("/v1/model").json()
        assert info["task"] == "forecast" and info["inputs"]["min_rows"] == 36
        schema = client.get("/openapi.json").json()["components"]["schemas"]
        assert "Month" in json.dumps(schema["HistoryRow"]) and "forecast" in json.dumps(schema)


def test_export_takes_windows_not_origins_into_the_training_series(airline_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "model.pt2"
    assert main(["export", str(airline_run), "--format", "torch-export", "--out", str(out)]) == 0
    run = kiln.Run.load(airline_run)
    windows = run.kind.to_input(run.kind.load().test_x)  # (13, 24, 1) float
    graph = torch.export.load(out).module()
    assert torch.allclose(graph(windows), run.outputs(windows), atol=1e-5)


def test_walk_forward_folds_test_consecutive_blocks_at_the_end(tmp_path: Path, capsys) -> None:
    csv = monthly_csv(tmp_path / "s.csv", n=96)
    config = series_config(csv, test_size=6, horizon=3)
    config["train"]["epochs"] = 2
    path = tmp_path / "ts.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["train", str(path), "--folds", "3", "--out", str(tmp_path / "cv")]) == 0
    assert "seasonal_naive_mase" in capsys.readouterr().out
    splits = [json.loads((tmp_path / "cv" / f"fold_{k}" / "series.json").read_text())["split"] for k in range(3)]
    assert [s["test_start"] for s in splits] == [78, 84, 90] and [s["test_end"] for s in splits] == [84, 90, 96]
    assert all(s["val_start"] < s["test_start"] for s in splits)
    cv = json.loads((tmp_path / "cv" / "cv_results.json").read_text())
    assert len(cv["test"]["mase"]["values"]) == 3 and "linear_ar_mase" in cv["test"]


# ---- bad series -------------------------------------------------------------------------------------------


def refused(tmp_path: Path, text: str, capsys, **data) -> str:
    csv = tmp_path / "bad.csv"
    csv.write_text(text)
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump(series_config(csv, covariates=[], calendar=[], **data)))
    assert main(["train", str(config), "--out", str(tmp_path / "run")]) == 2
    assert not (tmp_path / "run").exists()
    err = capsys.readouterr().err
    assert err.startswith("error:") and "Traceback" not in err
    return err


def rows_text(months: list[int], values: list[float] | None = None) -> str:
    values = values or [100.0 + i for i in range(len(months))]
    return "month,sales\n" + "".join(f"{2000 + m // 12}-{m % 12 + 1:02d},{v}\n" for m, v in zip(months, values,
                                                                                                strict=True))


def test_a_gap_in_the_time_column_names_where(tmp_path: Path, capsys) -> None:
    err = refused(tmp_path, rows_text([m for m in range(60) if m not in (30, 31)]), capsys)
    assert "gap" in err and "2002-09" in err and "2002-06" in err and "line 31" in err and "allow_gaps" in err


def test_a_duplicated_time_names_both_lines(tmp_path: Path, capsys) -> None:
    err = refused(tmp_path, rows_text([*range(40), 39, *range(40, 60)]), capsys)
    assert "2003-04 twice" in err and "line 41" in err and "line 42" in err


def test_a_series_shorter_than_lookback_plus_horizon(tmp_path: Path, capsys) -> None:
    err = refused(tmp_path, rows_text(list(range(14))), capsys)
    assert "14 steps, fewer than lookback + horizon" in err
    err = refused(tmp_path, rows_text(list(range(40))), capsys, target_transform="seasonal_diff")
    assert "the training part" in err and "transform" in err


def test_bad_values_and_settings_are_named(tmp_path: Path, capsys) -> None:
    values = [100.0 + i for i in range(60)]
    values[7] = -1.0
    err = refused(tmp_path, rows_text(list(range(60)), values), capsys, target_transform="log")
    assert "line 9" in err and "not positive" in err
    text = rows_text(list(range(60))).replace("2001-03,114.0", "2001-03,abc")
    assert "'abc' in column 'sales' is not a number" in refused(tmp_path, text, capsys)
    text = rows_text(list(range(60))).replace("2001-03", "March 2001")
    assert "line 16" in refused(tmp_path, text, capsys)  # 2001-03 is the 15th row, after the header
    assert "no column 'sales'" in refused(tmp_path, "month,other\n2000-01,1\n", capsys)
    model_err = tmp_path / "m.yaml"
    config = series_config(monthly_csv(tmp_path / "ok.csv"))
    config["model"]["blocks"][-1] = {"type": "regressor"}
    model_err.write_text(yaml.safe_dump(config))
    assert main(["train", str(model_err), "--out", str(tmp_path / "r2")]) == 2
    assert "forecaster" in capsys.readouterr().err
