"""Explanations (``kiln explain``, ``Run.explain``): the model-randomisation sanity check on MNIST, a table whose two
signal columns rank first (one-hot, piecewise-linear, periodic, FT-Transformer and TabM-mini models), integrated gradients'
completeness, recurrent and attention text models, the PyTorch path of fused runs, and bad input named."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

import kiln
from kiln.cli import main
from kiln.errors import KilnError
from kiln.explain import METHODS, attribute, explain_model
from kiln.nn import build_model

pytest.importorskip("captum", reason="explanations need Captum: pip install 'kiln[explain]'")
pytestmark = pytest.mark.usefixtures("one_thread")


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation (ties get their mean rank)."""
    from scipy.stats import rankdata

    ra, rb = rankdata(a), rankdata(b)
    return float(np.corrcoef(ra, rb)[0, 1])


# ---- images: MNIST ---------------------------------------------------------------------------------------------

SEED_LIKE = [{"type": "conv2d", "filters": 16, "kernel": 3, "activation": "relu"}, {"type": "maxpool2d", "size": 2},
             {"type": "rows_to_sequence"}, {"type": "dense", "units": 32, "activation": "relu"},
             {"type": "lstm", "units": 32},
             {"type": "transformer_encoder", "heads": 2, "ff": 64, "norm": "post", "dropout": 0.0},
             {"type": "seq_pool", "mode": "mean"}, {"type": "classifier", "classes": 10}]


@pytest.fixture(scope="module")
def mnist_run(mnist_root, tmp_path_factory):
    """The seed model's shape (conv, LSTM, attention), smaller, trained briefly: fused C kernels on the CPU."""
    torch.set_num_threads(1)
    cfg = {"name": "mnist_explain", "seed": 0,
           "data": {"dataset": "mnist", "root": str(mnist_root), "limit_train": 8000, "limit_test": 500},
           "model": {"blocks": SEED_LIKE},
           "train": {"epochs": 2, "batch_size": 32, "threads": 1, "optimizer": {"name": "adam", "lr": 0.002}}}
    out = tmp_path_factory.mktemp("mnist") / "run"
    kiln.train(cfg, out=out, live=False)
    return kiln.Run.load(out)


def test_model_randomisation_sanity_check(mnist_run):
    """Adebayo et al. (2018): attributions of the trained model and of the same architecture with re-initialised
    weights must differ. Spearman rank correlation of the signed maps on 20 test digits, mean below 0.5, for every
    method (absolute maps of integrated gradients and SHAP share the digit's zero background with any model, so
    they are compared over the digit's own pixels)."""
    run = mnist_run
    assert run.metrics["test"]["accuracy"] >= 0.9
    x, y = run.kind.load().split("test")
    x = run.kind.to_input(x[:20])
    trained = explain_model(run)
    torch.manual_seed(12345)
    randomised = build_model(run.config.blocks, run.kind.input_shape).eval()
    baseline = run.kind.explain_baseline(x)
    digit = (x > 0).reshape(20, -1).numpy()
    for method in METHODS:
        a = attribute(trained, x, baseline, y[:20], method).values.reshape(20, -1).numpy()
        b = attribute(randomised, x, baseline, y[:20], method).values.reshape(20, -1).numpy()
        signed = np.mean([spearman(p, q) for p, q in zip(a, b, strict=True)])
        on_digit = np.mean([spearman(np.abs(p[m]), np.abs(q[m])) for p, q, m in zip(a, b, digit, strict=True)])
        assert signed < 0.5, (method, signed)
        assert on_digit < 0.5, (method, on_digit)
        assert np.abs(a).sum() > 0


def test_images_explain_with_completeness_and_pictures(mnist_run, tmp_path):
    """20 digits: integrated gradients' attributions sum to output minus baseline output within 1%; a PNG overlay
    beside each input and a JSON each; the explained model runs PyTorch's operators, not the fused kernels the
    run itself uses on this CPU."""
    from PIL import Image

    run = mnist_run
    x, _ = run.kind.load().split("test")
    records = run.explain(x[:20], "integrated_gradients", out=tmp_path / "ig")
    assert len(records) == 20
    for r in records:
        change = r["output"] - r["baseline_output"]
        assert abs(r["sum_of_attributions"] - change) <= 0.01 * abs(change), r
        assert r["completeness_gap"] <= 0.01
        assert "native kernels" in r["engine"]
        json_path, png = map(Path, r["files"])
        assert json.loads(json_path.read_text())["class"] == r["class"]
        with Image.open(png) as img:
            assert img.format == "PNG" and img.width > 2 * img.height - 20
        assert len(r["attributions"]["map"]) == 28
    fused = {type(m).__name__ for m in run.model.modules()}
    plain = {type(m).__name__ for m in explain_model(run).modules()}
    assert "ConvPool" in fused and "ConvPool" not in plain


def test_cli_explains_image_files(mnist_run, tmp_path, capsys):
    from PIL import Image

    x, _ = mnist_run.kind.load().split("test")
    png = tmp_path / "digit.png"
    Image.fromarray(x[0, 0].numpy()).save(png)
    for method in METHODS:
        assert main(["explain", str(mnist_run.path), str(png), "--method", method, "--out", str(tmp_path / "e")]) == 0
        assert (tmp_path / "e" / f"digit.{method}.png").is_file()
        record = json.loads((tmp_path / "e" / f"digit.{method}.json").read_text())
        assert record["method"] == method and record["input"]["file"] == str(png)
    assert main(["explain", str(mnist_run.path), str(png)]) == 0  # default: into the run's explanations/
    assert (mnist_run.path / "explanations" / "digit.integrated_gradients.png").is_file()
    out = capsys.readouterr().out
    assert "digit.integrated_gradients.png" in out and "PyTorch's operators" in out


def test_images_of_an_idx_file_explain(mnist_run, mnist_root, tmp_path):
    """MNIST's own IDX file as input: each image an input, the first --limit of them."""
    idx = next(p for p in mnist_root.iterdir() if p.name.startswith("t10k-images-idx3-ubyte"))
    assert main(["explain", str(mnist_run.path), str(idx), "--limit", "3", "--method", "saliency",
                 "--out", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.glob("*.png")) == [f"t10k-images_{k}.saliency.png" for k in range(3)]
    record = json.loads((tmp_path / "t10k-images_2.saliency.json").read_text())
    x, _ = mnist_run.kind.load().split("test")
    assert record["input"]["index"] == 2 and record["class"] == mnist_run.class_names[
        int(mnist_run.predict(x[2:3]).argmax())]


def test_explanations_are_reproducible(mnist_run, tmp_path):
    """The same input and method give the same attributions (SHAP's random path points are seeded)."""
    x, _ = mnist_run.kind.load().split("test")
    for method in METHODS:
        first, again = (mnist_run.explain(x[:2], method, out=tmp_path / f"{method}{k}") for k in range(2))
        assert [r["attributions"] for r in first] == [r["attributions"] for r in again], method


def test_bad_image_input_is_named(mnist_run, tmp_path, capsys):
    with pytest.raises(KilnError, match=r"explain expects input of shape \(N, 1, 28, 28\), got \(2, 5, 5\)"):
        mnist_run.explain(torch.zeros(2, 5, 5))
    np.save(tmp_path / "small.npy", np.zeros((5, 5), dtype=np.uint8))
    assert main(["explain", str(mnist_run.path), str(tmp_path / "small.npy")]) == 2
    assert "does not fit the model input (1, 28, 28)" in capsys.readouterr().err
    assert main(["explain", str(mnist_run.path), str(tmp_path / "absent.png")]) == 2
    assert "absent.png: no such file" in capsys.readouterr().err
    assert main(["explain", str(mnist_run.path), "--global"]) == 2
    assert "inputs have no columns" in capsys.readouterr().err
    with pytest.raises(KilnError, match="target 'eleven' is not one of this run's classes"):
        mnist_run.explain(torch.zeros(1, 28, 28), target="eleven")


def test_photos_of_an_image_folder_run_explain(tmp_path, monkeypatch):
    """A colour image-folder run (normalised inputs, a residual block): the baseline is a black photo as the model
    reads it, integrated gradients are complete within 1%, and the overlay shows the photo in colour."""
    from PIL import Image
    from test_image_folders import config, photo, write_folder

    monkeypatch.setenv("KILN_CACHE", str(tmp_path / "cache"))
    run = kiln.train(config(write_folder(tmp_path / "photos", per_class=10), epochs=3), out=tmp_path / "run",
                     live=False)
    run = kiln.Run.load(run.path)
    black = run.kind.explain_baseline(run.kind.to_input(torch.zeros(1, 3, 16, 16, dtype=torch.uint8)))
    assert torch.allclose(black, run.kind.to_input(torch.zeros(1, 3, 16, 16, dtype=torch.uint8)))
    photo((200, 30, 30), (30, 30), 7).save(tmp_path / "red.png")
    record = run.explain([tmp_path / "red.png"])[0]
    assert record["class"] == "red" and record["completeness_gap"] <= 0.01
    with Image.open(record["files"][1]) as img:
        left = np.asarray(img.convert("RGB"))[:, : img.width // 2 - 2]
    assert left[..., 0].mean() > 2 * left[..., 2].mean()  # the input panel is the red photo itself


# ---- tables: two signal columns ----------------------------------------------------------------------------------

COLUMNS = ["noise_a", "signal_number", "noise_b", "colour", "noise_city", "noise_c", "label"]


def signal_csv(path: Path, n: int = 1500, seed: int = 0) -> Path:
    """Only ``signal_number`` and ``colour`` (is it red?) decide the label; four other columns are noise."""
    rnd = random.Random(seed)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        for _ in range(n):
            number, colour = rnd.gauss(0, 1), rnd.choice(["red", "green", "blue", "grey"])
            score = 1.5 * number + (2.0 if colour == "red" else -0.7) + rnd.gauss(0, 0.3)
            w.writerow([f"{rnd.gauss(0, 1):.4f}", f"{number:.4f}", f"{rnd.uniform(0, 100):.3f}", colour,
                        rnd.choice(["Oslo", "Lima", "Pune", "Kobe", "Bonn"]), f"{rnd.gauss(5, 2):.4f}",
                        "yes" if score > 0 else "no"])
    return path


ENCODINGS = {
    "onehot": ({}, [{"type": "tabular_encoder"}, {"type": "dense", "units": 32, "activation": "relu"}]),
    "ple_embedded": ({"numeric_encoding": "ple", "bins": 8},
                     [{"type": "tabular_encoder", "onehot_max": 0, "embed_dim": 4},
                      {"type": "dense", "units": 32, "activation": "relu"}]),
    "periodic": ({}, [{"type": "tabular_encoder", "numeric_embedding": "periodic", "frequencies": 8,
                       "numeric_dim": 4}, {"type": "dense", "units": 32, "activation": "relu"}]),
    "tabm_mini": ({"numeric_encoding": "ple", "bins": 8},
                  [{"type": "tabular_encoder"}, {"type": "ensemble_mlp", "members": 4, "units": 32, "layers": 2}]),
    "ft_transformer": ({}, [{"type": "feature_tokenizer", "width": 16},
                            {"type": "transformer_encoder", "heads": 2, "ff": 32, "dropout": 0.0},
                            {"type": "seq_pool", "mode": "last"}]),
}


@pytest.fixture(scope="module")
def signal_data(tmp_path_factory) -> Path:
    return signal_csv(tmp_path_factory.mktemp("signal") / "signal.csv")


def table_run(path: Path, out: Path, encoding: str = "onehot", **data):
    extra, blocks = ENCODINGS[encoding]
    cfg = {"name": f"signal_{encoding}", "seed": 0,
           "data": {"dataset": "tabular", "path": str(path), "target": "label", **extra, **data},
           "model": {"blocks": [*blocks, {"type": "classifier"}]},
           "train": {"epochs": 12, "batch_size": 64, "threads": 1, "optimizer": {"name": "adam", "lr": 0.01},
                     "precision": "fp32"}}  # float32 on every CPU (auto trains in bf16 where AMX is)
    kiln.train(cfg, out=out, live=False)
    return kiln.Run.load(out)


@pytest.mark.parametrize("encoding", list(ENCODINGS))
def test_two_signal_columns_rank_first(encoding, signal_data, tmp_path):
    """For every table encoding, the two columns that carry the signal rank first, per row (integrated
    gradients, averaged over rows) and globally over the test split (occlusion of whole columns); attributions
    come per column whatever the encoding spreads a column over (one-hot, piecewise-linear bins, periodic values,
    a token); integrated gradients are complete within 1%."""
    run = table_run(signal_data, tmp_path / "run", encoding)
    assert run.metrics["test"]["accuracy"] > 0.9, run.metrics["test"]
    rows = tmp_path / "rows.csv"
    lines = signal_data.read_text().splitlines()
    rows.write_text("\n".join(lines[:41]) + "\n")
    records = run.explain([rows], "integrated_gradients")
    assert len(records) == 40
    names = {c.name for c in run.kind.prep.columns}
    mean_abs: dict[str, float] = {}
    for r in records:
        assert {c["column"] for c in r["columns"]} == names  # one value per column, never per encoded input
        assert r["completeness_gap"] <= 0.01
        change = r["output"] - r["baseline_output"]
        assert abs(sum(c["attribution"] for c in r["columns"]) - change) <= 0.01 * abs(change) + 1e-5
        for c in r["columns"]:
            mean_abs[c["column"]] = mean_abs.get(c["column"], 0.0) + abs(c["attribution"])
        assert Path(r["files"][1]).read_text().startswith("<svg")
    assert set(sorted(mean_abs, key=lambda k: -mean_abs[k])[:2]) == {"signal_number", "colour"}, mean_abs
    assert records[0]["columns"][0]["value"] == dict(zip(COLUMNS, lines[1].split(","), strict=True))[
        records[0]["columns"][0]["column"]]
    result = run.explain_global()
    assert {c["column"] for c in result["columns"][:2]} == {"signal_number", "colour"}, result["columns"]
    assert result["rows"] == len(run.kind.load().split("test")[0])
    assert (run.path / "explanations" / "global.occlusion.svg").is_file()


def test_every_method_explains_a_table_row_and_the_cli_ranks_globally(signal_data, tmp_path, capsys):
    run = table_run(signal_data, tmp_path / "run")
    rows = tmp_path / "rows.csv"
    rows.write_text("\n".join(signal_data.read_text().splitlines()[:4]) + "\n")
    for method in METHODS:
        records = run.explain([rows], method)
        assert len(records) == 3 and all(len(r["columns"]) == 6 for r in records)
    assert main(["explain", str(run.path), "--global", "--method", "saliency", "--limit", "200"]) == 0
    out = capsys.readouterr().out
    assert "mean |attribution| over 200 test rows" in out
    ranked = [line.split(".", 1)[1].split()[0] for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert set(ranked[:2]) == {"signal_number", "colour"}, out


def test_bad_table_input_is_named(signal_data, tmp_path, capsys):
    data = tmp_path / "data.csv"
    data.write_text(signal_data.read_text())
    run = table_run(data, tmp_path / "run")
    partial = tmp_path / "partial.csv"
    partial.write_text("noise_a,signal_number\n0.1,0.2\n")
    assert main(["explain", str(run.path), str(partial)]) == 2
    assert "has no column 'noise_b'" in capsys.readouterr().err
    with pytest.raises(KilnError, match="limit must be at least 1, not 0"):
        run.explain_global(limit=0)
    with pytest.raises(KilnError, match="method must be one of integrated_gradients, saliency, occlusion, shap"):
        run.explain([partial], "lime")
    data.unlink()  # the run's test split can no longer be read
    assert main(["explain", str(run.path), "--global"]) == 2
    err = capsys.readouterr().err
    assert "error: global importance reads the run's test split, which cannot be read here" in err
    assert "data.csv" in err and "Traceback" not in err


def test_global_needs_a_nonempty_split(signal_data, tmp_path):
    run = table_run(signal_data, tmp_path / "run", val_fraction=0.0)
    with pytest.raises(KilnError, match=r"has no val split \(it is empty\)"):
        run.explain_global(split="val")


def test_a_regression_run_explains_its_value(tmp_path):
    """A regression target: the explained output is the (standardised) predicted value; its one signal column
    ranks first and integrated gradients are complete."""
    rnd = random.Random(2)
    path = tmp_path / "prices.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["rooms", "noise", "district", "price"])
        for _ in range(600):
            rooms = rnd.randint(1, 6)
            w.writerow([rooms, f"{rnd.gauss(0, 1):.3f}", rnd.choice("ABC"), f"{50 * rooms + rnd.gauss(0, 5):.1f}"])
    cfg = {"name": "prices", "seed": 0, "data": {"dataset": "tabular", "path": str(path), "target": "price"},
           "model": {"blocks": [{"type": "tabular_encoder"}, {"type": "dense", "units": 16, "activation": "relu"},
                                {"type": "regressor"}]},
           "train": {"epochs": 15, "batch_size": 32, "threads": 1, "optimizer": {"name": "adam", "lr": 0.01}}}
    kiln.train(cfg, out=tmp_path / "run", live=False)
    run = kiln.Run.load(tmp_path / "run")
    rows = tmp_path / "rows.csv"
    rows.write_text("rooms,noise,district\n5,0.1,A\n1,-0.3,B\n")
    records = run.explain([rows])
    assert [round(r["prediction"] / 50) for r in records] == [5, 1]
    for r in records:
        assert "class" not in r and r["columns"][0]["column"] == "rooms" and r["completeness_gap"] <= 0.01
    with pytest.raises(KilnError, match="a regression run has one output"):
        run.explain([rows], target="A")


def test_a_missing_captum_names_the_extra(signal_data, tmp_path, monkeypatch):
    import sys

    run = table_run(signal_data, tmp_path / "run")
    monkeypatch.setitem(sys.modules, "captum.attr", None)
    with pytest.raises(KilnError, match=r"explanations need Captum: pip install 'kiln\[explain\]'"):
        run.explain_global()


# ---- text: recurrent and attention models -------------------------------------------------------------------------

TEXT_ENCODERS = {
    "lstm": [{"type": "lstm", "units": 16}],
    "gru": [{"type": "gru", "units": 16}],
    "bidirectional_lstm": [{"type": "lstm", "units": 8, "layers": 2, "bidirectional": True}],
    "transformer_encoder": [{"type": "positional_encoding"},
                            {"type": "transformer_encoder", "heads": 2, "ff": 32, "dropout": 0.0}],
}


@pytest.fixture(scope="module")
def texts_csv(tmp_path_factory) -> Path:
    """A text is "alarm" when it holds the letter z, else "calm"; other letters are noise."""
    rnd = random.Random(1)
    path = tmp_path_factory.mktemp("texts") / "texts.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for i in range(600):
            letters = [rnd.choice("abcdefghij") for _ in range(rnd.randint(6, 14))]
            if i % 2:
                letters[rnd.randrange(len(letters))] = "z"
            w.writerow(["".join(letters), "alarm" if i % 2 else "calm"])
    return path


@pytest.mark.parametrize("encoder", list(TEXT_ENCODERS))
def test_recurrent_and_attention_text_models_explain(encoder, texts_csv, tmp_path):
    """LSTM, GRU, bidirectional LSTM and attention classifiers, fused on this CPU as trained: every method
    explains each text token by token (integrated gradients at the embedding layer from padding ids, complete
    within 1%), and the token that decides the class gets the largest attribution."""
    cfg = {"name": f"texts_{encoder}", "seed": 0,
           "data": {"dataset": "text_classes", "path": str(texts_csv), "tokenizer": "char", "max_tokens": 16},
           "model": {"blocks": [{"type": "token_embedding", "width": 16}, *TEXT_ENCODERS[encoder],
                                {"type": "seq_pool", "mode": "max"}, {"type": "classifier"}]},
           "train": {"epochs": 5, "batch_size": 32, "threads": 1, "optimizer": {"name": "adam", "lr": 0.005}}}
    kiln.train(cfg, out=tmp_path / "run", live=False)
    run = kiln.Run.load(tmp_path / "run")
    assert run.metrics["test"]["accuracy"] > 0.9, run.metrics["test"]
    lines = tmp_path / "texts.txt"
    lines.write_text("abczdefg\nhijabcdeabc\nz\n")
    for method in METHODS:
        records = run.explain([lines], method)
        assert [r["input"]["text"] for r in records] == ["abczdefg", "hijabcdeabc", "z"]
        for r in records:
            assert "".join(t["token"] for t in r["tokens"]) == r["input"]["text"]
            assert Path(r["files"][1]).read_text().startswith('<div class="kiln-explanation"')
        first = records[0]
        assert first["class"] == "alarm"
        if method != "saliency":  # saliency's magnitudes carry no sign or reference: it shows sensitivity only
            assert max(first["tokens"], key=lambda t: t["attribution"])["token"] == "z", (method, first["tokens"])
        if method == "integrated_gradients":
            assert all(r["completeness_gap"] <= 0.01 for r in records), [r["completeness_gap"] for r in records]


def test_a_language_model_run_says_it_has_no_explanations(tmp_path, capsys):
    path = tmp_path / "text.txt"
    path.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    cfg = {"name": "tiny_lm", "seed": 0, "data": {"dataset": "text", "path": str(path), "context": 16},
           "model": {"blocks": [{"type": "token_embedding", "width": 16}, {"type": "transformer_decoder", "layers": 1,
                                                                            "heads": 2}, {"type": "lm_head"}]},
           "train": {"steps": 5, "batch_size": 8, "eval_every": 5, "eval_batches": 1, "threads": 1}}
    kiln.train(cfg, out=tmp_path / "run", live=False)
    assert main(["explain", str(tmp_path / "run"), str(path)]) == 2
    err = capsys.readouterr().err
    assert "is a language-model run; explanations apply to image, table and text-classification runs" in err

