"""The OpenAPI document, made from the run: the request schema of its inputs, the answer of its task,
the error bodies, and the API key where one is required; served at ``/openapi.json`` and ``/docs``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, ConfigDict, Field, create_model

from kiln.serve.auth import check_key
from kiln.serve.body import JSON_TYPE, MULTIPART_TYPE

KEY_ROUTES = ("/v1/predict", "/v1/model", "/metrics", "/v1/completions", "/v1/models")  # the documented routes that need the key when one is set


class ModelRef(BaseModel):
    name: str
    version: str
    backend: str


def request_model(instance: Any, max_instances: int) -> type[BaseModel]:
    """``{"instances": [...]}`` with 1 to ``max_instances`` of ``instance``."""
    return create_model(
        "PredictRequest", __config__=ConfigDict(extra="forbid"),
        instances=(list[instance], Field(min_length=1, max_length=max_instances,
                                         description=f"1 to {max_instances} inputs")),
    )


def response_model(prediction: type[BaseModel]) -> type[BaseModel]:
    return create_model("PredictResponse", model=(ModelRef, ...),
                        predictions=(list[prediction], Field(description="one per instance")))


def predict_body(request: type[BaseModel], accepts_files: bool, max_instances: int) -> tuple[dict, dict]:
    """The documented request body of ``POST /v1/predict`` (JSON, and multipart uploads where the inputs take
    files), and the schemas it refers to, which belong in the document's components."""
    content: dict[str, Any] = {JSON_TYPE: {"schema": request.model_json_schema(
        ref_template="#/components/schemas/{model}")}}
    if accepts_files:
        content[MULTIPART_TYPE] = {"schema": {
            "type": "object", "required": ["files"], "additionalProperties": False,
            "properties": {"files": {"type": "array", "minItems": 1, "maxItems": max_instances,
                                     "items": {"type": "string", "format": "binary"}}}}}
    defs = content[JSON_TYPE]["schema"].pop("$defs", {})
    return {"required": True, "content": content}, defs


def complete_openapi(app: FastAPI, defs: dict[str, Any], keyed: bool) -> Callable[[], dict[str, Any]]:
    """``app.openapi`` with the request body's schemas added, and the API key where one is required."""
    base = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = base()
            schema.setdefault("components", {}).setdefault("schemas", {}).update(defs)
            if keyed:
                schema["components"]["securitySchemes"] = {"apiKey": {"type": "apiKey", "in": "header",
                                                                      "name": "X-API-Key"}}
                for path in KEY_ROUTES:
                    for op in schema["paths"].get(path, {}).values():  # /v1/completions: language models only
                        op["security"] = [{"apiKey": []}]
        return app.openapi_schema or schema

    return openapi


def add_document_routes(app: FastAPI, key: str | None) -> None:
    """``/openapi.json`` and ``/docs`` (Swagger UI), which need the key when one is set: the document tells
    the model's inputs (a table's columns) to whoever reads it. Create the app with ``openapi_url=None`` and
    ``docs_url=None`` so that these replace FastAPI's own, which nothing guards."""

    @app.get("/openapi.json", include_in_schema=False)
    async def document(request: Request) -> JSONResponse:
        check_key(request, key)
        return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False)
    async def docs(request: Request) -> HTMLResponse:
        check_key(request, key)
        return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{app.title} - docs")
