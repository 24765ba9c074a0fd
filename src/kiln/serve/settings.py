"""The settings of one served run (``kiln serve`` flags), checked before anything is loaded."""

from __future__ import annotations

from dataclasses import dataclass

from kiln.errors import KilnError
from kiln.hardware import usable_cpus


@dataclass
class ServeSettings:
    backend: str = "torch"  # torch | onnx
    max_batch: int = 64  # rows per forward pass
    max_wait_ms: float = 2.0  # longest a request waits for others to share its batch
    max_instances: int = 256  # per request (JSON instances or uploaded files)
    max_body_bytes: int = 8 * 1024 * 1024
    max_queue_rows: int = 4096  # beyond this, requests get 503 with Retry-After
    # Language models, POST /v1/completions: tokens (prompt + max_tokens) of the requests queued or being written;
    # beyond this, requests get 503 with Retry-After. max_batch is then the most texts decoded together.
    max_queue_tokens: int = 65536
    api_key_env: str | None = None  # name of the environment variable that holds the API key
    # Intra-op threads of the backend; auto: the CPUs this process may use (affinity, a container's quota) less
    # one for the event loop. On a busy 2-core machine a batch-1 forward took 109 ms with 2 torch threads against
    # 0.8 ms with 1 (oversubscribed thread pools).
    threads: int | str = "auto"

    def backend_threads(self) -> tuple[int, str]:
        """(threads, why) for the backend."""
        if self.threads != "auto":
            return int(self.threads), "set with --threads"
        usable, why = usable_cpus()
        return max(1, usable - 1), f"auto: {usable} usable ({why}), one left for the event loop"

    def check(self) -> None:
        if self.backend not in ("torch", "onnx"):
            raise KilnError(f"--backend must be torch or onnx, not {self.backend!r}")
        for name in ("max_batch", "max_instances", "max_body_bytes", "max_queue_rows", "max_queue_tokens"):
            if getattr(self, name) < 1:
                raise KilnError(f"{name} must be at least 1, not {getattr(self, name)}")
        if self.threads != "auto" and not (isinstance(self.threads, int) and self.threads >= 1):
            raise KilnError(f"--threads must be auto or at least 1, not {self.threads!r}")
        if not 0 <= self.max_wait_ms <= 1000:
            raise KilnError(f"max_wait_ms must be in [0, 1000], not {self.max_wait_ms}")
