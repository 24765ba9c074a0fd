"""kiln and the plain nanoGPT rewrite, step by step on the same weights and the same batches.

kiln's model is built from examples/shakespeare_char.yaml (kiln's initialisation, seed --seed); the rewrite's
GPT (bench_nanogpt.plain_gpt) gets a copy of its weights. Then both take --steps optimiser steps on the same
random training windows (drawn as `kiln train` draws them, so the kiln side repeats a `kiln train` run of the
same seed), each with its own optimiser, schedule and gradient clipping (kiln's
make_optimizer/make_scheduler/backward_and_step, the rewrite's AdamW groups and get_lr), and every step prints
the learning rate each used, the loss each computed, and the largest difference between their weights. The
initialisation rule (std of every parameter) and the weight-decay groups are compared first.

    KILN_DATA=../shared/data .venv/bin/python benchmarks/nanogpt_steps.py --steps 20

The whole run, with the exact held-out loss of both at the end (the rewrite trained on kiln's initial weights
and kiln's batches; about two trainings' time):

    KILN_DATA=../shared/data .venv/bin/python benchmarks/nanogpt_steps.py --steps 2000 --print-every 250 --exact

A difference in the first forward pass points at the model, in the first steps' weights at the optimiser, in a
learning rate at the schedule. Float rounding (a fused AdamW against a per-tensor one) grows slowly; a cause
shows at once.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent / "src"), str(HERE.parent)]

# kiln's parameter name -> the rewrite's (nanoGPT's) for layer i
LAYER_NAMES = {"norm1.weight": "ln_1.weight", "attn.qkv.weight": "attn.c_attn.weight",
               "attn.proj.weight": "attn.c_proj.weight", "norm2.weight": "ln_2.weight",
               "mlp.up.weight": "mlp.c_fc.weight", "mlp.down.weight": "mlp.c_proj.weight"}


def plain_name(kiln_name: str) -> str:
    parts = kiln_name.split(".")
    if kiln_name == "blocks.0.weight":
        return "transformer.wte.weight"
    if kiln_name == "blocks.1.table":
        return "transformer.wpe.weight"
    if kiln_name == "blocks.2.norm.weight":
        return "transformer.ln_f.weight"
    return f"transformer.h.{parts[3]}." + LAYER_NAMES[".".join(parts[4:])]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--same-lr", action="store_true",
                   help="give kiln's optimiser the rewrite's learning rate at every step (isolates the optimiser)")
    p.add_argument("--schedule", nargs="*", type=int, default=[0, 1, 99, 100, 101, 1000, 1999],
                   help="steps whose learning rates to compare besides the trained ones")
    p.add_argument("--print-every", type=int, default=1, help="print every Nth step (default 1)")
    p.add_argument("--exact", action="store_true",
                   help="after the last step, the exact held-out loss of both models (every held-out token once)")
    args = p.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    from benchmarks import bench_nanogpt as bench
    from kiln.config import load_config
    from kiln.data.kind import open_kind, resolve
    from kiln.nn import build_model
    from kiln.training.objectives import Objective
    from kiln.training.optim import backward_and_step, make_optimizer, make_scheduler

    bench.text_path()
    cfg = load_config(bench.CONFIG, {"seed": args.seed})
    kind = open_kind(cfg.data, cfg.seed)
    cfg = resolve(cfg, kind)
    torch.manual_seed(args.seed)
    kmodel = build_model(cfg.blocks, kind.input_shape)
    torch.manual_seed(args.seed)
    pmodel = bench.plain_gpt(kind.tokenizer.vocab_size)

    print("initialisation: std of each parameter, kiln (its seed) vs the rewrite (same seed, its own draw)")
    pparams = dict(pmodel.named_parameters())
    for name, param in kmodel.named_parameters():
        other = pparams[plain_name(name)]
        print(f"  {name:32s} kiln {param.std().item():.5f} mean {param.mean().item():+.5f}   "
              f"{plain_name(name):34s} plain {other.std().item():.5f} mean {other.mean().item():+.5f}")
    with torch.no_grad():
        for name, param in kmodel.named_parameters():
            pparams[plain_name(name)].copy_(param)

    kopt = make_optimizer(kmodel, cfg.train.optimizer, torch.device("cpu"))
    ksched = make_scheduler(kopt, cfg.train.schedule, cfg.train.steps)
    popt = torch.optim.AdamW(bench.plain_groups(pmodel), lr=bench.LR, betas=bench.BETAS)
    kdecay = {id(q) for g in kopt.param_groups if g["weight_decay"] for q in g["params"]}
    pdecay = {id(q) for g in popt.param_groups if g["weight_decay"] for q in g["params"]}
    kgroups = sorted(n for n, q in kmodel.named_parameters() if id(q) in kdecay)
    pgroups = sorted(plain_name(n) for n, q in kmodel.named_parameters() if id(pparams[plain_name(n)]) in pdecay)
    print(f"weight decay on {len(kgroups)} kiln tensors, {len(pgroups)} rewrite tensors; same set: "
          f"{sorted(plain_name(n) for n in kgroups) == pgroups}; kiln {[(g['weight_decay'], g['betas'], g['eps']) for g in kopt.param_groups]}"
          f", plain {[(g['weight_decay'], g['betas'], g['eps']) for g in popt.param_groups]}")

    mult = ksched.lr_lambdas[0]
    print("learning rate at step: " + ", ".join(f"{s}: kiln {cfg.train.optimizer.lr * mult(s):.3e} plain "
                                               f"{bench.plain_lr(s):.3e}" for s in args.schedule))

    data = kind.load()
    train = data.train_x
    objective = Objective("lm", None, 0.0)
    print("\nstep  lr kiln     lr plain   loss kiln  loss plain  |diff|     max |weight diff|")
    for step in range(args.steps):
        # kiln's own draw (kiln.training.plans.StepBatches): step i's windows from a generator seeded by (seed, i),
        # so with the same seed the kiln side repeats `kiln train`'s run
        gen = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
        idx = torch.randint(kind.samples(train), (cfg.train.batch_size,), generator=gen)
        x, y = kind.gather(train, data.train_y, idx)
        if args.same_lr:
            for g in kopt.param_groups:
                g["lr"] = bench.plain_lr(step)
        klr = kopt.param_groups[0]["lr"]
        for g in popt.param_groups:
            g["lr"] = bench.plain_lr(step)
        kloss = objective.loss(kmodel(x).float(), y, None)
        backward_and_step(kloss, kmodel, kopt, ksched, None, cfg.train.grad_clip)
        ploss = pmodel(x.contiguous(), y.contiguous())
        ploss.backward()
        torch.nn.utils.clip_grad_norm_(pmodel.parameters(), bench.CLIP)
        popt.step()
        popt.zero_grad(set_to_none=True)
        with torch.no_grad():
            diff = max((q - pparams[plain_name(n)]).abs().max().item() for n, q in kmodel.named_parameters())
        if step % args.print_every and step + 1 < args.steps:
            continue
        print(f"{step:4d}  {klr:.3e}  {bench.plain_lr(step):.3e}  {kloss.item():.6f}   {ploss.item():.6f}    "
              f"{abs(kloss.item() - ploss.item()):.2e}   {diff:.2e}", flush=True)
    if args.exact:
        kmodel.eval()
        pmodel.eval()
        with torch.no_grad():
            totals = {"kiln": [0.0, 0], "plain": [0.0, 0]}
            for xb, yb in kind.eval_batches(data.val_x, data.val_x, 64):
                for name, loss in (("kiln", objective.loss(kmodel(xb).float(), yb, None)),
                                   ("plain", pmodel(xb.contiguous(), yb.contiguous()))):
                    totals[name][0] += loss.item() * yb.numel()
                    totals[name][1] += yb.numel()
        kiln_exact, plain_exact = (totals[name][0] / totals[name][1] for name in ("kiln", "plain"))
        print(f"exact held-out loss after step {args.steps}: kiln {kiln_exact:.5f}  plain {plain_exact:.5f}")


if __name__ == "__main__":
    main()
