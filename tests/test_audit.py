"""kiln audit and fairness mitigation on German credit: the audit's figures equal Fairlearn's own, reweighing makes
group and label independent (and lowers the demographic-parity difference), per-group thresholds are saved,
reloaded and applied alike by predict and by serve, and bad input names the problem."""

from __future__ import annotations

import csv
import json
import os
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fairlearn", reason="needs the fairness extra: pip install 'kiln[fairness]'")

import fairlearn.metrics as fm  # noqa: E402
from fairlearn.postprocessing import ThresholdOptimizer  # noqa: E402
from sklearn.metrics import accuracy_score, roc_auc_score  # noqa: E402

import kiln  # noqa: E402
from kiln.audit import _scores_estimator, audit, bootstrap_figures, render, set_thresholds  # noqa: E402
from kiln.cli import main  # noqa: E402
from kiln.config import load_config  # noqa: E402
from kiln.data.tabular import split_indices  # noqa: E402
from kiln.errors import ConfigError, KilnError  # noqa: E402
from kiln.training.fairness import Grouping, GroupThresholds, reweigh  # noqa: E402
from kiln.training.objectives import Objective  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]
SEX = "personal_status_and_sex:A91=male,A92=female,A93=male,A94=male,A95=female"
CSV = "german_credit/german_credit.csv"


@pytest.fixture(scope="module")
def credit_csv() -> Path:
    root = os.environ.get("KILN_DATA")
    if not root or not (Path(root) / CSV).is_file():
        pytest.skip(f"German credit unavailable: set KILN_DATA to a folder holding {CSV}")
    return Path(root) / CSV


def short(overrides: dict | None = None) -> dict:
    """examples/german_credit.yaml, short: 8 epochs on one thread, and trained WITHOUT personal_status_and_sex (the
    audit reads it from the raw rows)."""
    return {"train.epochs": 8, "train.threads": 1, "train.early_stopping": None,
            "data.columns": {"personal_status_and_sex": "drop"}, **(overrides or {})}


@pytest.fixture(scope="module")
def credit_run(credit_csv, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("audit") / "credit"
    kiln.train(REPO / "examples" / "german_credit.yaml", short(), out=out, live=False)
    return out


def raw_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def split_rows(run_path: Path, csv_path: Path, split: str) -> list[dict]:
    """The raw CSV rows of a split of the run, found independently of the audit (the CSV read with csv, the split
    drawn by the run's seed)."""
    cfg = load_config(run_path / "config.yaml")
    rows = raw_rows(csv_path)
    table = kiln.data.table.read_table(csv_path)
    parts = split_indices(table, "credit_risk", "binary", cfg.data, cfg.seed)
    return [rows[i] for i in parts[("train", "val", "test").index(split)]]


def sex_of(code: str) -> str:
    return {"A91": "male", "A92": "female", "A93": "male", "A94": "male", "A95": "female"}[code]


def test_audit_figures_equal_fairlearns_own(credit_run, credit_csv):
    run = kiln.Run.load(credit_run)
    assert "personal_status_and_sex" not in [c.name for c in run.kind.prep.columns]  # not trained on
    report = audit(credit_run, [SEX, "age:25", "foreign"], bootstrap=200)
    rows = split_rows(credit_run, credit_csv, "test")
    probs = run.predict_rows(rows)
    # The model's own probabilities: predict_rows rounds them to 6 decimals, and a model whose probabilities lie
    # close together (TabM-mini after 8 epochs) then has ties that move a group's ROC-AUC by 1e-4.
    x, _ = run.kind.load().split("test")
    p = run.from_outputs(run.outputs(x))[:, 1].double().numpy()
    assert np.allclose(p, [r["probability_bad"] for r in probs], atol=1e-6)  # the rows are the split's, in order
    y = np.array([r["credit_risk"] == "bad" for r in rows], dtype=int)
    decided = (p >= run.threshold).astype(int)
    by_column = {"sex": [sex_of(r["personal_status_and_sex"]) for r in rows],
                 "age": ["<25" if float(r["age"]) < 25 else ">=25" for r in rows],
                 "foreign": [r["foreign"] for r in rows]}
    assert report["rows"] == len(rows) == 200
    for entry, groups in zip(report["sensitive"], by_column.values(), strict=True):
        sf = np.array(groups, dtype=object)
        frame = fm.MetricFrame(metrics={"selection_rate": fm.selection_rate, "accuracy": accuracy_score,
                                        "tpr": fm.true_positive_rate, "fpr": fm.false_positive_rate,
                                        "count": fm.count}, y_true=y, y_pred=decided, sensitive_features=sf)
        got = entry["before"]
        assert set(got["groups"]) == set(frame.by_group.index)
        for g, fig in got["groups"].items():
            assert fig["rows"] == frame.by_group.loc[g, "count"]
            for m in ("selection_rate", "accuracy", "tpr", "fpr"):
                assert fig[m] == pytest.approx(frame.by_group.loc[g, m], abs=2e-6), (entry["spec"], g, m)
            mask = sf == g
            if 0 < y[mask].sum() < mask.sum():
                assert fig["roc_auc"] == pytest.approx(roc_auc_score(y[mask], p[mask]), abs=1e-5)
            lo, hi = fig["interval"]["selection_rate"]
            assert lo <= fig["selection_rate"] + 1e-9 and fig["selection_rate"] - 1e-9 <= hi
        d = got["disparity"]
        assert d["demographic_parity_difference"] == pytest.approx(
            fm.demographic_parity_difference(y, decided, sensitive_features=sf), abs=2e-6)
        assert d["demographic_parity_ratio"] == pytest.approx(
            fm.demographic_parity_ratio(y, decided, sensitive_features=sf), abs=2e-6)
        assert d["equalized_odds_difference"] == pytest.approx(
            fm.equalized_odds_difference(y, decided, sensitive_features=sf), abs=2e-6)
        assert d["equalized_odds_ratio"] == pytest.approx(
            fm.equalized_odds_ratio(y, decided, sensitive_features=sf), abs=2e-6)
        lo, hi = got["disparity_interval"]["demographic_parity_difference"]
        assert 0 <= lo < hi
        # The bootstrap's vectorised figures are Fairlearn's figures on each resample: on the split itself, equal.
        names = list(got["groups"])
        boot = bootstrap_figures(y, decided, p, groups, names, np.ones((1, len(y))))
        for k, g in enumerate(names):
            for m in ("selection_rate", "accuracy", "tpr", "fpr", "roc_auc"):
                assert np.isclose(boot[m][0, k], got["groups"][g][m], equal_nan=True), (g, m)
        for m, v in d.items():
            assert boot[m][0] == pytest.approx(v)
    saved = json.loads((credit_run / "audit.json").read_text())
    assert saved["sensitive"][0]["before"]["disparity"] == report["sensitive"][0]["before"]["disparity"]
    svg = ET.fromstring((credit_run / "audit.svg").read_text())
    assert svg.tag.endswith("svg") and len(list(svg.iter("{http://www.w3.org/2000/svg}rect"))) > 10
    assert "demographic parity: difference" in render(report)


@pytest.mark.parametrize("case", ["no positives in a group", "nothing decided positive", "random"])
def test_bootstrap_figures_equal_fairlearns_at_the_edges(case):
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 40)
    groups = list(rng.choice(["a", "b", "c"], 40))
    d = rng.integers(0, 2, 40)
    if case == "no positives in a group":
        y[np.array(groups) == "c"] = 0
    if case == "nothing decided positive":
        d[:] = 0
    s = rng.random(40)
    from kiln.audit import fairlearn_figures

    want = fairlearn_figures(y, d, s, groups)
    names = list(want["groups"])
    got = bootstrap_figures(y, d, s, groups, names, np.ones((1, 40)))
    for k, g in enumerate(names):
        for m in ("selection_rate", "accuracy", "tpr", "fpr", "roc_auc"):
            assert np.isclose(got[m][0, k], want["groups"][g][m], equal_nan=True), (g, m)
    for m, v in want["disparity"].items():
        assert np.isclose(got[m][0], v, equal_nan=True), (m, got[m][0], v)


def test_bootstrap_auc_equals_sklearn_on_a_resample():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 80)
    s = np.round(rng.random(80) * 0.6 + 0.4 * y, 1)  # ties on purpose
    draws = rng.integers(0, 80, 80)
    w = np.bincount(draws, minlength=80)[None].astype(float)
    got = bootstrap_figures(y, s >= 0.5, s, ["a"] * 80, ["a"], w)["roc_auc"][0, 0]
    assert got == pytest.approx(roc_auc_score(y[draws], s[draws]))


def test_reweighing_makes_group_and_label_independent_exactly(credit_run):
    kind = kiln.Run.load(credit_run).kind
    y = kind.load().train_y.numpy()
    groups = Grouping.parse(SEX).groups(kind.column_values("train", "personal_status_and_sex"))
    w, cells = reweigh(groups, y)
    g = np.array(groups)
    assert w.mean() == pytest.approx(1.0, abs=1e-12)
    total = w.sum()
    for group in ("male", "female"):
        for label in (0, 1):
            joint = w[(g == group) & (y == label)].sum() / total
            assert joint == pytest.approx((w[g == group].sum() / total) * (w[y == label].sum() / total), abs=1e-12)
    # Unweighted, women are more often bad risks than men in the training rows; the weights undo that.
    rate = {k: y[g == k].mean() for k in ("male", "female")}
    assert rate["female"] > rate["male"] and cells["female"]["1"] < 1 < cells["male"]["1"]


def test_weighted_loss_is_the_plain_loss_with_unit_weights_and_follows_the_weights():
    logits, y = torch_randn(16, 2), np.random.default_rng(0).integers(0, 2, 16)
    import torch

    y = torch.as_tensor(y)
    obj = Objective("binary")
    assert obj.loss(logits, y, torch.ones(16)).item() == pytest.approx(obj.loss(logits, y).item(), rel=1e-6)
    w = torch.zeros(16)
    w[3] = 2.0
    assert obj.loss(logits, y, w).item() == pytest.approx(obj.sample_losses(logits, y)[3].item(), rel=1e-6)
    cw = Objective("binary", torch.tensor([1.0, 3.0]))
    assert cw.loss(logits, y, torch.ones(16)).item() == pytest.approx(cw.loss(logits, y).item(), rel=1e-6)


def torch_randn(*shape):
    import torch

    return torch.randn(*shape, generator=torch.Generator().manual_seed(0))


def test_a_reweighed_run_logs_its_weights_and_trains(credit_csv, tmp_path, capsys):
    run = kiln.train(REPO / "examples" / "german_credit_fair.yaml", short(), out=tmp_path / "r",
                     live=False)
    assert run.config.train.fairness.sensitive == SEX
    log = capsys.readouterr()
    assert "reweighing by personal_status_and_sex" in log.out + log.err
    assert run.metrics["test"]["roc_auc"] > 0.6


@pytest.mark.slow
def test_reweighing_lowers_the_demographic_parity_difference_for_sex(credit_csv, tmp_path):
    """5 folds of seed 0, pooled (every loan decided once), plain against reweighed (benchmarks/bench_fairness.py
    measures several seeds with intervals)."""
    def pooled(config: str) -> float:
        ys, ds, gs = [], [], []
        for k in range(5):
            run = kiln.train(REPO / "examples" / config, {"data.folds": 5, "data.fold": k, "train.threads": 1},
                             out=tmp_path / f"{config}-{k}", live=False)
            x, y = run.kind.load().split("test")
            p = run.from_outputs(run.outputs(x))[:, 1].double().numpy()
            ys.append(y.numpy())
            ds.append(p >= run.threshold)
            gs += Grouping.parse(SEX).groups(run.kind.column_values("test", "personal_status_and_sex"))
        return fm.demographic_parity_difference(np.concatenate(ys), np.concatenate(ds).astype(int),
                                                sensitive_features=np.array(gs))

    plain, fair = pooled("german_credit.yaml"), pooled("german_credit_fair.yaml")
    assert fair < plain, (plain, fair)


# ---- per-group thresholds ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def thresholded(credit_run, tmp_path_factory) -> Path:
    import shutil

    path = shutil.copytree(credit_run, tmp_path_factory.mktemp("thr") / "run")
    audit(path, [SEX], bootstrap=50, fit="demographic_parity")
    return path


def test_thresholds_are_fairlearns_saved_as_json_and_reloaded(thresholded, credit_csv):
    saved = json.loads((thresholded / "fairness.json").read_text())
    assert saved["enabled"] and saved["constraint"] == "demographic_parity" and set(saved["groups"]) == {"male",
                                                                                                      "female"}
    rules = GroupThresholds.from_json(saved)
    run = kiln.Run.load(thresholded)
    val = split_rows(thresholded, credit_csv, "val")
    plain = kiln.Run.load(thresholded)
    plain._group_thresholds = None
    p_val = np.array([r["probability_bad"] for r in plain.predict_rows(val)], dtype=np.float64)
    y_val = np.array([r["credit_risk"] == "bad" for r in val], dtype=int)
    g_val = np.array([sex_of(r["personal_status_and_sex"]) for r in val], dtype=object)
    opt = ThresholdOptimizer(estimator=_scores_estimator(), constraints="demographic_parity", prefit=True,
                             predict_method="predict_proba").fit(p_val[:, None], y_val, sensitive_features=g_val)
    test = split_rows(thresholded, credit_csv, "test")
    p = np.array([r["probability_bad"] for r in plain.predict_rows(test)], dtype=np.float64)
    g = [sex_of(r["personal_status_and_sex"]) for r in test]
    pmf = opt._pmf_predict(p[:, None], sensitive_features=np.array(g, dtype=object))[:, 1]
    np.testing.assert_allclose(rules.positive_probability(p, g), pmf, atol=1e-4)
    # Predict decides by them: deterministic where Fairlearn's rule is, and the same answer every time.
    decided = [r["prediction"] == "bad" for r in run.predict_rows(test)]
    sure = (pmf < 1e-6) | (pmf > 1 - 1e-6)
    assert np.array_equal(np.array(decided)[sure], (pmf > 0.5)[sure])
    assert decided == [r["prediction"] == "bad" for r in kiln.Run.load(thresholded).predict_rows(test)]
    report = json.loads((thresholded / "audit.json").read_text())
    entry = report["sensitive"][0]
    assert "before" in entry and "after" in entry
    assert entry["after"]["disparity"]["demographic_parity_difference"] == pytest.approx(
        fm.demographic_parity_difference(np.array([r["credit_risk"] == "bad" for r in test], dtype=int),
                                         np.array(decided, dtype=int), sensitive_features=np.array(g)), abs=1e-9)


def test_predict_needs_the_sensitive_column_and_thresholds_can_be_turned_off(thresholded, credit_csv, tmp_path):
    rows = split_rows(thresholded, credit_csv, "test")[:20]
    without = [{k: v for k, v in r.items() if k != "personal_status_and_sex"} for r in rows]
    with pytest.raises(KilnError, match="per-group thresholds on column 'personal_status_and_sex'"):
        kiln.Run.load(thresholded).predict_rows(without)
    path = tmp_path / "rows.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, list(without[0]))
        writer.writeheader()
        writer.writerows(without)
    assert main(["predict", str(thresholded), str(path)]) == 2
    set_thresholds(thresholded, False)
    try:
        run = kiln.Run.load(thresholded)
        assert run.group_thresholds is None
        got = run.predict_rows(without)
        assert [r["prediction"] == "bad" for r in got] == [r["probability_bad"] >= run.threshold for r in got]
    finally:
        set_thresholds(thresholded, True)


def test_serve_applies_the_thresholds_like_predict(thresholded, credit_csv):
    pytest.importorskip("fastapi", reason="needs the serve extra")
    from fastapi.testclient import TestClient

    from kiln.serve import create_app

    run = kiln.Run.load(thresholded)
    rows = split_rows(thresholded, credit_csv, "test")
    expected = [r["prediction"] for r in run.predict_rows(rows)]
    numeric = {c.name for c in run.kind.prep.columns if c.type == "numeric"}
    instances = [{k: (float(v) if k in numeric else v) for k, v in r.items() if k != "credit_risk"} for r in rows]
    with TestClient(create_app(thresholded, max_instances=256, threads=1)) as client:
        body = client.post("/v1/predict", json={"instances": instances}).json()
        assert [p["label"] for p in body["predictions"]] == expected
        info = client.get("/v1/model").json()
        assert info["inputs"]["group_thresholds"]["column"] == "personal_status_and_sex"
        assert "per-group thresholds" in info["outputs"]["decision"]
        missing = client.post("/v1/predict", json={"instances": [{k: v for k, v in instances[0].items()
                                                                   if k != "personal_status_and_sex"}]})
        assert missing.status_code == 422 and "personal_status_and_sex" in missing.text
        unknown = client.post("/v1/predict", json={"instances": [{**instances[0], "personal_status_and_sex": "A99"}]})
        assert unknown.status_code == 422 and "A99" in unknown.text
        assert "personal_status_and_sex" in json.dumps(client.get("/openapi.json").json())


def test_a_deployed_image_keeps_the_thresholds(thresholded, tmp_path):
    from kiln.deploy import deploy_docker

    deploy_docker(thresholded, tmp_path / "image")
    assert json.loads((tmp_path / "image" / "run" / "fairness.json").read_text())["enabled"]


# ---- bad input -----------------------------------------------------------------------------------------------


def test_a_missing_sensitive_column_names_the_nearest(credit_run, capsys):
    with pytest.raises(KilnError, match=r"no column 'foreign_worker'.*did you mean 'foreign'"):
        audit(credit_run, ["foreign_worker"], bootstrap=0, write=False)
    assert main(["audit", str(credit_run), "--sensitive", "foreign_worker", "--bootstrap", "0"]) == 2
    assert "did you mean 'foreign'" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="train.fairness.sensitive.*did you mean 'foreign'"):
        kiln.train(REPO / "examples" / "german_credit.yaml",
                   short({"train.fairness": {"sensitive": "foreign_workr"}}), out=Path("/nonexistent/never"))
    with pytest.raises(ConfigError, match="edges"):
        Grouping.parse("age:abc")
    with pytest.raises(ConfigError, match="train.fairness.sensitive: .*age:abc"):
        load_config(REPO / "examples" / "german_credit.yaml", {"train.fairness": {"sensitive": "age:abc"}})


def test_a_small_group_is_warned_about_with_its_size(credit_run, capsys):
    ages = [float(v) for v in kiln.Run.load(credit_run).kind.column_values("test", "age")]
    n_old = sum(a >= 65 for a in ages)
    assert 0 < n_old < 10
    assert main(["audit", str(credit_run), "--sensitive", "age:65", "--bootstrap", "100"]) == 0
    out = capsys.readouterr()
    assert f"group '>=65' has {n_old} rows" in out.err and "unreliable" in out.err
    report = json.loads((credit_run / "audit.json").read_text())
    entry = report["sensitive"][0]["before"]
    assert entry["groups"][">=65"]["small"] and entry["intervals_unreliable"]
    assert " !" in out.out


def test_numeric_column_is_binned_at_training_quantiles(credit_run):
    report = audit(credit_run, ["age"], bins=3, bootstrap=0, write=False)
    spec = report["sensitive"][0]["spec"]
    train_ages = [float(v) for v in kiln.Run.load(credit_run).kind.column_values("train", "age")]
    edges = [float(e) for e in spec.split(":")[1].split(",")]
    # the spec prints each edge with 6 significant digits
    assert edges == pytest.approx(list(np.unique(np.quantile(train_ages, [1 / 3, 2 / 3]))), rel=1e-5)
    assert len(report["sensitive"][0]["before"]["groups"]) == 3


def test_non_binary_runs_are_refused(credit_csv, tmp_path):
    run = kiln.train(REPO / "examples" / "german_credit.yaml",
                     short({"data.target": "job", "data.positive": None, "train.threshold_metric": None,
                            "train.epochs": 1}), out=tmp_path / "jobs", live=False)
    with pytest.raises(KilnError, match="binary classification.*multiclass"):
        audit(run.path, ["foreign"], bootstrap=0)
    with pytest.raises(ConfigError, match="train.fairness applies to classification"):
        kiln.train(REPO / "examples" / "german_credit.yaml",
                   short({"data.target": "amount", "data.positive": None, "train.threshold_metric": None,
                          "model.blocks.2": {"type": "regressor"}, "train.fairness": {"sensitive": "foreign"}}),
                   out=tmp_path / "reg", live=False)
