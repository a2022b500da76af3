"""Counts and times the API's requests, labelled by the route's template (``/v1/appeals/{appeal_id}``),
never the raw path: a path names an appeal, and a scan of made-up paths must not create a series
per path (those count as ``unmatched``)."""

from __future__ import annotations

import time
from collections.abc import Collection
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dispatcher.metrics.instruments import ApiMetrics

UNMATCHED = "unmatched"


class RequestMetrics:
    """Pure ASGI, so that streaming bodies pass through untouched."""

    def __init__(self, app: ASGIApp, *, metrics: ApiMetrics, skip: Collection[str] = ("/metrics",)):
        self.app = app
        self.metrics = metrics
        self.skip = skip

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # an exception that escapes every handler is answered 500 by the server

        async def answer(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, answer)
        finally:
            route = _template(scope.get("route"))
            if route not in self.skip:
                method = scope["method"] if scope["method"] in _METHODS else "other"
                self.metrics.requests.labels(method, route, str(status)).inc()
                self.metrics.seconds.labels(method, route).observe(time.perf_counter() - started)


_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def _template(route: Any) -> str:
    path = getattr(route, "path", None)
    return path if isinstance(path, str) and path else UNMATCHED
