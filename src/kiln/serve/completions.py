"""OpenAI-compatible routes of a language-model run: ``POST /v1/completions`` and ``GET /v1/models``, so that
OpenAI's client libraries (and anything else that speaks that API) work against ``kiln serve``.

Taken: ``model`` (the run's name), ``prompt`` (a string or a list of strings: one choice each), ``max_tokens``
(default 16), ``temperature`` (0 to 2, default 1; 0 is greedy), ``top_p``, ``stop`` (a string or up to 4),
``seed``, ``n`` (1 only), ``stream`` (server-sent events in OpenAI's chunk format, ending with
``data: [DONE]``), ``stream_options.include_usage``, and ``user`` (ignored). Answered with OpenAI's
``text_completion`` object and its ``usage`` counts. Options kiln does not implement (``logprobs``, ``echo``,
``best_of``, penalties, ``logit_bias``, ``suffix``) are refused with a 422 naming them rather than ignored.

Bad input is a 422 naming it: a prompt with characters the run's character tokenizer does not know (all of
them listed), and a prompt whose tokens plus ``max_tokens`` do not fit the model's context (refused, as
OpenAI refuses it; kiln's own ``/v1/predict`` windows instead). A client that disconnects mid-stream
cancels its generation.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Annotated, Any, Literal

import orjson
from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field, Strict, ValidationError
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from kiln.data.text_inputs import MAX_SEED, MAX_STOP_CHARS, MAX_TEXT_CHARS, token_count
from kiln.errors import InputError
from kiln.nn.generate import Sampling
from kiln.serve.auth import check_key
from kiln.serve.batcher import Overloaded
from kiln.serve.body import JSON_TYPE, read_body, validation_details
from kiln.serve.errors import ApiError, error_docs
from kiln.serve.generation import Event, GenerationEngine, Job

MAX_PROMPTS = 16  # per request
MAX_STOPS = 4  # as OpenAI

Number = Annotated[float, Strict(), Field(allow_inf_nan=False)]
Integer = Annotated[int, Strict()]
Stop = Annotated[str, Strict(), Field(min_length=1, max_length=MAX_STOP_CHARS)]
Prompt = Annotated[str, Strict(), Field(min_length=1, max_length=MAX_TEXT_CHARS)]


class CompletionRequest(BaseModel):
    """OpenAI's completion request, as far as kiln implements it; anything else is refused by name."""

    model_config = ConfigDict(extra="forbid")
    model: Annotated[str, Strict(), Field(max_length=256, description="the run's name (GET /v1/models)")]
    prompt: Prompt | Annotated[list[Prompt], Field(min_length=1, max_length=MAX_PROMPTS)] = Field(
        description=f"a text, or up to {MAX_PROMPTS} texts (one choice each)")
    max_tokens: Integer = Field(16, ge=1, description="tokens to write at most; prompt + max_tokens must fit the "
                                                       "model's context")
    temperature: Number = Field(1.0, ge=0, le=2, description="0: always the most likely token")
    top_p: Number = Field(1.0, gt=0, le=1, description="sample among the fewest tokens whose probabilities sum "
                                                        "to top_p")
    stop: Stop | Annotated[list[Stop], Field(max_length=MAX_STOPS)] | None = Field(
        None, description="end the text before the first of these strings")
    seed: Integer | None = Field(None, ge=0, le=MAX_SEED, description="the same seed writes the same text")
    n: Integer = Field(1, ge=1, le=1, description="choices per prompt: 1 only")
    stream: bool = False
    # {"include_usage": true}: a last chunk with the usage; other options (newer clients add their own) are ignored
    stream_options: dict[str, bool | None] | None = None
    user: str | None = Field(None, max_length=256, description="accepted and ignored")
    # OpenAI options kiln does not implement: accepted only at their no-op values, so clients that send the
    # defaults work and nobody gets silently different behaviour.
    echo: Literal[False] = False
    logprobs: None = None
    best_of: Literal[1] | None = None
    presence_penalty: Literal[0] | None = None
    frequency_penalty: Literal[0] | None = None
    logit_bias: None = None
    suffix: None = None


def add_completion_routes(app: FastAPI, state, engine: GenerationEngine) -> None:
    name = state.model_ref["name"]
    created = int(time.time())
    tokenizer, context = engine.tokenizer, engine.context

    @app.get("/v1/models", summary="The served model, as OpenAI lists models", responses=error_docs(401))
    async def models(request: Request) -> dict[str, Any]:
        check_key(request, state.api_key)
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "kiln",
                                            "context_length": context}]}

    @app.post("/v1/completions", summary="Complete text (OpenAI-compatible)",
              responses=error_docs(400, 401, 413, 422, 503),
              openapi_extra={"requestBody": {"required": True, "content": {JSON_TYPE: {
                  "schema": CompletionRequest.model_json_schema()}}}})
    async def completions(request: Request) -> Response:
        check_key(request, state.api_key)
        if not state.ready:
            raise ApiError(503, "not_ready", "the model is not loaded yet", headers={"Retry-After": "1"})
        req = parse(await read_body(request, state.settings.max_body_bytes))
        if req.model != name:
            raise ApiError(404, "model_not_found", f"the model {req.model!r} is not served here; this server serves "
                                                   f"{name!r} (GET /v1/models)", [{"loc": "model", "msg": "unknown"}])
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        jobs = []
        for i, text in enumerate(prompts):
            where = "prompt" if isinstance(req.prompt, str) else f"prompt.{i}"
            ids = prompt_ids(tokenizer, text, where)
            if len(ids) + req.max_tokens > context:
                raise ApiError(422, "context_length_exceeded",
                               f"{where}: {len(ids)} prompt tokens + max_tokens {req.max_tokens} = "
                               f"{len(ids) + req.max_tokens} tokens, over this model's context of {context}; "
                               f"lower max_tokens (at most {context - len(ids)} for this prompt) or shorten the "
                               "prompt", [{"loc": "max_tokens", "msg": "prompt + max_tokens exceeds the context"}])
            sampling = Sampling(req.max_tokens, req.temperature, None, None if req.top_p == 1.0 else req.top_p,
                                req.seed, stops)
            jobs.append(Job(i, ids, sampling, events, loop, cost=len(ids) + req.max_tokens))
        try:
            engine.submit(jobs)
        except Overloaded as e:
            raise ApiError(503, "overloaded", f"the server is busy ({e}); retry later",
                           headers={"Retry-After": "1"}) from None
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": name}
        prompt_tokens = sum(len(j.prompt) for j in jobs)
        if req.stream:
            usage = bool((req.stream_options or {}).get("include_usage"))
            return StreamingResponse(stream(jobs, events, head, prompt_tokens, usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        texts, finishes, tokens = [""] * len(jobs), [None] * len(jobs), 0
        watcher = asyncio.create_task(watch(request, jobs, events))
        try:
            remaining = len(jobs)
            while remaining:
                event: Event = await events.get()
                if event.finish == GONE:
                    return Response(status_code=499)  # nobody reads it
                texts[event.index] += event.text
                if event.finish is not None:
                    fail(event)
                    finishes[event.index], tokens, remaining = event.finish, tokens + event.tokens, remaining - 1
        finally:
            watcher.cancel()
            for job in jobs:  # ended, or the client went away: either way nothing more is written
                job.cancel()
        choices = [{"text": t, "index": i, "logprobs": None, "finish_reason": f}
                   for i, (t, f) in enumerate(zip(texts, finishes, strict=True))]
        body = {**head, "choices": choices, "usage": usage_of(prompt_tokens, tokens)}
        return Response(orjson.dumps(body), media_type=JSON_TYPE)


GONE = "client disconnected"


async def watch(request: Request, jobs: list[Job], events: asyncio.Queue) -> None:
    """Waits, while a non-streamed answer is written, for the client to go away; then cancels its jobs (the body
    has been read, so the next message the server can receive is the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            for job in jobs:
                job.cancel()
            events.put_nowait(Event(-1, finish=GONE))
            return
        await asyncio.sleep(0.05)  # a server that answers with empty body messages instead of waiting


async def stream(jobs: list[Job], events: asyncio.Queue, head: dict, prompt_tokens: int, include_usage: bool):
    """Server-sent events: a chunk per piece of text, one with each choice's finish_reason, the usage chunk when
    asked for, then ``data: [DONE]``. Closing the stream early (the client went away) cancels every job."""
    try:
        remaining, tokens = len(jobs), 0
        while remaining:
            event: Event = await events.get()
            if event.finish == "error":
                yield sse({"error": {"code": "internal", "message": f"generation failed: "
                                                                    f"{type(event.error).__name__}"}})
                return
            if event.finish is not None:
                remaining, tokens = remaining - 1, tokens + event.tokens
            yield sse({**head, "choices": [{"text": event.text, "index": event.index, "logprobs": None,
                                            "finish_reason": event.finish}]})
        if include_usage:
            yield sse({**head, "choices": [], "usage": usage_of(prompt_tokens, tokens)})
        yield b"data: [DONE]\n\n"
    finally:
        for job in jobs:
            job.cancel()


def sse(doc: dict) -> bytes:
    return b"data: " + orjson.dumps(doc) + b"\n\n"


def usage_of(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def fail(event: Event) -> None:
    if event.finish == "error":
        raise ApiError(500, "internal", f"generation failed: {type(event.error).__name__}")


def parse(body: bytes) -> CompletionRequest:
    try:
        return CompletionRequest.model_validate_json(body)
    except ValidationError as e:
        details = validation_details(e)
        if any(d["type"] == "json_invalid" for d in details):
            raise ApiError(400, "invalid_json", "the body is not valid JSON", details) from None
        first = details[0]
        raise ApiError(422, "invalid_request", f"the request does not match the schema: {first['loc']}: "
                                               f"{first['msg']}", details) from None


def prompt_ids(tokenizer, text: str, where: str) -> list[int]:
    try:
        token_count(tokenizer, text, where)  # checks the text (lone surrogates, unknown characters)
    except InputError as e:
        raise ApiError(422, "invalid_input", f"{where}: {e.message}", [{"loc": where, "msg": e.message}]) from None
    ids = tokenizer.encode(text)
    if not ids:
        raise ApiError(422, "invalid_input", f"{where}: the prompt gives no tokens", [{"loc": where, "msg": "empty"}])
    return ids
