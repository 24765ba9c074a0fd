"""Load benchmark of `kiln serve` (torch and onnx backends) against a plain FastAPI endpoint.

Each server runs in its own process on 127.0.0.1; a closed-loop load generator (asyncio, raw HTTP/1.1
keep-alive connections, in this process) keeps C requests in flight for the measured duration at
each concurrency C. Every request is one real MNIST test digit as a JSON pixel array. The plain
endpoint is what one writes without kiln: a sync FastAPI route that calls the PyTorch model per request.

    python benchmarks/bench_serve.py --run runs/mnist_seed            # 20 s per point, C = 1, 8, 64
    python benchmarks/bench_serve.py --duration 5 --concurrency 1 64  # quicker

Without --run it trains a small seed_hybrid run first (needs MNIST via KILN_DATA or the cache).
Prints hardware, versions and settings with the results; writes them as JSON (--out).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from pydantic import BaseModel

ROOT = Path(__file__).resolve().parent.parent


# ---- the plain baseline server (run as a subprocess: --plain-server RUN PORT) ------------------


class PlainInstance(BaseModel):
    pixels: list[list[float]]


class PlainRequest(BaseModel):  # at module level: FastAPI resolves the (string) annotation from here
    instances: list[PlainInstance]


def plain_server(run_dir: str, port: int) -> None:
    import torch
    import uvicorn
    from fastapi import FastAPI

    import kiln

    torch.set_num_threads(1)  # as kiln serve does: with 2 threads on 2 busy cores a forward was 100x slower
    run = kiln.Run.load(run_dir)
    app = FastAPI()

    @app.post("/v1/predict")
    def predict(req: PlainRequest):  # sync: FastAPI runs it on its thread pool, one model call per request
        x = torch.tensor([inst.pixels for inst in req.instances], dtype=torch.float32).round().to(torch.uint8)
        probs = run.predict(x)
        return {"predictions": [{"index": int(p.argmax()), "probabilities": p.tolist()} for p in probs]}

    @app.get("/readyz")
    def ready():
        return {"status": "ready"}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


# ---- load generator ----------------------------------------------------------------------------


async def _worker(port: int, request: bytes, deadline: float, latencies: list, errors: list) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            await reader.readexactly(length)
            if status == 200:
                latencies.append(time.perf_counter() - start)
            else:
                errors.append(status)
    except (ConnectionError, asyncio.IncompleteReadError) as e:
        errors.append(type(e).__name__)
    finally:
        writer.close()


async def _load(port: int, request: bytes, concurrency: int, seconds: float) -> tuple[list, list, float]:
    latencies: list[float] = []
    errors: list = []
    start = time.perf_counter()
    await asyncio.gather(*(_worker(port, request, start + seconds, latencies, errors) for _ in range(concurrency)))
    return latencies, errors, time.perf_counter() - start


def measure(port: int, body: bytes, concurrency: int, seconds: float, warmup: float) -> dict:
    request = (f"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    asyncio.run(_load(port, request, concurrency, warmup))
    latencies, errors, elapsed = asyncio.run(_load(port, request, concurrency, seconds))
    lat = np.array(latencies) * 1000
    return {"concurrency": concurrency, "seconds": round(elapsed, 2), "requests": len(latencies),
            "rps": round(len(latencies) / elapsed, 1),
            "p50_ms": round(float(np.percentile(lat, 50)), 2) if len(lat) else None,
            "p99_ms": round(float(np.percentile(lat, 99)), 2) if len(lat) else None,
            "errors": len(errors), "error_kinds": sorted({str(e) for e in errors})}


# ---- orchestration -----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], port: int) -> subprocess.Popen:
    import httpx

    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server {cmd} exited: {proc.stderr.read()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"server {cmd} did not become ready")


def environment() -> dict:
    import fastapi
    import onnxruntime
    import torch
    import uvicorn

    import kiln

    from kiln.hardware import cpu_model

    return {"cpu": cpu_model(), "cores": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "onnxruntime": onnxruntime.__version__,
            "fastapi": fastapi.__version__, "uvicorn": uvicorn.__version__, "kiln": kiln.__version__,
            "load_average_at_start": os.getloadavg()}


def ensure_run(run: str | None) -> Path:
    if run:
        return Path(run)
    import kiln

    out = Path(tempfile.mkdtemp(prefix="bench-serve-")) / "mnist_seed"
    print(f"training a small seed_hybrid run in {out} ...", flush=True)
    kiln.train(ROOT / "examples" / "mnist_seed.yaml", {"data.limit_train": 6000, "data.limit_test": 1000},
               out=out, live=False)
    return out


def digit_body() -> bytes:
    try:
        from kiln.data.mnist import load_mnist

        image = load_mnist().test_images[0].numpy()
    except Exception:  # no MNIST here: a random image measures the same work
        image = np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)
    return json.dumps({"instances": [{"pixels": image.tolist()}]}, separators=(",", ":")).encode()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", help="run directory (default: train a small one)")
    p.add_argument("--duration", type=float, default=20.0, help="measured seconds per point (default 20)")
    p.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before each point")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--servers", nargs="+", default=["kiln-torch", "kiln-onnx", "plain-fastapi"],
                   choices=["kiln-torch", "kiln-onnx", "plain-fastapi"])
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--max-wait-ms", type=float, default=2.0)
    p.add_argument("--out", help="JSON results (default: benchmarks/results/serve-<UTC time>.json)")
    p.add_argument("--plain-server", nargs=2, metavar=("RUN", "PORT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.plain_server:
        return plain_server(args.plain_server[0], int(args.plain_server[1]))

    run = ensure_run(args.run)
    if "kiln-onnx" in args.servers and not (run / "model.onnx").is_file():
        from kiln.export import export_run

        print(f"exporting {run} to ONNX: {export_run(run)}", flush=True)
    env = environment()
    settings = {"duration_s": args.duration, "warmup_s": args.warmup, "concurrency": args.concurrency,
                "max_batch": args.max_batch, "max_wait_ms": args.max_wait_ms, "run": str(run),
                "payload": "one MNIST digit as JSON pixels (28x28 uint8)", "load_generator":
                "closed loop, asyncio raw HTTP/1.1 keep-alive, one process, loopback"}
    print(json.dumps({"environment": env, "settings": settings}, indent=1), flush=True)
    body = digit_body()
    results = []
    for name in args.servers:
        port = free_port()
        if name == "plain-fastapi":
            cmd = [sys.executable, __file__, "--plain-server", str(run), str(port)]
        else:
            cmd = [sys.executable, "-m", "kiln", "serve", str(run), "--port", str(port), "--backend", name[5:],
                   "--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms)]
        proc = start(cmd, port)
        try:
            for c in args.concurrency:
                r = {"server": name, **measure(port, body, c, args.duration, args.warmup)}
                results.append(r)
                print(f"{name:14s} c={c:<3d} {r['rps']:8.1f} req/s  p50 {r['p50_ms']} ms  p99 {r['p99_ms']} ms  "
                      f"errors {r['errors']}", flush=True)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    print(f"\n{'server':14s} {'conc':>4s} {'req/s':>9s} {'p50 ms':>8s} {'p99 ms':>8s} {'errors':>6s}")
    for r in results:
        print(f"{r['server']:14s} {r['concurrency']:4d} {r['rps']:9.1f} {r['p50_ms']!s:>8s} {r['p99_ms']!s:>8s} "
              f"{r['errors']:6d}")
    by = {(r["server"], r["concurrency"]): r for r in results}
    top = max(args.concurrency)
    if ("plain-fastapi", top) in by:
        for name in ("kiln-torch", "kiln-onnx"):
            if (name, top) in by and by[("plain-fastapi", top)]["rps"]:
                print(f"{name} / plain at c={top}: {by[(name, top)]['rps'] / by[('plain-fastapi', top)]['rps']:.1f}x "
                      "requests/s")
    out = Path(args.out) if args.out else (Path(__file__).resolve().parent / "results" /
                                           f"serve-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"environment": env, "settings": settings, "results": results}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
