"""``data.bins: auto``: the number of quantile bins of piecewise-linear numbers follows the training rows, is
recorded in the run (config.yaml, preprocessing.json, the training log), and a reloaded or resumed run encodes
with the same edges; an integer still sets it by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from test_bank_marketing import REPO, config, fraud_csv

import kiln
from kiln.cli import main
from kiln.config import load_config
from kiln.data.preprocess import Preprocessing, auto_bins, fit
from kiln.data.table import read_table

pytestmark = pytest.mark.usefixtures("one_thread")

ROWS = [{"amount": 1e6, "hour": 2, "channel": "web"}, {"amount": 0.01, "hour": 14, "channel": "shop"},
        {"amount": 150.0, "hour": 3, "channel": "new channel"}, {"amount": 80.0, "hour": 22, "channel": "web"}]


@pytest.mark.parametrize(("rows", "bins"), [(50, 16), (720, 16), (1_359, 16), (1_360, 17), (2_560, 32),
                                            (5_120, 64), (10_239, 127), (10_240, 128), (29_655, 128),
                                            (10_000_000, 128)])
def test_auto_bins_follow_the_training_rows(rows: int, bins: int) -> None:
    # German credit's 5-fold training split has 720 rows, bank marketing's about 29,655
    assert auto_bins(rows) == bins


def test_bins_default_to_auto_and_an_integer_still_sets_them() -> None:
    data = {"dataset": "tabular", "path": "t.csv", "target": "y"}
    assert load_config({"name": "x", "data": data, "model": {"blocks": [{"type": "classifier"}]}}).data.bins == "auto"
    assert load_config({"name": "x", "data": {**data, "bins": 24}, "model": {"blocks": [{"type": "classifier"}]}}).data.bins == 24


@pytest.mark.parametrize("bins", ["many", 1, 300, 2.5])
def test_a_bad_bins_value_names_the_field(tmp_path: Path, bins, capsys) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config(fraud_csv(tmp_path / "f.csv", n=50), data={"bins": bins})))
    assert main(["train", str(path), "--out", str(tmp_path / "run")]) == 2
    assert "data.bins" in capsys.readouterr().err


def numeric_widths(run) -> dict[str, int]:
    return {c.name: c.width for c in run.kind.prep.columns if c.type == "numeric"}


@pytest.mark.parametrize(("rows", "bins"), [(400, 16), (3_000, 27), (15_000, 128)], ids=["small", "middle", "large"])
def test_auto_bins_are_recorded_in_the_run_and_reused_on_reload(tmp_path: Path, rows: int, bins: int) -> None:
    path = fraud_csv(tmp_path / "fraud.csv", n=rows)
    cfg = config(path, data={"numeric_encoding": "ple", "val_fraction": 0.1}, epochs=2, batch_size=256)
    run = kiln.train(cfg, out=tmp_path / "run", live=False)
    train_rows = run.manifest["samples"]["train"]
    assert auto_bins(train_rows) == bins  # the table sizes chosen to fall below and above the rule's bounds
    # the amount has a value per row: as many bins as asked; the hour (24 values) at most that
    assert numeric_widths(run)["amount"] == bins and numeric_widths(run)["hour"] <= bins
    saved = yaml.safe_load((run.path / "config.yaml").read_text())
    assert saved["data"]["bins"] == bins  # the run's config holds the number used, not "auto"
    assert json.loads((run.path / "preprocessing.json").read_text())["bins"] == bins
    again = kiln.Run.load(run.path)
    assert again.config.data.bins == bins and again.kind.prep.columns == run.kind.prep.columns  # the same edges
    assert again.predict_rows(ROWS) == run.predict_rows(ROWS)


def test_a_run_with_auto_bins_resumes_with_its_own_bins(tmp_path: Path) -> None:
    """Resuming compares the config with the saved one: `auto` resolves to the saved run's number of bins."""
    path = fraud_csv(tmp_path / "fraud.csv", n=400)
    cfg = config(path, data={"numeric_encoding": "ple"}, epochs=1)
    first = kiln.train(cfg, out=tmp_path / "run", live=False)
    cfg["train"]["epochs"] = 2
    again = kiln.train(cfg, out=tmp_path / "run", resume=True, live=False)
    assert again.config.data.bins == first.config.data.bins == auto_bins(first.manifest["samples"]["train"])


def test_an_integer_is_used_as_given(tmp_path: Path) -> None:
    path = fraud_csv(tmp_path / "fraud.csv", n=400)
    run = kiln.train(config(path, data={"numeric_encoding": "ple", "bins": 5}, epochs=1), out=tmp_path / "run",
                     live=False)
    assert numeric_widths(run)["amount"] == 5 and run.config.data.bins == 5
    assert json.loads((run.path / "preprocessing.json").read_text())["bins"] == 5


def test_standardised_numbers_record_no_bins(tmp_path: Path) -> None:
    run = kiln.train(config(fraud_csv(tmp_path / "fraud.csv", n=200), epochs=1), out=tmp_path / "run", live=False)
    assert set(numeric_widths(run).values()) == {1}
    assert json.loads((run.path / "preprocessing.json").read_text())["bins"] is None
    assert run.config.data.bins == "auto"  # nothing was binned: nothing to decide


def test_preprocessing_without_bins_loads(tmp_path: Path) -> None:
    """Files written before ``bins`` was recorded (the edges are what encodes; the count is a note)."""
    table = read_table(fraud_csv(tmp_path / "fraud.csv", n=100))
    prep, _ = fit(table, "fraud", "auto", {}, "yes", "ple", 8)
    raw = json.loads(prep.to_json())
    del raw["bins"]
    old = Preprocessing.from_json(json.dumps(raw))
    assert old.bins is None and old.columns == prep.columns
    raw["bins"] = "many"
    with pytest.raises(Exception, match="bins"):
        Preprocessing.from_json(json.dumps(raw))


def test_the_table_examples_share_one_recipe() -> None:
    """A user's default is not tuned per file: German credit and bank marketing differ only in their data and
    in what a decision costs."""
    german, bank = (yaml.safe_load((REPO / "examples" / f"{n}.yaml").read_text())
                    for n in ("german_credit", "bank_marketing"))
    assert german["model"] == bank["model"]
    for key in ("numeric_encoding", "bins", "val_fraction", "test_fraction"):
        assert german["data"].get(key) == bank["data"].get(key), key
    skip = ("threshold_metric", "costs")
    assert {k: v for k, v in german["train"].items() if k not in skip} == \
        {k: v for k, v in bank["train"].items() if k not in skip}
