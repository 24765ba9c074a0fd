"""Shared by the serve, export and deploy tests: one small trained MNIST run and one table run per session,
a live server.

Kept in a module (not a fixture in each file) so the run is trained once however many files use it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
SMALL = {"data.limit_train": 3000, "data.limit_test": 500, "train.epochs": 1}
_cache: dict[str, object] = {}


def trained_run(tmp_path_factory) -> Path:
    """Path of a small trained seed_hybrid run (about 15 s to train, once per session)."""
    if "run" not in _cache:
        import kiln

        out = tmp_path_factory.mktemp("serve-run") / "mnist_seed"
        kiln.train(ROOT / "examples" / "mnist_seed.yaml", SMALL, out=out, live=False)
        _cache["run"] = out
    return _cache["run"]  # type: ignore[return-value]


def trained_table_run(tmp_path_factory) -> Path:
    """Path of a small binary table run (synthetic loans: numeric, partly missing, categorical and boolean
    columns; about 2 s to train, once per session). Its decision threshold is chosen for F1 on validation."""
    if "table" not in _cache:
        import kiln
        from test_tabular import synthetic_rows, tabular_config, write_csv

        root = tmp_path_factory.mktemp("serve-table")
        data = write_csv(root / "loans.csv", synthetic_rows())
        cfg = tabular_config(data, class_weights="auto", threshold_metric="f1", threads=1)
        kiln.train(cfg, out=root / "loans", live=False)
        _cache["table"] = root / "loans"
    return _cache["table"]  # type: ignore[return-value]


def exported_run(tmp_path_factory) -> Path:
    """The trained run with model.onnx written by kiln export (checked on its test split)."""
    run = trained_run(tmp_path_factory)
    if "export" not in _cache:
        from kiln.export import export_run

        _cache["export"] = export_run(run, "onnx")
    return run


def mnist_test_images(count: int):
    """(uint8 images (N, 28, 28), labels) from the real MNIST test split."""
    from kiln.data.mnist import load_mnist

    data = load_mnist()
    return data.test_images[:count].numpy(), data.test_labels[:count].numpy()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``python -m kiln serve ...`` in a subprocess on 127.0.0.1; stopped with SIGTERM."""

    def __init__(self, run: Path, *args: str, env: dict[str, str] | None = None, cwd: Path | None = None,
                 command: list[str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = command or [sys.executable, "-m", "kiln", "serve", str(run), "--port", str(self.port), *args]
        self.proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, cwd=cwd,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def wait_ready(self, timeout: float = 60.0) -> Server:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}: {self.proc.stdout.read()}")
            try:
                if httpx.get(self.url + "/readyz", timeout=1.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise AssertionError("server did not become ready")

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def stop(self, timeout: float = 30.0) -> tuple[int, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        return self.proc.returncode, out


@pytest.fixture(scope="session")
def serve_run(mnist_root, tmp_path_factory) -> Path:
    return trained_run(tmp_path_factory)


@pytest.fixture(scope="session")
def table_run(tmp_path_factory) -> Path:
    return trained_table_run(tmp_path_factory)
