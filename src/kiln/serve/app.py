"""The FastAPI app of ``kiln serve``, built from a run directory alone, and the server that runs it.

Routes: ``POST /v1/predict`` (JSON instances or multipart image uploads), ``GET /v1/model``, for language
models OpenAI's ``POST /v1/completions`` and ``GET /v1/models`` (:mod:`~kiln.serve.completions`),
``GET /healthz`` (alive), ``GET /readyz`` (model loaded and warmed), ``GET /metrics`` (Prometheus).
Every client mistake is answered with a 4xx and a JSON body ``{"error": {"code", "message", "details"}}``.
The parts: :mod:`~kiln.serve.state` (what the app holds), :mod:`~kiln.serve.predict` and
:mod:`~kiln.serve.body` (the predict route and its body), :mod:`~kiln.serve.routes` (the small routes),
:mod:`~kiln.serve.errors`, :mod:`~kiln.serve.openapi`, :mod:`~kiln.serve.middleware`.
"""

from __future__ import annotations

import json
import os
from contextlib import asynccontextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from kiln.serve.body import BodyReader
from kiln.serve.completions import add_completion_routes
from kiln.serve.errors import error_docs, install_error_handlers
from kiln.serve.middleware import Metered
from kiln.serve.openapi import add_document_routes, complete_openapi, predict_body, request_model, response_model
from kiln.serve.predict import PredictRoute
from kiln.serve.routes import add_routes
from kiln.serve.settings import ServeSettings
from kiln.serve.state import build_state


def create_app(run_dir: str | Path, settings: ServeSettings | None = None, **overrides: Any) -> FastAPI:
    """The service for the run in ``run_dir``; the model is loaded now and warmed on startup."""
    settings = settings or ServeSettings()
    if overrides:
        settings = ServeSettings(**{**asdict(settings), **overrides})
    settings.check()
    state = build_state(run_dir, settings)
    request = request_model(state.adapter.instance_model(), settings.max_instances)
    body, defs = predict_body(request, state.adapter.accepts_files, settings.max_instances)
    predict = PredictRoute(state, BodyReader(state.adapter, request, settings.max_instances,
                                             settings.max_body_bytes))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.start()
        try:
            yield
        finally:
            state.stop()

    info = state.model_info
    app = FastAPI(title=f"kiln: {info['name']}", version=info["version"], lifespan=lifespan,
                  description=f"Predictions of the kiln run `{info['name']}` ({info['dataset']}, {info['task']}).",
                  openapi_url=None, docs_url=None, redoc_url=None)  # served by add_document_routes instead
    app.add_middleware(Metered, metrics=state.metrics, direct={("POST", "/v1/predict"): predict})
    install_error_handlers(app, state.metrics)
    app.add_api_route("/v1/predict", predict.answer, methods=["POST"], name="predict",
                      response_model=response_model(state.answers.prediction), summary=state.answers.summary,
                      responses=error_docs(400, 401, 413, 415, 422, 500, 503), openapi_extra={"requestBody": body})
    add_routes(app, state)
    if state.generation is not None:
        add_completion_routes(app, state, state.generation)
    add_document_routes(app, state.api_key)
    app.openapi = complete_openapi(app, defs, keyed=state.api_key is not None)  # type: ignore[method-assign]
    app.state.kiln = {"run": state.run, "settings": settings, "batcher": state.batcher, "metrics": state.metrics,
                      "generation": state.generation}
    return app


# ---- running it --------------------------------------------------------------------------------

SETTINGS_ENV = "KILN_SERVE_CONFIG"  # how worker processes (--workers > 1) get their settings


def app_from_env() -> FastAPI:
    """App factory for uvicorn worker processes: settings come as JSON in ``KILN_SERVE_CONFIG``."""
    spec = json.loads(os.environ[SETTINGS_ENV])
    return create_app(spec.pop("run_dir"), ServeSettings(**spec))


def serve(run_dir: str | Path, settings: ServeSettings | None = None, host: str = "127.0.0.1", port: int = 8000,
          workers: int = 1, graceful_timeout_s: int = 30, log_level: str = "info") -> None:
    """Run the service until SIGINT/SIGTERM; in-flight requests finish before it exits."""
    import uvicorn

    settings = settings or ServeSettings()
    common = {"host": host, "port": port, "timeout_graceful_shutdown": graceful_timeout_s,
              "log_level": log_level, "access_log": False}
    if workers > 1:
        os.environ[SETTINGS_ENV] = json.dumps({"run_dir": str(run_dir), **asdict(settings)})
        create_app(run_dir, settings)  # fail here, once, with a clear error rather than in each worker
        uvicorn.run("kiln.serve.app:app_from_env", factory=True, workers=workers, **common)
    else:
        uvicorn.run(create_app(run_dir, settings), **common)
