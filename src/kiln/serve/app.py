"""The FastAPI app of ``kiln serve``, built from a run directory alone.

Routes: ``POST /v1/predict`` (JSON instances or multipart image uploads), ``GET /v1/model``,
``GET /healthz`` (alive), ``GET /readyz`` (model loaded and warmed), ``GET /metrics`` (Prometheus).
Every client mistake is answered with a 4xx and a JSON body ``{"error": {"code", "message", "details"}}``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import time
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model
from starlette.exceptions import HTTPException as StarletteHTTPException

from kiln.errors import InputError, KilnError
from kiln.run import Run
from kiln.rundir import RunDir
from kiln.serve.backends import make_backend
from kiln.serve.batcher import MicroBatcher, Overloaded
from kiln.serve.metrics import ServeMetrics
from kiln.serve.outputs import answers_for

JSON_TYPE = "application/json"
MULTIPART_TYPE = "multipart/form-data"
ROUTES = ("/v1/predict", "/v1/model", "/healthz", "/readyz", "/metrics", "/openapi.json", "/docs")


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


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, details: list | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.details, self.headers = status, code, message, details, headers


# ---- documented response bodies (for /openapi.json) ---------------------------------------------


class ErrorInfo(BaseModel):
    code: str = Field(description="machine-readable kind, e.g. invalid_json, invalid_input, body_too_large")
    message: str
    details: list[dict[str, Any]] | None = None


class ErrorBody(BaseModel):
    error: ErrorInfo


class ModelRef(BaseModel):
    name: str
    version: str
    backend: str


def _error_response(err: ApiError) -> JSONResponse:
    body: dict[str, Any] = {"code": err.code, "message": err.message}
    if err.details is not None:
        body["details"] = err.details
    return JSONResponse({"error": body}, status_code=err.status, headers=err.headers)


def _error_docs(*codes: int) -> dict[int | str, dict[str, Any]]:
    words = {400: "malformed request (e.g. invalid JSON)", 401: "missing or wrong API key",
             404: "no such route", 413: "body over the size limit", 415: "unsupported content type",
             422: "well-formed but invalid input (shape, type, range, undecodable image, too many instances)",
             503: "not ready, or overloaded (retry later)"}
    return {c: {"model": ErrorBody, "description": words[c]} for c in codes}


def _weights_version(run: Run) -> str:
    digest = hashlib.sha256((run.path / RunDir.WEIGHTS).read_bytes()).hexdigest()
    return digest[:12]


def _validation_details(e: ValidationError) -> list[dict[str, Any]]:
    errors = e.errors(include_url=False, include_context=False, include_input=False)
    return [{"loc": _location(err["loc"]), "type": err["type"], "msg": err["msg"]} for err in errors[:20]]


def _location(loc: tuple) -> str:
    """``instances.3.age``. Pydantic names union members in locations: by their tag ("pixels-instance"), and
    below an instance's field by their type ("bool", "constrained-str": a boolean column takes true/false or a
    string). Users know only the fields, and below a field only list positions (``pixels.0.27``)."""
    parts = [str(p) for p in loc if not str(p).endswith("-instance")]
    return ".".join(p for k, p in enumerate(parts) if k < 3 or p.isdigit()) or "(body)"


class _Metered:
    """ASGI middleware: count every HTTP request and time it, by route (unknown paths as 'other').

    Routes in ``direct`` ((method, path) to ``async handler(request) -> response``) are answered here,
    past FastAPI's routing and dependency layers: for ``POST /v1/predict`` under load those took a
    quarter of the server's time. FastAPI still documents them."""

    def __init__(self, app, metrics: ServeMetrics, direct: dict | None = None) -> None:
        self.app, self.metrics, self.direct = app, metrics, direct or {}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = 500

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            handler = self.direct.get((scope["method"], scope["path"]))
            if handler is None:
                await self.app(scope, receive, send_status)
            else:
                response = await handler(Request(scope, receive))
                await response(scope, receive, send_status)
        finally:
            route = scope["path"] if scope["path"] in ROUTES else "other"
            self.metrics.request(route, status, time.perf_counter() - start)


def create_app(run_dir: str | Path, settings: ServeSettings | None = None, **overrides: Any) -> FastAPI:
    """The service for the run in ``run_dir``; the model is loaded now and warmed on startup."""
    settings = settings or ServeSettings()
    if overrides:
        settings = ServeSettings(**{**asdict(settings), **overrides})
    settings.check()
    api_key = None
    if settings.api_key_env:
        api_key = os.environ.get(settings.api_key_env)
        if not api_key:
            raise KilnError(f"--api-key-env {settings.api_key_env}: that environment variable is unset or empty")

    run = Run.load(run_dir)
    adapter = run.kind.inputs()
    answers = answers_for(run)
    example = adapter.example()
    backend = make_backend(settings.backend, run, settings.threads, example)
    version = _weights_version(run)
    model_ref = {"name": run.config.name, "version": version, "backend": backend.name}
    instance = adapter.instance_model()
    request_model = create_model(
        "PredictRequest", __config__=ConfigDict(extra="forbid"),
        instances=(list[instance], Field(min_length=1, max_length=settings.max_instances,
                                         description=f"1 to {settings.max_instances} inputs")),
    )
    response_model = create_model("PredictResponse", model=(ModelRef, ...),
                                  predictions=(list[answers.prediction], Field(description="one per instance")))
    media_types = (JSON_TYPE, MULTIPART_TYPE) if adapter.accepts_files else (JSON_TYPE,)
    state = {"ready": False}
    metrics = ServeMetrics(lambda: batcher.waiting_rows)
    batcher = MicroBatcher(backend, settings.max_batch, settings.max_wait_ms / 1000, settings.max_queue_rows,
                           on_batch=metrics.batch)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start(warmup=example)
        model_info["serving"]["runtime"] = backend.mode
        logging.getLogger("uvicorn.error").info("kiln: serving %s with %s", run.config.name, backend.mode)
        state["ready"] = True
        try:
            yield
        finally:
            state["ready"] = False
            batcher.stop()  # uvicorn has finished in-flight requests before this runs

    app = FastAPI(title=f"kiln: {run.config.name}", version=version, lifespan=lifespan,
                  description=f"Predictions of the kiln run `{run.config.name}` ({run.kind.name}, "
                              f"{run.kind.task}).")
    direct: dict = {}  # filled below, before the first request builds the middleware
    app.add_middleware(_Metered, metrics=metrics, direct=direct)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, err: ApiError):
        metrics.error(err.code)
        return _error_response(err)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code, "http_error")
        metrics.error(code)
        return _error_response(ApiError(err.status_code, code, str(err.detail), headers=err.headers))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, err: RequestValidationError):
        metrics.error("invalid_request")
        details = [{"loc": ".".join(map(str, e.get("loc", ()))), "type": e.get("type"), "msg": e.get("msg")}
                   for e in err.errors()[:20]]
        return _error_response(ApiError(422, "invalid_request", "the request is invalid", details))

    @app.exception_handler(Exception)
    async def _server_error(request: Request, err: Exception):
        metrics.error("internal")
        return _error_response(ApiError(500, "internal", f"internal error: {type(err).__name__}"))

    async def answer_directly(route, request: Request) -> Response:
        try:
            return await route(request)
        except ApiError as err:
            return await _api_error(request, err)
        except Exception as err:  # noqa: BLE001 - a server fault, answered like FastAPI's handler does
            return await _server_error(request, err)

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("x-api-key") or ""
        auth = request.headers.get("authorization") or ""
        if not given and auth.lower().startswith("bearer "):
            given = auth[7:].strip()
        if not hmac.compare_digest(given.encode("utf-8", "replace"), api_key.encode()):
            raise ApiError(401, "unauthorized", "missing or wrong API key (send it as X-API-Key or "
                                                "Authorization: Bearer)", headers={"WWW-Authenticate": "Bearer"})

    async def read_body(request: Request) -> bytes:
        limit = settings.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            raise ApiError(413, "body_too_large", f"the body is over the limit of {limit} bytes")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, "body_too_large", f"the body is over the limit of {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    async def read_files(request: Request, body: bytes) -> list[tuple[str, bytes]]:
        async def replay():
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            form = await Request(request.scope, replay).form(
                max_files=settings.max_instances, max_fields=settings.max_instances,
                max_part_size=settings.max_body_bytes)
        except (StarletteHTTPException, ValueError, KeyError, AssertionError) as e:
            reason = str(getattr(e, "detail", None) or e)
            if reason.startswith("Too many files"):
                raise ApiError(422, "too_many_instances", f"at most {settings.max_instances} files") from None
            raise ApiError(400, "invalid_multipart", f"the multipart body could not be parsed: {reason}") from None
        try:
            unknown = sorted({k for k in form.keys() if k != "files"})
            if unknown:
                raise ApiError(422, "invalid_request", f"unknown form fields {unknown}; send images in the "
                                                       "field `files`")
            files = []
            for i, item in enumerate(form.getlist("files")):
                if isinstance(item, str):
                    raise ApiError(422, "invalid_input", f"files.{i} is a text field, not an uploaded file")
                files.append((item.filename or f"file {i}", await item.read()))
        finally:
            await form.close()
        if not files:
            raise ApiError(422, "invalid_request", "no files: send one or more images in the form field `files`")
        if len(files) > settings.max_instances:
            raise ApiError(422, "too_many_instances", f"{len(files)} files; at most {settings.max_instances}")
        return files

    content: dict[str, Any] = {
        JSON_TYPE: {"schema": request_model.model_json_schema(ref_template="#/components/schemas/{model}")}}
    if adapter.accepts_files:
        content[MULTIPART_TYPE] = {"schema": {
            "type": "object", "required": ["files"], "additionalProperties": False,
            "properties": {"files": {"type": "array", "minItems": 1, "maxItems": settings.max_instances,
                                     "items": {"type": "string", "format": "binary"}}}}}
    predict_body = {"required": True, "content": content}
    defs = content[JSON_TYPE]["schema"].pop("$defs", {})

    @app.post("/v1/predict", response_model=response_model, summary=answers.summary,
              responses=_error_docs(400, 401, 413, 415, 422, 503),
              openapi_extra={"requestBody": predict_body})
    async def predict(request: Request):
        check_key(request)
        if not state["ready"]:
            raise ApiError(503, "not_ready", "the model is not loaded yet", headers={"Retry-After": "1"})
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype not in media_types:
            raise ApiError(415, "unsupported_media_type",
                           f"content type {ctype or '(none)'!r}: send {' or '.join(media_types)}")
        with batcher.arriving():
            batch = await read_batch(request, ctype)
        try:
            results = await batcher.predict(batch)
        except Overloaded as e:
            raise ApiError(503, "overloaded", f"the server is busy ({e}); retry later",
                           headers={"Retry-After": "1"}) from None
        try:
            predictions = answers.answer(results)
        except InputError as e:
            raise ApiError(422, "invalid_input", str(e), [{"loc": e.where, "msg": e.message}]) from None
        return Response(orjson.dumps({"model": model_ref, "predictions": predictions}), media_type=JSON_TYPE)

    direct[("POST", "/v1/predict")] = lambda request: answer_directly(predict, request)

    def fast_batch(body: bytes) -> np.ndarray | None:
        """The batch of a plainly valid JSON body without the per-number schema check, else None."""
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError:
            return None
        if not (isinstance(doc, dict) and doc.keys() == {"instances"} and isinstance(doc["instances"], list)
                and 1 <= len(doc["instances"]) <= settings.max_instances):
            return None
        return adapter.from_json(doc["instances"])

    async def read_batch(request: Request, ctype: str) -> np.ndarray:
        body = await read_body(request)
        try:
            if ctype == JSON_TYPE:
                batch = fast_batch(body)
                if batch is not None:
                    return batch
                try:
                    req = request_model.model_validate_json(body)
                except ValidationError as e:
                    details = _validation_details(e)
                    if any(d["type"] == "json_invalid" for d in details):
                        raise ApiError(400, "invalid_json", "the body is not valid JSON", details) from None
                    if any(d["loc"] == "instances" and d["type"] == "too_long" for d in details):
                        raise ApiError(422, "too_many_instances", f"at most {settings.max_instances} instances "
                                                                  "per request", details) from None
                    first = details[0]
                    raise ApiError(422, "invalid_request", f"the request does not match the schema: "
                                                           f"{first['loc']}: {first['msg']}", details) from None
                return adapter.from_instances(req.instances)
            return adapter.from_files(await read_files(request, body))
        except InputError as e:
            raise ApiError(422, "invalid_input", str(e), [{"loc": e.where, "msg": e.message}]) from None

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
                    "max_instances": settings.max_instances, "max_body_bytes": settings.max_body_bytes},
    }

    @app.get("/v1/model", summary="What the model is and takes", responses=_error_docs(401))
    async def model(request: Request) -> dict[str, Any]:
        check_key(request)
        return model_info

    @app.get("/healthz", summary="The process is alive")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", summary="The model is loaded and warmed", responses=_error_docs(503))
    async def readyz() -> dict[str, str]:
        if not state["ready"]:
            raise ApiError(503, "not_ready", "the model is not loaded yet, or the server is shutting down")
        return {"status": "ready"}

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response,
             responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}})
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    base_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = base_openapi()
            schema.setdefault("components", {}).setdefault("schemas", {}).update(defs)
            if api_key is not None:
                schema["components"]["securitySchemes"] = {"apiKey": {"type": "apiKey", "in": "header",
                                                                      "name": "X-API-Key"}}
                for path in ("/v1/predict", "/v1/model"):
                    for op in schema["paths"][path].values():
                        op["security"] = [{"apiKey": []}]
        return app.openapi_schema or schema

    app.openapi = openapi  # type: ignore[method-assign]
    app.state.kiln = {"run": run, "settings": settings, "batcher": batcher, "metrics": metrics}
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
