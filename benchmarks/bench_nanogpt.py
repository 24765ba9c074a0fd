"""kiln vs nanoGPT's documented CPU run of Tiny Shakespeare (character level), side by side.

nanoGPT's README gives this CPU configuration: 4 layers, 4 heads, width 128, context 64, batch 12,
2000 iterations, dropout 0, no bias, AdamW lr 1e-3 (betas 0.9/0.99, weight decay 0.1 on matrices),
100 warm-up iterations then cosine to 1e-4, gradient clip 1.0, and an evaluation of 20 random batches
per split every 250 iterations (at 0, 250, ..., 2000). ``plain`` below is a faithful rewrite of its model.py
and train.py loop (same modules, initialisation, optimiser groups, schedule, batch sampling and evaluation;
compared line by line with nanoGPT's files); ``kiln`` trains examples/shakespeare_char.yaml. Both run
alternately in fresh processes, --reps times each (rep i with seed --seed + i), with the same thread count;
--jobs N runs N of them at a time (the same losses sooner on a busy machine; the seconds are then no comparison).

    KILN_DATA=../shared/data .venv/bin/python benchmarks/bench_nanogpt.py --reps 2 --threads 1

Each reports its validation loss twice: nanoGPT's estimate (20 random batches of 12 x 64 tokens at the last
evaluation) and the exact loss of the whole held-out tail (every token once, in consecutive windows of the
context, measured after the timed loop).

The wall time counts the training loop with its evaluations (nanoGPT's measure); kiln's whole
``kiln.train`` call (tokenizer, data, final full-validation pass, saving) is reported beside it.
Results also go to benchmarks/results/nanogpt-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CONFIG = ROOT / "examples" / "shakespeare_char.yaml"
N_LAYER, N_HEAD, N_EMBD, BLOCK, BATCH, ITERS = 4, 4, 128, 64, 12, 2000
LR, MIN_LR, WARMUP, WD, BETAS, CLIP, EVAL_EVERY, EVAL_ITERS = 1e-3, 1e-4, 100, 0.1, (0.9, 0.99), 1.0, 250, 20


def text_path() -> Path:
    root = os.environ.get("KILN_DATA")
    if not root or not (Path(root) / "tinyshakespeare" / "input.txt").is_file():
        sys.exit("set KILN_DATA to a folder holding tinyshakespeare/input.txt (e.g. ../shared/data)")
    return Path(root) / "tinyshakespeare" / "input.txt"


# ---- plain: nanoGPT's model.py and train.py, condensed ------------------------------------------

def plain_gpt(vocab: int):
    """nanoGPT's GPT (model.py) for this configuration, initialised as nanoGPT does from torch's global RNG."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class CausalSelfAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.c_attn = nn.Linear(N_EMBD, 3 * N_EMBD, bias=False)
            self.c_proj = nn.Linear(N_EMBD, N_EMBD, bias=False)

        def forward(self, x):
            b, t, c = x.size()
            q, k, v = self.c_attn(x).split(N_EMBD, dim=2)
            q, k, v = (z.view(b, t, N_HEAD, c // N_HEAD).transpose(1, 2) for z in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=True)
            return self.c_proj(y.transpose(1, 2).contiguous().view(b, t, c))

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.c_fc = nn.Linear(N_EMBD, 4 * N_EMBD, bias=False)
            self.gelu = nn.GELU()
            self.c_proj = nn.Linear(4 * N_EMBD, N_EMBD, bias=False)

        def forward(self, x):
            return self.c_proj(self.gelu(self.c_fc(x)))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln_1, self.attn = nn.LayerNorm(N_EMBD, bias=False), CausalSelfAttention()
            self.ln_2, self.mlp = nn.LayerNorm(N_EMBD, bias=False), MLP()

        def forward(self, x):
            x = x + self.attn(self.ln_1(x))
            return x + self.mlp(self.ln_2(x))

    class GPT(nn.Module):
        def __init__(self, vocab):
            super().__init__()
            self.transformer = nn.ModuleDict(dict(
                wte=nn.Embedding(vocab, N_EMBD), wpe=nn.Embedding(BLOCK, N_EMBD),
                h=nn.ModuleList([Block() for _ in range(N_LAYER)]), ln_f=nn.LayerNorm(N_EMBD, bias=False)))
            self.lm_head = nn.Linear(N_EMBD, vocab, bias=False)
            self.transformer.wte.weight = self.lm_head.weight
            self.apply(self._init_weights)
            for name, p in self.named_parameters():
                if name.endswith("c_proj.weight"):
                    torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * N_LAYER))

        def _init_weights(self, module):
            if isinstance(module, (nn.Linear, nn.Embedding)):
                torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

        def forward(self, idx, targets):
            t = idx.size(1)
            x = self.transformer.wte(idx) + self.transformer.wpe(torch.arange(t, dtype=torch.long))
            for block in self.transformer.h:
                x = block(x)
            logits = self.lm_head(self.transformer.ln_f(x))
            return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)

    return GPT(vocab)


def plain_groups(model) -> list[dict]:
    """nanoGPT's configure_optimizers: weight decay on every parameter of 2 or more dimensions."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": WD},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def plain_lr(it: int) -> float:
    """nanoGPT's get_lr: linear warm-up from LR / (WARMUP + 1), then cosine to MIN_LR."""
    if it < WARMUP:
        return LR * (it + 1) / (WARMUP + 1)
    ratio = (it - WARMUP) / (ITERS - WARMUP)
    return MIN_LR + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (LR - MIN_LR)


def worker_plain(seed: int) -> dict:
    import torch

    text = text_path().read_text(encoding="utf-8")
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    ids = torch.tensor([stoi[c] for c in text], dtype=torch.long)
    n = int(len(ids) * 0.9)
    splits = {"train": ids[:n], "val": ids[n:]}
    torch.manual_seed(seed)

    def get_batch(split):
        data = splits[split]
        ix = torch.randint(len(data) - BLOCK, (BATCH,))
        return (torch.stack([data[i:i + BLOCK] for i in ix]), torch.stack([data[i + 1:i + 1 + BLOCK] for i in ix]))

    model = plain_gpt(len(chars))
    optimizer = torch.optim.AdamW(plain_groups(model), lr=LR, betas=BETAS)  # nanoGPT: fused only on CUDA
    get_lr = plain_lr

    @torch.no_grad()
    def exact_val_loss(windows=64):
        """The loss of every held-out token once: the tail cut into consecutive windows of BLOCK (the last one
        shorter), as kiln's final evaluation does; nanoGPT itself only estimates it from random batches."""
        model.eval()
        data, total, count = splits["val"], 0.0, 0
        n = (len(data) - 1) // BLOCK
        xs, ys = data[: n * BLOCK].view(n, BLOCK), data[1: n * BLOCK + 1].view(n, BLOCK)
        chunks = [(xs[i:i + windows], ys[i:i + windows]) for i in range(0, n, windows)]
        if n * BLOCK + 1 < len(data):
            chunks.append((data[n * BLOCK: -1].view(1, -1), data[n * BLOCK + 1:].view(1, -1)))
        for xb, yb in chunks:
            total += model(xb, yb).item() * yb.numel()
            count += yb.numel()
        model.train()
        return total / count

    @torch.no_grad()
    def estimate_loss():
        model.eval()
        out = {}
        for split in ("train", "val"):
            losses = torch.zeros(EVAL_ITERS)
            for k in range(EVAL_ITERS):
                losses[k] = model(*get_batch(split)).item()
            out[split] = losses.mean().item()
        model.train()
        return out

    t0 = time.perf_counter()
    history = []
    x, y = get_batch("train")
    for it in range(ITERS + 1):
        for group in optimizer.param_groups:
            group["lr"] = get_lr(it)
        if it % EVAL_EVERY == 0:
            history.append({"step": it, **estimate_loss()})
        if it == ITERS:
            break
        loss = model(x, y)
        x, y = get_batch("train")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()  # nanoGPT logs every iteration (log_interval=1)
    loop_seconds = time.perf_counter() - t0
    return {"loop_seconds": loop_seconds, "val_loss": history[-1]["val"], "train_loss": history[-1]["train"],
            "full_val_loss": exact_val_loss(), "history": history}


# ---- kiln -----------------------------------------------------------------------------------------

def worker_kiln(seed: int) -> dict:
    import kiln

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        run = kiln.train(CONFIG, {"seed": seed}, out=Path(tmp) / "run", live=False)
        total = time.perf_counter() - t0
        evals = [r for r in run.dir.read_metrics() if r["kind"] == "eval"]
        sample = run.generate("ROMEO:", 200, temperature=0.8, top_k=40, seed=1)
        return {"loop_seconds": run.metrics["train_seconds"], "call_seconds": total, "val_loss": evals[-1]["val_loss"],
                "train_loss": evals[-1]["train_loss"], "full_val_loss": run.metrics["val"]["loss"],
                "history": [{"step": r["step"], "train": r["train_loss"], "val": r["val_loss"]} for r in evals],
                "sample": "ROMEO:" + sample}


WORKERS = {"plain": worker_plain, "kiln": worker_kiln}


# ---- driver ---------------------------------------------------------------------------------------

def run_worker(name: str, seed: int, threads: int | None) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    out = subprocess.run([sys.executable, __file__, "--worker", name, "--seed", str(seed)], env=env,
                         capture_output=True, text=True, check=False)
    if out.returncode:
        sys.exit(f"{name} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def compute_floor(threads: int | None) -> dict:
    """The least time this configuration can take here: its FLOPs (counted by FlopCounterMode on kiln's
    model: one training step forward and backward, and one evaluation forward pass) over the machine's
    best measured fp32 matrix-multiply rate at the same thread count. No implementation beats it in fp32."""
    import torch
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    from kiln.config import load_config
    from kiln.summary import model_of

    if threads:
        torch.set_num_threads(threads)
    model = model_of(load_config(CONFIG))
    x = torch.randint(0, model.output_shape[-1], (BATCH, BLOCK))
    train = FlopCounterMode(display=False)
    with train:
        F.cross_entropy(model(x).flatten(0, 1), x.flatten()).backward()
    evaluate = FlopCounterMode(display=False)
    with evaluate, torch.no_grad():
        model(x)
    evals = ITERS // EVAL_EVERY + 1
    total = ITERS * train.get_total_flops() + evals * 2 * EVAL_ITERS * evaluate.get_total_flops()
    rates = {}
    for m, k, n in ((2048, 2048, 2048), (BATCH * BLOCK, N_EMBD, 4 * N_EMBD), (BATCH * BLOCK, 4 * N_EMBD, N_EMBD)):
        a, b = torch.randn(m, k), torch.randn(k, n)
        reps = max(3, int(2e10 / (2 * m * k * n)))
        a @ b
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(reps):
                a @ b
            best = min(best, (time.perf_counter() - start) / reps)
        rates[f"{m}x{k}x{n}"] = 2 * m * k * n / best / 1e9
    a16 = torch.randn(1024, 1024, dtype=torch.bfloat16)
    start = time.perf_counter()
    a16 @ a16
    bf16 = 2 * 1024**3 / (time.perf_counter() - start) / 1e9
    peak = max(rates.values())
    return {"tflop": total / 1e12, "train_gflop_per_step": train.get_total_flops() / 1e9, "fp32_gflops": rates,
            "bf16_gflops_1024": bf16, "floor_seconds": total / (peak * 1e9), "threads": torch.get_num_threads()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=2, help="runs of each system, alternating (default 2)")
    p.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for both (default: PyTorch's)")
    p.add_argument("--seed", type=int, default=1337, help="the first run's seed; rep i runs seed + i (default 1337)")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs at a time (default 1); more gives the same losses sooner, but no time comparison")
    p.add_argument("--floor", action="store_true", help="only print the compute floor of the configuration")
    p.add_argument("--worker", choices=WORKERS, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        import torch

        result = WORKERS[args.worker](args.seed)
        print(json.dumps({**result, "threads": torch.get_num_threads()}))
        return
    text_path()
    import torch

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}; "
          f"python {platform.python_version()}, torch {torch.__version__}; threads {args.threads or 'default'}")
    print(f"config: {N_LAYER} layers, {N_HEAD} heads, width {N_EMBD}, context {BLOCK}, batch {BATCH}, {ITERS} iterations, "
          f"AdamW {LR} -> {MIN_LR} (warm-up {WARMUP}), wd {WD}, clip {CLIP}, eval {EVAL_ITERS} batches/split every "
          f"{EVAL_EVERY}")
    floor = compute_floor(args.threads)
    rates = ", ".join(f"{k} {v:.0f}" for k, v in floor["fp32_gflops"].items())
    print(f"compute floor: {floor['tflop']:.2f} TFLOP in all ({floor['train_gflop_per_step']:.2f} GFLOP per training "
          f"step, evaluations included); fp32 matmul GFLOP/s at {floor['threads']} threads: {rates}; bf16 "
          f"{floor['bf16_gflops_1024']:.1f}; so at least {floor['floor_seconds']:.0f} s at the best fp32 rate",
          flush=True)
    if args.floor:
        return
    results: dict[str, list[dict]] = {"plain": [], "kiln": []}
    runs = [(rep, name) for rep in range(args.reps) for name in ("plain", "kiln")]  # alternating
    if args.jobs > 1:
        print(f"{args.jobs} runs at a time: the losses are those of one run at a time (each run's own seed and "
              "thread count), the seconds are not a speed comparison", flush=True)
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = [pool.submit(run_worker, name, args.seed + rep, args.threads) for rep, name in runs]
        for (rep, name), future in zip(runs, futures):
            r = future.result()
            results[name].append(r)
            extra = f"  (whole kiln.train call {r['call_seconds']:.1f} s)" if name == "kiln" else ""
            print(f"rep {rep + 1} {name:5s} (seed {args.seed + rep}): val loss {r['val_loss']:.4f} (20-batch "
                  f"estimate), {r['full_val_loss']:.4f} (exact: every held-out token)  train loss "
                  f"{r['train_loss']:.4f}  {r['loop_seconds']:.1f} s{extra}", flush=True)
    print("\n system   val loss estimate (min / median / max)   exact (min / median / max)   "
          "seconds (min / median / max)")
    for name, rs in results.items():
        losses, exact = [r["val_loss"] for r in rs], [r["full_val_loss"] for r in rs]
        secs = [r["loop_seconds"] for r in rs]
        print(f" {name:7s}  {min(losses):.4f} / {statistics.median(losses):.4f} / {max(losses):.4f}"
              f"          {min(exact):.4f} / {statistics.median(exact):.4f} / {max(exact):.4f}"
              f"      {min(secs):.1f} / {statistics.median(secs):.1f} / {max(secs):.1f}")
    ratio = statistics.median(r["loop_seconds"] for r in results["plain"]) / \
        statistics.median(r["loop_seconds"] for r in results["kiln"])
    print(f" median time ratio plain / kiln: {ratio:.2f}x")
    print("\nkiln sample (temperature 0.8, top-k 40, seed 1):\n" + results["kiln"][-1]["sample"])
    out = HERE / "results" / f"nanogpt-{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%SZ')}.json"
    out.parent.mkdir(exist_ok=True)
    # args and hardware: the options and machine printed above, for scripts/results_table.py's row and command
    hardware = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                "python": platform.python_version()}
    out.write_text(json.dumps({"args": vars(args), "hardware": hardware, "threads": args.threads,
                               "torch": torch.__version__, "compute_floor": floor, "results": results}, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
