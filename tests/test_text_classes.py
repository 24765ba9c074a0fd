"""Text classification (``dataset: text_classes``): padding that changes nothing, real training on SMS spam, a saved
run that predicts the same, multilabel texts, texts longer than max_tokens, and bad input named."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch

import kiln
from kiln.cli import main
from kiln.config import load_config
from kiln.data.kind import open_kind
from kiln.errors import ConfigError, DataError, KilnError
from kiln.nn import build_model
from kiln.nn.fuse import fuse
from kiln.registry import BLOCKS

SMS = "sms_spam/SMSSpamCollection"
PAD = 30  # the padding id of the masking tests' models (vocabulary 0..30)


pytestmark = pytest.mark.usefixtures("one_thread")


def sms_path() -> Path:
    root = os.environ.get("KILN_DATA")
    if not root or not (Path(root) / SMS).is_file():
        pytest.skip(f"SMS spam unavailable: set KILN_DATA to a folder holding {SMS} (e.g. ../shared/data)")
    return Path(root) / SMS


def sms_config(**data) -> dict:
    return {"name": "sms", "seed": 0,
            "data": {"dataset": "text_classes", "path": str(sms_path()), "header": False, "label": 0, "text": 1,
                     "tokenizer": "bpe", "vocab_size": 1000, "max_tokens": 48, **data},
            "model": {"blocks": [{"type": "token_embedding", "width": 32}, {"type": "seq_pool", "mode": "max"},
                                 {"type": "classifier"}]},
            "train": {"epochs": 3, "batch_size": 32, "threshold_metric": "f1", "threads": 1,
                      "optimizer": {"name": "adam", "lr": 0.005}}}


# ---- padding and masking -------------------------------------------------------------------------------------

ENCODERS = {
    "lstm": [{"type": "lstm", "units": 12}],
    "gru": [{"type": "gru", "units": 12}],
    "bidirectional_lstm": [{"type": "lstm", "units": 12, "layers": 2, "bidirectional": True}],
    "transformer_encoder": [{"type": "positional_encoding"}, {"type": "transformer_encoder", "heads": 2, "ff": 32}],
}


def classifier(encoder: str, pool: str, fused: bool) -> torch.nn.Module:
    specs = [{"type": "token_embedding", "width": 16, "vocab": PAD + 1, "padding": PAD}, *ENCODERS[encoder],
             {"type": "seq_pool", "mode": pool}, {"type": "dense", "units": 8}, {"type": "classifier", "classes": 3}]
    torch.manual_seed(0)
    model = build_model([BLOCKS.get(s["type"])(**s) for s in specs], (40,)).eval()
    if fused:
        fuse(model)  # the C kernels a CPU run uses (LSTM recurrence, attention, add+norm) must keep the mask too
    return model


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
@pytest.mark.parametrize("pool", ["mean", "max", "last"])
@pytest.mark.parametrize("encoder", list(ENCODERS))
def test_padding_changes_nothing(encoder, pool, fused):
    """The same text alone (no padding), padded to the model's full length, and in a batch beside a longer text
    gives the same output; without the mask, padding would change it."""
    model = classifier(encoder, pool, fused)
    gen = torch.Generator().manual_seed(1)
    text, longer = torch.randint(0, PAD, (7,), generator=gen), torch.randint(0, PAD, (33,), generator=gen)
    padded = torch.full((40,), PAD)
    padded[:7] = text
    batch = torch.full((3, 33), PAD)
    batch[0], batch[1, :7], batch[2, :20] = longer, text, longer[:20]
    with torch.no_grad():
        alone, full, beside = model(text[None]), model(padded[None]), model(batch)[1:2]
        assert torch.allclose(alone, full, atol=1e-6, rtol=0), (alone - full).abs().max()
        assert torch.allclose(alone, beside, atol=1e-6, rtol=0), (alone - beside).abs().max()
        model.blocks[0].padding = None  # the same weights reading the padding as tokens
        assert (model(padded[None]) - alone).abs().max() > 1e-4


def test_model_that_would_mix_padding_is_refused(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("text,label\n" + "".join(f"text number {i},{'ab'[i % 2]}\n" for i in range(40)))
    base = {"name": "t", "data": {"dataset": "text_classes", "path": str(path), "tokenizer": "char"},
            "train": {"threads": 1}}
    bad = {
        "transformer_decoder": ([{"type": "token_embedding", "width": 8},
                                 {"type": "transformer_decoder", "heads": 2}, {"type": "seq_pool"},
                                 {"type": "classifier"}], "model.blocks.1 (transformer_decoder): this block would mix"),
        "no pooling": ([{"type": "token_embedding", "width": 8}, {"type": "lstm", "units": 4}, {"type": "flatten"},
                        {"type": "classifier"}], "model.blocks.2 (flatten)"),
        "no embedding": ([{"type": "dense", "units": 4}, {"type": "classifier"}], "model.blocks.0 (dense): a text"),
    }
    for blocks, message in bad.values():
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            kiln.train({**base, "model": {"blocks": blocks}}, out=tmp_path / "run", live=False)
        assert not (tmp_path / "run").exists()


# ---- SMS spam: real training, reload, prediction -------------------------------------------------------------


@pytest.fixture(scope="module")
def sms_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sms") / "run"
    run = kiln.train(sms_config(), out=out, live=False)
    return run


def test_sms_spam_trains_to_a_real_roc_auc(sms_run):
    test = sms_run.metrics["test"]
    assert test["roc_auc"] > 0.95 and test["f1"] > 0.8, test
    assert test["samples"] == 1114 and sms_run.metrics["task"] == "binary"
    assert sms_run.class_names == ["ham", "spam"]  # the rarer class is the positive one
    manifest = sms_run.manifest
    assert manifest["samples"] == {"train": 4014, "val": 446, "test": 1114}  # all 5,574 lines: none merged by quotes


def test_reloaded_run_gives_identical_outputs(sms_run):
    loaded = kiln.Run.load(sms_run.path)
    x, _ = loaded.kind.load().split("test")
    assert torch.equal(loaded.outputs(x), sms_run.outputs(x))
    texts = ["WINNER!! You have won a free prize. Call 09061701461 now to claim", "see you at lunch tomorrow?"]
    assert torch.equal(loaded.predict(texts), sms_run.predict(texts))
    spam, ham = loaded.predict_texts(texts)
    assert (spam["label"], ham["label"]) == ("spam", "ham")
    assert spam["probabilities"]["spam"] > 0.5 > ham["probabilities"]["spam"]
    assert abs(sum(ham["probabilities"].values()) - 1) < 1e-5


def test_texts_longer_than_max_tokens_are_cut_and_counted(sms_run):
    kind = sms_run.kind
    cut = sum(kind.truncated)
    assert cut > 0 and any(f"{cut:,} texts longer than 48 tokens" in line for line in kind.report())
    saved = json.loads((sms_run.path / "tokenizer.json").read_text())["extra"]["truncated"]
    assert sum(saved.values()) == cut and saved["train"] > 0
    long_text = "call now to claim your prize " * 40
    record, = sms_run.predict_texts([long_text])
    assert record["truncated"] and not sms_run.predict_texts(["hi"])[0]["truncated"]
    # only the first 48 tokens count: what follows them changes nothing
    assert torch.equal(sms_run.predict([long_text]), sms_run.predict([long_text + " love you mum"]))


def test_cli_predict_text_and_file(sms_run, tmp_path, capsys):
    assert main(["predict", str(sms_run.path), "--text", "Free entry! txt WIN to 80086 to claim", "--json"]) == 0
    record, = json.loads(capsys.readouterr().out)
    assert record["label"] == "spam" and set(record["probabilities"]) == {"ham", "spam"}
    lines = tmp_path / "texts.txt"
    lines.write_text("ok see you at 7\n\nURGENT! You have won a 1000 cash prize. Call 09050000327\n")
    assert main(["predict", str(sms_run.path), str(lines)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[0] for line in out] == ["ham", "spam"]
    assert main(["predict", str(sms_run.path), "--text", "   "]) == 2
    assert "text 1 is empty" in capsys.readouterr().err


def test_served_texts_answer_with_class_names(sms_run):
    pytest.importorskip("fastapi", reason="needs the serve extra: pip install 'kiln[serve]'")
    from fastapi.testclient import TestClient

    from kiln.serve import create_app

    texts = ["URGENT! You have won a 1000 cash prize. Call 09050000327", "ok see you at 7"]
    with TestClient(create_app(sms_run.path, max_instances=8)) as client:
        resp = client.post("/v1/predict", json={"instances": texts})
        assert resp.status_code == 200, resp.text
        predictions = resp.json()["predictions"]
        assert [p["label"] for p in predictions] == ["spam", "ham"]
        expected = sms_run.predict(texts)
        for p, row in zip(predictions, expected.tolist(), strict=True):
            assert p["probabilities"]["spam"] == pytest.approx(row[1], abs=1e-5)
        blank = client.post("/v1/predict", json={"instances": ["ok", " "]})
        assert blank.status_code == 422 and "instances.1" in blank.text
        assert client.post("/v1/predict", json={"instances": [{"text": "hi"}]}).status_code == 422
        info = client.get("/v1/model").json()
        assert info["dataset"] == "text_classes" and info["task"] == "binary"
        assert info["inputs"]["kind"] == "text" and info["inputs"]["max_tokens"] == 48
        assert client.get("/openapi.json").status_code == 200


# ---- multilabel ----------------------------------------------------------------------------------------------

WORDS = {"sport": ["match", "goal", "team", "score"], "money": ["cash", "bank", "price", "loan"]}
FILLER = ["the", "a", "today", "we", "saw", "some", "news", "about", "it", "and", "then", "went", "home"]


def multilabel_csv(path: Path, n: int = 400) -> Path:
    rng = random.Random(0)
    lines = ["id,text,sport,money"]
    for i in range(n):
        sport, money = rng.random() < 0.4, rng.random() < 0.4
        words = rng.choices(FILLER, k=rng.randint(3, 12))
        for label, on in (("sport", sport), ("money", money)):
            if on:
                words.insert(rng.randrange(len(words) + 1), rng.choice(WORDS[label]))
        lines.append(f"{i},\"{' '.join(words)}\",{int(sport)},{'yes' if money else 'no'}")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_multilabel_texts(tmp_path):
    cfg = {"name": "ml", "seed": 0,
           "data": {"dataset": "text_classes", "path": str(multilabel_csv(tmp_path / "news.csv")),
                    "label": ["sport", "money"], "tokenizer": "char", "max_tokens": 96},
           "model": {"blocks": [{"type": "token_embedding", "width": 16}, {"type": "gru", "units": 32},
                                {"type": "seq_pool", "mode": "max"}, {"type": "classifier"}]},
           "train": {"epochs": 12, "batch_size": 16, "optimizer": {"name": "adam", "lr": 0.01}, "threads": 1}}
    run = kiln.train(cfg, out=tmp_path / "run", live=False)
    test = run.metrics["test"]
    assert run.metrics["task"] == "multilabel" and run.class_names == ["sport", "money"]
    assert test["micro_f1"] > 0.9 and test["macro_f1"] > 0.9 and test["roc_auc"] > 0.95, test
    assert test["roc_auc_sport"] > 0.95 and test["roc_auc_money"] > 0.95
    both, neither = run.predict_texts(["we saw the team score a goal at the bank", "we went home"])
    assert both["labels"] == ["sport", "money"] and neither["labels"] == []
    probs = run.predict(["we saw the team score a goal at the bank"])
    assert probs.shape == (1, 2) and bool((probs > 0.5).all())  # a sigmoid per label, not a softmax
    loaded = kiln.Run.load(run.path)
    x, _ = loaded.kind.load().split("test")
    assert torch.equal(loaded.outputs(x), run.outputs(x))
    assert loaded.evaluate()["micro_f1"] == pytest.approx(test["micro_f1"])
    pytest.importorskip("fastapi", reason="needs the serve extra: pip install 'kiln[serve]'")
    from fastapi.testclient import TestClient

    from kiln.serve import create_app

    with TestClient(create_app(run.path, max_instances=4)) as client:
        resp = client.post("/v1/predict", json={"instances": ["we saw the team score a goal at the bank"]})
        assert resp.status_code == 200, resp.text
        answer, = resp.json()["predictions"]
        assert answer["labels"] == ["sport", "money"] and set(answer["probabilities"]) == {"sport", "money"}


def test_multiclass_texts_with_a_transformer(tmp_path):
    """Three classes, byte-level BPE, a Transformer encoder with max pooling."""
    rng = random.Random(1)
    rows = ["topic;text"]
    for i in range(300):
        topic = ["sport", "money", "other"][i % 3]
        words = rng.choices(FILLER, k=rng.randint(2, 8))
        if topic != "other":
            words.insert(rng.randrange(len(words) + 1), rng.choice(WORDS[topic]))
        rows.append(f"{topic};{' '.join(words)}")
    path = write(tmp_path, "\n".join(rows) + "\n", "topics.csv")
    cfg = {"name": "mc", "seed": 0,
           "data": {"dataset": "text_classes", "path": str(path), "label": "topic", "tokenizer": "bpe",
                    "vocab_size": 300, "max_tokens": 80},
           "model": {"blocks": [{"type": "token_embedding", "width": 32}, {"type": "positional_encoding"},
                                {"type": "transformer_encoder", "heads": 2, "ff": 64},
                                {"type": "seq_pool", "mode": "max"},
                                {"type": "classifier"}]},
           "train": {"epochs": 10, "batch_size": 16, "optimizer": {"name": "adam", "lr": 0.003}, "threads": 1}}
    run = kiln.train(cfg, out=tmp_path / "run", live=False)
    assert run.metrics["task"] == "multiclass" and run.class_names == ["money", "other", "sport"]
    assert run.metrics["test"]["accuracy"] > 0.9 and run.metrics["test"]["macro_f1"] > 0.9, run.metrics["test"]
    record, = run.predict_texts(["the team saw a goal"])
    assert record["label"] == "sport" and abs(sum(record["probabilities"].values()) - 1) < 1e-5


def test_tokenizer_is_fitted_on_training_texts_only(tmp_path):
    rows = "".join(f"{'abcdefghijklmnopqrstuvwxyz'[i % 26] * 3} {i},{'xy'[i % 2]}\n" for i in range(60))
    kind = kind_of(write(tmp_path, "text,label\n" + rows))
    train, val, test = kind.rows
    seen = set("".join(kind.file.texts[i] for i in train))
    assert set(kind.tokenizer.chars) == seen
    unseen = set("".join(kind.file.texts[i] for i in val + test)) - seen
    assert unseen  # digits of held-out rows the training rows lack
    ids = kind.encode("".join(sorted(unseen)))
    assert set(ids) == {kind.tokenizer.special("<unk>")}


# ---- bad input -----------------------------------------------------------------------------------------------


def write(tmp_path: Path, text: str, name: str = "t.csv") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def kind_of(path: Path, **data):
    cfg = load_config({"name": "t", "data": {"dataset": "text_classes", "path": str(path), "tokenizer": "char", **data},
                       "model": {"blocks": [{"type": "token_embedding", "width": 4}, {"type": "seq_pool"},
                                            {"type": "classifier"}]}})
    return open_kind(cfg.data, 0)


ROWS = "".join(f"message {i},{'ab'[i % 2]}\n" for i in range(20))


@pytest.mark.parametrize("data, message", [
    ({"max_tokens": 0}, "data.max_tokens"),
    ({"tokenizr": "bpe"}, "data.tokenizr"),
    ({"tokenizer": "words"}, "data.tokenizer"),
    ({"label": []}, "data.label"),
    ({"label": "text"}, "data.text"),
    ({"delimiter": ";;"}, "data.delimiter"),
])
def test_bad_config_names_the_field(tmp_path, data, message):
    path = write(tmp_path, "text,label\n" + ROWS)
    with pytest.raises(ConfigError, match=message):
        kind_of(path, **data)


def test_missing_columns_and_values_are_named(tmp_path):
    path = write(tmp_path, "text,label\n" + ROWS)
    with pytest.raises(ConfigError, match=r"data.label: no column 'category' in .*columns: 'text', 'label'"):
        kind_of(path, label="category")
    with pytest.raises(ConfigError, match="data.text: column index 5, but .* has 2 columns"):
        kind_of(path, text=5)
    with pytest.raises(ConfigError, match="data.label: 'label' names a column, but data.header is false"):
        kind_of(write(tmp_path, ROWS, "nohead.csv"), header=False, text=0)
    with pytest.raises(DataError, match=r"t.csv, line 4: the text \(column 'text'\) is empty"):
        kind_of(write(tmp_path, "text,label\nhello,a\nthere,b\n  ,a\n" + ROWS))
    with pytest.raises(DataError, match=r"t.csv, line 3: the label \(column 'label'\) is empty"):
        kind_of(write(tmp_path, "text,label\nhello,a\nthere,\n" + ROWS))
    with pytest.raises(DataError, match="line 3: 1 fields, but column 'label' is field 2"):
        kind_of(write(tmp_path, "text,label\nhello,a\nno label here\n" + ROWS))
    with pytest.raises(DataError, match="holds one class"):
        kind_of(write(tmp_path, "text,label\n" + "".join(f"m {i},a\n" for i in range(9))))
    with pytest.raises(DataError, match="label column 'b' holds 'maybe'"):
        kind_of(write(tmp_path, "text,a,b\nhi,1,0\nho,0,maybe\n" + "".join(f"m {i},1,0\n" for i in range(9))),
                label=["a", "b"])
    with pytest.raises(DataError, match="is empty"):
        kind_of(write(tmp_path, ""))


def test_tab_separated_without_header_keeps_quotes(tmp_path):
    """A TSV is read without CSV quoting: a text that starts with a quote stays one text with its quotes."""
    lines = ['ham\t"Hi" she said, "see you"', 'spam\t"WIN now', 'ham\tok then'] * 4
    kind = kind_of(write(tmp_path, "\n".join(lines) + "\n", "sms.tsv"), header=False, label=0, text=1)
    assert kind.file.texts[:3] == ['"Hi" she said, "see you"', '"WIN now', "ok then"]
    assert len(kind.file.texts) == 12 and kind.class_names == ["ham", "spam"]


def test_predicting_nothing_is_refused(tmp_path):
    path = write(tmp_path, "text,label\n" + ROWS)
    kind = kind_of(path)
    with pytest.raises(KilnError, match="text 2 is empty"):
        kind.as_stored(["fine", ""])


@pytest.mark.slow
def test_exported_onnx_serves_the_same_answers(sms_run, tmp_path):
    """The exported graph reads every max_tokens column (no cut to the batch's longest text) and, masked, equals
    PyTorch; the ONNX backend answers with the torch backend's probabilities."""
    pytest.importorskip("onnxruntime", reason="needs the serve extra: pip install 'kiln[serve]'")
    from kiln.export import export_run
    from kiln.serve.backends import make_backend

    result = export_run(sms_run.path, format="onnx", check="test")
    assert result["max_abs_diff"] < 1e-4
    run = kiln.Run.load(sms_run.path)
    batch = run.kind.inputs().from_instances(["URGENT! You have won a 1000 cash prize", "ok see you at 7", "hi"])
    onnx, torch_backend = make_backend("onnx", run), make_backend("torch", run)
    onnx.start(), torch_backend.start()
    assert abs(onnx.predict(batch) - torch_backend.predict(batch)).max() < 1e-5
