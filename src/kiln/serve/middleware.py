"""The outermost layer of the app: meters every HTTP request and answers the fast routes directly."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import Response

from kiln.serve.metrics import ServeMetrics

ROUTES = ("/v1/predict", "/v1/model", "/v1/completions", "/v1/models", "/healthz", "/readyz", "/metrics", "/openapi.json", "/docs")

DirectRoutes = dict[tuple[str, str], Callable[[Request], Awaitable[Response]]]


class Metered:
    """ASGI middleware: count every HTTP request and time it, by route (unknown paths as 'other').

    Routes in ``direct`` ((method, path) to ``async handler(request) -> response``) are answered here,
    past FastAPI's routing and dependency layers: for ``POST /v1/predict`` under load those took a
    quarter of the server's time. FastAPI still documents them."""

    def __init__(self, app, metrics: ServeMetrics, direct: DirectRoutes) -> None:
        self.app, self.metrics, self.direct = app, metrics, direct

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
