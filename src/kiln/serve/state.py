"""What an app holds while it serves one run: the run, its input adapter and answers, the backend, the
batcher, the metrics, the API key and whether it is ready."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kiln.data.requests import InputAdapter
from kiln.errors import KilnError
from kiln.run import Run
from kiln.rundir import RunDir
from kiln.serve.auth import api_key_from_env
from kiln.serve.backends import make_backend
from kiln.serve.batcher import MicroBatcher
from kiln.serve.fairness import with_group_thresholds
from kiln.serve.generation import EngineBatcher, GenerationEngine
from kiln.serve.metrics import ServeMetrics
from kiln.serve.outputs import answers_for
from kiln.serve.settings import ServeSettings


@dataclass
class AppState:
    run: Run
    settings: ServeSettings
    api_key: str | None
    adapter: InputAdapter
    answers: Any  # kiln.serve.outputs: ClassAnswers, ValueAnswers or TextAnswers
    example: np.ndarray | None  # one typical input batch: traces and warms the backend
    batcher: MicroBatcher | EngineBatcher  # the engine's, for language models
    metrics: ServeMetrics
    model_ref: dict[str, str]  # name, version, backend: in every answer
    model_info: dict[str, Any]  # GET /v1/model
    ready: bool = False  # loaded and warmed, and not shutting down
    generation: GenerationEngine | None = None  # language-model runs: both routes generate on it (the batcher's)

    def start(self) -> None:
        """Start the batch worker and warm the model; the app is ready after this."""
        self.batcher.start(warmup=self.example)  # a language model's: its generation engine
        mode = self.batcher.backend.mode
        self.model_info["serving"]["runtime"] = mode
        serving = self.model_info["serving"]
        logging.getLogger("uvicorn.error").info("kiln: serving %s with %s, %d threads (%s)", self.run.config.name, mode,
                                                serving["threads"], serving["threads_reason"])
        self.ready = True

    def stop(self) -> None:
        self.ready = False
        self.batcher.stop()  # uvicorn has finished in-flight requests before this runs


def build_state(run_dir: str | Path, settings: ServeSettings) -> AppState:
    """The state for the run in ``run_dir``: the model is loaded now and warmed by :meth:`AppState.start`.

    The one place that asks what kind of data the run has (its inputs, answers and backend)."""
    api_key = api_key_from_env(settings.api_key_env)
    run = Run.load(run_dir)
    adapter = run.kind.inputs()
    answers = answers_for(run)
    example = adapter.example()
    threads, threads_reason = settings.backend_threads()
    backend = make_backend(settings.backend, run, threads, example)
    adapter, answers, backend, example = with_group_thresholds(run, adapter, answers, backend, example)
    metrics = ServeMetrics(lambda: batcher.waiting_rows)
    batcher = MicroBatcher(backend, settings.max_batch, settings.max_wait_ms / 1000, settings.max_queue_rows,
                           on_batch=metrics.batch)
    generation = None
    if run.kind.task == "lm":  # both routes generate on one engine (continuous batching)
        generation = GenerationEngine(run, settings.max_batch, settings.max_queue_tokens, on_step=metrics.decode_step,
                                      threads=threads)
        batcher = EngineBatcher(generation)
    model_ref = {"name": run.config.name, "version": _weights_version(run), "backend": backend.name}
    try:
        metrics_at_training = run.metrics
    except KilnError:
        metrics_at_training = {}
    model_info = {
        **model_ref, "dataset": run.kind.name, "task": run.kind.task,
        "inputs": adapter.describe(),
        "outputs": answers.describe(),
        "metrics": metrics_at_training,
        "parameters": run.manifest.get("parameters"),
        "serving": {"max_batch": settings.max_batch, "max_wait_ms": settings.max_wait_ms,
                    "max_instances": settings.max_instances, "max_body_bytes": settings.max_body_bytes,
                    "threads": threads, "threads_reason": threads_reason},
    }
    if generation is not None:
        model_info["serving"] |= {"max_queue_tokens": settings.max_queue_tokens, "completions": generation.mode}
    return AppState(run, settings, api_key, adapter, answers, example, batcher, metrics, model_ref, model_info,
                    generation=generation)


def _weights_version(run: Run) -> str:
    digest = hashlib.sha256((run.dir / RunDir.WEIGHTS).read_bytes()).hexdigest()
    return digest[:12]
