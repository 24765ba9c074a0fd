"""Transfer learning: train.init_from (by name and shape, a new head when the classes differ), train.freeze (frozen
blocks keep their exact weights) and train.optimizer.lr_scale (per-block learning rates that schedules scale)."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import kiln
from kiln.cli import main
from kiln.config import load_config
from kiln.errors import ConfigError
from kiln.nn import build_model
from kiln.training.checkpoint import save_weights
from kiln.training.optim import make_optimizer, make_scheduler
from kiln.training.transfer import freeze, init_from, prepare, selected

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).parent.parent
SEED = ROOT / "examples" / "mnist_seed.yaml"
TINY = {"data.limit_train": 3000, "data.limit_test": 500, "train.epochs": 1, "train.batch_size": 32,
        "train.optimizer.lr": 0.003, "train.schedule.name": "onecycle", "train.threads": 1, "train.log_every": 1000}


def seed_model(**overrides):
    cfg = load_config(SEED, overrides)
    return build_model(cfg.blocks, (1, 28, 28)), cfg


@pytest.fixture(scope="module")
def source(mnist_root, tmp_path_factory):
    """A short MNIST run of the seed model: the run to start from."""
    return kiln.train(SEED, TINY, out=tmp_path_factory.mktemp("runs") / "source", live=False)


def test_five_class_head_is_new_the_rest_loaded_and_the_table_says_so(source, tmp_path, capsys):
    # A source whose head has 5 classes (another task): everything but the head matches by name and shape.
    five, _ = seed_model(**{"model.blocks.7.classes": 5})
    init_from(five, source.path)
    save_weights(tmp_path / "five.safetensors", five)
    out = tmp_path / "target"
    code = main(["train", str(SEED), "--out", str(out), "--set", f"train.init_from={tmp_path / 'five.safetensors'}",
                 *[f"--set={k}={v}" for k, v in TINY.items()]])
    assert code == 0
    printed = capsys.readouterr()
    table = printed.out + printed.err
    assert "init_from" in table and "weight shape differs: (5, 50) in the source, (10, 50) here" in table
    assert any(line.split()[:3] == ["7", "classifier", "new"] for line in table.splitlines())
    report = json.loads((out / "transfer.json").read_text())
    head = {t["name"]: t for t in report["new"]}
    assert set(head) == {"blocks.7.weight", "blocks.7.bias"}
    assert all("shape differs" in t["reason"] for t in report["new"])
    assert {t["name"] for t in report["skipped"]} == set(head) and all(
        "shape differs" in t["reason"] for t in report["skipped"])
    loaded = {t["name"] for t in report["loaded"]}
    assert "blocks.0.conv.weight" in loaded and "blocks.4.rnn.weight_hh_l0" in loaded
    assert len(loaded) + len(head) == len(load_file(out / "model.safetensors"))
    statuses = {b["index"]: b["status"] for b in report["blocks"]}
    assert statuses[0] == "loaded" and statuses[7] == "new" and statuses[1] == "-"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["transfer"]["loaded"] == len(loaded) and manifest["transfer"]["new"] == 2


def test_frozen_blocks_keep_their_exact_weights_and_the_rest_train(source, tmp_path):
    run = kiln.train(SEED, {**TINY, "seed": 1, "train.init_from": str(source.path), "train.freeze": ["0-3"]},
                     out=tmp_path / "ft", live=False)
    before, after = load_file(source.path / "model.safetensors"), load_file(run.path / "model.safetensors")
    for name in before:
        block = int(name.split(".")[1])
        if block <= 3:
            assert torch.equal(before[name], after[name]), f"{name} of a frozen block changed"
        else:
            assert not torch.equal(before[name], after[name]), f"{name} of a trained block did not change"
    # The frozen weights never reach the optimiser: the checkpoint holds Adam state for the trained ones only.
    state = load_file(run.path / "checkpoints" / "last.safetensors")
    moments = [k for k in state if k.startswith("optim/") and k.endswith("/exp_avg")]
    trained = [n for n in before if int(n.split(".")[1]) > 3]
    assert len(moments) == len(trained)
    assert run.metrics["test"]["accuracy"] > source.metrics["test"]["accuracy"] + 0.05  # a second epoch, front end fixed
    assert json.loads((run.path / "transfer.json").read_text())["frozen"][0] == {"index": 0, "type": "conv2d",
                                                                                 "parameters": 320}


def test_a_frozen_block_keeps_its_normalisation_statistics():
    cfg = load_config({"model": {"blocks": [{"type": "conv2d", "filters": 4, "kernel": 3}, {"type": "batchnorm"},
                                            {"type": "flatten"}, {"type": "classifier", "classes": 10}]}})
    model = build_model(cfg.blocks, (1, 28, 28))
    freeze(model, ["batchnorm"])
    stats = {k: v.clone() for k, v in model.blocks[1].state_dict().items()}
    model.train()
    model(torch.rand(8, 1, 28, 28)).sum().backward()
    assert all(torch.equal(v, model.blocks[1].state_dict()[k]) for k, v in stats.items())
    assert all(p.grad is None for p in model.blocks[1].parameters())
    assert model.blocks[0].training and model.blocks[0].conv.weight.grad is not None  # the rest trains


def test_lr_scale_gives_each_block_its_rate_and_schedules_scale_them_all():
    model, cfg = seed_model(**{"train.optimizer.lr_scale": {"0-3": 0.1, "lstm": 0.5}, "train.freeze": ["conv2d"],
                               "train.optimizer.weight_decay": 0.01, "train.schedule.name": "onecycle"})
    freeze(model, cfg.train.freeze)
    opt = make_optimizer(model, cfg.train.optimizer, torch.device("cpu"))
    lr = cfg.train.optimizer.lr
    rate = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    for i, block in enumerate(model.blocks):
        for p in block.parameters():
            if i == 0:
                assert id(p) not in rate  # frozen: not in the optimiser at all
            else:
                assert rate[id(p)] == pytest.approx(lr * (0.1 if i <= 3 else 0.5 if i == 4 else 1.0))
    decay = {g["weight_decay"] for g in opt.param_groups}
    assert decay == {0.0, 0.01}  # the weight-decay split is kept within each rate
    assert opt.param_groups[0]["lr_scale"] == 1.0  # progress lines show the unscaled rate
    sched = make_scheduler(opt, cfg.train.schedule, 100)
    for _ in range(30):
        opt.step()
        sched.step()
        for g in opt.param_groups:
            assert g["lr"] == pytest.approx(sched.get_last_lr()[0] * g["lr_scale"])
    assert opt.param_groups[0]["lr"] != pytest.approx(lr / 25)  # the schedule did move


def _error(capsys, args) -> str:
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "Traceback" not in err
    return err


def test_bad_init_from_and_block_names_are_errors_that_name_them(mnist_root, tmp_path, capsys):
    out = tmp_path / "never"
    base = ["train", str(SEED), "--out", str(out), *[f"--set={k}={v}" for k, v in TINY.items()]]
    err = _error(capsys, [*base, f"--set=train.init_from={tmp_path / 'nowhere'}"])
    assert "train.init_from" in err and "nowhere" in err and "does not exist" in err
    (tmp_path / "unfinished").mkdir()
    err = _error(capsys, [*base, f"--set=train.init_from={tmp_path / 'unfinished'}"])
    assert "has no model.safetensors" in err
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    err = _error(capsys, [*base, f"--set=train.init_from={tmp_path / 'junk.safetensors'}"])
    assert "not a readable safetensors file" in err
    # A model that shares no tensor with this one: the error lists names and shapes on both sides.
    other = build_model(load_config({"model": {"blocks": [{"type": "flatten"}, {"type": "dense", "units": 7}]}}).blocks,
                        (1, 28, 28))
    save_weights(tmp_path / "other.safetensors", other)
    err = _error(capsys, [*base, f"--set=train.init_from={tmp_path / 'other.safetensors'}"])
    assert "nothing in" in err and "matches this model" in err
    assert "blocks.1.linear.weight (7, 784)" in err and "blocks.0.conv.weight (32, 1, 3, 3)" in err
    err = _error(capsys, [*base, "--set=train.freeze=[12]"])
    assert "train.freeze: block 12 does not exist" in err and "0 conv2d" in err and "7 classifier" in err
    err = _error(capsys, [*base, "--set=train.freeze=[lsmt]"])
    assert "'lsmt' names no block" in err and "did you mean 'lstm'" in err
    err = _error(capsys, [*base, "--set=train.freeze=[\"0-7\"]"])
    assert "every block with weights is frozen" in err
    err = _error(capsys, [*base, "--set=train.optimizer.lr_scale={\"3-9\": 0.1}"])
    assert "train.optimizer.lr_scale.3-9: block 9 does not exist" in err
    assert not out.exists(), "a refused start writes nothing"


def test_select_blocks_reads_indices_ranges_and_types():
    model, _ = seed_model()
    assert selected(model, [0, "2-3", "lstm", -1, "blocks.5"], "x") == [0, 2, 3, 4, 5, 7]
    with pytest.raises(ConfigError, match="the range '3-1' is empty"):
        selected(model, ["3-1"], "x")


def test_init_exclude_leaves_the_blocks_it_names_new(tmp_path):
    source, _ = seed_model()
    save_weights(tmp_path / "source.safetensors", source)
    torch.manual_seed(1)
    target, _ = seed_model()
    head = target.blocks[7].weight.detach().clone()
    report = init_from(target, tmp_path / "source.safetensors", exclude=["classifier"])
    assert torch.equal(target.blocks[7].weight, head)  # as built, not the source's
    assert torch.equal(target.blocks[4].rnn.weight_hh_l0, source.blocks[4].rnn.weight_hh_l0)
    assert {t["name"]: t["reason"] for t in report.new} == {"blocks.7.weight": "train.init_exclude",
                                                            "blocks.7.bias": "train.init_exclude"}
    assert [b["status"] for b in report.blocks if b["index"] == 7] == ["new"]
    with pytest.raises(ConfigError, match="train.init_exclude.*set init_from too"):
        prepare(load_config(SEED, {"train.init_exclude": [7]}).train, target)


@pytest.mark.slow
def test_fine_tuning_from_mnist_learns_fashion_faster_than_scratch(mnist_root, tmp_path):
    """The README's example, small: one epoch on 6,000 Fashion-MNIST images from an MNIST run (convolution frozen,
    a new head) against the same epoch from scratch, same seed and data order."""
    if not (mnist_root.parent / "fashion_mnist").is_dir():
        pytest.skip("Fashion-MNIST unavailable: no fashion_mnist/ beside mnist/ in KILN_DATA")
    source = kiln.train(SEED, {**TINY, "data.limit_train": 20000}, out=tmp_path / "mnist",
                        live=False)
    small = {"data.limit_train": 6000, "data.limit_test": 2000, "train.epochs": 1, "train.threads": 1,
             "train.log_every": 1000}
    scratch = kiln.train(ROOT / "examples" / "fashion_mnist.yaml", {**small, "data.val_fraction": 0.1},
                         out=tmp_path / "scratch", live=False)
    tuned = kiln.train(ROOT / "examples" / "fashion_from_mnist.yaml", {**small, "train.init_from": str(source.path)},
                       out=tmp_path / "tuned", live=False)
    assert tuned.metrics["test"]["accuracy"] > scratch.metrics["test"]["accuracy"] + 0.02
