"""How much of kiln's validation-loss gap to the plain nanoGPT rewrite is measurement: one training of each on
nanoGPT's CPU configuration (bench_nanogpt.py's workers, same seed, one thread each, in this process), each
reporting nanoGPT's estimate (20 random batches of 12 x 64 held-out tokens at the last evaluation) and the exact
loss of the whole held-out tail (every token once, in consecutive windows of the context); then the spread of
the 20-batch estimate over --draws fresh batch draws on kiln's trained model.

    KILN_DATA=../shared/data .venv/bin/python benchmarks/nanogpt_eval.py --seed 1337 --threads 1

Prints one JSON object. Takes two trainings' time (about 10-15 minutes at one thread on a busy machine).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent / "src"), str(HERE.parent)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--draws", type=int, default=100, help="batch draws for the estimate's spread (default 100)")
    args = p.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    import kiln
    from benchmarks import bench_nanogpt as bench
    from kiln.training.metrics import evaluate

    bench.text_path()
    out: dict = {"seed": args.seed, "threads": args.threads}
    plain = bench.worker_plain(args.seed)
    out["plain"] = {k: plain[k] for k in ("val_loss", "full_val_loss", "loop_seconds")}
    with tempfile.TemporaryDirectory() as tmp:
        run = kiln.train(bench.CONFIG, {"seed": args.seed, "train.threads": args.threads}, out=Path(tmp) / "run",
                         live=False)
        last = [r for r in run.dir.read_metrics() if r["kind"] == "eval"][-1]
        out["kiln"] = {"val_loss": last["val_loss"], "full_val_loss": run.metrics["val"]["loss"],
                       "tokens": run.metrics["val"]["tokens"], "loop_seconds": run.metrics["train_seconds"]}
        val = run.kind.load().val_x
        estimates = []
        for draw in range(args.draws):
            gen = torch.Generator().manual_seed(10_000 + draw)
            batches = [run.kind.gather(val, val, torch.randint(run.kind.samples(val), (bench.BATCH,), generator=gen))
                       for _ in range(bench.EVAL_ITERS)]
            estimates.append(evaluate(run.model, run.kind, batches, device=torch.device("cpu"))["loss"])
    out["kiln_estimate_spread"] = {"draws": args.draws, "mean": statistics.fmean(estimates),
                                   "std": statistics.pstdev(estimates), "min": min(estimates), "max": max(estimates)}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
