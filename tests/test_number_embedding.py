"""``tabular_encoder.numeric_embedding: linear`` (and ``linear_relu``): each number's inputs (its value, or its
piecewise-linear bins) go through a linear layer of its own; the data gives each number's width, the run keeps
it, and a reloaded run predicts the same. ``auto`` chooses linear for a table of 5,120 training rows or more."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from test_bank_marketing import config, fraud_csv

import kiln
from kiln.data.preprocess import auto_number_embedding
from kiln.errors import KilnError
from kiln.nn.blocks.tabular import NumberEmbedding, TableEncoder
from kiln.registry import BLOCKS

pytestmark = pytest.mark.usefixtures("one_thread")

ROWS = [{"amount": 1e6, "hour": 2, "channel": "web"}, {"amount": 0.01, "hour": 14, "channel": "shop"},
        {"amount": 80.0, "hour": 22, "channel": "new channel"}]


@pytest.mark.parametrize("relu", [False, True])
def test_each_number_is_embedded_from_its_own_inputs_alone(relu: bool) -> None:
    torch.manual_seed(0)
    widths, numeric, dim = [3, 1, 2], 8, 4  # three numbers' inputs, then two is-missing indicators
    emb = NumberEmbedding(widths, numeric, dim, relu)
    x = torch.rand(6, numeric)
    out = emb(x)
    assert out.shape == (6, len(widths) * dim + 2)
    assert torch.equal(out[:, -2:], x[:, -2:])  # indicators pass through
    starts = [0, 3, 4]
    for n, (s, w) in enumerate(zip(starts, widths)):
        moved = x.clone()
        moved[:, s:s + w] += torch.rand(6, w)
        changed = (emb(moved) != out).any(0)
        own = torch.zeros_like(changed)
        own[n * dim:(n + 1) * dim] = True
        assert not changed[~own].any()  # no other number's values move
        assert changed[own].any()
    # the first number alone is a plain linear layer of its 3 inputs
    z = x[:, :3] @ emb.weight[0] + emb.bias[0]
    assert torch.allclose(out[:, :dim], torch.relu(z) if relu else z, atol=1e-6)
    # the padding of the shorter numbers stays 0: it never gets a gradient
    out.sum().backward()
    assert emb.weight[1, 1:].abs().sum() == 0 and emb.weight.grad[1, 1:].abs().sum() == 0


def test_output_sources_name_each_numbers_first_input() -> None:
    spec = BLOCKS.get("tabular_encoder")(numeric=7, categories=[3, 14], numbers=[3, 1, 2], onehot_max=4,
                                         embed_dim=2, numeric_embedding="linear", numeric_dim=4)
    built = spec.build((9,))
    enc: TableEncoder = built.module
    assert enc(torch.zeros(5, 9)).shape == (5, built.out_shape[0])
    assert enc.output_sources().tolist() == [0] * 4 + [3] * 4 + [4] * 4 + [6] + [7] * 3 + [8] * 2


def test_numbers_that_do_not_fit_the_row_name_the_field() -> None:
    spec = BLOCKS.get("tabular_encoder")(numeric=3, categories=[], numbers=[2, 2], numeric_embedding="linear")
    with pytest.raises(KilnError, match="tabular_encoder.numbers"):
        spec.build((3,))


@pytest.mark.parametrize("encoding", ["ple", "standard"])
def test_a_run_keeps_each_numbers_width_and_reloads_to_the_same_outputs(tmp_path: Path, encoding: str) -> None:
    path = fraud_csv(tmp_path / "fraud.csv", n=600)
    cfg = config(path, data={"numeric_encoding": encoding, "bins": 6}, epochs=6,
                 encoder={"numeric_embedding": "linear", "numeric_dim": 4})
    run = kiln.train(cfg, out=tmp_path / "run", live=False)
    widths = [c.width for c in run.kind.prep.numeric]
    assert widths == ([6, 6] if encoding == "ple" else [1, 1])  # amount and hour
    saved = yaml.safe_load((run.path / "config.yaml").read_text())
    assert saved["model"]["blocks"][0]["numbers"] == widths
    assert run.metrics["test"]["roc_auc"] > 0.75  # it learns the planted rule
    again = kiln.Run.load(run.path)
    assert again.predict_rows(ROWS) == run.predict_rows(ROWS)
    from kiln.export import export_run
    assert export_run(run.path, format="onnx")["max_abs_diff"] <= 1e-4  # against PyTorch on the test rows


@pytest.mark.parametrize(("rows", "chosen"), [(720, "none"), (5_119, "none"), (5_120, "linear"), (29_655, "linear")])
def test_auto_follows_the_training_rows(rows: int, chosen: str) -> None:
    # German credit's 5-fold training split has 720 rows, bank marketing's 29,655
    assert auto_number_embedding(rows) == chosen


@pytest.mark.parametrize(("rows", "chosen"), [(400, "none"), (8_000, "linear")], ids=["small", "large"])
def test_auto_is_decided_by_the_data_and_kept_in_the_run(tmp_path: Path, rows: int, chosen: str) -> None:
    path = fraud_csv(tmp_path / "fraud.csv", n=rows)
    cfg = config(path, data={"numeric_encoding": "ple", "val_fraction": 0.1}, epochs=1, batch_size=256,
                 encoder={"numeric_embedding": "auto", "numeric_dim": 4})
    run = kiln.train(cfg, out=tmp_path / "run", live=False)
    assert (run.manifest["samples"]["train"] >= 5_120) == (chosen == "linear")
    assert run.config.model.blocks[0].numeric_embedding == chosen
    assert yaml.safe_load((run.path / "config.yaml").read_text())["model"]["blocks"][0]["numeric_embedding"] == chosen
    assert (run.model.blocks[0].linear is not None) == (chosen == "linear")
    assert kiln.Run.load(run.path).predict_rows(ROWS) == run.predict_rows(ROWS)


def test_auto_without_table_data_names_the_field() -> None:
    spec = BLOCKS.get("tabular_encoder")(numeric=2, categories=[], numeric_embedding="auto")
    with pytest.raises(KilnError, match="numeric_embedding: auto"):
        spec.build((2,))


def test_a_resumed_run_keeps_the_choice_auto_made(tmp_path: Path) -> None:
    """Resuming reopens the data from the run (its saved preprocessing): auto follows the manifest's rows."""
    path = fraud_csv(tmp_path / "fraud.csv", n=8_000)
    cfg = config(path, data={"numeric_encoding": "ple", "val_fraction": 0.1}, epochs=1, batch_size=256,
                 encoder={"numeric_embedding": "auto", "numeric_dim": 4})
    first = kiln.train(cfg, out=tmp_path / "run", live=False)
    cfg["train"]["epochs"] = 2
    again = kiln.train(cfg, out=tmp_path / "run", resume=True, live=False)
    assert first.config.model.blocks[0].numeric_embedding == again.config.model.blocks[0].numeric_embedding == "linear"


def test_weight_decay_shrinks_weights_but_not_ensemble_scalings_or_number_embeddings() -> None:
    """AdamW with zero gradients only decays: the MLP's matrices shrink; TabM's per-member scalings (which start
    at one) and each number's own embedding stay as they are, as do 2-D biases."""
    from types import SimpleNamespace

    from kiln.nn.build import build_model
    from kiln.training.optim import make_optimizer

    specs = [BLOCKS.get("tabular_encoder")(numeric=5, categories=[3], numbers=[3, 2], numeric_embedding="linear",
                                           numeric_dim=4),
             BLOCKS.get("ensemble_mlp")(members=3, units=8), BLOCKS.get("classifier")(classes=2)]
    model = build_model(specs, (6,))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = make_optimizer(model, SimpleNamespace(name="adamw", lr=0.1, betas=(0.9, 0.999), weight_decay=0.5),
                         torch.device("cpu"))
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {"blocks.1.mlp.0.weight", "blocks.1.mlp.3.weight", "blocks.2.weight"}
