"""Campaigns: the list with their counters, and one campaign — counters by section and by target,
the pacing forecast per recipient with a chart of letters per day until the deadline, and closing
it (an admin, with a reason, after a confirmation step).

Scope: an operator of some sections sees the campaigns its sections take part in, and only its
sections' numbers and recipients; another campaign's page answers 404. Closing concerns every
section, so only an admin closes, and the audit entry has no section.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import date, timedelta
from zoneinfo import ZoneInfo

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, Response

from dispatcher.console.charts import letters_per_day
from dispatcher.console.context import ConsoleContext
from dispatcher.console.pages import redirect, render
from dispatcher.console.scope import ActingOperator, Context, CurrentOperator, Operator, admin_only, visible
from dispatcher.ledger.campaigns import GROUPS, CampaignTotals, StateCounts

router = APIRouter()


@dataclass(frozen=True)
class CampaignLine:
    id: str
    title: str | None
    #: the deadline's day in each visible section that takes part, earliest first
    deadlines: tuple[tuple[str, date], ...]
    closed: str | None
    totals: CampaignTotals


def _sections_of(ctx: ConsoleContext, campaign: str) -> list[str]:
    """The sections whose configuration takes part in ``campaign``."""
    return sorted(code for code, s in ctx.catalog.sections.items() if campaign in s.campaigns)


def _visible_sections(ctx: ConsoleContext, operator: Operator, campaign: str) -> list[str]:
    return [code for code in _sections_of(ctx, campaign) if operator.sees(code)]


def _deadlines(ctx: ConsoleContext, campaign: str, sections: list[str]) -> tuple[tuple[str, date], ...]:
    """The last day to act in each of ``sections``, as the section published it (in its own time
    zone), earliest first."""
    if campaign not in ctx.catalog.campaigns:
        return ()
    out = []
    for code in sections:
        end = ctx.catalog.deadline_at(campaign, code) - timedelta(seconds=1)
        out.append((code, end.astimezone(ZoneInfo(ctx.catalog.sections[code].timezone)).date()))
    return tuple(sorted(out, key=lambda pair: (pair[1], pair[0])))


@router.get("/campaigns", response_class=HTMLResponse)
def campaigns(request: Request, operator: CurrentOperator, ctx: Context) -> HTMLResponse:
    totals = ctx.ledger.campaigns.totals(sections=operator.scope)
    names = set(totals) | {c for c in ctx.catalog.campaigns if _visible_sections(ctx, operator, c)}
    lines = []
    for campaign in sorted(names):
        sections = _visible_sections(ctx, operator, campaign)
        if not sections and campaign not in totals:
            continue
        config = ctx.catalog.campaigns.get(campaign)
        closure = ctx.ledger.controls.closure(campaign)
        lines.append(
            CampaignLine(
                id=campaign,
                title=config.title if config else None,
                deadlines=_deadlines(ctx, campaign, sections),
                closed=closure.reason if closure else None,
                totals=totals.get(campaign) or CampaignTotals(campaign, 0, StateCounts()),
            )
        )
    return render(request, "campaigns.html", nav="Campaigns", lines=lines, groups=list(GROUPS))


def _campaign_or_404(ctx: ConsoleContext, operator: Operator, campaign: str) -> list[str]:
    """The operator's sections taking part in ``campaign``; 404 when none does and the ledger has
    no letter of it in them either (unknown, or only other sections')."""
    sections = _visible_sections(ctx, operator, campaign)
    if not sections and campaign not in ctx.ledger.campaigns.totals(sections=operator.scope):
        visible(operator, None)  # raises: answered as a campaign that does not exist
    return sections


@router.get("/campaigns/{campaign}", response_class=HTMLResponse)
def campaign(request: Request, campaign: str, operator: CurrentOperator, ctx: Context) -> HTMLResponse:
    sections = _campaign_or_404(ctx, operator, campaign)
    return _campaign_page(request, ctx, operator, campaign, sections)


def _campaign_page(
    request: Request,
    ctx: ConsoleContext,
    operator: Operator,
    campaign: str,
    sections: list[str],
    *,
    confirm: str | None = None,
    status: int = 200,
) -> HTMLResponse:
    now = ctx.now()
    counts = ctx.ledger.campaigns.counts(campaign, sections=operator.scope)
    config = ctx.catalog.campaigns.get(campaign)
    closure = ctx.ledger.controls.closure(campaign)
    forecasts = []
    if ctx.forecast is not None and closure is None and config is not None:
        for row in ctx.forecast(campaign, now):
            if operator.scope is not None and not (row.sections & set(operator.scope)):
                continue  # a recipient only other sections write to
            deadline = row.deadline.date() if row.deadline is not None else None
            rate = row.forecast.rate_per_hour
            pace = "no cap" if math.isinf(rate) else f"{rate:.2f} letters per open hour"
            forecasts.append((row, letters_per_day(row.per_day, deadline=deadline, label=row.forecast.recipient), pace))
    return render(
        request,
        "campaign.html",
        status=status,
        nav="Campaigns",
        campaign=campaign,
        config=config,
        closure=closure,
        counts=counts,
        groups=list(GROUPS),
        deadlines=_deadlines(ctx, campaign, sections),
        forecasts=forecasts,
        confirm=confirm,
        now=now,
    )


@router.post("/campaigns/{campaign}/close", response_class=HTMLResponse)
def close(
    request: Request,
    campaign: str,
    operator: ActingOperator,
    ctx: Context,
    reason: str = Form(""),
    confirm: str = Form(""),
) -> Response:
    """Two steps: the first post (a reason) shows what closing does and asks to confirm by typing
    the campaign's id; the second (reason and id) closes it."""
    sections = _campaign_or_404(ctx, operator, campaign)
    admin_only(operator)
    reason = reason.strip()
    if not reason:
        return redirect(f"/campaigns/{campaign}", flash="Give a reason for closing the campaign.", error=True)
    if ctx.ledger.controls.closure(campaign) is not None:
        return redirect(f"/campaigns/{campaign}", flash=f"{campaign} is already closed.", error=True)
    if confirm.strip() != campaign:
        return _campaign_page(request, ctx, operator, campaign, sections, confirm=reason)
    cancelled = ctx.ledger.controls.close_campaign(campaign, reason, ctx.now(), by=operator.name)
    if cancelled is None:
        return redirect(f"/campaigns/{campaign}", flash=f"{campaign} is already closed.", error=True)
    return redirect(
        f"/campaigns/{campaign}",
        flash=f"{campaign} closed: {cancelled} waiting letter(s) cancelled in every section; new appeals get 410.",
    )
