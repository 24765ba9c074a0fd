"""Imbalanced tables: a decision threshold chosen for the costs of errors, the precision-recall plot, numeric
embeddings (piecewise-linear preprocessing, periodic block) saved and reloaded, and a real training on a
subsample of bank marketing (when KILN_DATA has it)."""

from __future__ import annotations

import csv
import json
import os
import random
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import torch

import kiln
from kiln.cli import main
from kiln.data.preprocess import Preprocessing, fit
from kiln.data.splits import stratified_holdout
from kiln.data.table import read_table
from kiln.training.metrics import THRESHOLD_CANDIDATES, choose_threshold, expected_cost

REPO = Path(__file__).resolve().parents[1]
SVG = "{http://www.w3.org/2000/svg}"


def fraud_csv(path: Path, n: int = 600, seed: int = 0) -> Path:
    """About 12% 'fraud': more likely for large amounts at night; a skewed amount (as money is)."""
    rnd = random.Random(seed)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["amount", "hour", "channel", "fraud"])
        for _ in range(n):
            amount, hour, channel = rnd.lognormvariate(4, 1.2), rnd.randint(0, 23), rnd.choice(["web", "shop", "app"])
            score = 1.2 * (np.log(amount) - 5) + (1.5 if hour < 5 else 0) + (0.5 if channel == "web" else 0)
            w.writerow([f"{amount:.2f}", hour, channel, "yes" if score + rnd.gauss(0, 1) > 1.8 else "no"])
    return path


def config(path: Path, **extra) -> dict:
    data = {"dataset": "tabular", "path": str(path), "target": "fraud", "positive": "yes", **extra.pop("data", {})}
    return {"name": "fraud", "data": data,
            "model": {"blocks": [{"type": "tabular_encoder", **extra.pop("encoder", {})},
                                 {"type": "dense", "units": 16, "activation": "relu"}, {"type": "classifier"}]},
            "train": {"epochs": 8, "batch_size": 32, "optimizer": {"name": "adam", "lr": 0.01}, "log_every": 1000,
                      **extra}}


# ---- the threshold of a cost ratio --------------------------------------------------------------------


@pytest.mark.parametrize("costs", [(1.0, 5.0), (1.0, 1.0), (4.0, 1.0), (0.0, 1.0)])
def test_cost_threshold_minimises_the_expected_cost(costs) -> None:
    gen = torch.Generator().manual_seed(0)
    score = 2 * torch.randn(500, generator=gen) - 2
    y = (torch.rand(500, generator=gen) < torch.sigmoid(score)).long()  # calibrated: P(positive) = sigmoid(score)
    outputs = torch.stack([torch.zeros(500), score], dim=1)
    chosen = choose_threshold(outputs, y, "cost", costs)
    # Brute force: the cost of every candidate threshold, counted row by row.
    p = torch.softmax(outputs, 1)[:, 1].tolist()
    cost = {}
    for threshold in np.linspace(0, 1, THRESHOLD_CANDIDATES):
        cost[round(float(threshold), 2)] = sum(costs[0] if pi >= threshold and yi == 0 else
                                               costs[1] if pi < threshold and yi == 1 else 0.0
                                               for pi, yi in zip(p, y.tolist(), strict=True))
    assert cost[chosen] == min(cost.values())
    assert expected_cost(outputs, y, chosen, costs) == pytest.approx(cost[chosen] / 500)
    if costs == (1.0, 5.0):  # missing a positive costs 5 false alarms: near the cost-optimal 1 / (1 + 5)
        assert 0.05 < chosen < 0.35


def test_cost_threshold_is_saved_and_applied_by_predict(tmp_path: Path) -> None:
    path = fraud_csv(tmp_path / "fraud.csv")
    run = kiln.train(config(path, threshold_metric="cost", costs={"false_positive": 1, "false_negative": 8}),
                     out=tmp_path / "run", live=False)
    results = json.loads((run.path / "results.json").read_text())
    threshold = results["threshold"]
    assert threshold < 0.5  # a missed fraud costs eight false alarms
    assert results["test"]["cost"] >= 0 and results["val"]["cost"] >= 0
    rows = [{"amount": a, "hour": h, "channel": c} for a, h, c in
            [(500.0, 2, "web"), (20.0, 14, "shop"), (150.0, 3, "app"), (80.0, 22, "web")]]
    again = kiln.Run.load(run.path)
    for record in again.predict_rows(rows):
        positive = record["probability_yes"] >= threshold
        assert record["prediction"] == ("yes" if positive else "no")


def test_cost_settings_are_checked(tmp_path: Path, capsys) -> None:
    path = fraud_csv(tmp_path / "fraud.csv", n=100)
    for train, fragment in (({"threshold_metric": "cost"}, "train.costs"),
                            ({"costs": {"false_positive": 1, "false_negative": 2}}, "threshold_metric: cost"),
                            ({"threshold_metric": "cost", "costs": {"false_positive": 0, "false_negative": 0}},
                             "more than 0"),
                            ({"threshold_metric": "cost", "costs": {"false_positive": 1}}, "false_negative")):
        file = tmp_path / "bad.yaml"
        file.write_text(json.dumps(config(path, **train)))
        assert main(["train", str(file), "--out", str(tmp_path / "never")]) == 2
        err = capsys.readouterr().err
        assert fragment in err and "train" in err and "Traceback" not in err, err
    assert not (tmp_path / "never").exists()


# ---- the precision-recall plot ------------------------------------------------------------------------


def test_binary_run_writes_a_precision_recall_plot(tmp_path: Path) -> None:
    path = fraud_csv(tmp_path / "fraud.csv")
    run = kiln.train(config(path, threshold_metric="f1"), out=tmp_path / "run", live=False)
    svg = ET.parse(run.path / "precision_recall.svg").getroot()  # well-formed XML
    assert svg.tag == f"{SVG}svg"
    curve = svg.find(f"{SVG}polyline")
    points = [tuple(map(float, p.split(","))) for p in curve.get("points").split()]
    assert len(points) > 10
    width, height = float(svg.get("width")), float(svg.get("height"))
    assert all(0 <= x <= width and 0 <= y <= height for x, y in points)
    assert sorted(x for x, _ in points) == [x for x, _ in points]  # recall only grows along the curve
    text = " ".join(t.text or "" for t in svg.iter(f"{SVG}text"))
    results = json.loads((run.path / "results.json").read_text())
    assert f"{results['test']['pr_auc']:.4f}" in text and f"threshold {results['threshold']:.2f}" in text


def test_regression_run_writes_no_precision_recall_plot(tmp_path: Path) -> None:
    path = fraud_csv(tmp_path / "fraud.csv", n=200)
    cfg = config(path, data={"target": "amount", "positive": None}, epochs=1)
    cfg["model"]["blocks"][-1] = {"type": "regressor"}
    run = kiln.train(cfg, out=tmp_path / "run", live=False)
    assert not (run.path / "precision_recall.svg").exists()


# ---- numeric embeddings -------------------------------------------------------------------------------


def test_piecewise_linear_encoding_fits_quantile_bins(tmp_path: Path) -> None:
    table = read_table(fraud_csv(tmp_path / "fraud.csv"))
    prep, _ = fit(table, "fraud", "auto", {}, "yes", "ple", 8)
    amount, hour = (next(c for c in prep.columns if c.name == n) for n in ("amount", "hour"))
    assert len(amount.edges) == 9 and amount.edges == sorted(amount.edges)
    values = np.array([float(v) for v in table.columns["amount"]])
    # Each bin holds about an eighth of the training rows.
    counts = np.histogram(values, bins=amount.edges)[0]
    assert counts.min() >= len(values) / 8 * 0.8
    x = prep.transform(table).numpy()
    assert prep.input_shape == (amount.width + hour.width + 1,) and x.shape == (len(table), prep.input_shape[0])
    encoded = x[:, :amount.width]
    assert encoded.min() >= 0.0 and encoded.max() <= 1.0
    # The encoding is monotone in the value and tells values apart within a bin.
    order = np.argsort(values)
    assert (np.diff(encoded[order].sum(1)) >= 0).all()
    assert len(np.unique(encoded.sum(1))) == len(np.unique(values))
    # Saved and read back: the same numbers.
    again = Preprocessing.from_json(prep.to_json())
    assert torch.equal(again.transform(table), prep.transform(table))


def test_preprocessing_of_the_previous_format_still_loads(tmp_path: Path) -> None:
    table = read_table(fraud_csv(tmp_path / "fraud.csv", n=100))
    prep, _ = fit(table, "fraud", "auto", {}, "yes")
    raw = json.loads(prep.to_json())
    raw["format"] = "kiln-tabular-1"
    for c in raw["columns"]:
        del c["edges"]
    assert torch.equal(Preprocessing.from_json(json.dumps(raw)).transform(table), prep.transform(table))


@pytest.mark.parametrize("extra", [{"data": {"numeric_encoding": "ple", "bins": 8}},
                                   {"encoder": {"numeric_embedding": "periodic", "frequencies": 8, "numeric_dim": 4}}],
                         ids=["ple", "periodic"])
def test_numeric_embeddings_reload_to_identical_predictions(tmp_path: Path, extra: dict) -> None:
    path = fraud_csv(tmp_path / "fraud.csv")
    run = kiln.train(config(path, **extra), out=tmp_path / "run", live=False)
    assert run.metrics["test"]["roc_auc"] > 0.75  # learnt (a broken encoding scores near 0.5)
    rows = [{"amount": float(a), "hour": h, "channel": c} for a, h, c in
            [(1e6, 2, "web"), (0.01, 14, "shop"), (150.0, 3, "new channel"), (80.0, 22, "web")]]
    again = kiln.Run.load(run.path)
    assert again.predict_rows(rows) == run.predict_rows(rows)


# ---- bank marketing ---------------------------------------------------------------------------------


@pytest.fixture
def bank_marketing() -> Path:
    root = os.environ.get("KILN_DATA")
    path = Path(root or ".") / "bank_marketing" / "bank-additional-full.csv"
    if not root or not path.is_file():
        pytest.skip("bank marketing data unavailable: set KILN_DATA to a folder holding "
                    "bank_marketing/bank-additional-full.csv")
    return path


def bank_quarter(path: Path, out: Path) -> Path:
    """A stratified quarter of the bank-marketing calls (10,297 rows), written as the same `;`-separated CSV."""
    table = read_table(path)
    _, keep = stratified_holdout(table.columns["y"], 0.25, 0)
    with open(out, "w", newline="") as f:
        w = csv.writer(f, delimiter=";")
        w.writerow(table.columns)
        w.writerows([["" if v[i] is None else v[i] for v in table.columns.values()] for i in keep.tolist()])
    return out


@pytest.mark.slow  # about a minute of CPU
def test_bank_marketing_subsample_reaches_a_real_roc_auc(bank_marketing: Path, tmp_path: Path) -> None:
    """The example's own config on a stratified quarter of the calls (10,297 rows), a few epochs."""
    sample = bank_quarter(bank_marketing, tmp_path / "bank.csv")
    run = kiln.train(REPO / "examples" / "bank_marketing.yaml",
                     {"data.path": str(sample), "train.epochs": 5, "train.log_every": 1000}, out=tmp_path / "run",
                     live=False)
    kept = {c.name for c in run.kind.prep.columns}
    assert "duration" not in kept and {"age", "euribor3m", "poutcome"} <= kept  # dropped as its documentation says
    assert run.config.model.blocks[0].numeric_embedding == "linear"  # auto, on about 7,400 training rows
    test = run.metrics["test"]
    assert test["roc_auc"] > 0.75, test
    assert test["pr_auc"] > 0.3, test  # 11% positive: a model without skill has PR-AUC 0.11
    assert (run.path / "precision_recall.svg").is_file()
    assert run.threshold < 0.5 and test["cost"] > 0  # a missed subscriber costs five calls
