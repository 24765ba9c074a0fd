"""TabM-mini (``ensemble_mlp``): every member predicts every row in training and the loss is the mean of the
members' losses, or (``batches: own``) each member trains on batches of its own; in evaluation the model gives
the members' mean, one prediction per row, through Run.predict, a reloaded run, ONNX export and serving; a real
training on bank marketing (when KILN_DATA has it)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_bank_marketing import REPO, bank_marketing, bank_quarter, config, fraud_csv  # noqa: F401  (bank_marketing: fixture)

import kiln
from kiln.data.table import read_table
from kiln.errors import ConfigError
from kiln.nn.blocks.tabular import EnsembleMLP, MemberHeads
from kiln.nn.build import build_model
from kiln.registry import BLOCKS
from kiln.training.objectives import Objective
from kiln.training.optim import param_groups
from kiln.training.plans import epoch_order, member_batches

ENSEMBLE = [{"type": "tabular_encoder"}, {"type": "ensemble_mlp", "members": 4, "units": 32, "dropout": 0.0},
            {"type": "classifier"}]


def two_members(classes: int = 3, heads: str = "shared", batches: str = "shared"):
    """A 2-member ensemble_mlp and a classifier head on 5 inputs, no dropout."""
    torch.manual_seed(0)
    specs = [EnsembleMLP(members=2, units=8, layers=2, dropout=0.0, heads=heads, batches=batches),
             BLOCKS.get("classifier")(classes=classes)]
    return build_model(specs, (5,))


def own_logits(model, x: torch.Tensor, m: int) -> torch.Tensor:
    """Member m alone: the shared MLP on the input scaled by its r, its output scaled by its s, the head (the
    shared one, or member m's own)."""
    members, head = model.blocks
    hidden = members.mlp(x * members.r[m]) * members.s[m]
    if isinstance(head, MemberHeads):
        return torch.nn.functional.linear(hidden, head.weight[m], head.bias[m])
    return head(hidden)


@pytest.mark.parametrize("heads", ["shared", "own"])
@pytest.mark.parametrize("task", ["multiclass", "weighted"])
def test_loss_of_two_members_is_the_mean_of_each_members_own_loss(task: str, heads: str) -> None:
    model = two_members(heads=heads).train()
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    logits = model(x)
    assert logits.shape == (16, 2, 3)  # one prediction per member in training
    weight = torch.tensor([1.0, 3.0, 0.5]) if task == "weighted" else None
    objective = Objective("multiclass", class_weight=weight, label_smoothing=0.1)
    own = [objective.loss(own_logits(model, x, m), y) for m in range(2)]
    assert torch.allclose(own_logits(model, x, 1), logits[:, 1], atol=1e-6)
    assert objective.loss(logits, y).item() == pytest.approx(((own[0] + own[1]) / 2).item(), rel=1e-5)
    assert abs(own[0].item() - own[1].item()) > 1e-4  # the members differ (else the test could not fail)
    # a sample's own loss: its mean over the members; the progress line counts each member's answers
    per_sample = objective.sample_losses(logits, y)
    assert per_sample.shape == (16,)
    assert torch.allclose(per_sample, (Objective("multiclass").sample_losses(own_logits(model, x, 0), y)
                                       + Objective("multiclass").sample_losses(own_logits(model, x, 1), y)) / 2)
    right, counted = objective.counts(logits, y)
    assert counted == 32 and right == sum((own_logits(model, x, m).argmax(1) == y).sum() for m in range(2))


def test_members_are_found_only_with_a_member_dimension() -> None:
    assert Objective("multiclass").members(torch.zeros(4, 3), torch.zeros(4, dtype=torch.long)) == 0
    assert Objective("multiclass").members(torch.zeros(4, 5, 3), torch.zeros(4, dtype=torch.long)) == 5
    assert Objective("regression").members(torch.zeros(4, 1), torch.zeros(4)) == 0
    assert Objective("regression").members(torch.zeros(4, 6, 1), torch.zeros(4)) == 6
    assert Objective("multilabel").members(torch.zeros(4, 3), torch.zeros(4, 3)) == 0
    assert Objective("multilabel").members(torch.zeros(4, 2, 3), torch.zeros(4, 3)) == 2
    assert Objective("lm").members(torch.zeros(4, 7, 9), torch.zeros(4, 7, dtype=torch.long)) == 0


def test_evaluation_gives_the_mean_of_the_members_logits_per_row() -> None:
    model = two_members()
    x = torch.randn(16, 5)
    members = model.train()(x)
    mean = model.eval()(x)
    assert mean.shape == (16, 3)
    assert torch.allclose(mean, members.mean(1), atol=1e-6)
    plain = build_model([BLOCKS.get("dense")(units=4), BLOCKS.get("classifier")(classes=3)], (5,))
    assert not plain.ensemble and plain.train()(x).shape == (16, 3)  # other models: unchanged


def test_own_heads_are_one_per_member_drawn_apart_and_must_end_the_model() -> None:
    model = two_members(classes=3, heads="own")
    head = model.blocks[1]
    assert isinstance(head, MemberHeads) and head.weight.shape == (2, 3, 8) and head.bias.shape == (2, 3)
    assert not torch.equal(head.weight[0], head.weight[1])  # drawn apart, as two heads would be
    decayed, free = param_groups(model, 0.01)
    assert any(p is head.weight for p in decayed["params"]) and any(p is head.bias for p in free["params"])
    assert model.layers[1].params == 2 * (3 * 8 + 3)  # the summary counts every member's head
    shared = two_members(classes=3)
    assert shared.layers[1].params == 3 * 8 + 3 and isinstance(shared.blocks[1], torch.nn.Linear)
    specs = [EnsembleMLP(members=2, units=8, heads="own"), BLOCKS.get("dense")(units=4),
             BLOCKS.get("classifier")(classes=3)]
    with pytest.raises(ConfigError, match=r"model\.blocks\.0 \(ensemble_mlp\): heads: own .* one must follow it"):
        build_model(specs, (5,))
    specs = [EnsembleMLP(members=2, units=8, heads="own"), BLOCKS.get("dropout")(rate=0.1),
             BLOCKS.get("classifier")(classes=3)]
    assert isinstance(build_model(specs, (5,)).blocks[2], MemberHeads)  # dropout may come between


@pytest.mark.parametrize("heads", ["shared", "own"])
def test_own_batches_give_each_member_its_own_rows(heads: str) -> None:
    """In training, 2 members' batches side by side (rows 0-7 member 0's, 8-15 member 1's) give one prediction per
    row, each through its own member; in evaluation every member predicts every row, as with shared batches."""
    model = two_members(heads=heads, batches="own").train()
    x = torch.randn(16, 5)
    logits = model(x)
    assert logits.shape == (16, 3) and model.member_batches == 2
    for m in range(2):
        assert torch.allclose(logits[8 * m:8 * (m + 1)], own_logits(model, x[8 * m:8 * (m + 1)], m), atol=1e-6)
    assert not torch.allclose(own_logits(model, x[:8], 0), own_logits(model, x[:8], 1), atol=1e-3)  # members differ
    shared = two_members(heads=heads)  # the same weights (the same seed), every member on every row
    assert torch.equal(model.eval()(x), shared.eval()(x)) and model.eval()(x[:3]).shape == (3, 3)
    assert two_members().member_batches == 1
    with pytest.raises(ValueError, match="2 batches of equal size side by side, one per member, but got 15 rows"):
        model.train()(x[:15])


def test_member_batches_pass_over_every_sample_once_per_member_in_orders_of_their_own() -> None:
    batches = member_batches(10, seed=3, epoch=1, members=3, batch_size=4, device=torch.device("cpu"))
    assert [len(b) for b in batches] == [12, 12, 6]  # each batch: 3 members' batches of 4 (the last: of 2)
    orders = torch.cat([b.view(3, -1) for b in batches], dim=1)  # (members, samples): each member's order
    assert all(sorted(order.tolist()) == list(range(10)) for order in orders)
    assert len({tuple(order.tolist()) for order in orders}) == 3  # three different orders
    assert torch.equal(orders[0], epoch_order(10, 3, 1, torch.device("cpu")))  # the first: a shared epoch's
    again = member_batches(10, seed=3, epoch=1, members=3, batch_size=4, device=torch.device("cpu"))
    assert all(torch.equal(a, b) for a, b in zip(batches, again, strict=True))  # (seed, epoch) alone: resumable
    other = member_batches(10, seed=3, epoch=2, members=3, batch_size=4, device=torch.device("cpu"))
    assert not torch.equal(torch.cat(other), torch.cat(batches))


def test_own_batches_refuse_what_draws_its_own_samples(tmp_path: Path) -> None:
    cfg = config(fraud_csv(tmp_path / "fraud.csv", n=200), hard_examples={"fraction": 0.5})
    cfg["model"]["blocks"] = [dict(b) for b in ENSEMBLE]
    cfg["model"]["blocks"][1]["batches"] = "own"
    with pytest.raises(ConfigError, match="batches: own .* which train.hard_examples does not: use batches: shared"):
        kiln.train(cfg, out=tmp_path / "run", live=False)


@pytest.mark.parametrize(("heads", "batches"), [("shared", "shared"), ("own", "shared"), ("shared", "own")])
def test_ensemble_run_predicts_reloads_exports_and_serves_the_same(tmp_path: Path, heads: str, batches: str) -> None:
    path = fraud_csv(tmp_path / "fraud.csv")
    cfg = config(path)
    cfg["model"]["blocks"] = [dict(b) for b in ENSEMBLE]
    cfg["model"]["blocks"][1] |= {"heads": heads, "batches": batches}
    run = kiln.train(cfg, out=tmp_path / "run", live=False)
    assert run.metrics["test"]["roc_auc"] > 0.75, run.metrics["test"]  # learnt: a broken ensemble scores ~0.5
    epochs = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in epochs if r["kind"] == "epoch"]
    assert len(epochs) == 8 and {r["samples"] for r in epochs} == {run.manifest["samples"]["train"]}
    rows = [{"amount": float(a), "hour": h, "channel": c} for a, h, c in
            [(1e6, 2, "web"), (0.01, 14, "shop"), (150.0, 3, "new channel"), (80.0, 22, "web")]]
    again = kiln.Run.load(run.path)
    predictions = run.predict_rows(rows)
    assert again.predict_rows(rows) == predictions
    table = read_table(path)
    probabilities = again.predict(again.rows_input(table))
    assert probabilities.shape == (len(table), 2)  # one (averaged) prediction per row
    assert torch.allclose(probabilities.sum(1), torch.ones(len(table)))
    assert [p["prediction"] for p in again.predict_table(table)] == [p["prediction"] for p in run.predict_table(table)]
    from kiln.export import export_run
    exported = export_run(run.path, format="onnx")  # compared with PyTorch on the test rows, within 1e-4
    assert exported["max_abs_diff"] <= 1e-4
    fastapi = pytest.importorskip("fastapi.testclient", reason="needs the serve extra: pip install 'kiln[serve]'")
    from kiln.serve import create_app
    want = [[p["probability_no"], p["probability_yes"]] for p in predictions]
    for backend in ("torch", "onnx"):  # TorchScript traced in evaluation mode, and the exported ONNX file
        with fastapi.TestClient(create_app(run.path, backend=backend)) as client:
            served = client.post("/v1/predict", json={"instances": rows}).json()["predictions"]
        assert [p["label"] for p in served] == [p["prediction"] for p in predictions], backend
        got = [[p["probabilities"]["no"], p["probabilities"]["yes"]] for p in served]
        assert torch.allclose(torch.tensor(got), torch.tensor(want), atol=1e-4), backend


@pytest.mark.slow  # about a minute of CPU
def test_tabm_on_bank_marketing_subsample_reaches_a_real_roc_auc(bank_marketing: Path, tmp_path: Path) -> None:  # noqa: F811
    """The example config with ensemble_mlp on a stratified quarter of the calls (10,297 rows), a few epochs."""
    sample = bank_quarter(bank_marketing, tmp_path / "bank.csv")
    blocks = [{"type": "tabular_encoder"}, {"type": "ensemble_mlp", "members": 8, "units": 64}, {"type": "classifier"}]
    run = kiln.train(REPO / "examples" / "bank_marketing.yaml",
                     {"data.path": str(sample), "model.blocks": blocks, "train.epochs": 5, "train.log_every": 1000},
                     out=tmp_path / "run", live=False)
    assert run.metrics["test"]["roc_auc"] > 0.75, run.metrics["test"]


def test_lr_find_sweeps_on_each_members_own_batches() -> None:
    """The learning-rate range test draws what training would: with ``batches: own``, each step's batch holds one
    full batch a member, each from an order of its own (a pass's short last batch is left out)."""
    from types import SimpleNamespace

    from kiln.training.lr_find import _batches

    def trainer(members: int):
        return SimpleNamespace(kind=SimpleNamespace(samples=len), train_x=torch.zeros(10, 5), cfg=SimpleNamespace(seed=0),
                               t=SimpleNamespace(batch_size=4), model=SimpleNamespace(member_batches=members),
                               device=torch.device("cpu"))

    own = _batches(trainer(3), 5)
    assert [len(b) for b in own] == [12] * 5
    assert all(len(set(b.view(3, 4)[m].tolist())) == 4 for b in own for m in range(3))
    assert any(not torch.equal(b.view(3, 4)[0], b.view(3, 4)[1]) for b in own)
    assert [len(b) for b in _batches(trainer(1), 5)] == [4] * 5  # other models: one batch of 4
