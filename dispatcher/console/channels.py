"""Channels and numbers: paused channels (pause, resume) and flagged fax numbers (unflag).

A channel key ("email:us") is a fact every operator sees; acting on it is for an operator of its
section or an admin. Resuming does what ``dispatcher channel resume`` does (the channel's waiting
letters become due now); unflagging what ``dispatcher fax unflag`` does. A number is unflagged by
an operator of the section whose letter flagged it, or by an admin. Every action is written to the
audit log in its own transaction (:mod:`dispatcher.ledger.controls`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse

from dispatcher.console.context import ConsoleContext
from dispatcher.console.pages import redirect, render
from dispatcher.console.scope import NOT_FOUND, ActingOperator, Context, CurrentOperator, Operator, not_allowed
from dispatcher.errors import OutOfScope

router = APIRouter()

#: longest reason kept
REASON_MAX = 500


@dataclass(frozen=True)
class NumberRow:
    number: str
    reason: str
    flagged_at: datetime
    #: the letter that flagged it, when the operator may see it
    delivery: str | None
    #: that letter's section (None: unknown)
    section: str | None
    may_unflag: bool


def _may_unflag(operator: Operator, section: str | None) -> bool:
    return operator.is_admin if section is None else operator.acts_on(section)


def _numbers(ctx: ConsoleContext, operator: Operator) -> list[NumberRow]:
    rows = []
    for flagged in ctx.ledger.controls.flagged_numbers():
        letter = ctx.ledger.views.delivery(flagged.delivery) if flagged.delivery else None
        section = letter.section if letter is not None else None
        rows.append(
            NumberRow(
                number=flagged.number,
                reason=flagged.reason,
                flagged_at=flagged.flagged_at,
                delivery=flagged.delivery if section is not None and operator.sees(section) else None,
                section=section,
                may_unflag=_may_unflag(operator, section),
            )
        )
    return rows


def _section(key: str) -> str:
    return key.partition(":")[2]


@router.get("/channels", response_class=HTMLResponse)
def channels_page(request: Request, operator: CurrentOperator, ctx: Context) -> HTMLResponse:
    paused = ctx.ledger.controls.paused_channels()
    pausable = [k for k in ctx.channel_keys() if k not in paused and operator.acts_on(_section(k))]
    return render(
        request,
        "channels.html",
        nav="Channels",
        paused=list(paused.values()),
        pausable=pausable,
        numbers=_numbers(ctx, operator),
        acts_on=lambda key: operator.acts_on(_section(key)),
    )


def _acts_on_channel(operator: Operator, ctx: ConsoleContext, key: str) -> None:
    if key not in ctx.channel_keys() and key not in ctx.ledger.controls.paused_channels():
        raise OutOfScope(NOT_FOUND)
    if not operator.acts_on(_section(key)):
        raise not_allowed(operator, f"{key} is not a channel of your sections.")


@router.post("/channels/pause")
def pause(
    operator: ActingOperator,
    ctx: Context,
    key: Annotated[str, Form()] = "",
    reason: Annotated[str, Form()] = "",
) -> RedirectResponse:
    _acts_on_channel(operator, ctx, key)
    reason = reason.strip()[:REASON_MAX]
    if not reason:
        return redirect("/channels", flash=f"{key} not paused: say why (the reason is shown to everyone).", error=True)
    if not ctx.ledger.controls.pause_channel(key, reason, ctx.now(), by=operator.name):
        return redirect("/channels", flash=f"{key} was paused already.", error=True)
    return redirect("/channels", flash=f"{key} paused: its letters wait until it is resumed.")


@router.post("/channels/resume")
def resume(
    operator: ActingOperator,
    ctx: Context,
    key: Annotated[str, Form()] = "",
    reason: Annotated[str, Form()] = "",
) -> RedirectResponse:
    _acts_on_channel(operator, ctx, key)
    released = ctx.ledger.controls.resume_channel(
        key, ctx.now(), by=operator.name, reason=reason.strip()[:REASON_MAX] or None
    )
    if released is None:
        return redirect("/channels", flash=f"{key} is not paused.", error=True)
    return redirect("/channels", flash=f"{key} resumed; {released} waiting letter(s) are due now.")


@router.post("/numbers/unflag")
def unflag(
    operator: ActingOperator,
    ctx: Context,
    number: Annotated[str, Form()] = "",
    reason: Annotated[str, Form()] = "",
) -> RedirectResponse:
    row = next((r for r in _numbers(ctx, operator) if r.number == number), None)
    if row is None:
        raise OutOfScope(NOT_FOUND)
    if not row.may_unflag:
        raise not_allowed(
            operator, "this number was flagged by another section's letter; its operators or an admin unflag it."
        )
    if not ctx.ledger.controls.unflag_number(
        number, now=ctx.now(), by=operator.name, reason=reason.strip()[:REASON_MAX] or None
    ):
        return redirect("/channels", flash=f"{number} is not flagged.", error=True)
    return redirect("/channels", flash=f"{number} cleared; letters waiting for it are sent at their next try.")
