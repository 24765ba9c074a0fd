"""kiln serve --workers N: several server processes, each with its own model, behind one port."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="needs the serve extra: pip install 'kiln[serve]'")

from test_serve_support import Server, mnist_test_images, serve_run  # noqa: E402,F401

import kiln  # noqa: E402


def _children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


@pytest.mark.slow  # starts three Python processes that each load torch
def test_two_workers_answer_like_the_run(serve_run):
    import httpx

    server = Server(serve_run, "--workers", "2").wait_ready(timeout=120)
    try:
        images, _ = mnist_test_images(12)
        expected = kiln.Run.load(serve_run).predict(images).numpy().argmax(1).tolist()
        got = []
        for img in images:  # a new connection each time: the kernel spreads them over the workers
            r = httpx.post(server.url + "/v1/predict", json={"instances": [{"pixels": img.tolist()}]}, timeout=30)
            assert r.status_code == 200, r.text
            got.append(r.json()["predictions"][0]["index"])
        assert got == expected
        spawned = [Path(f"/proc/{p}/cmdline").read_bytes() for p in _children(server.proc.pid)]
        assert sum(b"spawn_main" in cmd for cmd in spawned) == 2, spawned  # two workers (and a resource tracker)
    finally:
        code, out = server.stop()
    assert "Application shutdown complete" in out or code in (0, -15), out
