"""The settings of one served run (``kiln serve`` flags), checked before anything is loaded."""

from __future__ import annotations

from dataclasses import dataclass

from kiln.errors import KilnError


@dataclass
class ServeSettings:
    backend: str = "torch"  # torch | onnx
    max_batch: int = 64  # rows per forward pass
    max_wait_ms: float = 2.0  # longest a request waits for others to share its batch
    max_instances: int = 256  # per request (JSON instances or uploaded files)
    max_body_bytes: int = 8 * 1024 * 1024
    max_queue_rows: int = 4096  # beyond this, requests get 503 with Retry-After
    api_key_env: str | None = None  # name of the environment variable that holds the API key
    # Intra-op threads of the backend. One: the event loop needs a core too, and on a busy 2-core machine a
    # batch-1 forward took 109 ms with 2 torch threads against 0.8 ms with 1 (oversubscribed thread pools).
    threads: int | None = 1

    def check(self) -> None:
        if self.backend not in ("torch", "onnx"):
            raise KilnError(f"--backend must be torch or onnx, not {self.backend!r}")
        for name in ("max_batch", "max_instances", "max_body_bytes", "max_queue_rows"):
            if getattr(self, name) < 1:
                raise KilnError(f"{name} must be at least 1, not {getattr(self, name)}")
        if not 0 <= self.max_wait_ms <= 1000:
            raise KilnError(f"max_wait_ms must be in [0, 1000], not {self.max_wait_ms}")
