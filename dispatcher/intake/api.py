"""The intake HTTP API: the public contract of DESIGN.md.

POST /v1/appeals reads the raw body itself (the signature covers the exact bytes), so FastAPI's
own body parsing is not used for it. Every refusal is an IntakeError rendered as
``{"error": {"code", "message", ...}}`` with its status; no input can produce a 500.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi_offline import FastAPIOffline
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from dispatcher.channels.base import WebhookRequest
from dispatcher.channels.registry import Channels
from dispatcher.config.models import Section
from dispatcher.errors import IntakeError, NotFound
from dispatcher.intake import contract
from dispatcher.intake.contract import refusals
from dispatcher.intake.erasures import SignedErasures
from dispatcher.intake.fastpath import PATH as APPEALS
from dispatcher.intake.fastpath import AppealsFastPath, answer_appeal, read_limited
from dispatcher.intake.public import public_router
from dispatcher.intake.schema import field_problems
from dispatcher.intake.service import IntakeService
from dispatcher.intake.signature import HEADER
from dispatcher.logging import get_logger
from dispatcher.queue.reports import ReportApplier
from dispatcher.supporters import Supporters

log = get_logger("dispatcher.api")


class SandboxWebhook(IntakeError):
    status = 409
    code = "sandbox_mode"


async def _read_limited(request: Request, limit: int) -> bytes:
    return await read_limited(request.headers, request.receive, limit)


def create_app(
    service: IntakeService,
    *,
    health: Any = None,
    channels: Channels | None = None,
    reports: ReportApplier | None = None,
) -> FastAPI:
    """``health`` is an optional callable returning a dict of component states for /healthz;
    ``channels`` and ``reports`` enable the channels' status webhooks (live mode only: sandbox
    mode delivers to local sinks, which call no webhooks)."""

    # Swagger UI (/docs) and ReDoc (/redoc) with their assets served from the fastapi-offline
    # package, not a CDN: the pages work on a machine without internet.
    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        await service.quotas.aclose()  # its Redis connections belong to this loop

    app = FastAPIOffline(
        lifespan=lifespan,
        title="Appeal dispatch service",
        version="1",
        description="Signed appeals in; letters to officials out. docs/intake.md is the integrators' guide.",
    )

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = contract.openapi_document(
                lambda: FastAPI.openapi(app),
                max_message_chars=service.settings.max_message_chars,
                sections=service.catalog.sections,
                campaigns=service.catalog.campaigns,
            )
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    @app.exception_handler(IntakeError)
    async def _intake_error(_request: Request, exc: IntakeError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers())

    # Our error body everywhere, never FastAPI's {"detail": ...}: a parameter FastAPI refuses, an
    # unknown path, a method a path does not take.
    @app.exception_handler(RequestValidationError)
    async def _request_invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        refused = contract.InvalidRequest(field_problems(exc.errors()))
        return JSONResponse(refused.body(), status_code=refused.status)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
        codes = {404: "not_found", 405: "method_not_allowed"}
        message = f"{exc.detail}: {request.method} {request.url.path} (the API is described at /docs)"
        body = {"error": {"code": codes.get(exc.status_code, f"http_{exc.status_code}"), "message": message}}
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    @app.post(
        APPEALS,
        status_code=202,
        response_model=None,
        responses={
            202: {"model": contract.AcceptedOut, "description": "Accepted (or, `replayed`, a retry's original)."},
            **refusals(401, 409, 410, 413, 422, 429, 503),
        },
    )
    async def post_appeal(request: Request) -> JSONResponse:
        """One supporter's appeal, signed with the section's key. Retrying with the same
        `client_ref` is safe: the answer is the original appeal, `replayed: true`."""
        # Served by AppealsFastPath (fastpath.py) before FastAPI's routing; the same answer here.
        raw = await _read_limited(request, service.settings.max_body_bytes)
        return await answer_appeal(service, raw, request.headers.get(HEADER))

    app.add_middleware(
        AppealsFastPath,
        service=service,
        route=next(
            r for r in app.routes if getattr(r, "path", None) == APPEALS and "POST" in getattr(r, "methods", ())
        ),
    )

    erasures = SignedErasures(service, Supporters(service.ledger, service.settings, service.clock))

    @app.post(
        "/v1/erasures",
        status_code=200,
        response_model=None,
        responses={
            200: {"model": contract.ErasureOut, "description": "Erased (or `already_erased`): counts only."},
            **refusals(401, 404, 413, 422, 503),
        },
    )
    async def post_erasure(request: Request) -> JSONResponse:
        """Erase a supporter's data (GDPR art. 17): one appeal, or every appeal of one email, of
        your section; signed like an appeal. Letters not yet sent are cancelled; counts stay."""
        raw = await _read_limited(request, service.settings.max_body_bytes)
        report = await run_in_threadpool(erasures.submit_signed, raw, request.headers.get(HEADER))
        return JSONResponse(report.as_json())

    # GET /v1/appeals/{id}, the counters and their badge: read by pages in browsers (CORS)
    app.include_router(public_router(service))

    async def section_of(delivery_id: str) -> Section | None:
        # The ledger is synchronous: off the event loop.
        row = await run_in_threadpool(service.ledger.views.delivery, delivery_id)
        return None if row is None else service.catalog.sections.get(row.section)

    async def webhook_result(channel_name: str, gateway: str, request: Request) -> str:
        if not service.settings.live:
            raise SandboxWebhook("sandbox mode delivers to local sinks; providers' webhooks are not accepted")
        if channels is None or reports is None or channel_name not in channels:
            raise NotFound(f"no webhook for {channel_name[:20]!r}")
        channel = channels.get(channel_name)
        raw = await _read_limited(request, service.settings.max_body_bytes)
        webhook = WebhookRequest(raw, request.headers, request.query_params)
        report = await channel.read_webhook(gateway, webhook, section_of)
        return await run_in_threadpool(reports.apply, channel_name, report)

    @app.post(
        "/v1/webhooks/{channel_name}/{gateway}",
        response_model=None,
        responses={
            200: {"model": contract.WebhookOut, "description": "The report was applied (or was news to nobody)."},
            **refusals(401, 404, 409, 413, 422),
        },
    )
    async def webhook(channel_name: str, gateway: str, request: Request) -> JSONResponse:
        """A fax gateway's status report (live mode only), authenticated the gateway's own way."""
        try:
            result = await webhook_result(channel_name, gateway, request)
        except IntakeError as exc:
            # The gateway keeps quiet about refusals (at most it retries), so a wrong key, a
            # skewed clock or a wrong URL would otherwise show only as faxes that never settle.
            # Our own message and code only: the body and headers are the sender's.
            log.warning(
                "webhook.refused",
                channel=channel_name[:20],
                gateway=gateway[:40],
                reason=exc.code,
                status=exc.status,
                detail=exc.message,
                remote_addr=request.client.host if request.client else None,
            )
            raise
        return JSONResponse({"result": result})

    @app.get(
        "/healthz",
        response_model=None,
        responses={
            200: {"model": contract.HealthOut, "description": "Up."},
            503: {"model": contract.HealthOut, "description": "The ledger cannot be reached."},
        },
    )
    async def healthz() -> JSONResponse:
        components: dict[str, Any] = await run_in_threadpool(health) if health else {}
        # Only the ledger is vital: without the queue appeals are still accepted (the outbox).
        ok = components.get("ledger", "ok") == "ok"
        return JSONResponse({"status": "ok" if ok else "degraded", **components}, status_code=200 if ok else 503)

    return app
