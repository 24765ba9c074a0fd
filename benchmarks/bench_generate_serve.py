"""Generation throughput of `kiln serve` on a language model: tokens/s of OpenAI's `POST /v1/completions`
(continuous batching, per-request key/value caches) at concurrency 1 and 16, side by side with generating one
request at a time (`Run.generate` in a loop in this process: the KV-cached decoder, no server), and kiln's own
`POST /v1/predict` at concurrency 16 (the same engine).

    KILN_DATA=../shared/data python benchmarks/bench_generate_serve.py            # 32 requests of 128 tokens
    python benchmarks/bench_generate_serve.py --requests 16 --max-tokens 64 --run runs/shakespeare_char_256

Without --run it trains examples/shakespeare_char.yaml briefly with a longer context (--context, --steps: the
weights only need to write plausible text; throughput does not depend on them). The server runs in its own
process on 127.0.0.1 with 1 thread; a closed-loop load generator (httpx, asyncio) in this process keeps C
requests in flight. Every system is measured once per round, interleaved (--rounds, median). Every request samples (temperature 0.8) with its own seed, so the texts served are checked
against `Run.generate` with the same seed. Prints hardware and ratios; writes
benchmarks/results/generate_serve-<UTC time>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


def train_run(out: Path, context: int, steps: int) -> Path:
    import kiln

    overrides = {"data.context": context, "train.steps": steps, "train.eval_every": steps, "train.eval_batches": 2,
                 "train.checkpoint_every": steps, "train.threads": 1}
    kiln.train(ROOT / "examples" / "shakespeare_char.yaml", overrides, out=out, live=False)
    return out


def requests_of(run, n: int, max_tokens: int) -> list[dict]:
    text = run.kind.text if run.kind.cfg.path else "ROMEO:\nJULIET:\n"
    lines = [line for line in text.splitlines() if 3 <= len(line) <= 40][:n * 7: 7] or ["ROMEO:"]
    return [{"prompt": lines[i % len(lines)], "max_tokens": max_tokens, "temperature": 0.8, "seed": i}
            for i in range(n)]


class Server:
    def __init__(self, run: Path) -> None:
        from test_serve_support import free_port

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "kiln", "serve", str(run), "--port", str(self.port),
                                      "--threads", "1"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def __enter__(self) -> Server:
        import httpx

        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"the server exited: {self.proc.stdout.read()}")
            try:
                if httpx.get(self.url + "/readyz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise SystemExit("the server did not become ready")

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        self.proc.communicate(timeout=60)


async def load(url: str, route: str, bodies: list[dict], concurrency: int) -> tuple[list[str], float]:
    """Every body sent with ``concurrency`` in flight: the texts (in order) and the wall seconds."""
    import httpx

    texts: list[str] = [""] * len(bodies)
    todo = iter(range(len(bodies)))

    async def worker(client):
        for i in todo:
            r = await client.post(url + route, json=bodies[i])
            r.raise_for_status()
            doc = r.json()
            texts[i] = doc["choices"][0]["text"] if route == "/v1/completions" else doc["predictions"][0]["text"]

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        return texts, time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", help="a trained language-model run (default: train one briefly)")
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    p.add_argument("--rounds", type=int, default=2, help="every system measured once per round, interleaved")
    p.add_argument("--context", type=int, default=256, help="data.context of the run trained without --run")
    p.add_argument("--steps", type=int, default=30, help="training steps of the run trained without --run")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args()

    import torch

    import kiln
    from kiln.hardware import cpu_model

    torch.set_num_threads(1)  # as the server (--threads 1): the same arithmetic on both sides
    tmp = tempfile.TemporaryDirectory()
    run_dir = Path(args.run) if args.run else train_run(Path(tmp.name) / "lm", args.context, args.steps)
    run = kiln.Run.load(run_dir)
    bodies = requests_of(run, args.requests, args.max_tokens)
    name = run.config.name
    tokens_of = len if run.kind.tokenizer.kind == "char" else (lambda t: len(run.kind.tokenizer.encode(t)))

    expected = [run.generate(b["prompt"], b["max_tokens"], temperature=b["temperature"], seed=b["seed"])
                for b in bodies]  # also warms this process up
    top = max(args.concurrency)
    points = [("Run.generate", 1)] + [("/v1/completions", c) for c in args.concurrency] + [("/v1/predict", top)]
    seconds: dict = {p: [] for p in points}
    identical: dict = {p: [] for p in points}
    tokens = sum(tokens_of(t) for t in expected)
    with Server(run_dir) as server:
        asyncio.run(load(server.url, "/v1/completions", [{**bodies[0], "model": name, "max_tokens": 4}], 1))  # warm
        for round_ in range(args.rounds):  # interleaved, so a change in the machine's load hits every system
            for route, c in points:
                if route == "Run.generate":
                    start = time.perf_counter()
                    texts = [run.generate(b["prompt"], b["max_tokens"], temperature=b["temperature"],
                                          seed=b["seed"]) for b in bodies]
                    took = time.perf_counter() - start
                else:
                    sent = ([{**b, "model": name} for b in bodies] if route == "/v1/completions" else
                            [{"instances": [{"prompt": b["prompt"], "max_new_tokens": b["max_tokens"],
                                             "temperature": b["temperature"], "seed": b["seed"]}]} for b in bodies])
                    texts, took = asyncio.run(load(server.url, route, sent, c))
                seconds[route, c].append(took)
                identical[route, c].append(sum(t == e for t, e in zip(texts, expected, strict=True)))
                print(f"round {round_ + 1}: {route} at concurrency {c}: {tokens / took:,.0f} tokens/s; "
                      f"{identical[route, c][-1]}/{len(texts)} texts identical to Run.generate's", flush=True)
    systems = {"Run.generate": "Run.generate, one request at a time (in process, no server)",
               "/v1/completions": "kiln serve /v1/completions (continuous batching)",
               "/v1/predict": "kiln serve /v1/predict (kiln's own route, on the same engine)"}
    results = []
    for route, c in points:
        median = statistics.median(seconds[route, c])
        results.append({"system": systems[route], "route": route, "concurrency": c, "seconds": seconds[route, c],
                        "tokens": tokens, "tokens_per_s": tokens / median,
                        "identical": None if route == "Run.generate" else min(identical[route, c])})

    base = results[0]["tokens_per_s"]
    for r in results:
        r["vs_one_at_a_time"] = r["tokens_per_s"] / base
    for r in results:
        print(f"{r['system']} at concurrency {r['concurrency']}: {r['tokens_per_s']:,.0f} tokens/s (median of "
              f"{args.rounds}), {r['vs_one_at_a_time']:.2f}x one at a time")
    batched = next(r for r in results if r["route"] == "/v1/completions" and r["concurrency"] == top)
    predict = next(r for r in results if r["route"] == "/v1/predict")
    print(f"\n/v1/completions at concurrency {top}: {batched['vs_one_at_a_time']:.2f}x the tokens/s of one request at "
          f"a time (Run.generate); kiln's /v1/predict at the same concurrency: {predict['vs_one_at_a_time']:.2f}x")
    hardware = {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
                "torch": torch.__version__, "kiln": kiln.__version__, "threads": 1,
                "load_average_at_start": list(os.getloadavg())}
    print(f"hardware: {hardware}")
    model = {"name": name, "parameters": run.manifest.get("parameters"), "context": run.model.input_shape[0],
             "blocks": [b.type for b in run.config.blocks]}
    doc = {"args": {"requests": args.requests, "rounds": args.rounds, "max_tokens": args.max_tokens, "concurrency": args.concurrency,
                    "run": args.run, "context": args.context, "steps": args.steps},
           "model": model, "results": results, "hardware": hardware,
           "speedup": {"completions_vs_one_at_a_time": batched["vs_one_at_a_time"],
                       "completions_vs_predict": batched["tokens_per_s"] / predict["tokens_per_s"]}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"generate_serve-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.json"
    tmp_path = path.with_suffix(".tmp")
    tmp_path.write_text(json.dumps(doc, indent=2) + "\n")
    tmp_path.replace(path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
