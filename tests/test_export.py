"""kiln export: the exported model (ONNX or torch.export) matches PyTorch on the run's test split, is kept only
when it does, and auto falls back to torch.export when ONNX fails, saying why."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from test_serve_support import _cache, exported_run, mnist_test_images, trained_run
from test_tabular import synthetic_rows, tabular_config, write_csv
from test_text import CORPUS, lm_config

import kiln
import kiln.export
from kiln.cli import main
from kiln.export import export_run

needs_onnxruntime = pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None,
                                       reason="needs the serve extra: pip install 'kiln[serve]'")


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


@needs_onnxruntime
def test_export_matches_pytorch_on_the_test_set(tmp_path_factory, mnist_root):
    import onnxruntime as ort

    run = exported_run(tmp_path_factory)
    report = _cache["export"]
    assert report["check"] == "test" and report["samples"] == 500  # the run's whole (limited) test split
    assert report["max_abs_diff"] <= 1e-4
    session = ort.InferenceSession(str(run / "model.onnx"), providers=["CPUExecutionProvider"])
    images, _ = mnist_test_images(37)  # a batch size never seen at export time
    logits = session.run(None, {"pixels": images[:, None]})[0]
    expected = kiln.Run.load(run).predict(images).numpy()
    np.testing.assert_allclose(softmax(logits), expected, atol=1e-5)


def test_torch_export_matches_pytorch_on_the_test_set_and_after_reload(tmp_path_factory, mnist_root):
    run = trained_run(tmp_path_factory)
    report = export_run(run, "torch-export")
    assert report["format"] == "torch-export" and report["path"] == str(run / "model.pt2")
    assert report["check"] == "test" and report["samples"] == 500 and report["max_abs_diff"] <= 1e-4
    assert "fallback_reason" not in report
    module = torch.export.load(run / "model.pt2").module()  # unpickles: fine for a file this test had written
    images, _ = mnist_test_images(37)  # a batch size never seen at export time
    logits = module(torch.from_numpy(images[:, None])).detach().numpy()
    expected = kiln.Run.load(run).predict(images).numpy()
    np.testing.assert_allclose(softmax(logits), expected, atol=1e-5)


@needs_onnxruntime
def test_auto_falls_back_to_torch_export_when_onnx_export_fails(tmp_path_factory, tmp_path, mnist_root, capsys,
                                                               monkeypatch):
    run = trained_run(tmp_path_factory)

    def unsupported(*args, **kwargs):
        raise RuntimeError("no ONNX symbolic for aten::made_up")

    monkeypatch.setattr(kiln.export, "_export_onnx", unsupported)
    out = tmp_path / "exported"
    assert main(["export", str(run), "--out", str(out), "--check", "random"]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out} (torch-export)" in printed and "max abs difference" in printed
    assert "ONNX was not used: the ONNX exporter failed on this image run" in printed and "aten::made_up" in printed
    with open(out, "rb") as f:
        program = torch.export.load(f)  # unpickles: fine for a file this test had written
    assert len(program.graph_signature.user_inputs) == 1
    # A name ending in .onnx asks for ONNX: no fallback then, and nothing is written.
    with pytest.raises(kiln.KilnError, match=r"the ONNX exporter failed on this image run \(.*\): RuntimeError"):
        export_run(run, out=tmp_path / "m.onnx", check="random")
    assert not (tmp_path / "m.onnx").exists() and not list(tmp_path.glob(".*.tmp"))
    # When torch.export fails too, the error gives both reasons.
    monkeypatch.setattr(kiln.export, "_export_torch", unsupported)
    with pytest.raises(kiln.KilnError, match="neither format works for this image run. onnx: the ONNX exporter "
                                             "failed .* torch-export: torch.export failed on this image run"):
        export_run(run, out=tmp_path / "never", check="random")
    assert not (tmp_path / "never").exists() and not list(tmp_path.glob(".*.tmp"))


def test_tabular_and_text_runs_export_with_their_own_input_types(tmp_path):
    csv = write_csv(tmp_path / "loans.csv", synthetic_rows(120))
    table = kiln.train(tabular_config(csv, epochs=1), out=tmp_path / "table", live=False)
    (tmp_path / "corpus.txt").write_text(CORPUS)
    text = kiln.train(lm_config(tmp_path / "corpus.txt", steps=2, eval_every=2), out=tmp_path / "lm", live=False)
    rows = table.kind.load().test_x[:5]  # float32 rows from the saved preprocessing
    ids = torch.tensor([[1, 2, 3, 4] * 4, [4, 3, 2, 1] * 4])  # (2, context 16) token ids

    for run, check, x in ((table, "random", rows), (text, "test", ids)):
        report = export_run(run.path, "torch-export", check=check)
        assert report["max_abs_diff"] <= 1e-4 and report["samples"] > 0
        module = torch.export.load(run.path / "model.pt2").module()  # unpickles: written by this test
        with torch.inference_mode():
            torch.testing.assert_close(module(x), run.model(run.kind.to_input(x)), atol=1e-5, rtol=0)
    assert report["samples"] == (len(text.kind.load().test_x) - 1) // 16  # held-out text: windows with targets


def test_bad_format_and_suffix_name_the_allowed_ones(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["export", str(tmp_path), "--format", "tflite"])
    assert "choose from auto, onnx, torch-export" in capsys.readouterr().err.replace("'", "")
    with pytest.raises(kiln.KilnError, match="--format must be one of auto, onnx, torch-export, not 'tflite'"):
        export_run(tmp_path, format="tflite")
    with pytest.raises(kiln.KilnError, match=r"ends in \.onnx.*name the torch-export file .*copy\.pt2"):
        export_run(tmp_path, format="torch-export", out=tmp_path / "copy.onnx")


def test_nan_or_another_shape_never_passes_the_check():
    x = torch.tensor([[0.0], [0.0], [1.0]])  # batches of 2: the NaN comes in the second
    check = kiln.export._max_abs_diff
    assert check(lambda xb: xb.numpy(), torch.nn.Identity(), x, 2) == 0.0
    assert np.isnan(check(lambda xb: np.where(xb.numpy() > 0, np.nan, 0.0), torch.nn.Identity(), x, 2))
    assert check(lambda xb: xb.numpy()[:, None], torch.nn.Identity(), x, 2) == np.inf


@needs_onnxruntime
@pytest.mark.slow
def test_export_cli_and_its_errors(tmp_path_factory, tmp_path, mnist_root, capsys):
    run = exported_run(tmp_path_factory)
    out = tmp_path / "copy.onnx"
    assert main(["export", str(run), "--out", str(out), "--check", "random"]) == 0
    assert out.is_file() and "max abs difference" in capsys.readouterr().out
    assert main(["export", str(tmp_path)]) == 2
    assert "not a kiln run directory" in capsys.readouterr().err
    # An impossible tolerance fails the check: the error says so and nothing is written.
    bad = tmp_path / "never.onnx"
    with pytest.raises(kiln.KilnError, match="differs from PyTorch"):
        export_run(run, out=bad, check="random", tolerance=-1.0)
    assert not bad.exists() and not list(tmp_path.glob(".*.tmp"))
