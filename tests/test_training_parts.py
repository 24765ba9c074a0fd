"""Pieces of training that need no data: schedules, the validation split, checkpoints."""

import pytest
import torch

from kiln.config import HardExamplesConfig, ScheduleConfig
from kiln.data.splits import holdout
from kiln.training.plans import epoch_order, epoch_size, hard_subset
from kiln.training.optim import SCHEDULES


def test_schedules_shape():
    total = 100
    const = SCHEDULES.get("constant")(total, ScheduleConfig(name="constant", warmup=0.1))
    # nanoGPT's warm-up: step s of 10 at (s + 1) / 11, so the first step is not spent at learning rate 0
    assert const(0) == pytest.approx(1 / 11) and const(5) == pytest.approx(6 / 11) and const(9) == pytest.approx(10 / 11)
    assert const(10) == const(50) == 1.0
    cos = SCHEDULES.get("cosine")(total, ScheduleConfig(name="cosine", final_lr_fraction=0.1))
    assert cos(0) == 1.0 and cos(50) == pytest.approx(0.55) and cos(100) == pytest.approx(0.1)
    one = SCHEDULES.get("onecycle")(total, ScheduleConfig(name="onecycle"))
    assert one(0) == pytest.approx(1 / 25) and one(25) == 1.0 and one(100) == pytest.approx(0.0)
    assert max(one(s) for s in range(total)) == 1.0


def test_validation_split_is_deterministic_disjoint_and_complete():
    tr, va = holdout(1000, 0.1, seed=3)
    tr2, va2 = holdout(1000, 0.1, seed=3)
    assert torch.equal(tr, tr2) and torch.equal(va, va2)
    assert len(va) == 100 and len(tr) == 900
    assert torch.equal(torch.cat([tr, va]).sort().values, torch.arange(1000))
    assert not torch.equal(holdout(1000, 0.1, seed=4)[1], va)


def test_epoch_order_depends_on_seed_and_epoch_only():
    cpu = torch.device("cpu")
    assert torch.equal(epoch_order(50, 1, 2, cpu), epoch_order(50, 1, 2, cpu))
    assert not torch.equal(epoch_order(50, 1, 2, cpu), epoch_order(50, 1, 3, cpu))


def test_hard_examples_keep_the_highest_losses_in_epoch_order():
    order = torch.tensor([5, 0, 3, 1, 4, 2])
    last_loss = torch.tensor([0.1, 2.0, 0.3, float("inf"), 0.3, 0.05])
    # the three highest are samples 3 (never seen), 1 and a tie of 2 and 4, broken by the lower index
    assert hard_subset(order, last_loss, 4, "hardest").tolist() == [3, 1, 4, 2]
    assert hard_subset(order, last_loss, 3, "hardest").tolist() == [3, 1, 2]
    assert hard_subset(order, last_loss, 2, "random").tolist() == [5, 0]
    assert hard_subset(order, last_loss, 6, "hardest") is order


def test_hard_examples_epoch_sizes():
    hard = HardExamplesConfig(fraction=0.25, from_epoch=3)
    assert [epoch_size(1001, hard, e) for e in range(4)] == [1001, 1001, 251, 251]
    assert [epoch_size(1001, None, e) for e in range(2)] == [1001, 1001]


def test_split_seed_fixes_the_split_while_the_run_seed_varies(mnist_root):
    from kiln.config import load_config
    from kiln.data.kind import open_kind

    def val_images(seed, data):
        cfg = load_config({"model": {"blocks": [{"type": "flatten"}, {"type": "classifier"}]}, "seed": seed,
                           "data": {"limit_train": 500, "limit_test": 10, **data}})
        return open_kind(cfg.data, cfg.seed).load().val_x

    fixed = val_images(1, {"split_seed": 7})
    assert torch.equal(fixed, val_images(2, {"split_seed": 7}))
    assert torch.equal(fixed, val_images(7, {}))
    assert not torch.equal(val_images(1, {}), val_images(2, {}))


def test_auto_precision_follows_the_cpus_bf16_support(monkeypatch):
    from kiln.training import precision

    cpu = torch.device("cpu")
    for flags in ({"avx2", "fma"}, {"avx2", "avx512f", "avx512_bf16"}):  # bf16 measured no faster on either
        monkeypatch.setattr(precision, "cpu_flags", lambda flags=flags: flags)
        chosen = precision.pick_precision("auto", cpu)
        assert chosen.name == "fp32" and "without bf16 tiles (AMX)" in chosen.reason
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx2", "avx512f", "amx_bf16", "amx_tile"})
    chosen = precision.pick_precision("auto", cpu)
    assert chosen.name == "bf16" and "amx_bf16" in chosen.reason
    assert precision.pick_precision("fp32", cpu).reason == "set in the config"  # a config forces either way


def test_weight_decay_spares_biases_and_norm_scales():
    from types import SimpleNamespace

    from kiln.training.optim import make_optimizer

    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3), torch.nn.Embedding(5, 3))
    cfg = SimpleNamespace(name="adamw", lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1)
    groups = make_optimizer(model, cfg, torch.device("cpu")).param_groups
    decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decayed == {id(model[0].weight), id(model[2].weight)}  # matrices and embeddings only
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd"])
def test_optimizers_update_exactly_as_torch_optim_does(name):
    """kiln calls torch.optim's update without its torch.compile guards: the same parameters and state."""
    import copy
    from types import SimpleNamespace

    from kiln.training.optim import make_optimizer, make_scheduler, param_groups

    cfg = SimpleNamespace(name=name, lr=1e-2, betas=(0.9, 0.99), weight_decay=0.01, momentum=0.9, nesterov=True)
    torch.manual_seed(0)
    ours = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    theirs = copy.deepcopy(ours)
    opt = make_optimizer(ours, cfg, torch.device("cpu"))
    kind, keys = {"adam": (torch.optim.Adam, ("betas",)), "adamw": (torch.optim.AdamW, ("betas",)),
                  "sgd": (torch.optim.SGD, ("momentum", "nesterov"))}[name]
    ref = kind(param_groups(theirs, cfg.weight_decay),
               **{k: opt.defaults[k] for k in ("lr", "weight_decay", "fused", *keys)})
    assert opt.defaults["fused"] and type(opt) is not kind and isinstance(opt, kind)
    sched = make_scheduler(opt, SimpleNamespace(name="onecycle", warmup=0.5, final_lr_fraction=0.0), 6)
    ref_sched = torch.optim.lr_scheduler.LambdaLR(ref, sched.lr_lambdas[0])
    for step in range(6):
        x = torch.randn(8, 6)
        for model, o, s in ((ours, opt, sched), (theirs, ref, ref_sched)):
            o.zero_grad()
            model(x).square().mean().backward()
            o.step()
            s.step()
        if step == 2:  # a checkpoint round trip mid-run changes nothing
            opt.load_state_dict(opt.state_dict())
    for a, b in zip(ours.parameters(), theirs.parameters()):
        assert torch.equal(a, b)


def test_training_does_not_import_the_compiler():
    """torch.optim's guards import torch._dynamo (seconds) on first use; kiln's optimisers must not."""
    import subprocess
    import sys

    code = (
        "import sys, torch\n"
        "from types import SimpleNamespace\n"
        "from kiln.training.optim import make_optimizer, make_scheduler\n"
        "m = torch.nn.Linear(3, 2)\n"
        "for name in ('adam', 'adamw', 'sgd'):\n"
        "    cfg = SimpleNamespace(name=name, lr=0.1, betas=(0.9, 0.99), weight_decay=0.1, momentum=0.9,"
        " nesterov=False)\n"
        "    opt = make_optimizer(m, cfg, torch.device('cpu'))\n"
        "    sched = make_scheduler(opt, SimpleNamespace(name='cosine', warmup=0.1, final_lr_fraction=0.0), 4)\n"
        "    m(torch.ones(1, 3)).sum().backward(); opt.step(); sched.step(); opt.zero_grad()\n"
        "    opt.load_state_dict(opt.state_dict())\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr


def test_a_checkpoint_whose_optimiser_groups_differ_is_refused_with_a_reason(tmp_path):
    """A checkpoint written by a kiln that put other parameters under weight decay cannot continue here: the
    error says why and what to do, instead of torch's bare group-size message."""
    from kiln.errors import RunDirError
    from kiln.training.checkpoint import load_checkpoint, save_checkpoint

    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    sched = lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)  # noqa: E731
    old = torch.optim.AdamW([{"params": [model[0].weight]},
                             {"params": [model[0].bias, model[1].weight, model[1].bias], "weight_decay": 0.0}])
    save_checkpoint(tmp_path / "c.safetensors", model=model, optimizer=old, scheduler=sched(old), scaler=None,
                    rng={}, progress={})
    new = torch.optim.AdamW([{"params": [model[0].weight, model[1].weight]},
                             {"params": [model[0].bias, model[1].bias], "weight_decay": 0.0}])
    with pytest.raises(RunDirError, match="resume with that version, or train again"):
        load_checkpoint(tmp_path / "c.safetensors", model=model, optimizer=new, scheduler=sched(new), scaler=None)
