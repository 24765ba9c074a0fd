"""``train.ema``: an exponential moving average of the weights, updated after every optimiser step, is what
evaluation, the best epoch, the final weights and the test metrics use; it resumes exactly; a bad decay or
FSDP is refused naming the problem."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import kiln
from kiln.config import load_config
from kiln.errors import ConfigError
from kiln.training.ema import Ema, EmaConfig

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).parent.parent


def test_the_average_is_the_hand_computed_ema_and_evaluation_swaps_it_in_and_out() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.BatchNorm1d(3))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    decay = 0.2  # reached at update 0 already: the warm-up (1 + t) / (10 + t) is 0.1, 0.18, 0.25, ...
    ema = Ema(model, EmaConfig(decay=decay))
    expected = {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}
    for t in range(4):
        loss = model(torch.randn(8, 4)).square().mean()  # training mode: BatchNorm's running stats move too
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.update()
        d = min(decay, (1 + t) / (10 + t))
        for k, v in model.state_dict().items():
            if k in expected:
                expected[k] = d * expected[k] + (1 - d) * v
    live = {k: v.clone() for k, v in model.state_dict().items()}
    with ema.swapped():
        inside = {k: v.clone() for k, v in model.state_dict().items()}
    for k, want in expected.items():
        assert torch.allclose(inside[k], want, atol=1e-6), k
        assert not torch.equal(inside[k], live[k]), f"{k}: the average equals the weights (the test could not fail)"
    for k, v in model.state_dict().items():  # the training weights are back
        assert torch.equal(v, live[k]), k
    assert torch.equal(inside["2.num_batches_tracked"], live["2.num_batches_tracked"])  # a counter is not averaged


def _german(german_credit: Path, epochs: int) -> dict:
    cfg = load_config(REPO / "examples" / "german_credit.yaml").to_dict()
    cfg["data"]["path"] = str(german_credit)
    cfg["model"]["blocks"][1].update(members=4, units=32)
    cfg["train"].update(epochs=epochs, schedule={"name": "constant"}, early_stopping=None, ema={"decay": 0.9}, threads=1,
                        checkpoint_every=5)
    return cfg


def test_evaluations_and_the_saved_model_use_the_averaged_weights(german_credit: Path, tmp_path: Path) -> None:
    run = kiln.train(_german(german_credit, 3), out=tmp_path / "run", live=False)
    saved = load_file(str(run.path / "model.safetensors"))
    last = load_file(str(run.path / "checkpoints" / "last.safetensors"))
    for k, v in saved.items():
        if v.is_floating_point():
            assert torch.equal(v, last[f"tracked/ema/{k}"]), f"{k}: model.safetensors is not the average"
    assert any(not torch.equal(v, last[f"model/{k}"]) for k, v in saved.items())  # and not the training weights
    # The last epoch's validation (no early stopping: its weights are the final ones) is the final model's
    epochs = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()
              if json.loads(line).get("kind") == "epoch"]
    assert epochs[-1]["val_loss"] == pytest.approx(run.metrics["val"]["loss"], abs=1e-6)
    reloaded = kiln.Run.load(run.path)
    for r in (run, reloaded):
        assert r.evaluate("test")["roc_auc"] == pytest.approx(run.metrics["test"]["roc_auc"], abs=1e-9)
        assert r.evaluate("test")["loss"] == pytest.approx(run.metrics["test"]["loss"], abs=1e-6)


def test_resume_gives_the_same_final_weights_as_an_uninterrupted_run(german_credit: Path, tmp_path: Path) -> None:
    whole = kiln.train(_german(german_credit, 4), out=tmp_path / "whole", live=False)
    kiln.train(_german(german_credit, 2), out=tmp_path / "parts", live=False)
    resumed = kiln.train(_german(german_credit, 4), out=tmp_path / "parts", resume=True, live=False)
    a, b = load_file(str(whole.path / "model.safetensors")), load_file(str(resumed.path / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"
    assert whole.metrics["test"]["roc_auc"] == resumed.metrics["test"]["roc_auc"]


@pytest.mark.parametrize("decay", [1.0, 0, -0.5, "fast"])
def test_a_bad_decay_names_the_field(decay) -> None:
    cfg = {"name": "x", "data": {"dataset": "tabular", "path": "t.csv", "target": "y"},
           "model": {"blocks": [{"type": "classifier"}]}, "train": {"ema": {"decay": decay}}}
    with pytest.raises(ConfigError, match=r"train\.ema\.decay"):
        load_config(cfg)


def test_fsdp_is_refused_and_says_why() -> None:
    with pytest.raises(ConfigError, match="train.parallel: fsdp.*train.parallel: ddp"):
        Ema(torch.nn.Linear(2, 2), EmaConfig(), fsdp=True)
