"""kiln compress: structured pruning that really shrinks layers, int8 runs that reload and agree with the float
run, distillation, the --max-drop refusal, blocks kept in float reported, and compressed runs that evaluate,
predict, export and serve like any run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("torch_pruning", reason="needs the compress extra: pip install 'kiln[compress]'")
pytest.importorskip("onnxruntime", reason="needs the compress extra: pip install 'kiln[compress]'")

import kiln  # noqa: E402
from kiln.cli import main  # noqa: E402
from kiln.compress import CompressionRefused, compress  # noqa: E402
from kiln.compress.fit import DistillObjective  # noqa: E402
from kiln.compress.prune import prune  # noqa: E402
from kiln.compress.quantize import quantize  # noqa: E402
from kiln.config import load_config  # noqa: E402
from kiln.errors import KilnError  # noqa: E402
from kiln.nn import build_model  # noqa: E402
from kiln.nn.onnx_model import OnnxModel  # noqa: E402
from kiln.training.objectives import Objective  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

TEACHER = {
    "name": "small_cnn",
    "data": {"dataset": "mnist", "limit_train": 10000, "limit_test": 2000, "val_fraction": 0.1},
    "model": {"blocks": [
        {"type": "conv2d", "filters": 8, "kernel": 3, "activation": "relu"},
        {"type": "maxpool2d", "size": 2},
        {"type": "flatten"},
        {"type": "dense", "units": 32, "activation": "relu"},
        {"type": "classifier", "classes": 10},
    ]},
    "train": {"epochs": 3, "batch_size": 64, "threads": 1, "optimizer": {"name": "adam", "lr": 0.003}},
}
SEED_LIKE = {  # the seed model's block types, small: built (not trained) for pruning and quantizing on their own
    "data": {"dataset": "mnist"},
    "model": {"blocks": [
        {"type": "conv2d", "filters": 8, "kernel": 3, "activation": "relu"},
        {"type": "maxpool2d", "size": 2},
        {"type": "rows_to_sequence"},
        {"type": "dense", "units": 16, "activation": "relu"},
        {"type": "lstm", "units": 12, "steps": "all"},
        {"type": "transformer_encoder", "heads": 2, "ff": 20, "norm": "post", "dropout": 0.0},
        {"type": "seq_pool", "mode": "mean"},
        {"type": "classifier", "classes": 10},
    ]},
}


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, mnist_root) -> Path:
    path = tmp_path_factory.mktemp("compress") / "teacher"
    run = kiln.train(TEACHER, out=path, live=False)
    assert run.metrics["test"]["accuracy"] > 0.9
    return path


@pytest.fixture(scope="module")
def int8_run(teacher) -> Path:
    out = teacher.parent / "int8"
    compress(teacher, quantize="int8", out=out, latency=False, live=False)
    return out


def agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.argmax(1) == b.argmax(1)).float().mean())


def test_pruning_really_shrinks_layers_and_the_run_rebuilds_from_config_and_weights(teacher):
    out = teacher.parent / "pruned"
    report = compress(teacher, prune=0.5, finetune_epochs=1, out=out, max_drop=3.0, latency=False, live=False)
    original, pruned = report["steps"]
    assert pruned["parameters"] < 0.55 * original["parameters"]
    assert pruned["file_bytes"] < 0.55 * original["file_bytes"]
    assert {(p["type"], p["before"], p["after"]) for p in pruned["pruned"]} == {("conv2d", 8, 4), ("dense", 32, 16)}
    run = kiln.Run.load(out)  # config + safetensors, nothing else
    assert run.config.blocks[0].filters == 4 and run.config.blocks[3].units == 16
    state = run.model.state_dict()
    assert tuple(state["blocks.0.conv.weight"].shape) == (4, 1, 3, 3)
    assert tuple(state["blocks.3.linear.weight"].shape) == (16, 4 * 13 * 13)
    assert tuple(state["blocks.4.weight"].shape) == (10, 16)
    saved = json.loads((out / "compression.json").read_text())
    assert saved["steps"][1]["test_accuracy"] == pytest.approx(run.evaluate("test")["accuracy"])
    assert run.evaluate("test")["accuracy"] > original["test_accuracy"] - 0.03
    assert not list(teacher.parent.glob(".pruned.compress-*"))  # the steps' working directory is gone


def test_quantized_run_reloads_and_agrees_with_the_float_run(teacher, int8_run):
    float_run, int8 = kiln.Run.load(teacher), kiln.Run.load(int8_run)
    assert isinstance(int8.model, OnnxModel) and (int8_run / "model.int8.onnx").is_file()
    x, _ = float_run.kind.load().split("test")
    assert agreement(int8.predict(x), float_run.predict(x)) >= 0.99
    saved = json.loads((int8_run / "compression.json").read_text())
    step = saved["steps"][-1]
    assert step["weights"].startswith("int8") and step["file_bytes"] < saved["steps"][0]["file_bytes"] / 2.5
    assert abs(int8.evaluate("test")["accuracy"] - float_run.evaluate("test")["accuracy"]) < 0.01
    # dense layers are int8; the convolution, which dynamic int8 has no kernel for, is kept in float and reported
    blocks = {b["type"]: b for b in step["quantization"]["blocks"]}
    assert blocks["dense"]["int8"] and blocks["classifier"]["int8"]
    assert not blocks["conv2d"]["int8"] and "leaves convolutions in float" in blocks["conv2d"]["reason"]
    assert [b["type"] for b in step["quantization"]["kept_in_float"]] == ["conv2d"]


def test_static_int8_quantizes_convolutions_with_calibration(teacher):
    out = teacher.parent / "static"
    report = compress(teacher, quantize="int8-static", out=out, max_drop=1.0, latency=False, live=False)
    blocks = {b["type"]: b for b in report["steps"][-1]["quantization"]["blocks"]}
    assert blocks["conv2d"]["int8"] and blocks["dense"]["int8"]
    x, _ = kiln.Run.load(teacher).kind.load().split("test")
    assert agreement(kiln.Run.load(out).predict(x), kiln.Run.load(teacher).predict(x)) >= 0.98


def test_compressed_run_evaluates_predicts_exports_and_serves(int8_run, tmp_path, capsys):
    from kiln.export import export_run

    run = kiln.Run.load(int8_run)
    x, _ = run.kind.load().split("test")
    probs = run.predict(x[:16]).numpy()
    assert main(["evaluate", str(int8_run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] > 0.9
    files = []
    for i in range(3):  # one image per .npy file, uint8 (H, W), as `kiln predict` reads them
        np.save(tmp_path / f"d{i}.npy", x[i, 0].numpy())
        files.append(str(tmp_path / f"d{i}.npy"))
    assert main(["predict", str(int8_run), *files, "--json"]) == 0
    printed = capsys.readouterr().out
    assert [int(p["class"]) for p in json.loads(printed)] == probs[:3].argmax(1).tolist(), printed
    report = export_run(int8_run, "onnx")  # the int8 graph behind the uint8 pixel conversion, checked
    assert report["max_abs_diff"] <= 1e-4
    import onnxruntime as ort

    session = ort.InferenceSession(str(int8_run / "model.onnx"), providers=["CPUExecutionProvider"])
    logits = session.run(None, {session.get_inputs()[0].name: x[:16].numpy()})[0]
    np.testing.assert_allclose(torch.softmax(torch.from_numpy(logits), 1).numpy(), probs, atol=1e-5)
    with pytest.raises(kiln.KilnError, match="ONNX Runtime and cannot be traced"):
        export_run(int8_run, "torch-export", out=tmp_path / "m.pt2")

    from kiln.deploy import deploy_docker

    deploy_docker(int8_run, tmp_path / "docker")  # the image serves the int8 graph, not the float weights
    assert (tmp_path / "docker" / "run" / "model.int8.onnx").read_bytes() == (int8_run / "model.int8.onnx").read_bytes()

    pytest.importorskip("fastapi", reason="serving needs the serve extra")
    from fastapi.testclient import TestClient

    from kiln.serve import create_app

    images = x[:8, 0].numpy()
    # Dynamic int8 quantizes each batch's activations with the batch's own range: compare the same batch of 8.
    probs8 = run.predict(x[:8]).numpy()
    for backend in ("torch", "onnx"):
        with TestClient(create_app(int8_run, backend=backend)) as client:
            resp = client.post("/v1/predict", json={"instances": [{"pixels": im.tolist()} for im in images]})
            assert resp.status_code == 200, resp.text
            got = np.array([[p["probabilities"][str(d)] for d in range(10)] for p in resp.json()["predictions"]])
            np.testing.assert_allclose(got, probs8, atol=1e-5)


def test_a_table_run_prunes_quantizes_and_predicts_rows_like_the_float_run(tmp_path):
    from test_tabular import synthetic_rows, tabular_config, write_csv

    from kiln.data.table import read_table

    csv = write_csv(tmp_path / "loans.csv", synthetic_rows(400))
    source = kiln.train(tabular_config(csv, epochs=8, threads=1), out=tmp_path / "float", live=False)
    report = compress(source.path, prune=0.5, finetune_epochs=2, quantize="int8", out=tmp_path / "small",
                      max_drop=100, latency=False, live=False)
    assert [(p["type"], p["before"], p["after"]) for p in report["steps"][1]["pruned"]] == [("dense", 16, 8)]
    small = kiln.Run.load(tmp_path / "small")
    assert isinstance(small.model, OnnxModel) and small.config.blocks[1].units == 8
    table = read_table(csv)
    got, ref = small.predict_table(table), source.predict_table(table)
    same = sum(a["prediction"] == b["prediction"] for a, b in zip(got, ref, strict=True)) / len(ref)
    assert same >= 0.9 and abs(small.evaluate("test")["accuracy"] - source.evaluate("test")["accuracy"]) <= 0.1


def test_distillation_trains_a_smaller_student_on_the_teachers_soft_targets(teacher, tmp_path):
    student = tmp_path / "student.yaml"
    student.write_text("model:\n  blocks:\n    - {type: flatten}\n    - {type: dense, units: 24, activation: relu}\n"
                       "    - {type: classifier, classes: 10}\ntrain: {epochs: 2}\n")
    report = compress(teacher, distill=student, out=tmp_path / "distilled", max_drop=100, latency=False, live=False)
    step = report["steps"][-1]
    assert step["step"] == "distill" and step["temperature"] == 4.0
    assert step["parameters"] == 784 * 24 + 24 + 24 * 10 + 10
    run = kiln.Run.load(tmp_path / "distilled")
    assert run.evaluate("test")["accuracy"] > 0.85
    assert run.manifest["execution"]["distilled_from"] == str(teacher)


@pytest.mark.parametrize("name", ["mnist_seed", "german_credit"])
def test_example_students_fit_their_teachers(name, mnist_root):
    from kiln.compress import student_config
    from kiln.config import read_yaml
    from kiln.data.kind import open_kind, resolve

    examples = Path(__file__).parent.parent / "examples"
    teacher = load_config(examples / f"{name}.yaml")
    kind = open_kind(teacher.data, teacher.seed)
    teacher = resolve(teacher, kind)
    student = student_config(teacher, kind, read_yaml(examples / "students" / f"{name}.yaml"))
    params = [sum(p.numel() for p in build_model(c.blocks, kind.input_shape).parameters()) for c in (teacher, student)]
    assert params[1] < params[0] / 2 and student.data == teacher.data


def test_distillation_loss_is_the_hard_loss_at_alpha_0_and_zero_soft_loss_for_a_copy():
    torch.manual_seed(0)
    logits, y = torch.randn(8, 5), torch.randint(0, 5, (8,))
    base = Objective("multiclass")
    copy = DistillObjective(base, lambda x: x, temperature=3.0, alpha=1.0)
    copy.inputs = logits
    assert float(copy.loss(logits, y)) == pytest.approx(0.0, abs=1e-6)
    hard = DistillObjective(base, lambda x: torch.zeros_like(x), temperature=3.0, alpha=0.0)
    hard.inputs = logits
    assert float(hard.loss(logits, y)) == pytest.approx(float(base.loss(logits, y)))


def test_max_drop_refuses_and_writes_nothing(teacher, capsys):
    out = teacher.parent / "refused"
    with pytest.raises(CompressionRefused, match="points below the original's .* nothing was written") as e:
        compress(teacher, prune=0.95, finetune_epochs=1, out=out, max_drop=1.0, latency=False, live=False)
    assert e.value.report["refused"] and e.value.report["steps"][-1]["accuracy_drop_points"] > 1.0
    assert not out.exists() and not list(teacher.parent.glob(".refused.compress-*"))
    assert main(["compress", str(teacher), "--prune", "0.95", "--structured", "--finetune-epochs", "1",
                 "--max-drop", "1", "--no-latency", "--out", str(out)]) == 2
    assert "error: refused: after the prune step" in capsys.readouterr().err and not out.exists()


def zeroed(model, pruned: list[dict]):
    """``model`` with the channels, units and heads that pruning removed zeroed instead: their weights (and
    biases) set to 0, so they give nothing to the layers after them."""
    with torch.no_grad():
        for p in pruned:
            block, idx = model.blocks[p["block"]], torch.tensor(p["removed"], dtype=torch.long)
            if p["field"] == "heads":
                d = p["head_dim"]
                block.attn.proj.weight[:, (idx[:, None] * d + torch.arange(d)).flatten()] = 0
                continue
            layer = {"filters": "conv", "units": "linear"}.get(p["field"])
            layer = getattr(block, layer) if layer else block.mlp.up
            layer.weight[idx] = 0
            layer.bias[idx] = 0
    return model


def test_pruning_channels_through_rows_to_sequence_and_heads_equals_zeroing_them():
    cfg = load_config(SEED_LIKE)
    torch.manual_seed(0)
    model = build_model(cfg.blocks, (1, 28, 28)).eval()
    x = torch.rand(16, 1, 28, 28)
    result = prune(cfg, model.state_dict(), (1, 28, 28), x[:4], 0.5)
    pruned = {(p["type"], p["field"]): (p["before"], p["after"], len(p["removed"])) for p in result.pruned}
    assert pruned == {("conv2d", "filters"): (8, 4, 4), ("dense", "units"): (16, 8, 8),
                      ("transformer_encoder", "ff"): (20, 10, 10), ("transformer_encoder", "heads"): (2, 1, 1)}
    kept = {k["type"]: k["reason"] for k in result.kept}
    assert set(kept) == {"lstm", "classifier"}
    assert "Torch-Pruning#404" in kept["lstm"] and "output layer" in kept["classifier"]
    # the new config (4 filters, 1 head of 6 features in a 12-wide model) rebuilds and holds the pruned weights
    enc = result.config.blocks[5]
    assert (result.config.blocks[0].filters, enc.heads, enc.head_dim) == (4, 1, 6)
    rebuilt = build_model(result.config.blocks, (1, 28, 28)).eval()
    rebuilt.load_state_dict(result.model.state_dict())
    state = rebuilt.state_dict()
    assert state["blocks.0.conv.weight"].shape == (4, 1, 3, 3)
    assert state["blocks.3.linear.weight"].shape == (8, 13 * 4)  # rows_to_sequence: 13 columns x 4 channels
    assert state["blocks.4.rnn.weight_ih_l0"].shape == (48, 8)  # the LSTM reads the narrower dense layer
    assert state["blocks.5.attn.qkv.weight"].shape == (3 * 6, 12)
    assert state["blocks.5.attn.proj.weight"].shape == (12, 6)
    with torch.no_grad():  # removing them computes exactly what zeroing them does in the unpruned model
        torch.testing.assert_close(rebuilt(x), zeroed(model, result.pruned)(x), atol=1e-5, rtol=0)


def test_pruning_no_head_leaves_attention_as_it_was_and_heads_rank_by_weight_norm():
    from kiln.compress.prune import head_scores, prune_heads

    cfg = load_config(SEED_LIKE)
    torch.manual_seed(0)
    model = build_model(cfg.blocks, (1, 28, 28)).eval()
    x = torch.rand(8, 1, 28, 28)
    with torch.no_grad():
        ref = model(x)
        prune_heads(model.blocks[5].attn, [])
        assert torch.equal(model(x), ref)
    result = prune(cfg, model.state_dict(), (1, 28, 28), x[:4], 0.3)  # 2 heads x 0.3: none removed
    assert not [p for p in result.pruned if p["field"] == "heads"]
    assert (result.config.blocks[5].heads, result.config.blocks[5].head_dim) == (2, None)
    reason = next(k["reason"] for k in result.kept if k["type"] == "transformer_encoder")
    assert "heads are kept (2 heads x 0.3 rounds down" in reason
    attn = model.blocks[5].attn
    with torch.no_grad():  # the head whose weights are smallest goes
        attn.qkv.weight.view(3, 2, 6, 12)[:, 1] *= 0.01
        attn.proj.weight[:, 6:] *= 0.01
    assert head_scores(attn).argmin() == 1
    result = prune(cfg, model.state_dict(), (1, 28, 28), x[:4], 0.5)
    assert next(p for p in result.pruned if p["field"] == "heads")["removed"] == [1]


@pytest.mark.slow  # trains twice (about a minute on a busy 2-core machine)
def test_pruned_heads_and_channels_fine_tune_keep_accuracy_and_export(tmp_path, mnist_root):
    from kiln.export import export_run

    cfg = {**SEED_LIKE, "name": "tiny_seed", "data": {"dataset": "mnist", "limit_train": 4000, "limit_test": 1000,
                                                       "val_fraction": 0.1},
           "train": {"epochs": 3, "batch_size": 32, "threads": 1, "optimizer": {"name": "adam", "lr": 0.004}}}
    source = kiln.train(cfg, out=tmp_path / "float", live=False)
    report = compress(source.path, prune=0.5, finetune_epochs=2, out=tmp_path / "pruned", max_drop=100,
                      latency=False, live=False)
    original, step = report["steps"]
    assert {(p["field"], p["after"]) for p in step["pruned"]} >= {("filters", 4), ("heads", 1)}
    run = kiln.Run.load(tmp_path / "pruned")  # config + safetensors
    assert run.config.blocks[5].heads == 1 and run.config.blocks[5].head_dim == 6
    acc = run.evaluate("test")["accuracy"]
    assert original["test_accuracy"] > 0.7 and acc > original["test_accuracy"] - 0.03, (original, acc)
    assert export_run(tmp_path / "pruned", "onnx")["max_abs_diff"] <= 1e-4


@pytest.mark.parametrize("mode, lstm_int8", [("int8", True), ("int8-static", False)])
def test_lstm_is_int8_under_dynamic_and_kept_in_float_and_reported_under_static(tmp_path, mode, lstm_int8):
    cfg = load_config(SEED_LIKE)
    torch.manual_seed(0)
    model = build_model(cfg.blocks, (1, 28, 28)).eval()
    x = torch.rand(64, 1, 28, 28)
    report = quantize(model, mode, x[:2], x, tmp_path / "m.onnx", tmp_path)
    lstm = next(b for b in report["blocks"] if b["block"] == 4)
    assert lstm["int8"] is lstm_int8
    if not lstm_int8:
        assert "no statically quantized LSTM kernel" in lstm["reason"] and lstm in report["kept_in_float"]
    with torch.inference_mode():
        ref = model(x)
    got = OnnxModel(tmp_path / "m.onnx")(x)
    assert agreement(got, ref) >= 0.9 and float((got - ref).abs().max()) < 0.5


def test_help_names_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["compress", "--help"])
    out = capsys.readouterr().out
    for option in ("--prune", "--structured", "--quantize", "{int8,int8-static}", "--distill", "--max-drop", "--out",
                   "--finetune-epochs", "--temperature", "--alpha"):
        assert option in out


def test_bad_options_are_errors_that_name_the_problem(teacher, tmp_path, capsys):
    def error(*args) -> str:
        assert main(["compress", str(teacher), *args]) == 2
        return capsys.readouterr().err

    assert "nothing to do" in error()
    assert "structurally only" in error("--prune", "0.5")
    assert "between 0 and 1" in error("--prune", "1.5", "--structured")
    assert "cannot be negative" in error("--quantize", "int8", "--max-drop", "-1")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("")
    assert "already holds files" in error("--quantize", "int8", "--out", str(tmp_path / "busy"))
    bad = tmp_path / "student.yaml"
    bad.write_text("data: {dataset: mnist}\nmodel: {blocks: [{type: flatten}, {type: classifier}]}\n")
    assert "name, model and train only" in error("--distill", str(bad), "--out", str(tmp_path / "x"))
    bad.write_text("model: {blocks: [{type: dense, units: 8}, {type: classifier}]}\ntrain: {epoch: 3}\n")
    assert "train.epoch: unknown key" in error("--distill", str(bad), "--out", str(tmp_path / "x"))
    bad.write_text("model: {blocks: [{type: lstm, units: 8}, {type: classifier}]}\n")
    assert "model.blocks.0 (lstm)" in error("--distill", str(bad), "--out", str(tmp_path / "x"))
    assert "not a kiln run directory" in (main(["compress", str(tmp_path), "--quantize", "int8"]) == 2
                                          and capsys.readouterr().err)
    assert not (tmp_path / "x").exists()


def test_a_quantized_run_is_not_compressed_again(int8_run, tmp_path, capsys):
    assert main(["compress", str(int8_run), "--quantize", "int8", "--out", str(tmp_path / "again")]) == 2
    assert "already quantized" in capsys.readouterr().err and not (tmp_path / "again").exists()


@pytest.mark.parametrize("heads", ["shared", "own"])
def test_pruning_tabm_mini_units_equals_zeroing_them_and_a_model_with_nothing_to_prune_is_refused(heads):
    cfg = load_config({"data": {"dataset": "mnist"}, "model": {"blocks": [
        {"type": "flatten"}, {"type": "dense", "units": 12, "activation": "relu"},
        {"type": "ensemble_mlp", "members": 4, "units": 10, "layers": 2, "dropout": 0.0, "heads": heads},
        {"type": "classifier", "classes": 10}]}})
    torch.manual_seed(0)
    model = build_model(cfg.blocks, (1, 28, 28)).eval()
    with torch.no_grad():  # members differ by more than their random signs, as after training
        model.blocks[2].s.mul_(torch.rand_like(model.blocks[2].s) + 0.5)
    x = torch.rand(16, 1, 28, 28)
    result = prune(cfg, model.state_dict(), (1, 28, 28), x[:4], 0.5)
    pruned = {(p["type"], p["field"]): (p["before"], p["after"]) for p in result.pruned}
    assert pruned == {("dense", "units"): (12, 6), ("ensemble_mlp", "units"): (10, 5)}
    assert result.config.blocks[2].units == 5 and not [k for k in result.kept if k["type"] == "ensemble_mlp"]
    rebuilt = build_model(result.config.blocks, (1, 28, 28)).eval()
    rebuilt.load_state_dict(result.model.state_dict())
    state = rebuilt.state_dict()
    assert state["blocks.2.r"].shape == (4, 6) and state["blocks.2.s"].shape == (4, 5)
    assert state["blocks.2.mlp.3.weight"].shape == (5, 5)
    assert state["blocks.3.weight"].shape == {"shared": (10, 5), "own": (4, 10, 5)}[heads]  # the members' own heads
    with torch.no_grad():  # removing the units computes exactly what zeroing them does in the unpruned model
        ref = model
        for p in result.pruned:
            block = ref.blocks[p["block"]]
            if p["type"] == "dense":
                block.linear.weight[p["removed"]] = 0
                block.linear.bias[p["removed"]] = 0
            else:
                for layer, idx in zip([m for m in block.mlp if isinstance(m, torch.nn.Linear)],
                                      p["removed_per_layer"], strict=True):
                    layer.weight[idx] = 0
                    layer.bias[idx] = 0
        torch.testing.assert_close(rebuilt(x), ref(x), atol=1e-5, rtol=0)
    # Nothing prunable (a recurrent layer and the head): refused, saying why, instead of a "pruned" copy.
    cfg = load_config({"data": {"dataset": "mnist"}, "model": {"blocks": [
        {"type": "rows_to_sequence"}, {"type": "lstm", "units": 8, "steps": "last"},
        {"type": "classifier", "classes": 10}]}})
    model = build_model(cfg.blocks, (1, 28, 28)).eval()
    with pytest.raises(KilnError, match=r"--prune 0.5: nothing in this model can be pruned: block 1 \(lstm\): "
                                        r"recurrent hidden units are kept .*; block 2 \(classifier\): the output"):
        prune(cfg, model.state_dict(), (1, 28, 28), x[:4], 0.5)
