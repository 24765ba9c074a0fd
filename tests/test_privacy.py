"""Training with differential privacy (train.privacy, kiln.training.privacy): the budget spent is Opacus's own
figure, private training still learns, per-sample gradients are right for every sequence block, refusals name
the fix, and a resumed run keeps what it had spent."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch
import yaml

import kiln
from kiln.errors import ConfigError, RunDirError

ROOT = Path(__file__).parent.parent

opacus = pytest.importorskip("opacus", reason="train.privacy needs the privacy extra (opacus)")
from opacus.accountants import PRVAccountant, RDPAccountant  # noqa: E402
from opacus.accountants.utils import get_noise_multiplier  # noqa: E402

pytestmark = [pytest.mark.usefixtures("one_thread"),
              # what Opacus says of every use here (kiln's training filters them itself)
              pytest.mark.filterwarnings("ignore:Full backward hook is firing", "ignore:Optimal order is the largest")]

CNN = [  # Opacus's MNIST example network (tanh, no batchnorm)
    {"type": "conv2d", "filters": 16, "kernel": 8, "stride": 2, "padding": 3, "activation": "tanh"},
    {"type": "maxpool2d", "size": 2, "stride": 1},
    {"type": "conv2d", "filters": 32, "kernel": 4, "stride": 2, "activation": "tanh"},
    {"type": "maxpool2d", "size": 2, "stride": 1},
    {"type": "flatten"},
    {"type": "dense", "units": 32, "activation": "tanh"},
    {"type": "classifier", "classes": 10},
]
SEQUENCE = [  # every block that reads a sequence: per-sample gradients through LSTM, GRU, positions, attention
    {"type": "maxpool2d", "size": 2},
    {"type": "rows_to_sequence"},
    {"type": "dense", "units": 12, "activation": "relu"},
    {"type": "lstm", "units": 8, "bidirectional": True},
    {"type": "gru", "units": 8},
    {"type": "positional_encoding", "kind": "learned"},
    {"type": "transformer_encoder", "heads": 2, "ff": 16, "norm": "pre"},
    {"type": "seq_pool", "mode": "mean"},
    {"type": "classifier", "classes": 10},
]


def config(blocks, train_rows=1000, **train) -> dict:
    return {"name": "private", "data": {"dataset": "mnist", "limit_train": train_rows, "limit_test": 1000},
            "model": {"blocks": blocks},
            "train": {"epochs": 1, "batch_size": 64, "threads": 1, "optimizer": {"name": "sgd", "lr": 2.0},
                      "privacy": {"epsilon": 8.0, "max_grad_norm": 0.1}} | train}


def spent_by_opacus(accountant, sigma: float, rate: float, steps: int, delta: float) -> float:
    """Opacus's epsilon for the same mechanism, counted step by step as its PrivacyEngine does."""
    acc = {"prv": PRVAccountant, "rdp": RDPAccountant}[accountant]()
    for _ in range(steps):
        acc.step(noise_multiplier=sigma, sample_rate=rate)
    return acc.get_epsilon(delta=delta)


@pytest.fixture(scope="module")
def private_run(tmp_path_factory, mnist_root):
    torch.set_num_threads(1)
    # 8,000 rows: over 10 runs (the noise is the operating system's, not seeded) test accuracy was 0.874 +- 0.007,
    # lowest 0.862; with 4,000 rows it was 0.765 +- 0.030 and one run of 12 fell to 0.690
    cfg = config(CNN, train_rows=8000, epochs=2, batch_size=256, optimizer={"name": "sgd", "lr": 4.0,
                                                                            "momentum": 0.9})
    return kiln.train(cfg, out=tmp_path_factory.mktemp("dp") / "run", live=False)


def test_private_mnist_learns_and_records_the_budget(private_run):
    results = json.loads((private_run.path / "results.json").read_text())
    assert results["test"]["accuracy"] > 0.8, results["test"]  # chance is 0.1
    p = results["privacy"]
    assert {"epsilon", "delta", "max_grad_norm", "noise_multiplier", "accountant"} <= p.keys()
    assert p["accountant"] == "prv" and p["delta"] == 1e-5 and p["max_grad_norm"] == 0.1
    assert 7.5 < p["epsilon"] <= 8.0, "the planned run spends its budget, not more"
    assert p["steps"] == 2 * math.ceil(7200 / 256)  # 8000 rows less 10% for validation, every step counted
    manifest = json.loads((private_run.path / "manifest.json").read_text())
    assert manifest["privacy"] == p and manifest["status"] == "completed"
    assert manifest["execution"]["fuse"] == [] and "privacy" in manifest["execution"]["fuse_reason"]
    # The saved weights are a plain model's: a reloaded run predicts as the trained one does.
    x = torch.randint(0, 256, (5, 1, 28, 28), dtype=torch.uint8)
    torch.testing.assert_close(kiln.Run.load(private_run.path).predict(x), private_run.predict(x))


def test_epsilon_spent_is_opacus_own(private_run):
    """The recorded epsilon equals Opacus's accountant fed the same noise, sample rate and steps, and the noise is
    the one Opacus's get_noise_multiplier picks for the planned run."""
    p = json.loads((private_run.path / "results.json").read_text())["privacy"]
    assert p["epsilon"] == pytest.approx(spent_by_opacus("prv", p["noise_multiplier"], p["sample_rate"],
                                                         p["steps"], p["delta"]), abs=2e-4)
    assert p["noise_multiplier"] == pytest.approx(get_noise_multiplier(
        target_epsilon=8.0, target_delta=1e-5, sample_rate=p["sample_rate"], steps=p["steps"], accountant="prv"),
        rel=1e-5)
    # RDP gives a looser bound for the same noise: more epsilon
    assert spent_by_opacus("rdp", p["noise_multiplier"], p["sample_rate"], p["steps"], p["delta"]) > p["epsilon"]


def test_rdp_accountant(mnist_root, tmp_path):
    run = kiln.train(config(CNN, train_rows=600, privacy={"epsilon": 5.0, "accountant": "rdp",
                                                          "max_grad_norm": 1.0}), out=tmp_path / "rdp", live=False)
    p = run.metrics["privacy"]
    assert p["accountant"] == "rdp"
    assert p["epsilon"] == pytest.approx(spent_by_opacus("rdp", p["noise_multiplier"], p["sample_rate"],
                                                         p["steps"], 1e-5), abs=2e-4)
    assert p["epsilon"] <= 5.0


def per_sample_grads_by_hand(model, x, y):
    grads = []
    for i in range(len(x)):
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(x[i: i + 1]), y[i: i + 1]).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    return grads


SEED = yaml.safe_load((ROOT / "examples" / "mnist_seed.yaml").read_text())["model"]["blocks"]


@pytest.mark.parametrize("mode", ["hooks", "functorch"])
@pytest.mark.parametrize("blocks, recurrent", [(SEQUENCE, 2), (SEED, 1)], ids=["sequence_blocks", "seed_model"])
def test_per_sample_gradients_of_sequence_blocks_are_exact(mode, blocks, recurrent):
    """LSTM and GRU (as Opacus's DPLSTM/DPGRU), a learned position table (the broadcast parameter of
    opacus#505), kiln's attention (pre- and post-norm: the seed model's): each sample's gradient from the hooks
    equals that sample's gradient alone."""
    from opacus.grad_sample import GradSampleHooks

    from kiln.config import load_config
    from kiln.nn import build_model
    from kiln.training.privacy import _dp_layer, _replace, check_model

    cfg = load_config({"model": {"blocks": blocks}})
    torch.manual_seed(0)
    model = build_model(cfg.blocks, (1, 28, 28))
    check_model(model, [b.type for b in cfg.blocks])
    assert len(_replace(model, _dp_layer)) == recurrent
    x, y = torch.rand(4, 1, 28, 28), torch.tensor([1, 2, 3, 4])
    expected = per_sample_grads_by_hand(model, x, y)
    hooks = GradSampleHooks(model, loss_reduction="mean", force_functorch=mode == "functorch")
    model.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    for name, p in model.named_parameters():
        assert p.grad_sample.shape == (4, *p.shape), name
        for i in range(4):
            torch.testing.assert_close(p.grad_sample[i], expected[i][name], atol=1e-5, rtol=1e-4, msg=name)
    hooks.cleanup()


def test_lstm_gru_attention_train_privately(mnist_root, tmp_path):
    run = kiln.train(config(SEQUENCE, train_rows=300), out=tmp_path / "seq", live=False)
    p = run.metrics["privacy"]
    assert p["steps"] == 5 and 0 < p["epsilon"] <= 8.0
    assert sorted(p["layers_swapped"]) == ["blocks.3.rnn", "blocks.4.rnn"]
    # After training the model holds PyTorch's layers again, with the trained weights under the same keys.
    assert type(run.model.blocks[3].rnn) is torch.nn.LSTM and type(run.model.blocks[4].rnn) is torch.nn.GRU
    x = torch.randint(0, 256, (3, 1, 28, 28), dtype=torch.uint8)
    torch.testing.assert_close(kiln.Run.load(run.path).predict(x), run.predict(x))


def test_empty_poisson_batches_take_a_counted_noise_only_step(mnist_root, tmp_path, monkeypatch):
    """36 samples at an expected batch of 1: about a third of the steps draw no sample (opacus#514). Each still
    steps (noise alone) and counts in the budget; the logged loss stays finite."""
    from kiln.training.privacy import Privacy

    empty, noise_only = [], Privacy.empty_step
    monkeypatch.setattr(Privacy, "empty_step", lambda self: empty.append(1) or noise_only(self))
    run = kiln.train(config(CNN, train_rows=40, epochs=2, batch_size=1), out=tmp_path / "tiny", live=False)
    assert 5 < len(empty) < 50, "(35/36)^36: about 36% of the steps are empty"
    p = run.metrics["privacy"]
    assert p["steps"] == 72 and p["expected_batch_size"] == 1.0
    assert p["epsilon"] == pytest.approx(spent_by_opacus("prv", p["noise_multiplier"], p["sample_rate"], 72, 1e-5),
                                         abs=2e-4)
    epochs = [r for r in run.dir.read_metrics() if r["kind"] == "epoch"]
    assert len(epochs) == 2 and all(math.isfinite(r["train_loss"]) for r in epochs)


def test_batchnorm_is_refused_with_the_fix(mnist_root, tmp_path):
    blocks = [{"type": "conv2d", "filters": 4}, {"type": "batchnorm"}, {"type": "flatten"},
              {"type": "classifier", "classes": 10}]
    with pytest.raises(ConfigError, match=r"model\.blocks\.1 \(batchnorm\).*groupnorm.*layernorm"):
        kiln.train(config(blocks), out=tmp_path / "bn", live=False)
    assert not (tmp_path / "bn").exists(), "refused before anything is written"
    blocks = [{"type": "residual", "filters": 4}, {"type": "global_pool"}, {"type": "classifier", "classes": 10}]
    with pytest.raises(ConfigError, match=r"model\.blocks\.0 \(residual\).*groupnorm"):
        kiln.train(config(blocks), out=tmp_path / "res", live=False)
    # The fix works: groupnorm trains privately.
    blocks[0:1] = [{"type": "conv2d", "filters": 4, "activation": "relu"}, {"type": "groupnorm", "groups": 2}]
    run = kiln.train(config(blocks, train_rows=200), out=tmp_path / "gn", live=False)
    assert run.metrics["privacy"]["epsilon"] > 0


def test_unreachable_epsilon_names_the_smallest_reachable(mnist_root, tmp_path):
    with pytest.raises(ConfigError) as e:
        kiln.train(config(CNN, epochs=5, privacy={"epsilon": 0.01}), out=tmp_path / "tiny", live=False)
    message = str(e.value)
    assert "train.privacy.epsilon: 0.01 cannot be reached in 5 epochs" in message
    smallest = float(message.split("the smallest epsilon reachable there is ")[1].split()[0])
    assert smallest > 0.01
    assert "needs a noise multiplier of" in message
    # ... and that smallest epsilon is indeed reachable
    ok = config(CNN, epochs=5, privacy={"epsilon": smallest * 1.05})
    assert kiln.train(ok, out=tmp_path / "ok", live=False).metrics["privacy"]["noise_multiplier"] <= 10


@pytest.mark.parametrize("train, match", [
    ({"privacy": {"epsilon": 1, "delta": 0.01}}, "delta: 0.01 is not below 1 / 900"),
    ({"grad_clip": 1.0}, "train.grad_clip"),
    ({"class_weights": "auto"}, "train.class_weights"),
    ({"l2": 1e-4}, "weight_decay"),
    ({"hard_examples": {"fraction": 0.5}}, "hard_examples"),
    ({"fuse": "on"}, "train.fuse: on cannot be used with train.privacy"),
])
def test_settings_that_break_privacy_are_refused(mnist_root, tmp_path, train, match):
    cfg = config(CNN, **train)
    cfg["train"]["privacy"] = {"epsilon": 8.0} | train.get("privacy", {})
    with pytest.raises(ConfigError, match=match):
        kiln.train(cfg, out=tmp_path / "run", live=False)


def test_privacy_config_errors_name_the_field():
    from kiln.config import load_config

    with pytest.raises(ConfigError, match=r"train\.privacy\.epsilon: required field is missing"):
        load_config(config(CNN, privacy={"delta": 1e-5}))
    with pytest.raises(ConfigError, match=r"train\.privacy\.accountant"):
        load_config(config(CNN, privacy={"epsilon": 1, "accountant": "gdp"}))


@pytest.mark.slow
def test_resume_keeps_the_spent_budget(mnist_root, tmp_path, monkeypatch):
    """A run interrupted after a checkpoint and resumed spends what the uninterrupted run spends: the steps before
    the interruption stay counted. Resuming with more epochs than the budget allows is refused."""
    from kiln.training.trainer import Trainer

    cfg = config(CNN, train_rows=1000, epochs=2, checkpoint_every=5)
    step = Trainer.step

    def interrupted(self, idx):
        if self.state.global_step == 8:
            raise KeyboardInterrupt
        return step(self, idx)

    monkeypatch.setattr(Trainer, "step", interrupted)
    with pytest.raises(RunDirError, match="interrupted"):
        kiln.train(cfg, out=tmp_path / "run", live=False)
    monkeypatch.setattr(Trainer, "step", step)
    with pytest.raises(ConfigError, match=r"4 epochs .* would spend epsilon .* more than train\.privacy\.epsilon 8"):
        kiln.train(cfg, {"train.epochs": 4}, out=tmp_path / "run", resume=True, live=False)
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["train"]["epochs"] == 2, "refused before anything is written"
    resumed = kiln.train(cfg, out=tmp_path / "run", resume=True, live=False)
    p = resumed.metrics["privacy"]
    assert p["steps"] == 2 * math.ceil(900 / 64)
    assert p["epsilon"] == pytest.approx(spent_by_opacus("prv", p["noise_multiplier"], p["sample_rate"], p["steps"],
                                                         1e-5), abs=2e-4)
    assert 7.5 < p["epsilon"] <= 8.0


def test_example_config_is_private():
    from kiln.config import load_config

    path = ROOT / "examples" / "mnist_private.yaml"
    cfg = load_config(path)
    assert cfg.train.privacy.epsilon == 3.0 and cfg.train.privacy.delta == 1e-5
    assert not any(b["type"] == "batchnorm" for b in yaml.safe_load(path.read_text())["model"]["blocks"])


def test_missing_extra_names_it(monkeypatch):
    from kiln.training.privacy import PrivacyConfig, noise_for

    monkeypatch.setitem(sys.modules, "opacus", None)  # `import opacus` now fails as it does without the extra
    with pytest.raises(ConfigError, match=r"train\.privacy: .*needs Opacus: pip install 'kiln\[privacy\]'"):
        noise_for(PrivacyConfig(epsilon=1.0), 0.01, 100, "1 epoch")
