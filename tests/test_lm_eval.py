"""A language model's exact evaluation: every held-out token once, in consecutive windows of the context, reported
in results.json beside the training's estimate from random batches."""

import pytest
import torch

import kiln
from kiln.data.text import Text, TextData

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n" * 12


@pytest.mark.parametrize("length", [9, 17, 20, 33])
def test_eval_windows_predict_every_token_once(length):
    kind = Text.__new__(Text)  # only the windowing is tested: no tokenizer, no file
    kind.cfg = TextData(path="unused", context=8)
    stream = torch.arange(length)
    batches = list(kind.eval_batches(stream, torch.empty(0), size=2))
    inputs = torch.cat([xb.flatten() for xb, _ in batches])
    targets = torch.cat([yb.flatten() for _, yb in batches])
    assert targets.tolist() == stream[1:].tolist()  # every token after the first, once, in order
    assert inputs.tolist() == stream[:-1].tolist()
    assert all(xb.shape == yb.shape and xb.shape[1] <= 8 for xb, yb in batches)
    assert all(xb.shape[1] == 8 for xb, _ in batches[:-1])  # only the tail is shorter than a window


def test_results_hold_the_exact_loss_beside_the_estimate(tmp_path):
    (tmp_path / "text.txt").write_text(TEXT)
    cfg = {"data": {"dataset": "text", "path": str(tmp_path / "text.txt"), "context": 16, "val_fraction": 0.2},
           "model": {"blocks": [{"type": "token_embedding", "width": 16}, {"type": "positional_encoding",
                                                                            "kind": "learned"},
                                {"type": "transformer_decoder", "layers": 1, "heads": 2}, {"type": "lm_head"}]},
           "train": {"steps": 20, "batch_size": 8, "eval_every": 20, "eval_batches": 3, "threads": 1}}
    run = kiln.train(cfg, out=tmp_path / "run", live=False)
    val = run.kind.load().val_x
    results = run.metrics
    assert results["val"]["tokens"] == len(val) - 1  # the whole held-out tail, not 3 batches of 8 x 16
    assert results["estimate"]["batches"] == 3 and results["estimate"]["batch_size"] == 8
    evals = [r for r in run.dir.read_metrics() if r["kind"] == "eval"]
    assert results["estimate"]["val_loss"] == evals[-1]["val_loss"]
    assert run.evaluate("val") == pytest.approx(results["val"])  # `kiln evaluate RUN --split val` gives the same
    # the exact loss by hand: each held-out token's loss given the window of tokens before it in its own window
    with torch.no_grad():
        losses = []
        for xb, yb in run.kind.eval_batches(val, torch.empty(0), 1000):
            losses.append(torch.nn.functional.cross_entropy(run.model(xb).flatten(0, 1), yb.flatten(),
                                                            reduction="none"))
    assert float(torch.cat(losses).mean()) == pytest.approx(results["val"]["loss"], rel=1e-5)
