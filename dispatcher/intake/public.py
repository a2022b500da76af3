"""The public read endpoints: an appeal's letters, a campaign's counters, the counters' badge.

What a section's web page reads straight from a supporter's browser, so each answer carries
CORS headers for the pages its section allows (docs/config.md, ``[web]``), an ETag computed
from its content (``If-None-Match`` → 304) and a ``Cache-Control``; ``OPTIONS`` answers a
browser's preflight. A refusal carries the CORS headers too, so the page can read why.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from fastapi import APIRouter, Request, Response
from starlette.concurrency import run_in_threadpool

from dispatcher.config.catalog import Catalog
from dispatcher.errors import FieldProblem, IntakeError, NotFound, ValidationFailed
from dispatcher.intake import badge, contract
from dispatcher.intake.contract import refusals
from dispatcher.intake.cors import Origins, add_headers, preflight_headers
from dispatcher.intake.service import IntakeService
from dispatcher.ledger.views import AppealView

#: counters change with every appeal, but a page showing them a minute late loses nothing, and
#: a campaign's busy hour is spared one ledger query per visitor
COUNTERS_MAX_AGE = 60
COUNTERS_CACHE = f"public, max-age={COUNTERS_MAX_AGE}"
#: an appeal's letters move on; a page polling them revalidates each time (cheap with the ETag)
APPEAL_CACHE = "private, no-cache"

_APPEAL = "/v1/appeals/{appeal_id}"
_COUNTERS = "/v1/campaigns/{campaign_id}/counters"
_BADGE = "/v1/campaigns/{campaign_id}/counters.svg"


def appeal_origins(catalog: Catalog, section: str | None) -> Origins:
    """The pages that may read an appeal of ``section``; for an appeal that does not exist,
    every section's pages, so the page that asked can read the 404."""
    if section is None:
        return Origins.of(s.web.origins for s in catalog.sections.values())
    own = catalog.sections.get(section)
    # a section since removed from the configuration has no pages any more
    return Origins.of([own.web.origins] if own is not None else [])


def counter_origins(catalog: Catalog, campaign: str, section: str | None = None) -> Origins:
    """The pages that may read a campaign's counters: those of every section taking part in
    it, or of the one section asked for (the badge's ``section=``)."""
    sections = [
        s
        for s in catalog.sections.values()
        if (section is None or s.code == section) and (campaign in s.campaigns or campaign not in catalog.campaigns)
    ]
    return Origins.of(s.web.counters for s in sections)


def etag_of(content: bytes) -> str:
    return '"' + hashlib.sha256(content).hexdigest()[:32] + '"'


def _matches(if_none_match: str | None, etag: str) -> bool:
    """RFC 9110 §13.1.2: weak comparison, a list of tags, or ``*``."""
    if if_none_match is None:
        return False
    tags = [t.strip() for t in if_none_match.split(",")]
    return any(t == "*" or t.removeprefix("W/") == etag for t in tags)


def _answer(request: Request, content: bytes, media_type: str, cache: str, origins: Origins, **extra: str) -> Response:
    etag = etag_of(content)
    headers = {"ETag": etag, "Cache-Control": cache, **extra}
    add_headers(headers, origins, request.headers.get("origin"))
    if _matches(request.headers.get("if-none-match"), etag):
        return Response(status_code=304, headers=headers)
    return Response(content, media_type=media_type, headers=headers)


def _json(body: dict[str, Any]) -> bytes:
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _refusal(request: Request, exc: IntakeError, origins: Origins) -> Response:
    headers: dict[str, str] = {}
    add_headers(headers, origins, request.headers.get("origin"))
    return Response(_json(exc.body()), status_code=exc.status, media_type="application/json", headers=headers)


def _preflight(request: Request, origins: Origins) -> Response:
    h = request.headers
    headers = preflight_headers(
        origins, h.get("origin"), h.get("access-control-request-method"), h.get("access-control-request-headers")
    )
    return Response(status_code=204, headers=headers)


def public_router(service: IntakeService) -> APIRouter:
    router = APIRouter()

    async def section_of_appeal(appeal_id: str) -> tuple[AppealView | None, Origins]:
        # The ledger is synchronous: off the event loop.
        view = await run_in_threadpool(service.ledger.views.appeal, appeal_id)
        return view, appeal_origins(service.catalog, None if view is None else view.section)

    @router.get(
        _APPEAL,
        response_class=Response,
        responses={
            200: {"model": contract.AppealOut, "description": "The appeal's letters; no personal data."},
            304: {"description": "Not modified (If-None-Match matched the ETag)."},
            **refusals(404),
        },
    )
    async def get_appeal(appeal_id: str, request: Request) -> Response:
        view, origins = await section_of_appeal(appeal_id)
        if view is None:
            return _refusal(request, NotFound(f"no appeal {appeal_id!r}"), origins)
        return _answer(request, _json(view.as_json()), "application/json", APPEAL_CACHE, origins)

    @router.options(_APPEAL, include_in_schema=False)
    async def appeal_preflight(appeal_id: str, request: Request) -> Response:
        _view, origins = await section_of_appeal(appeal_id)
        return _preflight(request, origins)

    @router.get(
        _COUNTERS,
        response_class=Response,
        responses={
            200: {"model": contract.CountersOut, "description": "The campaign's counts, by section."},
            304: {"description": "Not modified (If-None-Match matched the ETag)."},
            **refusals(404),
        },
    )
    async def counters(campaign_id: str, request: Request) -> Response:
        origins = counter_origins(service.catalog, campaign_id)
        if campaign_id not in service.catalog.campaigns:
            return _refusal(request, NotFound(f"no campaign {campaign_id!r}"), origins)
        counted = await run_in_threadpool(service.ledger.views.counters, campaign_id)
        return _answer(request, _json(counted.as_json()), "application/json", COUNTERS_CACHE, origins)

    @router.options(_COUNTERS, include_in_schema=False)
    async def counters_preflight(campaign_id: str, request: Request) -> Response:
        return _preflight(request, counter_origins(service.catalog, campaign_id))

    @router.get(
        _BADGE,
        response_class=Response,
        responses={
            200: {"content": {"image/svg+xml": {}}, "description": "The badge, in the campaign's languages."},
            304: {"description": "Not modified (If-None-Match matched the ETag)."},
            **refusals(404, 422),
        },
    )
    async def counters_badge(
        campaign_id: str,
        request: Request,
        section: str | None = None,
        lang: str | None = None,
        count: str = badge.Count.APPEALS.value,
    ) -> Response:
        origins = counter_origins(service.catalog, campaign_id, section)
        campaign = service.catalog.campaigns.get(campaign_id)
        if campaign is None:
            return _refusal(request, NotFound(f"no campaign {campaign_id!r}"), origins)
        part = service.catalog.sections.get(section) if section is not None else None
        if section is not None and (part is None or campaign_id not in part.campaigns):
            return _refusal(request, NotFound(f"no section {section!r} in campaign {campaign_id!r}"), origins)
        if count not in {c.value for c in badge.Count}:
            problem = FieldProblem(("count",), f"is one of {', '.join(c.value for c in badge.Count)}")
            return _refusal(request, ValidationFailed([problem]), origins)
        offered = [*campaign.letter_languages, *campaign.preferred_languages, *(part.languages if part else [])]
        language = badge.choose_language(lang, offered, campaign.default_language)
        counted = await run_in_threadpool(service.ledger.views.counters, campaign_id)
        if part is None:
            n_appeals, n_letters = counted.appeals, counted.letters_delivered
        else:
            own = counted.by_section.get(part.code)
            n_appeals, n_letters = (own.appeals, own.letters_delivered) if own else (0, 0)
        what = badge.Count(count)
        svg = badge.render(what, n_appeals if what is badge.Count.APPEALS else n_letters, language)
        return _answer(
            request,
            svg,
            "image/svg+xml",
            COUNTERS_CACHE,
            origins,
            # embeddable by any page, also one that requires CORP of what it embeds (COEP)
            **{
                "Cross-Origin-Resource-Policy": "cross-origin",
                "X-Content-Type-Options": "nosniff",
                # opened on its own, the badge can run and fetch nothing
                "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'",
                "Content-Language": language,
            },
        )

    @router.options(_BADGE, include_in_schema=False)
    async def badge_preflight(campaign_id: str, request: Request, section: str | None = None) -> Response:
        return _preflight(request, counter_origins(service.catalog, campaign_id, section))

    return router
