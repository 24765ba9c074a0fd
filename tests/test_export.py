"""kiln export: the ONNX file matches PyTorch on the run's test split, and is kept only when it does."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("onnxruntime", reason="needs the serve extra: pip install 'kiln[serve]'")

from test_serve_support import _cache, exported_run, mnist_test_images  # noqa: E402

import kiln  # noqa: E402
from kiln.cli import main  # noqa: E402
from kiln.export import export_run  # noqa: E402


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
    e = np.exp(logits - logits.max(1, keepdims=True))
    np.testing.assert_allclose(e / e.sum(1, keepdims=True), expected, atol=1e-5)


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
    with pytest.raises(kiln.KilnError, match="--format"):
        export_run(run, format="tflite")
