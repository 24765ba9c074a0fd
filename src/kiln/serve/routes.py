"""The small routes: what the model is, liveness, readiness and metrics.

Only the probes (``/healthz``, ``/readyz``) are open when an API key is set: metrics tell the traffic and
the model's name and version to whoever reads them, and Prometheus sends the key as a Bearer token."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response

from kiln.serve.auth import check_key
from kiln.serve.errors import ApiError, error_docs
from kiln.serve.metrics import CONTENT_TYPE
from kiln.serve.state import AppState


def add_routes(app: FastAPI, state: AppState) -> None:
    @app.get("/v1/model", summary="What the model is and takes", responses=error_docs(401))
    async def model(request: Request) -> dict[str, Any]:
        check_key(request, state.api_key)
        return state.model_info

    @app.get("/healthz", summary="The process is alive")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", summary="The model is loaded and warmed", responses=error_docs(503))
    async def readyz() -> dict[str, str]:
        if not state.ready:
            raise ApiError(503, "not_ready", "the model is not loaded yet, or the server is shutting down")
        return {"status": "ready"}

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response,
             responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}, **error_docs(401)})
    async def prometheus(request: Request) -> Response:
        check_key(request, state.api_key)
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)
