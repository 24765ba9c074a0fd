"""``POST /v1/predict``: key, readiness and content type checked, the body read into a batch, the batch
shared with concurrent requests on the model's worker thread, and the results answered.

The middleware calls it directly, past FastAPI's routing (FastAPI only documents it)."""

from __future__ import annotations

import logging

import orjson
from starlette.requests import Request
from starlette.responses import Response

from kiln.serve.auth import check_key
from kiln.serve.batcher import Overloaded
from kiln.serve.body import JSON_TYPE, MULTIPART_TYPE, BodyReader
from kiln.serve.errors import ApiError, answer_error
from kiln.serve.outputs import NotFinite
from kiln.serve.state import AppState

log = logging.getLogger("uvicorn.error")  # uvicorn's own log, where `kiln serve` writes its lines


class PredictRoute:
    def __init__(self, state: AppState, body: BodyReader) -> None:
        self.state, self.body = state, body
        self.media_types = (JSON_TYPE, MULTIPART_TYPE) if state.adapter.accepts_files else (JSON_TYPE,)

    async def __call__(self, request: Request) -> Response:
        """The answer, errors included, as FastAPI's error handlers would give it."""
        try:
            return await self.answer(request)
        except ApiError as err:
            return answer_error(err, self.state.metrics)
        except Exception as err:  # noqa: BLE001 - a server fault: logged, and answered in the error model
            log.exception("kiln: POST /v1/predict failed")
            return answer_error(err, self.state.metrics)

    async def answer(self, request: Request) -> Response:
        state = self.state
        check_key(request, state.api_key)
        if not state.ready:
            raise ApiError(503, "not_ready", "the model is not loaded yet", headers={"Retry-After": "1"})
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype not in self.media_types:
            raise ApiError(415, "unsupported_media_type",
                           f"content type {ctype or '(none)'!r}: send {' or '.join(self.media_types)}")
        with state.batcher.arriving():
            batch = await self.body.batch(request, ctype)
        try:
            results = await state.batcher.predict(batch)
        except Overloaded as e:
            raise ApiError(503, "overloaded", f"the server is busy ({e}); retry later",
                           headers={"Retry-After": "1"}) from None
        try:
            predictions = state.answers.answer(results)
        except NotFinite as e:
            log.error("kiln: %s: %s; answered 500. The run's weights or model are broken: check them with "
                      "`kiln evaluate`", state.model_ref["name"], e)
            raise ApiError(500, "non_finite_output", f"{e}: a fault of the model, not of the request") from None
        return Response(orjson.dumps({"model": state.model_ref, "predictions": predictions}), media_type=JSON_TYPE)
