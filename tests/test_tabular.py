"""Tables: type inference, preprocessing saved and reapplied, clear errors for malformed CSVs, metrics,
stratified splits, and small real trainings (synthetic, and German credit when KILN_DATA has it)."""

from __future__ import annotations

import csv
import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import kiln
from kiln.cli import main
from kiln.data.splits import stratified_folds, stratified_holdout
from kiln.data.preprocess import Preprocessing, fit
from kiln.data.table import read_table, rows_to_table
from kiln.data.tabular import rows_to_input
from kiln.errors import DataError
from kiln.training.metrics import average_precision, choose_threshold, roc_auc, task_metrics

REPO = Path(__file__).resolve().parents[1]
HEADER = ["id", "age", "income", "city", "member", "country", "risk"]


def write_csv(path: Path, rows: list[list], header: list[str] = HEADER) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def synthetic_rows(n: int = 300, seed: int = 0) -> list[list]:
    """risk is 'high' mostly when age is high and the city is C: learnable, with noise."""
    rnd = random.Random(seed)
    rows = []
    for i in range(n):
        age = rnd.randint(18, 80)
        city = rnd.choice("ABC")
        score = (age - 50) / 15 + (1.5 if city == "C" else -0.5) + rnd.gauss(0, 0.5)
        income = "" if i % 10 == 3 else f"{rnd.uniform(1e3, 9e3):.2f}"  # 10% missing
        rows.append([f"id-{i:05d}", age, income, city, rnd.choice(["yes", "no"]), "DE",
                     "high" if score > 0 else "low"])
    return rows


@pytest.fixture
def table_csv(tmp_path: Path) -> Path:
    return write_csv(tmp_path / "loans.csv", synthetic_rows())


def tabular_config(path: Path, **train) -> dict:
    return {"name": "loans", "data": {"dataset": "tabular", "path": str(path), "target": "risk"},
            "model": {"blocks": [{"type": "tabular_encoder"}, {"type": "dense", "units": 16, "activation": "relu"},
                                 {"type": "classifier"}]},
            "train": {"epochs": 10, "batch_size": 32, "optimizer": {"name": "adam", "lr": 0.01}, **train}}


# ---- inference and preprocessing ----------------------------------------------------------------------


def test_type_inference_on_mixed_missing_values(table_csv: Path) -> None:
    table = read_table(table_csv)
    prep, dropped = fit(table, "risk", "auto", {}, None)
    types = {c.name: c.type for c in prep.columns + dropped}
    assert types == {"id": "drop", "age": "numeric", "income": "numeric", "city": "categorical",
                     "member": "boolean", "country": "drop"}
    income = next(c for c in prep.columns if c.name == "income")
    assert income.missing == 30 and income.indicator
    assert prep.target.task == "binary" and set(prep.target.classes) == {"high", "low"}
    assert prep.target.classes[1] == min(prep.target.classes, key=lambda c: table.columns["risk"].count(c))
    # Overrides win over inference.
    prep2, _ = fit(table, "risk", "auto", {"age": "categorical", "country": "categorical"}, None)
    assert {c.name: c.type for c in prep2.columns}["age"] == "categorical"
    described = "\n".join(prep.describe(dropped))
    assert "income: numeric" in described and "30 missing" in described and "id: drop" in described


def test_preprocessing_saved_and_reapplied_identically(table_csv: Path, tmp_path: Path) -> None:
    table = read_table(table_csv)
    prep, _ = fit(table.take(list(range(200))), "risk", "auto", {}, None)
    prep.save(tmp_path / "preprocessing.json")
    assert json.loads((tmp_path / "preprocessing.json").read_text())["format"] == "kiln-tabular-2"
    reloaded = Preprocessing.load(tmp_path / "preprocessing.json")
    assert reloaded == prep
    rest = table.take(list(range(200, 300)))
    assert torch.equal(reloaded.transform(rest), prep.transform(rest))
    assert torch.equal(reloaded.encode_target(rest), prep.encode_target(rest))

    # Layout: age, income, member, income-missing, city code. Statistics come from the fitted rows only.
    x = prep.transform(table.take(list(range(200))))
    assert x.shape == (200, 5)
    assert x[:, 0].mean().abs() < 1e-5 and (x[:, 0].std(unbiased=False) - 1).abs() < 1e-4
    # A raw row as a client sends it: an unseen city is "unknown" (code 0), a missing income is imputed
    # (0 after standardising) and flagged; the same row from a CSV gives the same tensor.
    row = {"id": "x", "age": "40", "income": None, "city": "Zurich", "member": "yes", "country": "DE"}
    got = reloaded.transform(rows_to_table([row]))
    assert got[0, 1] == 0.0 and got[0, 3] == 1.0 and got[0, 4] == 0.0
    csv_row = write_csv(tmp_path / "one.csv", [["x", 40, "", "Zurich", "yes", "DE", ""]])
    assert torch.equal(reloaded.transform(read_table(csv_row)), got)
    # A boolean value never seen in training is imputed like a missing one, not read as false.
    no, maybe = (reloaded.transform(rows_to_table([{**row, "member": m}]))[0, 2] for m in ("no", "maybe"))
    assert maybe == 0.0 and no < 0.0 < got[0, 2]


# ---- malformed input ----------------------------------------------------------------------------------


def test_quoted_fields_keep_line_breaks_and_the_delimiter_is_sniffed(tmp_path: Path) -> None:
    """A quoted value may hold line breaks and the delimiter; rows are then named by their first line."""
    path = tmp_path / "notes.csv"
    path.write_bytes(b'id;note;score\r\n1;"first line\r\nsecond; line";3.5\r\n2;plain;4\r\n3;"said ""hi""";5\r\n')
    table = read_table(path)
    assert table.columns["note"] == ["first line\r\nsecond; line", "plain", 'said "hi"']
    assert table.columns["score"] == ["3.5", "4", "5"] and table.where == ["line 3", "line 4", "line 5"]


def test_ragged_row_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text("a,b,target\n1,2,x\n3,4,y,extra\n5,6,x\n")
    with pytest.raises(DataError, match=r"bad\.csv, line 3: 4 fields but the header names 3 columns"):
        read_table(path)


def test_missing_target_column_is_named(table_csv: Path) -> None:
    with pytest.raises(DataError, match=r"has no column 'risc' \(did you mean 'risk'\?\)"):
        fit(read_table(table_csv), "risc", "auto", {}, None)


def test_target_with_one_class(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "one.csv", [[f"i{i}", 30, 1.0, "A", "yes", "DE", "low"] for i in range(10)])
    with pytest.raises(DataError, match=r"target column 'risk' .* one value only \('low' in all 10 rows\)"):
        fit(read_table(path), "risk", "auto", {}, None)


def test_text_in_a_numeric_column_names_column_and_line(tmp_path: Path) -> None:
    rows = synthetic_rows(40)
    rows[6][1] = "forty"  # data row 7 is line 8 of the file
    path = write_csv(tmp_path / "text.csv", rows)
    with pytest.raises(DataError, match=r"text\.csv, line 8: column 'age' is numeric but holds 'forty'"):
        fit(read_table(path), "risk", "auto", {}, None)


def test_cli_reports_bad_table_without_traceback(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "bad.csv"
    path.write_text("a,b,risk\n1,2,x\n3,4\n")
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml.safe_dump(tabular_config(path)))
    assert main(["train", str(cfg)]) == 2
    out, err = capsys.readouterr()
    assert err.startswith("error: ") and "line 3" in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()


# ---- metrics and splits -------------------------------------------------------------------------------


def test_ranking_metrics_match_scikit_learn() -> None:
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    t = rng.integers(0, 2, 500)
    p = np.round(rng.random(500) * 0.6 + t * 0.3, 2)  # rounded: many ties
    assert roc_auc(p, t) == pytest.approx(sklearn_metrics.roc_auc_score(t, p), abs=1e-12)
    assert average_precision(p, t) == pytest.approx(sklearn_metrics.average_precision_score(t, p), abs=1e-12)
    logits = torch.randn(500, 2, generator=torch.Generator().manual_seed(1))
    y = torch.from_numpy(t)
    m = task_metrics("binary", logits, y, threshold=0.3)
    prob = torch.softmax(logits, 1)[:, 1].numpy()
    assert m["f1"] == pytest.approx(sklearn_metrics.f1_score(t, prob >= 0.3))
    assert m["brier"] == pytest.approx(sklearn_metrics.brier_score_loss(t, prob))
    assert m["log_loss"] == pytest.approx(sklearn_metrics.log_loss(t, prob), rel=1e-5)
    assert 0.0 <= choose_threshold(logits, y, "f1") <= 1.0


def test_stratified_splits_are_disjoint_complete_and_balanced() -> None:
    labels = ["bad"] * 300 + ["good"] * 700
    folds = stratified_folds(labels, 5, seed=0)
    assert torch.equal(torch.cat(folds).sort().values, torch.arange(1000))
    for fold in folds:
        assert len(fold) == 200 and sum(labels[i] == "bad" for i in fold) == 60
    assert all(torch.equal(a, b) for a, b in zip(folds, stratified_folds(labels, 5, seed=0), strict=True))
    keep, held = stratified_holdout(labels, 0.1, seed=3)
    assert len(held) == 100 and sum(labels[i] == "bad" for i in held) == 30
    assert not set(keep.tolist()) & set(held.tolist())


# ---- training, reloading, predicting ------------------------------------------------------------------


def test_train_reload_predict_rows_and_csv(table_csv: Path, tmp_path: Path, capsys) -> None:
    run = kiln.train(tabular_config(table_csv, class_weights="auto", threshold_metric="f1"),
                     out=tmp_path / "run", live=False)
    test = run.metrics["test"]
    assert test["accuracy"] >= 0.8 and test["roc_auc"] >= 0.85, test
    assert set(test) >= {"roc_auc", "pr_auc", "f1", "precision", "recall", "log_loss", "brier"}
    saved = yaml.safe_load((run.path / "config.yaml").read_text())
    assert saved["model"]["blocks"][0]["numeric"] == 4 and saved["model"]["blocks"][0]["categories"] == [4]

    loaded = kiln.Run.load(run.path)
    assert loaded.evaluate("test") == test
    rows = [dict(zip(HEADER, map(str, r), strict=True)) for r in synthetic_rows(20, seed=5)]
    x = rows_to_input(rows, run.path)
    assert torch.equal(loaded.predict(x), run.predict(x))
    by_rows = loaded.predict_rows(rows)
    assert {"prediction", "probability_high", "probability_low"} == set(by_rows[0])

    rows_csv = write_csv(tmp_path / "rows.csv", synthetic_rows(20, seed=5))
    assert main(["predict", str(run.path), str(rows_csv), "--out", str(tmp_path / "pred.csv")]) == 0
    # A header-only file, and an empty value where training saw none (a server refuses that row too).
    empty = write_csv(tmp_path / "empty.csv", [])
    no_age = write_csv(tmp_path / "no_age.csv", [["x", "", 50000, "Zurich", "yes", "DE", "low"]])
    for bad, fragment in ((empty, "holds no rows"), (no_age, "line 2: column 'age' is empty")):
        assert main(["predict", str(run.path), str(bad)]) == 2
        assert fragment in capsys.readouterr().err
    written = list(csv.DictReader(open(tmp_path / "pred.csv")))
    assert len(written) == 20 and written[0]["id"] == "id-00000"
    assert [r["prediction"] for r in written] == [r["prediction"] for r in by_rows]
    assert [float(r["probability_high"]) for r in written] == [r["probability_high"] for r in by_rows]


def test_train_threads_hold_for_that_training_only(table_csv: Path, tmp_path: Path) -> None:
    """train.threads once stayed set in the calling process, so one test's training ran later ones single-threaded
    (and their results, which depend on the thread count, no longer matched a subprocess's)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        kiln.train(tabular_config(table_csv, threads=1, epochs=1), out=tmp_path / "run", live=False)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_regression_task(tmp_path: Path) -> None:
    rnd = random.Random(1)
    rows = [[x := rnd.uniform(0, 10), rnd.choice("AB"), 3 * x + rnd.gauss(0, 0.5)] for _ in range(200)]
    path = write_csv(tmp_path / "reg.csv", rows, ["x", "g", "y"])
    cfg = {"data": {"dataset": "tabular", "path": str(path), "target": "y"},
           "model": {"blocks": [{"type": "tabular_encoder"}, {"type": "dense", "units": 16, "activation": "relu"},
                                {"type": "regressor"}]},
           "train": {"epochs": 30, "batch_size": 16, "optimizer": {"name": "adam", "lr": 0.01}}}
    run = kiln.train(cfg, out=tmp_path / "run", live=False)
    assert run.metrics["task"] == "regression" and run.metrics["test"]["r2"] > 0.9, run.metrics["test"]
    pred = run.predict_rows([{"x": 5.0, "g": "A"}])[0]["prediction"]
    assert 12 < pred < 18
    # Hard examples rank a regressor's rows by squared error; half the rows per epoch still fit the line.
    hard = kiln.train({**cfg, "train": {**cfg["train"], "hard_examples": {"fraction": 0.5}}}, out=tmp_path / "hard",
                      live=False)
    assert hard.metrics["test"]["r2"] > 0.9, hard.metrics["test"]
    bad = {**cfg, "model": {"blocks": [{"type": "tabular_encoder"}, {"type": "classifier"}]}}
    with pytest.raises(kiln.ConfigError, match="task is regression; end the model with `regressor`"):
        kiln.train(bad, out=tmp_path / "run2", live=False)


def test_a_diverging_loss_stops_training_with_the_step_and_marks_the_run_failed(tmp_path: Path, capsys) -> None:
    """SGD at lr 10 on a regression: the loss is infinite by the fourth step. Training must stop there with an
    error that names the step and what to try, exit 2 from the CLI, and mark the run failed (it was completed)."""
    rnd = random.Random(1)
    rows = [[x := rnd.uniform(0, 10), rnd.choice("AB"), 3 * x + rnd.gauss(0, 0.5)] for _ in range(200)]
    path = write_csv(tmp_path / "reg.csv", rows, ["x", "g", "y"])
    cfg = {"name": "diverge", "data": {"dataset": "tabular", "path": str(path), "target": "y"},
           "model": {"blocks": [{"type": "tabular_encoder"}, {"type": "dense", "units": 16, "activation": "relu"},
                                {"type": "regressor"}]},
           "train": {"epochs": 3, "batch_size": 16, "optimizer": {"name": "sgd", "lr": 10.0}, "threads": 1}}
    config = tmp_path / "diverge.yaml"
    config.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(config), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert re.search(r"error: the loss became (inf|nan) at step \d+ \(epoch 1\)", err), err
    assert "train.optimizer.lr" in err and "Traceback" not in err
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["status"] == "failed" and "the loss became" in manifest["error"]
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_tables_too_small_or_empty_are_refused_before_anything_is_written(tmp_path: Path, capsys) -> None:
    header_only = write_csv(tmp_path / "header.csv", [])
    two_rows = write_csv(tmp_path / "two.csv", synthetic_rows(2))
    only_target = write_csv(tmp_path / "target.csv", [[r[-1]] for r in synthetic_rows(50)], ["risk"])
    for path, fragment in ((header_only, "holds no rows"), (two_rows, "leaves no test rows"),
                           (only_target, "no column is left to predict 'risk' from")):
        config = tmp_path / f"{path.stem}.yaml"
        config.write_text(yaml.safe_dump(tabular_config(path)))
        assert main(["train", str(config), "--out", str(tmp_path / path.stem)]) == 2
        err = capsys.readouterr().err
        assert fragment in err and "Traceback" not in err, err
        assert not (tmp_path / path.stem).exists()


@pytest.mark.parametrize(("example", "epochs", "lr"), [("german_credit.yaml", 6, 0.005)])
def test_german_credit_folds_from_the_cli(german_credit: Path, tmp_path: Path, capsys, example: str, epochs: int,
                                          lr: float) -> None:
    out = tmp_path / "cv"
    argv = ["train", str(REPO / "examples" / example), "--folds", "2", "--out", str(out), "--set", f"train.epochs={epochs}",
            "--set", f"train.optimizer.lr={lr}", "--set", "train.log_every=1000"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "2-fold cross-validation" in printed and "roc_auc" in printed
    cv = json.loads((out / "cv_results.json").read_text())
    assert cv["folds"] == 2 and len(cv["test"]["roc_auc"]["values"]) == 2
    assert cv["test"]["roc_auc"]["mean"] > 0.65  # a broken pipeline scores near 0.5
    assert sum(cv["test"]["samples"]["values"]) == 1000  # the two test folds cover every row once
