"""The CIFAR-10 example (examples/cifar10_small.yaml) side by side: kiln against an eager PyTorch loop of the same
model, on the same photos, splits, normalisation and augmentation. Time per epoch, their ratio, test accuracy.

Both train the same small ResNet (the example's blocks, written out by hand in plain PyTorch for the eager loop),
with AdamW and a one-cycle schedule of the same settings, batch size and epochs, the example's flip + shift +
cutout augmentation (batched tensor operations in both), the same thread count, on the 5,000 training photos of
../shared/data/cifar10_small, and report accuracy on its 1,000 test photos. Each system runs in its own process,
alternately, --reps times each (seed r for repetition r).

    KILN_DATA=../shared/data .venv/bin/python benchmarks/bench_cifar.py [--epochs 30] [--reps 1] [--threads 1]

Results go to benchmarks/results/cifar-<timestamp>.json.
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
from datetime import datetime, timezone
from pathlib import Path

from kiln.hardware import cpu_model

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CONFIG = ROOT / "examples" / "cifar10_small.yaml"



# ---- workers -------------------------------------------------------------------------------------------------


def worker_kiln(epochs: int, seed: int, threads: int) -> dict:
    import kiln

    with tempfile.TemporaryDirectory() as tmp:
        run = kiln.train(str(CONFIG), [f"train.epochs={epochs}", f"seed={seed}", f"train.threads={threads}"],
                         out=str(Path(tmp) / "run"))
        results, fused = run.metrics, run.manifest["execution"]["fuse"]
    return {"train_seconds": results["train_seconds"], "test_accuracy": results["test"]["accuracy"], "fused": fused}


def worker_eager(epochs: int, seed: int, threads: int) -> dict:
    import torch
    import torch.nn.functional as F
    from torch import nn

    from kiln.config import load_config
    from kiln.data.kind import open_kind

    torch.set_num_threads(threads)
    cfg = load_config(CONFIG)
    kind = open_kind(cfg.data, seed)  # the same photos, splits and normalisation as kiln's run of this seed
    data = kind.load()
    mean = torch.tensor(kind.mean).view(1, 3, 1, 1)
    std = torch.tensor(kind.std).view(1, 3, 1, 1)
    t = cfg.train
    aug = cfg.data.augment

    class Block(nn.Module):
        def __init__(self, c: int, f: int, stride: int) -> None:
            super().__init__()
            self.c1, self.b1 = nn.Conv2d(c, f, 3, stride, 1, bias=False), nn.BatchNorm2d(f)
            self.c2, self.b2 = nn.Conv2d(f, f, 3, 1, 1, bias=False), nn.BatchNorm2d(f)
            self.short = nn.Identity() if stride == 1 and c == f else nn.Sequential(
                nn.Conv2d(c, f, 1, stride, bias=False), nn.BatchNorm2d(f))

        def forward(self, x):
            return F.relu(self.b2(self.c2(F.relu(self.b1(self.c1(x))))) + self.short(x))

    # The example's blocks, by hand: conv2d + relu, maxpool2d, batchnorm, residual blocks, global_pool, classifier.
    blocks = cfg.model.blocks
    layers: list[nn.Module] = []
    c = 3
    for b in blocks:
        if b.type == "conv2d":
            layers += [nn.Conv2d(c, b.filters, b.kernel, padding=0 if b.padding == "valid" else b.kernel // 2),
                       nn.ReLU()]
            c = b.filters
        elif b.type == "maxpool2d":
            layers.append(nn.MaxPool2d(b.size))
        elif b.type == "batchnorm":
            layers.append(nn.BatchNorm2d(c))
        elif b.type == "residual":
            layers.append(Block(c, b.filters, b.stride))
            c = b.filters
        elif b.type == "global_pool":
            layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        elif b.type == "dropout":
            layers.append(nn.Dropout(b.rate))
        elif b.type == "classifier":
            layers.append(nn.Linear(c, len(kind.class_names)))
        else:
            raise SystemExit(f"the eager twin has no {b.type} block")
    torch.manual_seed(seed)
    model = nn.Sequential(*layers)
    x_train, y_train = data.train_x, data.train_y
    steps_per_epoch = math.ceil(len(x_train) / t.batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=t.optimizer.lr, weight_decay=t.optimizer.weight_decay,
                            betas=t.optimizer.betas)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, t.optimizer.lr, total_steps=steps_per_epoch * epochs,
                                                pct_start=t.schedule.warmup or 0.25, anneal_strategy="cos",
                                                cycle_momentum=False)
    gen = torch.Generator().manual_seed(seed + 1)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=t.label_smoothing)

    def augment(x):  # x in [0, 1]: flip and shift in one grid_sample, as anyone writes it without torchvision
        b = len(x)
        sign = torch.where(torch.rand(b, generator=gen) < 0.5, -1.0, 1.0) if aug.flip else torch.ones(b)
        tx = (torch.rand(b, generator=gen) * 2 - 1) * 2 * aug.shift
        ty = (torch.rand(b, generator=gen) * 2 - 1) * 2 * aug.shift
        zero, one = torch.zeros(b), torch.ones(b)
        theta = torch.stack([torch.stack([sign, zero, tx], 1), torch.stack([zero, one, ty], 1)], 1)
        return F.grid_sample(x, F.affine_grid(theta, list(x.shape), align_corners=False), align_corners=False)

    def cut(x):  # cutout after normalisation: a square of side aug.cutout x the size, at a random centre, zeroed
        b, _, h, w = x.shape
        side = round(aug.cutout * h)
        cy, cx = torch.randint(0, h, (b,), generator=gen), torch.randint(0, w, (b,), generator=gen)
        rows = (torch.arange(h)[None] - (cy - side // 2)[:, None]).clamp(min=0) < side
        rows &= torch.arange(h)[None] >= (cy - side // 2)[:, None]
        cols = (torch.arange(w)[None] - (cx - side // 2)[:, None]).clamp(min=0) < side
        cols &= torch.arange(w)[None] >= (cx - side // 2)[:, None]
        return x.masked_fill(rows[:, None, :, None] & cols[:, None, None, :], 0.0)

    seconds = 0.0
    for _ in range(epochs):
        model.train()
        t0 = time.perf_counter()
        order = torch.randperm(len(x_train))
        for start in range(0, len(order), t.batch_size):
            idx = order[start:start + t.batch_size]
            x = augment(x_train[idx].float() / 255.0)
            x = (x - mean) / std
            logits = model(cut(x) if aug.cutout else x)
            loss = loss_fn(logits, y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if t.grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
            opt.step()
            sched.step()
        seconds += time.perf_counter() - t0
    model.eval()
    with torch.inference_mode():
        pred = torch.cat([model((data.test_x[i:i + 500].float() / 255.0 - mean) / std).argmax(1)
                          for i in range(0, len(data.test_x), 500)])
    return {"train_seconds": seconds, "test_accuracy": float((pred == data.test_y).float().mean())}


def run_worker(system: str, epochs: int, seed: int, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", system, "--epochs", str(epochs), "--seed", str(seed),
           "--threads", str(threads)]
    path = os.pathsep.join([str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": str(threads)}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if out.returncode != 0:
        raise RuntimeError(f"{system} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, help="default: the example's")
    p.add_argument("--reps", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="CPU threads for both (default 1: a shared machine)")
    p.add_argument("--systems", default="kiln,eager")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        fn = worker_kiln if args.worker == "kiln" else worker_eager
        print(json.dumps(fn(args.epochs, args.seed, args.threads)))
        return

    import yaml

    epochs = args.epochs or yaml.safe_load(CONFIG.read_text())["train"]["epochs"]
    systems = args.systems.split(",")
    results: dict[str, list[dict]] = {s: [] for s in systems}
    for rep in range(args.reps):
        for system in systems:
            r = run_worker(system, epochs, rep, args.threads)
            results[system].append(r)
            print(f"rep {rep + 1}/{args.reps} {system:6s} {r['train_seconds'] / epochs:7.2f} s/epoch  "
                  f"test acc {r['test_accuracy'] * 100:.2f}%", flush=True)
    hw = {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
          "platform": platform.platform(),
          "load_average_1m_at_end": os.getloadavg()[0]}
    print(f"\nhardware: {hw}\nconfig: {CONFIG.name}, {epochs} epochs, {args.threads} thread(s), {args.reps} rep(s)")
    print(f"\n{'system':8s} {'median s/epoch':>15s} {'test acc (median)':>18s}")
    summary = {}
    for system, rs in results.items():
        per_epoch = statistics.median(r["train_seconds"] / epochs for r in rs)
        acc = statistics.median(r["test_accuracy"] for r in rs)
        summary[system] = {"seconds_per_epoch_median": per_epoch, "test_accuracy_median": acc}
        print(f"{system:8s} {per_epoch:15.2f} {acc * 100:17.2f}%")
    ratios = {}
    if "kiln" in summary:
        for other in [s for s in summary if s != "kiln"]:
            ratios[other] = summary[other]["seconds_per_epoch_median"] / summary["kiln"]["seconds_per_epoch_median"]
            print(f"kiln is {ratios[other]:.2f}x as fast as {other} per epoch (above 1: faster)")
    out_dir = HERE / "results"
    out_dir.mkdir(exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = out_dir / f"cifar-{stamp}.json"
    out.write_text(json.dumps({"hardware": hw, "args": vars(args), "epochs": epochs, "results": results,
                               "summary": summary, "kiln_speedup": ratios}, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
