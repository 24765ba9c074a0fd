"""A character GPT trains as nanoGPT's does, and the levers of the fast recipe (Muon, ReLU^2, QK-norm).

No data needed: random token ids. The nanoGPT rewrite is benchmarks/bench_nanogpt.py's."""

import copy
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from kiln.config import load_config
from kiln.nn import build_model
from kiln.registry import BLOCKS
from kiln.training.muon import MuonAdamW, hidden_matrices
from kiln.training.optim import backward_and_step, make_optimizer, make_scheduler

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 65


def char_gpt(**decoder):
    """examples/shakespeare_char.yaml's model (4 layers, width 128, context 64) for a 65-token vocabulary."""
    specs = [BLOCKS.get("token_embedding")(type="token_embedding", width=128, vocab=VOCAB),
             BLOCKS.get("positional_encoding")(type="positional_encoding", kind="learned"),
             BLOCKS.get("transformer_decoder")(type="transformer_decoder", layers=4, heads=4, bias=False, **decoder),
             BLOCKS.get("lm_head")(type="lm_head", vocab=VOCAB, tie=True)]
    return build_model(specs, (64,))


def test_initialisation_follows_nanogpts_rule():
    """Every matrix N(0, 0.02); the two projections into the residual stream per layer N(0, 0.02 / sqrt(2 * 4));
    norm scales 1; the head shares the token embedding."""
    torch.manual_seed(0)
    model = char_gpt()
    residual = 0.02 / math.sqrt(2 * 4)
    for name, p in model.named_parameters():
        if p.dim() == 1:
            assert torch.equal(p, torch.ones_like(p)), name
            continue
        want = residual if name.endswith(("attn.proj.weight", "mlp.down.weight")) else 0.02
        assert p.std().item() == pytest.approx(want, rel=0.05), name
        assert abs(p.mean().item()) < 3 * want / math.sqrt(p.numel()) + 1e-4, name
    head, embedding = model.blocks[3].proj.weight, model.blocks[0].weight
    assert head is embedding


def test_steps_match_the_nanogpt_rewrite_on_the_same_weights_and_batches():
    """kiln's model, optimiser (AdamW groups, betas, eps), warm-up schedule and clipping against the rewrite of
    nanoGPT's model.py/train.py: the same losses and weights step for step (the cause of a loss gap would show)."""
    sys.path.insert(0, str(ROOT))
    from benchmarks import bench_nanogpt as bench
    from benchmarks.nanogpt_steps import plain_name

    torch.manual_seed(0)
    ours = char_gpt()
    theirs = bench.plain_gpt(VOCAB)
    named = dict(theirs.named_parameters())
    with torch.no_grad():
        for name, p in ours.named_parameters():
            named[plain_name(name)].copy_(p)
    cfg = load_config(ROOT / "examples" / "shakespeare_char.yaml").train
    opt = make_optimizer(ours, cfg.optimizer, torch.device("cpu"))
    sched = make_scheduler(opt, cfg.schedule, cfg.steps)
    ref = torch.optim.AdamW(bench.plain_groups(theirs), lr=bench.LR, betas=bench.BETAS)
    gen = torch.Generator().manual_seed(1)
    for step in range(4):
        assert opt.param_groups[0]["lr"] == pytest.approx(bench.plain_lr(step), rel=1e-9)
        for g in ref.param_groups:
            g["lr"] = bench.plain_lr(step)
        ids = torch.randint(VOCAB, (12, 65), generator=gen)
        x, y = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()
        loss = F.cross_entropy(ours(x).flatten(0, 1), y.flatten())
        backward_and_step(loss, ours, opt, sched, None, cfg.grad_clip)
        ref_loss = theirs(x, y)
        ref_loss.backward()
        torch.nn.utils.clip_grad_norm_(theirs.parameters(), bench.CLIP)
        ref.step()
        ref.zero_grad(set_to_none=True)
        assert loss.item() == pytest.approx(ref_loss.item(), abs=1e-5)
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p, named[plain_name(name)], atol=1e-6, rtol=0, msg=name)
    assert bench.plain_lr(100) == pytest.approx(cfg.optimizer.lr * sched.lr_lambdas[0](100))


def muon_cfg(**kw):
    return SimpleNamespace(**{"name": "muon", "lr": 3e-3, "weight_decay": 0.1, "momentum": 0.95,
                              "betas": (0.9, 0.99), **kw})


def test_muon_takes_the_hidden_matrices_and_adamw_the_rest():
    torch.manual_seed(0)
    model = char_gpt()
    opt = make_optimizer(model, muon_cfg(), torch.device("cpu"))
    assert isinstance(opt, MuonAdamW)
    matrices = {id(p) for p in hidden_matrices(model)}
    names = {name for name, p in model.named_parameters() if id(p) in matrices}
    assert names == {f"blocks.2.layers.{i}.{m}.weight" for i in range(4)
                     for m in ("attn.qkv", "attn.proj", "mlp.up", "mlp.down")}
    muon, *adamw = opt.param_groups
    assert {id(p) for p in muon["params"]} == matrices and muon["adjust_lr_fn"] == "match_rms_adamw"
    rest = {id(p): g["weight_decay"] for g in adamw for p in g["params"]}
    assert rest[id(model.blocks[0].weight)] == 0.1 and rest[id(model.blocks[1].table)] == 0.1  # embeddings decay
    assert all(rest[id(p)] == 0.0 for p in model.parameters() if p.dim() == 1)  # norm scales do not
    assert len(rest) + len(matrices) == len(list(model.parameters()))


def test_muon_trains_resumes_exactly_and_follows_the_schedule():
    torch.manual_seed(0)
    model = char_gpt()
    opt = make_optimizer(model, muon_cfg(), torch.device("cpu"))
    sched = make_scheduler(opt, SimpleNamespace(name="cosine", warmup=0.0, final_lr_fraction=0.1), 20)
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(VOCAB, (8, 65), generator=gen)
    losses = []

    def step(m, o, s):
        loss = F.cross_entropy(m(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
        backward_and_step(loss, m, o, s, None, 1.0)
        return loss.item()

    for _ in range(6):
        losses.append(step(model, opt, sched))
    assert losses[-1] < losses[0] - 0.5  # it learns (one repeated batch)
    assert all(g["lr"] == pytest.approx(3e-3 * sched.lr_lambdas[0](6)) for g in opt.param_groups)
    twin = copy.deepcopy(model)
    twin_opt = make_optimizer(twin, muon_cfg(), torch.device("cpu"))
    twin_sched = make_scheduler(twin_opt, SimpleNamespace(name="cosine", warmup=0.0, final_lr_fraction=0.1), 20)
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    twin_sched.load_state_dict(sched.state_dict())
    assert step(model, opt, sched) == step(twin, twin_opt, twin_sched)
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(a, b)
