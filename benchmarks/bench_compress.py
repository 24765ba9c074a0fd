"""kiln compress, measured: parameters, model file size, test accuracy and batch-1 / batch-64 latency (kiln's own
predict path and ONNX Runtime) of the original run and of each compressed run, for the seed model
(examples/mnist_seed.yaml) and the German credit model (examples/german_credit.yaml).

    KILN_DATA=../shared/data python benchmarks/bench_compress.py [--runs DIR] [--model mnist_seed|german_credit]
        [--rounds 15]

The originals are trained into --runs (default runs/bench_compress) unless a finished run is already there
(then reused). Each compressed run is written by ``kiln.compress.compress`` (as ``kiln compress`` does) with
``--max-drop`` off, so every step's accuracy is reported, refused or not; a run that a --max-drop 0.5 would
refuse is marked. Latencies are measured afterwards side by side in one process on one thread: interleaved
rounds, each timing every run on both paths, median and quartiles over rounds (``kiln.compress.measure``).
kiln's predict path is ``Run.predict`` (a float run: PyTorch with kiln's fused kernels; a quantized run: its int8
graph in ONNX Runtime); the ONNX Runtime path runs the float model exported to ONNX, or the int8 graph.
The goal for the seed model: a variant at least 2x faster at batch 64 and 3x smaller with at most 0.5 points of
test accuracy lost. Writes benchmarks/results/compress-<time>.json. ``--reuse`` measures again the compressed runs
already in --runs instead of compressing again.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
from datetime import datetime, timezone
from pathlib import Path

import onnxruntime
import torch

import kiln
from kiln.compress import compress, measure
from kiln.hardware import cpu_model
from kiln.run import Run
from kiln.rundir import RunDir

REPO = Path(__file__).resolve().parents[1]
EX = REPO / "examples"
# model -> (config, overrides of the original's training, [(variant name, compress options)])
PLANS = {
    # The example trains 1 epoch (96-97%); compressing adds epochs of training (fine-tuning, a student's), so the
    # original here trains 3 epochs: what it loses or gains is then compression's, not more training's.
    "mnist_seed": (EX / "mnist_seed.yaml", {"train.epochs": 3}, [
        ("prune 0.5", {"prune": 0.5, "finetune_epochs": 2}),
        ("int8 (dynamic)", {"quantize": "int8"}),
        ("int8-static", {"quantize": "int8-static"}),
        ("prune 0.5 + int8", {"prune": 0.5, "finetune_epochs": 2, "quantize": "int8"}),
        ("prune 0.75 + int8", {"prune": 0.75, "finetune_epochs": 2, "quantize": "int8"}),
        ("distill + int8", {"distill": EX / "students" / "mnist_seed.yaml", "quantize": "int8"}),
    ]),
    "german_credit": (EX / "german_credit.yaml", {}, [
        ("prune 0.5", {"prune": 0.5, "finetune_epochs": 10}),
        ("int8 (dynamic)", {"quantize": "int8"}),
        ("prune 0.5 + int8", {"prune": 0.5, "finetune_epochs": 10, "quantize": "int8"}),
        ("distill + int8", {"distill": EX / "students" / "german_credit.yaml", "quantize": "int8"}),
    ]),
}
GOAL = {"faster_batch_64": 2.0, "smaller": 3.0, "max_drop_points": 0.5}


def original(config: Path, overrides: dict, runs: Path) -> Path:
    path = runs / config.stem
    if (path / RunDir.RESULTS).is_file():
        print(f"reusing {path}", flush=True)
        return path
    shutil.rmtree(path, ignore_errors=True)
    kiln.train(config, {"train.threads": 1, **overrides}, out=path, live=False)
    return path


def bench(model: str, runs: Path, rounds: int, reuse: bool) -> dict:
    config, overrides, variants = PLANS[model]
    source = original(config, overrides, runs)
    rows = [{"variant": "original", "run": str(source), **measure.static_measures(Run.load(source))}]
    for name, options in variants:
        out = runs / f"{model}-{name.replace(' ', '').replace('+', '_').replace('(', '').replace(')', '')}"
        if reuse and (out / RunDir.COMPRESSION).is_file():
            print(f"reusing {out}", flush=True)
            report = json.loads((out / RunDir.COMPRESSION).read_text())
        else:
            shutil.rmtree(out, ignore_errors=True)
            print(f"\n== {model}: {name}", flush=True)
            report = compress(source, out=out, max_drop=100.0, latency=False, live=False, **options)
        last = report["steps"][-1]
        rows.append({"variant": name, "run": str(out), "options": {k: str(v) for k, v in options.items()},
                     "steps": report["steps"][1:],
                     **{k: last[k] for k in ("parameters", "file", "file_bytes", "test_accuracy", "test", "weights")}})
    print(f"\nmeasuring latency of {len(rows)} runs side by side, 1 thread, {rounds} rounds", flush=True)
    for row, lat in zip(rows, measure.latencies([Path(r["run"]) for r in rows], rounds=rounds), strict=True):
        row["latency"] = lat
    base = rows[0]
    for row in rows:
        row["accuracy_drop_points"] = round((base["test_accuracy"] - row["test_accuracy"]) * 100, 3)
        row["smaller"] = round(base["file_bytes"] / row["file_bytes"], 3)
        row["fewer_parameters"] = round(base["parameters"] / row["parameters"], 3)
        for b in ("batch_1", "batch_64"):
            for path in ("kiln", "onnxruntime"):
                ref, got = base["latency"][b].get(path), row["latency"][b].get(path)
                if ref and got:
                    row.setdefault("faster", {}).setdefault(b, {})[path] = round(ref["median_ms"] / got["median_ms"], 3)
        row["refused_at_max_drop_0.5"] = row["accuracy_drop_points"] > GOAL["max_drop_points"]
        row["meets_goal"] = (row.get("faster", {}).get("batch_64", {}).get("kiln", 0) >= GOAL["faster_batch_64"]
                             and row["smaller"] >= GOAL["smaller"]
                             and row["accuracy_drop_points"] <= GOAL["max_drop_points"])
    return {"config": str(config.relative_to(REPO)), "original_overrides": overrides, "rows": rows}


def _ms(row: dict, b: str, path: str) -> str:
    v = row["latency"][b].get(path)
    return f"{v['median_ms']:.2f} [{v['q1_ms']:.2f}-{v['q3_ms']:.2f}]" if v else "-"


def print_table(model: str, result: dict) -> None:
    print(f"\n{model} ({result['config']}); latency ms per batch: median [quartiles], 1 thread")
    print(f"{'variant':18s} {'params':>8s} {'file KB':>8s} {'smaller':>8s} {'test acc':>9s} {'drop pt':>8s} "
          f"{'b1 kiln':>20s} {'b1 ORT':>20s} {'b64 kiln':>22s} {'b64 ORT':>22s} {'b64 faster (kiln/ORT)':>22s}")
    for r in result["rows"]:
        f = r.get("faster", {}).get("batch_64", {})
        print(f"{r['variant']:18s} {r['parameters']:8,d} {r['file_bytes'] / 1024:8.1f} {r['smaller']:7.2f}x "
              f"{r['test_accuracy']:9.4f} {r['accuracy_drop_points']:8.2f} {_ms(r, 'batch_1', 'kiln'):>20s} "
              f"{_ms(r, 'batch_1', 'onnxruntime'):>20s} {_ms(r, 'batch_64', 'kiln'):>22s} "
              f"{_ms(r, 'batch_64', 'onnxruntime'):>22s} "
              f"{f.get('kiln', 0):>9.2f}x / {f.get('onnxruntime', 0):.2f}x{'  GOAL' if r['meets_goal'] else ''}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", default=str(REPO / "runs" / "bench_compress"), help="where the runs are written")
    ap.add_argument("--model", choices=list(PLANS), action="append", help="default: both")
    ap.add_argument("--rounds", type=int, default=15, help="latency rounds (each times every run once)")
    ap.add_argument("--reuse", action="store_true", help="reuse the compressed runs already in --runs (measure again)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    conditions = {"cpu": cpu_model(), "cores": os.cpu_count(), "threads": 1, "python": platform.python_version(),
                  "torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "kiln": kiln.__version__,
                  "command": " ".join(sys.argv)}
    print(f"{conditions['cpu']}, {conditions['cores']} cores, 1 thread; torch {torch.__version__}, onnxruntime "
          f"{onnxruntime.__version__}")
    runs = Path(args.runs)
    runs.mkdir(parents=True, exist_ok=True)
    report = {"args": {"model": args.model or list(PLANS), "rounds": args.rounds, "reuse": args.reuse},
              "conditions": conditions, "goal": GOAL, "models": {}}
    for model in args.model or list(PLANS):
        result = bench(model, runs, args.rounds, args.reuse)
        report["models"][model] = result
        print_table(model, result)
        if model == "mnist_seed":
            met = [r["variant"] for r in result["rows"] if r["meets_goal"]]
            print(f"goal (>= {GOAL['faster_batch_64']}x faster at batch 64 on kiln's predict path, >= "
                  f"{GOAL['smaller']}x smaller, <= {GOAL['max_drop_points']} points lost): "
                  + (f"met by {', '.join(met)}" if met else "not met"))
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = REPO / "benchmarks" / "results" / f"compress-{stamp}.json"
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"wrote {out}", flush=True)


if __name__ == "__main__":
    main()
