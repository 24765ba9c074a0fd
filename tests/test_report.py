"""`kiln report`: the model card of a run, one self-contained HTML file.

Small real runs (an MNIST subset with the whole 10,000-image test split, German credit as a classifier and as a
regression) are reported; the files other commands add (explanations/, audit.json + audit.svg, the privacy budget
in results.json, compression.json, an exported model) are hand-made here in the shapes agreed for them. The page
is opened in a real headless browser (Playwright driving Debian's Chromium) where both are installed."""

from __future__ import annotations

import json
import re
import shutil
import struct
import zlib
from html import escape
from html.parser import HTMLParser
from pathlib import Path

import pytest

from kiln.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"  # git-ignored; CI keeps the screenshots
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FAST = {"train.threads": 1, "train.log_every": 10}
# The bars of add_trust_files' explanations (a row's attributions, the global column importance).
EXPLAINED = ("fig-explanation-input1-integrated_gradients", "fig-explanation-global-integrated_gradients")
# The sections and figures every classification run's card has, by id.
CLASSIFICATION = ("summary", "metrics", "curves", "fig-loss", "fig-metrics", "confusion", "fig-confusion",
                  "per-class", "per-class-table", "calibration", "fig-calibration", "errors", "errors-table", "config",
                  "config-yaml")


@pytest.fixture(scope="module")
def mnist_run(tmp_path_factory, mnist_root) -> Path:
    import kiln

    out = tmp_path_factory.mktemp("report") / "mnist"
    kiln.train(REPO / "examples" / "mnist_seed.yaml", {**FAST, "data.limit_train": 2000, "train.epochs": 2,
                                                        "train.batch_size": 50, "train.optimizer.lr": 0.003},
               out=out, live=False)
    return out


@pytest.fixture(scope="module")
def credit_root() -> Path:
    import os

    root = os.environ.get("KILN_DATA")
    if not root or not (Path(root) / "german_credit" / "german_credit.csv").is_file():
        pytest.skip("German credit data unavailable: set KILN_DATA to a folder holding german_credit/german_credit.csv")
    return Path(root)


@pytest.fixture(scope="module")
def credit_run(tmp_path_factory, credit_root) -> Path:
    import kiln

    out = tmp_path_factory.mktemp("report") / "credit"
    kiln.train(REPO / "examples" / "german_credit.yaml", {**FAST, "train.epochs": 8}, out=out, live=False)
    return out


class Ids(HTMLParser):
    """Every element id of a page, and every URL its elements would load (src, href, srcdoc aside)."""

    def __init__(self) -> None:
        super().__init__()
        self.ids: list[str] = []
        self.urls: list[str] = []
        self.tags: set[str] = set()

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        for name, value in attrs:
            if name == "id":
                self.ids.append(value)
            if name in ("src", "href", "xlink:href", "action", "data", "poster") and value:
                self.urls.append(value)


def parse(html: str) -> Ids:
    p = Ids()
    p.feed(html)
    return p


def assert_self_contained(html: str) -> Ids:
    page = parse(html)
    assert len(page.ids) == len(set(page.ids)), "ids are unique"
    outside = [u for u in page.urls if not u.startswith(("data:", "#"))]
    assert not outside, outside
    assert "script" not in page.tags and "link" not in page.tags
    assert "http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'" in html
    assert not re.search(r"url\((?!data:)", html), "no stylesheet URL"
    return page


def tiny_png() -> bytes:
    """A 4x4 grey PNG written by hand (no library), as `kiln explain` writes overlays."""
    raw = b"".join(b"\x00" + bytes([40 * (r + c) for c in range(4)]) for r in range(4))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 4, 4, 8, 0, 0, 0, 0)) + \
        chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


SVG = '<svg xmlns="http://www.w3.org/2000/svg" width="120" height="40"><rect width="80" height="20" fill="#36c"/></svg>'


def add_trust_files(run: Path) -> None:
    """The files kiln explain / audit / DP training / compress / export add, in the shapes they write."""
    ex = run / "explanations"
    ex.mkdir()
    stem = "input1.integrated_gradients"
    (ex / f"{stem}.json").write_text(json.dumps({
        "input": {"status_account": "A11", "age": "23"}, "method": "integrated_gradients",
        "explained": "the logit of the class", "class": "bad", "probabilities": {"good": 0.19, "bad": 0.81},
        "output": 1.2, "baseline_output": 0.1, "sum_of_attributions": 1.1, "completeness_gap": 0.0004,
        "columns": [{"column": "status_account", "value": "A11", "attribution": 0.42, "rank": 1},
                    {"column": "duration_months", "value": "48", "attribution": -0.13, "rank": 2},
                    {"column": "age", "value": "23", "attribution": 0.05, "rank": 3}],
        "files": [f"{stem}.json", f"{stem}.svg"]}))
    (ex / f"{stem}.svg").write_text(SVG)
    (ex / "text1.integrated_gradients.json").write_text(json.dumps({"method": "integrated_gradients", "tokens": [
        {"token": "WINNER", "attribution": 0.9}, {"token": "call", "attribution": 0.2},
        {"token": "now", "attribution": -0.1}]}))
    (ex / "text1.integrated_gradients.html").write_text(
        '<div class="kiln-explanation"><span title="+0.9" style="background:rgba(220,40,40,1)">WINNER</span> call now'
        '</div>')
    (ex / "digit1.saliency.json").write_text(json.dumps({
        "method": "saliency", "class": "7", "attributions": {"shape": [2, 2], "summed_over": "channels",
                                                             "map": [[0.1, 0.2], [0.0, 0.7]]}}))
    (ex / "digit1.saliency.png").write_bytes(tiny_png())
    (ex / "global.integrated_gradients.json").write_text(json.dumps({
        "method": "integrated_gradients", "split": "test", "rows": 200,
        "columns": [{"column": "status_account", "importance": 0.2, "mean_attribution": 0.1, "rank": 1},
                    {"column": "amount", "importance": 0.1, "mean_attribution": -0.05, "rank": 2}]}))

    def groups(male: float, female: float) -> dict:
        return {name: {"rows": rows, "selection_rate": rate, "accuracy": 0.7, "tpr": 0.2, "fpr": 0.1, "roc_auc": 0.75,
                       "interval": {"selection_rate": [rate - 0.05, rate + 0.06], "accuracy": [0.62, 0.77]},
                       "small": False} for name, rows, rate in (("male", 143, male), ("female", 57, female))}

    (run / "audit.json").write_text(json.dumps({
        "run": str(run), "split": "test", "rows": 200, "positive": "bad", "threshold": 0.59, "bootstrap": 200,
        "sensitive": [{"spec": "personal_status_and_sex:A91=male,A92=female", "column": "personal_status_and_sex",
                       "before": {"groups": groups(0.1329, 0.0526),
                                  "disparity": {"demographic_parity_difference": 0.0802},
                                  "disparity_interval": {"demographic_parity_difference": [0.0109, 0.1644]}},
                       "after": {"groups": groups(0.12, 0.11), "disparity": {"demographic_parity_difference": 0.01}},
                       "after_rule": "per-group thresholds, demographic_parity"}],
        "warnings": ["foreign: group 'A202' has 7 rows in the test split (fewer than 10)"]}))
    (run / "audit.svg").write_text(SVG)
    (run / "compression.json").write_text(json.dumps({"source": "runs/credit", "steps": [
        {"step": "original", "parameters": 7810, "file": "model.safetensors", "file_bytes": 31240,
         "test_accuracy": 0.74,
         "latency": {"batch_1": {"kiln": {"median_ms": 0.31}, "onnxruntime": {"median_ms": 0.05}}}},
        {"step": "quantize", "quantization": {"mode": "int8", "weights": "QUInt8"}, "file": "model.int8.onnx",
         "file_bytes": 12000, "test_accuracy": 0.735,
         "latency": {"batch_1": {"onnxruntime": {"median_ms": 0.04}}}}]}))
    (run / "model.onnx").write_bytes(b"\0" * 2048)
    results = json.loads((run / "results.json").read_text())
    results["privacy"] = {"epsilon": 2.97, "delta": 1e-5, "max_grad_norm": 1.0, "noise_multiplier": 1.1,
                          "accountant": "prv", "steps": 44, "layers_swapped": []}
    (run / "results.json").write_text(json.dumps(results))


# ---- the HTML itself ------------------------------------------------------------------------------------------


def test_mnist_card_has_every_figure_and_stays_small(mnist_run: Path) -> None:
    from kiln.report import write_report

    path = write_report(mnist_run)
    assert path == mnist_run / "report.html"
    html = path.read_text()
    page = assert_self_contained(html)
    for fig in CLASSIFICATION + ("fig-steps",):
        assert fig in page.ids, fig
    assert path.stat().st_size < 5 * 2**20
    # The whole test split was predicted, and the confusion matrix counts every test image once.
    results = json.loads((mnist_run / "results.json").read_text())
    assert results["test"]["samples"] == 10000
    cells = [int(n) for n in re.findall(r"predicted \w+: (\d+)</title>", html)]
    assert len(cells) == 100 and sum(cells) == 10000
    # Its diagonal is the run's own test accuracy.
    diagonal = sum(int(count) for _, count in re.findall(r"true (\d), predicted \1: (\d+)</title>", html))
    assert diagonal == round(results["test"]["accuracy"] * 10000)
    # The worst errors are wrong, shown as images, most confident first.
    rows = re.findall(r'<img class="sample" alt="input" src="data:image/png;base64,[^"]+"></td><td>(\d)</td>'
                      r'<td>(\d)</td><td class="num">([0-9.]+)</td>', html)
    assert len(rows) == 12 and all(t != p for t, p, _ in rows)
    probs = [float(p) for *_, p in rows]
    assert probs == sorted(probs, reverse=True)
    # No optional section without its file.
    for absent in ("explanations", "fairness", "privacy", "compression", "serving", "notes"):
        assert absent not in page.ids


def test_worst_errors_and_calibration_agree_with_the_run(mnist_run: Path) -> None:
    """The report's figures come from the run's own predictions: recomputed here through Run."""
    import numpy as np

    from kiln.report.predictions import calibration, per_class, test_predictions, worst
    from kiln.run import Run

    run = Run.load(mnist_run)
    p = test_predictions(run, run.kind.load())
    probs = run.predict(p.x).numpy()
    assert np.allclose(p.scores, probs, atol=1e-6)
    evaluated = run.evaluate("test")
    assert abs(float((p.pred == p.y).mean()) - evaluated["accuracy"]) < 1e-6
    top = worst(p, 5)
    assert all(probs[w["index"]].argmax() != p.y[w["index"]] for w in top)
    wrong = probs.argmax(1) != p.y
    assert top[0]["probability"] == pytest.approx(probs[wrong].max(1).max())
    cal = calibration(p)
    assert sum(b["count"] for b in cal["bins"]) == 10000
    acc = sum(b["frequency"] * b["count"] for b in cal["bins"]) / 10000
    assert acc == pytest.approx(evaluated["accuracy"], abs=1e-6)
    f1 = np.mean([r["f1"] for r in per_class(p)])
    assert f1 == pytest.approx(evaluated["macro_f1"], abs=1e-6)


def test_a_run_made_before_these_features_renders(mnist_run: Path, tmp_path: Path, capsys) -> None:
    """An old run: only its config, manifest, metrics, results and weights."""
    old = tmp_path / "old"
    old.mkdir()
    for name in ("config.yaml", "manifest.json", "metrics.jsonl", "results.json", "model.safetensors"):
        shutil.copy(mnist_run / name, old / name)
    out = tmp_path / "card.html"
    assert main(["report", str(old), "--out", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    page = assert_self_contained(out.read_text())
    for fig in CLASSIFICATION:
        assert fig in page.ids, fig
    assert not (old / "report.html").exists()
    # A results.json cut short (a kill mid-write of an old kiln): the card says so and keeps the rest.
    (old / "results.json").write_text('{"test": {"loss": 0.3')
    assert main(["report", str(old)]) == 0
    page = assert_self_contained(html := (old / "report.html").read_text())
    assert {"notes", "fig-confusion", "fig-loss"} <= set(page.ids) and "results.json is corrupt" in html


def test_credit_card_shows_rows_and_every_trust_section(credit_run: Path, tmp_path: Path) -> None:
    from kiln.report import render_report

    run = tmp_path / "credit"
    shutil.copytree(credit_run, run)
    add_trust_files(run)
    html = render_report(run)
    page = assert_self_contained(html)
    for fig in (*CLASSIFICATION, "fig-pr", "explanations", "explanation-cards", *EXPLAINED, "fairness",
                "fig-audit", "audit-table", "privacy", "privacy-table", "compression", "compression-table", "serving",
                "serving-table"):
        assert fig in page.ids, fig
    # the worst errors show the rows as the CSV holds them
    assert "<b>status_account</b> A1" in html and "<b>purpose</b>" in html
    assert "(&epsilon; = 2.97, &delta; = 1e-05) spent" in html
    # the audit's groups, before and after, with their intervals; its warnings
    assert "<td>female</td><td class=\"num\">57</td><td>0.0526 [0.0026, 0.1126]</td>" in html
    assert "<td>demographic_parity_difference</td><td>0.0802 [0.0109, 0.1644]</td>" in html
    assert "after (per-group thresholds, demographic_parity)" in html and "has 7 rows" in html
    # tokens coloured once (from the JSON; kiln explain's HTML of the same tokens is not shown again); the PNG
    assert html.count("WINNER") == 1 and 'srcdoc="&lt;div class=&quot;kiln-explanation' not in html
    assert "digit1.saliency.png" in html
    # compression: a row per step with its latency
    assert "<td>quantize</td>" in html and "batch_1 onnxruntime median ms" in html


def test_regression_card_plots_predicted_against_true(credit_root: Path, tmp_path: Path) -> None:
    import kiln
    from kiln.report import render_report

    as_regression = {**FAST, "train.epochs": 6, "data.target": "amount", "data.positive": None,
                     "train.early_stopping": None, "train.threshold_metric": None,
                     "model.blocks.2": {"type": "regressor"}}
    run = kiln.train(REPO / "examples" / "german_credit.yaml", as_regression, out=tmp_path / "amount", live=False)
    assert run.kind.task == "regression"
    page = assert_self_contained(html := render_report(run.path))
    for fig in ("fig-pred-true", "fig-residuals", "errors-table", "curves", "fig-loss"):
        assert fig in page.ids, fig
    for absent in ("confusion", "calibration", "per-class"):
        assert absent not in page.ids
    assert "largest errors" in html


def test_text_card_shows_the_misread_texts(tmp_path: Path) -> None:
    import os

    import kiln
    from kiln.report import render_report

    sms = Path(os.environ.get("KILN_DATA") or ".") / "sms_spam" / "SMSSpamCollection"
    if not sms.is_file():
        pytest.skip("SMS spam unavailable: set KILN_DATA to a folder holding sms_spam/SMSSpamCollection")
    config = {"name": "sms", "seed": 0,
              "data": {"dataset": "text_classes", "path": str(sms), "header": False, "label": 0, "text": 1,
                       "tokenizer": "bpe", "vocab_size": 1000, "max_tokens": 48},
              "model": {"blocks": [{"type": "token_embedding", "width": 32}, {"type": "seq_pool", "mode": "max"},
                                   {"type": "classifier"}]},
              "train": {"epochs": 2, "batch_size": 32, "threads": 1, "optimizer": {"name": "adam", "lr": 0.005}}}
    run = kiln.train(config, out=tmp_path / "sms", live=False)
    page = assert_self_contained(html := render_report(run.path))
    for fig in CLASSIFICATION:
        assert fig in page.ids, fig
    texts = {line.split("\t", 1)[1] for line in sms.read_text(encoding="utf-8").splitlines() if "\t" in line}
    shown = re.findall(r'<div class="row">([^<]+)</div>', html)
    assert shown and all(any(escape(t)[:80] == s[:80] for t in texts) for s in shown)  # the messages as written


def test_a_forecast_run_renders_from_its_files(tmp_path: Path) -> None:
    import os

    import kiln
    from kiln.report import render_report

    if not (Path(os.environ.get("KILN_DATA") or ".") / "timeseries" / "airline-passengers.csv").is_file():
        pytest.skip("airline passengers unavailable: set KILN_DATA to a folder holding timeseries/")
    run = kiln.train(REPO / "examples" / "airline.yaml", {**FAST, "train.epochs": 4}, out=tmp_path / "air", live=False)
    page = assert_self_contained(html := render_report(run.path))
    assert {"summary", "model-table", "metrics", "curves", "fig-loss", "config", "notes"} <= set(page.ids)
    assert "confusion" not in page.ids and "a forecast run: no confusion matrix" in html


def test_calibration_and_worst_of_binary_and_multilabel_predictions() -> None:
    """By hand: four binary rows and three multilabel rows."""
    import numpy as np
    import torch

    from kiln.report.predictions import Predictions, calibration, per_class, worst

    p = Predictions("binary", ["no", "yes"], torch.zeros(4, 1), np.array([0, 1, 1, 0]),
                    np.array([[0.95, 0.05], [0.35, 0.65], [0.8, 0.2], [0.3, 0.7]]), 0.5)
    cal = calibration(p)  # P(yes) 0.05 | 0.2 | 0.65, 0.7 -> positives 0/1, 1/1, 1/2
    assert [(b["count"], b["frequency"]) for b in cal["bins"]] == [(1, 0.0), (1, 1.0), (1, 1.0), (1, 0.0)]
    assert cal["ece"] == pytest.approx((0.05 + 0.8 + 0.35 + 0.7) / 4)
    assert [w["index"] for w in worst(p, 5)] == [2, 3]  # P(no) 0.8 for a yes, then P(yes) 0.7 for a no
    assert per_class(p)[1] == {"class": "yes", "precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    m = Predictions("multilabel", ["a", "b"], torch.zeros(3, 1), np.array([[1, 0], [0, 1], [1, 1]]),
                    np.array([[0.9, 0.2], [0.6, 0.7], [0.8, 0.3]]), 0.5)
    wrong = worst(m, 5)  # row 2 misses b at 0.3 (sure at 0.7); row 1 says a at 0.6
    assert [(w["index"], w["probability"]) for w in wrong] == [(2, pytest.approx(0.7)), (1, pytest.approx(0.6))]
    assert wrong[0]["true"] == "a, b" and wrong[0]["predicted"] == "a"
    assert per_class(m)[0]["precision"] == pytest.approx(2 / 3) and per_class(m)[1]["recall"] == 0.5
    assert sum(b["count"] for b in calibration(m)["bins"]) == 6


def test_a_run_whose_data_is_gone_still_renders(credit_run: Path, tmp_path: Path, monkeypatch) -> None:
    from kiln.report import render_report

    monkeypatch.delenv("KILN_DATA")
    monkeypatch.chdir(tmp_path)
    page = assert_self_contained(html := render_report(credit_run))
    assert {"summary", "model-table", "metrics", "curves", "config", "notes"} <= set(page.ids)
    assert "<td>table</td>" in html and "good, bad" in html  # what the run is, from its own files
    assert "confusion" not in page.ids
    assert "Test predictions were not computed" in html and "german_credit.csv" in html


def test_bad_input_is_an_error_naming_it(tmp_path: Path, capsys) -> None:
    assert main(["report", str(tmp_path / "nowhere")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    assert main(["report", str(tmp_path)]) == 2
    assert "not a kiln run directory" in capsys.readouterr().err
    assert main(["report", str(tmp_path), "--out", str(tmp_path)]) == 2
    assert f"--out {tmp_path} is a folder" in capsys.readouterr().err


# ---- in a real browser ----------------------------------------------------------------------------------------


def open_in_browser(path: Path, screenshot: Path) -> dict:
    """Open the page in headless Chromium with every request recorded and any leaving the page refused."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install -e '.[dev]')")
    if CHROMIUM is None:
        pytest.skip("no chromium on PATH (apt-get install -y chromium; .ci/run installs it)")
    seen: dict = {"requests": [], "console": [], "errors": []}
    url = path.resolve().as_uri()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("console", lambda m: seen["console"].append((m.type, m.text)))
            page.on("pageerror", lambda e: seen["errors"].append(str(e)))

            def route(r):
                seen["requests"].append(r.request.url)
                if r.request.url == url or r.request.url.startswith("data:"):
                    r.continue_()
                else:
                    r.abort()

            page.context.route("**/*", route)
            page.on("request", lambda r: seen["requests"].append(r.url))
            page.goto(url)
            page.wait_for_load_state("load")
            seen["ids"] = page.evaluate("Array.from(document.querySelectorAll('[id]')).map(e => e.id)")
            seen["boxes"] = page.evaluate(
                "Object.fromEntries(Array.from(document.querySelectorAll('[id^=fig-]')).map(e => "
                "[e.id, [e.getBoundingClientRect().width, e.getBoundingClientRect().height]]))")
            seen["broken_images"] = page.evaluate(
                "Array.from(document.images).filter(i => !i.complete || i.naturalWidth === 0).map(i => i.alt)")
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    return seen


def assert_clean(seen: dict, path: Path, figures: tuple[str, ...]) -> None:
    own = path.resolve().as_uri()
    assert all(u == own or u.startswith("data:") for u in seen["requests"]), seen["requests"]
    assert not [c for c in seen["console"] if c[0] in ("error", "warning")], seen["console"]
    assert not seen["errors"], seen["errors"]
    assert not seen["broken_images"], seen["broken_images"]
    for fig in figures:
        assert fig in seen["ids"], fig
        if fig.startswith("fig-"):
            w, h = seen["boxes"][fig]
            assert w > 50 and h > 30, (fig, w, h)


def test_mnist_card_in_a_real_browser(mnist_run: Path) -> None:
    from kiln.report import write_report

    path = write_report(mnist_run)
    shot = ARTIFACTS / "report_mnist.png"
    seen = open_in_browser(path, shot)
    assert_clean(seen, path, CLASSIFICATION + ("fig-steps",))
    assert shot.stat().st_size > 10_000
    assert path.stat().st_size < 5 * 2**20


def test_credit_card_with_every_section_in_a_real_browser(credit_run: Path, tmp_path: Path) -> None:
    from kiln.report import write_report

    run = tmp_path / "credit"
    shutil.copytree(credit_run, run)
    add_trust_files(run)
    path = write_report(run)
    seen = open_in_browser(path, ARTIFACTS / "report_credit.png")
    assert_clean(seen, path, CLASSIFICATION + ("fig-pr", *EXPLAINED, "fig-audit", "privacy-table",
                                               "compression-table", "serving-table"))


def test_a_snippet_that_reaches_out_is_stopped_by_the_page(credit_run: Path, tmp_path: Path) -> None:
    """An explanation's HTML that names a remote image loads nothing: the page's policy forbids it."""
    from kiln.report import write_report

    run = tmp_path / "credit"
    shutil.copytree(credit_run, run)
    (run / "explanations").mkdir()
    (run / "explanations" / "x.html").write_text('<img src="http://203.0.113.9/pixel.png"><p>tokens</p>')
    path = write_report(run)
    seen = open_in_browser(path, tmp_path / "shot.png")
    own = path.resolve().as_uri()
    assert all(u == own or u.startswith("data:") or u == "about:srcdoc" for u in seen["requests"]), seen["requests"]
    assert any("203.0.113.9" in text and "Content Security Policy" in text for _, text in seen["console"])
