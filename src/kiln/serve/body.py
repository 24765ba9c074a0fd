"""A predict request's body to one input batch: size limits, JSON (a fast path and the schema), multipart.

Every mistake in the body is raised as an :class:`ApiError` (400, 413 or 422) naming what is wrong. Only
the fast path (plain pixel arrays) runs on the event loop; schema checks and image decoding run on a
thread, so that a request of large images does not hold up others, or ``/healthz`` (20 large PNGs in one
request once held it for 7.7 s, longer than the liveness probe waits).
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import orjson
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request

from kiln.data.requests import InputAdapter
from kiln.errors import InputError
from kiln.serve.errors import ApiError

JSON_TYPE = "application/json"
MULTIPART_TYPE = "multipart/form-data"


class BodyReader:
    def __init__(self, adapter: InputAdapter, request_model: type[BaseModel], max_instances: int,
                 max_body_bytes: int) -> None:
        self.adapter, self.request_model = adapter, request_model
        self.max_instances, self.max_body_bytes = max_instances, max_body_bytes

    async def batch(self, request: Request, ctype: str) -> np.ndarray:
        """The batch of a request whose content type (``ctype``) is JSON or multipart."""
        body = await self._read(request)
        try:
            if ctype == JSON_TYPE:
                batch = self._fast_batch(body)
                return batch if batch is not None else await asyncio.to_thread(self._checked_batch, body)
            files = await self._files(request, body)
            return await asyncio.to_thread(self.adapter.from_files, files)
        except InputError as e:
            raise ApiError(422, "invalid_input", str(e), [{"loc": e.where, "msg": e.message}]) from None

    async def _read(self, request: Request) -> bytes:
        return await read_body(request, self.max_body_bytes)

    def _fast_batch(self, body: bytes) -> np.ndarray | None:
        """The batch of a plainly valid JSON body without the per-number schema check, else None."""
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError:
            return None
        if not (isinstance(doc, dict) and doc.keys() == {"instances"} and isinstance(doc["instances"], list)
                and 1 <= len(doc["instances"]) <= self.max_instances):
            return None
        return self.adapter.from_json(doc["instances"])

    def _checked_batch(self, body: bytes) -> np.ndarray:
        """The batch of a JSON body checked against the request schema, which names any fault."""
        try:
            req = self.request_model.model_validate_json(body)
        except ValidationError as e:
            details = validation_details(e)
            if any(d["type"] == "json_invalid" for d in details):
                raise ApiError(400, "invalid_json", "the body is not valid JSON", details) from None
            if any(d["loc"] == "instances" and d["type"] == "too_long" for d in details):
                raise ApiError(422, "too_many_instances", f"at most {self.max_instances} instances per request",
                               details) from None
            first = details[0]
            raise ApiError(422, "invalid_request", f"the request does not match the schema: "
                                                   f"{first['loc']}: {first['msg']}", details) from None
        return self.adapter.from_instances(req.instances)

    async def _files(self, request: Request, body: bytes) -> list[tuple[str, bytes]]:
        """The (filename, content) pairs uploaded in the form field ``files``."""
        async def replay():
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            form = await Request(request.scope, replay).form(
                max_files=self.max_instances, max_fields=self.max_instances, max_part_size=self.max_body_bytes)
        except (StarletteHTTPException, ValueError, KeyError, AssertionError) as e:
            reason = str(getattr(e, "detail", None) or e)
            if reason.startswith("Too many files"):
                raise ApiError(422, "too_many_instances", f"at most {self.max_instances} files") from None
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
        if len(files) > self.max_instances:
            raise ApiError(422, "too_many_instances", f"{len(files)} files; at most {self.max_instances}")
        return files


def validation_details(e: ValidationError) -> list[dict[str, Any]]:
    errors = e.errors(include_url=False, include_context=False, include_input=False)
    return [{"loc": _location(err["loc"]), "type": err["type"], "msg": err["msg"]} for err in errors[:20]]


def _location(loc: tuple) -> str:
    """``instances.3.age``. Pydantic names union members in locations: by their tag ("pixels-instance"), and
    below an instance's field by their type ("bool", "constrained-str": a boolean column takes true/false or a
    string). Users know only the fields, and below a field only list positions (``pixels.0.27``)."""
    parts = [str(p) for p in loc if not str(p).endswith("-instance")]
    return ".".join(p for k, p in enumerate(parts) if k < 3 or p.isdigit()) or "(body)"


async def read_body(request: Request, limit: int) -> bytes:
    """The request's body, refused (413) as soon as it is over ``limit`` bytes, declared or streamed."""
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
