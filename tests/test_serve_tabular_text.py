"""kiln serve on table runs (binary, regression) and text runs (sequence to sequence, language model): answers
equal to the Run's own, schemas made from the run, and a 422 naming the field for each kind of bad instance."""

from __future__ import annotations

import json
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="needs the serve extra: pip install 'kiln[serve]'")

from fastapi.testclient import TestClient  # noqa: E402
from test_serve_support import table_run  # noqa: E402,F401
from test_tabular import HEADER, synthetic_rows, write_csv  # noqa: E402
from test_text import CORPUS, lm_config  # noqa: E402

import kiln  # noqa: E402
from kiln.serve import create_app  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent.parent / "examples"))
from numbers_to_digits import pairs  # noqa: E402

THREADS = 1  # tiny models train several times faster on one thread, far more so on a busy machine


def instances_of(raw_rows: list[list]) -> list[dict]:
    """Synthetic loan rows as a JSON client sends them: numbers as numbers, a missing income null or left
    out, member as "yes"/"no" or as true/false."""
    out = []
    for i, (_, age, income, city, member, _, _) in enumerate(raw_rows):
        inst = {"age": age, "city": city, "member": member if i % 2 else member == "yes"}
        if income != "" or i % 3:
            inst["income"] = float(income) if income != "" else None
        out.append(inst)
    return out


def post(client, instances, **kw):
    return client.post("/v1/predict", json={"instances": instances}, **kw)


def error_of(resp, status=422) -> dict:
    assert resp.status_code == status, resp.text[:500]
    return resp.json()["error"]


# ---- tables ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def table_client(table_run):
    with TestClient(create_app(table_run, max_instances=32)) as c:
        yield c


def test_table_rows_get_the_probabilities_and_labels_of_predict_rows(table_run, table_client, tmp_path):
    raw = synthetic_rows(24, seed=5)
    instances = instances_of(raw)
    expected = kiln.Run.load(table_run).predict_rows([dict(zip(HEADER, map(str, r), strict=True)) for r in raw])
    body = post(table_client, instances).json()
    assert body["model"]["name"] == "loans" and len(body["model"]["version"]) == 12
    got = body["predictions"]
    np.testing.assert_allclose([[p["probabilities"]["high"], p["probabilities"]["low"]] for p in got],
                               [[e["probability_high"], e["probability_low"]] for e in expected], atol=2e-6)
    assert [p["label"] for p in got] == [e["prediction"] for e in expected]
    assert all(p["probability"] == p["probabilities"][p["label"]] for p in got)
    runtime = table_client.get("/v1/model").json()["serving"]["runtime"]
    assert runtime.startswith("torchscript"), runtime  # float feature rows trace like images do

    # A binary run labels by the decision threshold it chose on validation, not by the larger probability.
    strict = shutil.copytree(table_run, tmp_path / "strict")
    results = json.loads((strict / "results.json").read_text())
    (strict / "results.json").write_text(json.dumps({**results, "threshold": 0.97}))
    expected = kiln.Run.load(strict).predict_rows([dict(zip(HEADER, map(str, r), strict=True)) for r in raw])
    with TestClient(create_app(strict)) as c:
        got = post(c, instances).json()["predictions"]
        info = c.get("/v1/model").json()
    assert [p["label"] for p in got] == [e["prediction"] for e in expected]
    assert any(p["label"] != max(p["probabilities"], key=p["probabilities"].get) for p in got)
    assert info["task"] == "binary" and info["outputs"]["threshold"] == 0.97
    assert info["outputs"]["classes"] == ["high", "low"] and info["outputs"]["positive"] == "low"
    assert [c["name"] for c in info["inputs"]["columns"]] == ["age", "income", "city", "member"]


def test_table_openapi_lists_each_column_with_its_type(table_client):
    spec = table_client.get("/openapi.json").json()
    row = spec["components"]["schemas"]["TableRow"]
    props = row["properties"]
    assert list(props) == ["age", "income", "city", "member"] and row["additionalProperties"] is False
    assert sorted(row["required"]) == ["age", "city", "member"]  # income had missing values in training
    assert props["age"]["type"] == "number" and props["city"]["type"] == "string"
    assert {t["type"] for t in props["income"]["anyOf"]} == {"number", "null"}
    assert "imputed" in props["income"]["description"]
    assert {t["type"] for t in props["member"]["anyOf"]} == {"boolean", "string"}
    assert "'A'" in props["city"]["description"]
    body = spec["paths"]["/v1/predict"]["post"]["requestBody"]["content"]
    assert set(body) == {"application/json"}  # no file uploads for tables
    assert "ClassPrediction" in spec["components"]["schemas"]


@pytest.mark.parametrize(("name", "change", "loc", "code"), [
    ("missing column", lambda r: {k: v for k, v in r.items() if k != "city"}, "instances.1.city", "invalid_request"),
    ("unknown column", lambda r: {**r, "zip": "8001"}, "instances.1.zip", "invalid_request"),
    ("the target column", lambda r: {**r, "risk": "high"}, "instances.1.risk", "invalid_request"),
    ("text for a number", lambda r: {**r, "age": "forty"}, "instances.1.age", "invalid_request"),
    ("number as text", lambda r: {**r, "age": "40"}, "instances.1.age", "invalid_request"),
    ("boolean for a number", lambda r: {**r, "age": True}, "instances.1.age", "invalid_request"),
    ("number for a category", lambda r: {**r, "city": 3}, "instances.1.city", "invalid_request"),
    ("number for a boolean", lambda r: {**r, "member": 1}, "instances.1.member", "invalid_request"),
    ("null where training had no missing value", lambda r: {**r, "age": None}, "instances.1.age", "invalid_request"),
    ("missing-value text there", lambda r: {**r, "city": "NA"}, "instances.1.city", "invalid_input"),
    ("number out of range", lambda r: {**r, "income": 1e300}, "instances.1.income", "invalid_request"),
    ("not an object", lambda r: ["age", 40], "instances.1", "invalid_request"),
])
def test_bad_table_rows_are_422_naming_the_column_and_row(table_client, name, change, loc, code):
    good = instances_of(synthetic_rows(2))
    err = error_of(post(table_client, [good[0], change(good[1])]))
    assert err["code"] == code and err["details"][0]["loc"] == loc, (name, err)
    assert loc in err["message"], (name, err["message"])
    assert post(table_client, good).status_code == 200


def test_table_runs_take_no_file_uploads(table_client):
    resp = table_client.post("/v1/predict", files=[("files", ("a.png", b"x", "image/png"))])
    assert error_of(resp, 415)["code"] == "unsupported_media_type"


def test_table_onnx_backend_matches_torch(table_run, table_client, regression_run, tmp_path):
    from kiln.export import export_run
    from kiln.rundir import RunDir

    export_run(table_run)
    instances = instances_of(synthetic_rows(16, seed=9))
    with TestClient(create_app(table_run, backend="onnx")) as c:
        got = post(c, instances).json()
    assert got["model"]["backend"] == "onnx"
    want = post(table_client, instances).json()["predictions"]
    np.testing.assert_allclose([p["probabilities"]["low"] for p in got["predictions"]],
                               [p["probabilities"]["low"] for p in want], atol=1e-5)
    # Another run's file is refused at startup, not at the first request.
    other = shutil.copytree(regression_run, tmp_path / "other")
    shutil.copy(table_run / RunDir.ONNX, other / RunDir.ONNX)
    with pytest.raises(kiln.KilnError, match="belongs to another model"):
        create_app(other, backend="onnx")


@pytest.fixture(scope="module")
def regression_run(tmp_path_factory):
    rnd = random.Random(1)
    rows = [[x := rnd.uniform(0, 10), rnd.choice("AB"), 3 * x + rnd.gauss(0, 0.5)] for _ in range(200)]
    root = tmp_path_factory.mktemp("serve-regression")
    path = write_csv(root / "reg.csv", rows, ["x", "g", "y"])
    cfg = {"name": "reg", "data": {"dataset": "tabular", "path": str(path), "target": "y"},
           "model": {"blocks": [{"type": "tabular_encoder"}, {"type": "dense", "units": 16, "activation": "relu"},
                                {"type": "regressor"}]},
           "train": {"epochs": 10, "batch_size": 16, "optimizer": {"name": "adam", "lr": 0.01}, "threads": THREADS}}
    kiln.train(cfg, out=root / "run", live=False)
    return root / "run"


def test_regression_run_answers_values(regression_run):
    from kiln.export import export_run

    instances = [{"x": x, "g": g} for x, g in [(0.5, "A"), (5.0, "B"), (9.25, "A"), (3, "unseen")]]
    expected = [e["prediction"] for e in kiln.Run.load(regression_run).predict_rows(instances)]
    with TestClient(create_app(regression_run)) as c:
        body = post(c, instances).json()
        info = c.get("/v1/model").json()
        spec = c.get("/openapi.json").json()
        err = error_of(post(c, [{"x": 1.0}]))
    assert [set(p) for p in body["predictions"]] == [{"value"}] * 4
    np.testing.assert_allclose([p["value"] for p in body["predictions"]], expected, rtol=1e-5)
    export_run(regression_run)
    with TestClient(create_app(regression_run, backend="onnx")) as c:
        np.testing.assert_allclose([p["value"] for p in post(c, instances).json()["predictions"]], expected,
                                   rtol=1e-5)
    assert info["task"] == "regression" and info["outputs"] == {"kind": "value", "target": "y"}
    prediction = spec["components"]["schemas"]["ValuePrediction"]
    assert prediction["properties"]["value"]["type"] == "number"
    assert "ClassPrediction" not in spec["components"]["schemas"]
    assert err["details"][0]["loc"] == "instances.0.g"


# ---- text --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pairs_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-pairs")
    (root / "numbers.tsv").write_text("".join(f"{w}\t{d}\n" for w, d in pairs(100, limit=1000)))
    cfg = {"name": "numbers", "data": {"dataset": "text_pairs", "path": str(root / "numbers.tsv")},
           "model": {"blocks": [{"type": "token_embedding", "width": 16},
                                {"type": "positional_encoding", "kind": "learned"},
                                {"type": "encoder_decoder", "heads": 2, "layers": 1},
                                {"type": "lm_head"}]},
           "train": {"steps": 10, "batch_size": 32, "eval_every": 10, "eval_batches": 1,
                     "optimizer": {"name": "adamw", "lr": 0.005}, "threads": THREADS}}
    kiln.train(cfg, out=root / "run", live=False)
    return root / "run"


def test_seq2seq_run_answers_the_translation(pairs_run):
    sources = ["seven hundred twelve", "three", "forty-two"]
    run = kiln.Run.load(pairs_run)
    with TestClient(create_app(pairs_run)) as c:
        body = post(c, [{"text": s} for s in sources]).json()
        info = c.get("/v1/model").json()
        too_long = error_of(post(c, [{"text": "one"}, {"text": "seven hundred seventy-seven " * 10}]))
        unknown = error_of(post(c, [{"text": "thr✓e"}]))
        empty = error_of(post(c, [{"text": ""}]))
    assert body["predictions"] == [{"text": t} for t in run.translate(sources)]
    assert info["task"] == "seq2seq" and info["inputs"]["max_tokens"] == run.kind.source_steps
    assert too_long["code"] == "invalid_input" and too_long["details"][0]["loc"] == "instances.1.text"
    assert f"at most {run.kind.source_steps}" in too_long["message"]
    assert unknown["code"] == "invalid_input" and "'✓'" in unknown["message"]
    assert empty["details"][0]["loc"] == "instances.0.text"


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-lm")
    (root / "corpus.txt").write_text(CORPUS)
    kiln.train(lm_config(root / "corpus.txt", steps=10, eval_every=10, threads=THREADS), out=root / "run", live=False)
    return root / "run"


@pytest.fixture(scope="module")
def lm_client(lm_run):
    with TestClient(create_app(lm_run)) as c:
        yield c


def test_language_model_run_answers_generated_text(lm_run, lm_client):
    run = kiln.Run.load(lm_run)
    prompts = [{"prompt": "First", "max_new_tokens": 30, "temperature": 0.8, "top_k": 5, "seed": 7},
               {"prompt": "All:\n", "max_new_tokens": 20, "temperature": 0, "stop": ["e"]},
               {"prompt": "Speak", "max_new_tokens": 12, "top_p": 0.9, "seed": 3}]
    body = post(lm_client, prompts).json()
    info = lm_client.get("/v1/model").json()
    spec = lm_client.get("/openapi.json").json()
    assert body["predictions"] == [{"text": run.generate(**p)} for p in prompts]
    assert info["task"] == "lm" and info["outputs"]["kind"] == "text"
    fields = spec["components"]["schemas"]["PromptInstance"]["properties"]
    assert fields["max_new_tokens"]["maximum"] == 512 and fields["prompt"]["maxLength"] == 4096


@pytest.mark.parametrize(("field", "value", "code"), [
    ("prompt", "First " * 700, "invalid_request"),  # over 4096 characters
    ("prompt", "✓", "invalid_input"),  # not a character of the training text
    ("max_new_tokens", 0, "invalid_request"),
    ("max_new_tokens", 513, "invalid_request"),
    ("max_new_tokens", 2.5, "invalid_request"),
    ("temperature", -1, "invalid_request"),
    ("top_k", 0, "invalid_request"),
    ("top_p", 1.5, "invalid_request"),
    ("seed", -1, "invalid_request"),
    ("stop", [""], "invalid_request"),
    ("stop", "e", "invalid_request"),
    ("tokens", 3, "invalid_request"),  # no such setting
])
def test_bad_prompts_are_422_naming_the_field(lm_client, field, value, code):
    err = error_of(post(lm_client, [{"prompt": "First", "max_new_tokens": 2}, {"prompt": "First", field: value}]))
    assert err["code"] == code and err["details"][0]["loc"].startswith(f"instances.1.{field}"), err


def test_text_runs_refuse_the_onnx_backend_at_startup(lm_run):
    with pytest.raises(kiln.KilnError, match="decoded step by step: serve it with --backend torch"):
        create_app(lm_run, backend="onnx")
