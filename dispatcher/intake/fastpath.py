"""``POST /v1/appeals`` answered by a plain ASGI handler, in front of FastAPI's routing.

The route where supporters wait is the one a burst hits: a section's mailing brings thousands
of appeals in minutes. FastAPI's path to an endpoint (the exception middleware, the router
trying every route, the route's request object, its dependency solver, its exit stack) cost a
fifth of the API's CPU per appeal, for a route that takes no parameters, reads its body raw
(the signature covers the exact bytes) and answers JSON (bench/intake.py, docs/benchmarks.md).

What stays the same: the route is declared in FastAPI as before (the OpenAPI document, and the
same handler, ``answer_appeal``, if a request ever reaches it there); the middleware outside this
one (server errors, request metrics under the route's template) sees it like any route; every
refusal is the same ``{"error": ...}`` body and status.
"""

from __future__ import annotations

from typing import Any

from starlette.datastructures import Headers
from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from dispatcher.errors import BodyTooLarge, IntakeError
from dispatcher.intake.service import IntakeService
from dispatcher.intake.signature import HEADER

PATH = "/v1/appeals"


async def answer_appeal(service: IntakeService, raw: bytes, header: str | None) -> JSONResponse:
    """The answer to a signed appeal: 202 and the appeal, or the refusal."""
    try:
        accepted = await service.submit_signed_async(raw, header)
    except IntakeError as exc:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers())
    return JSONResponse(accepted.body(), status_code=202)


class AppealsFastPath:
    """ASGI middleware: ``POST /v1/appeals`` here, everything else to ``app``."""

    def __init__(self, app: ASGIApp, *, service: IntakeService, route: Any = None):
        """``route``: what the router would have put in ``scope["route"]`` (the request metrics
        label requests by its template)."""
        self.app = app
        self.service = service
        self.route = route

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != PATH or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        if self.route is not None:
            scope["route"] = self.route
        headers = Headers(scope=scope)
        try:
            raw = await read_limited(headers, receive, self.service.settings.max_body_bytes)
        except ClientDisconnect:
            return  # nobody to answer; nothing was read into the ledger
        except BodyTooLarge as exc:
            response = JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers())
        else:
            response = await answer_appeal(self.service, raw, headers.get(HEADER))
        await response(scope, receive, send)


async def read_limited(headers: Headers, receive: Receive, limit: int) -> bytes:
    """The request body, refused (413) beyond ``limit`` bytes, declared or sent."""
    declared = headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(f"request body is {declared} bytes; at most {limit} are accepted")
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(f"request body is larger than {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)
