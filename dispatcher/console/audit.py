"""The audit log, newest first, read-only: who did what, when, on what, why.

An operator of some sections sees their sections' entries only; entries of no one section
(operator accounts, numbers flagged by no known letter) only those who see every section. Paged by
entry id (``before``), filtered by an exact target id (a letter, a campaign, a channel key...).
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

from dispatcher.console.pages import render
from dispatcher.console.scope import NOT_FOUND, Context, CurrentOperator
from dispatcher.errors import OutOfScope

router = APIRouter()

PAGE = 50


@router.get("/audit", response_class=HTMLResponse)
def audit_page(
    request: Request,
    operator: CurrentOperator,
    ctx: Context,
    target: str = "",
    before: int | None = None,
) -> HTMLResponse:
    target = target.strip()[:128]
    entries = ctx.ledger.audit.entries(
        sections=operator.scope, target_id=target or None, before_id=before, limit=PAGE + 1
    )
    older = entries[PAGE - 1].id if len(entries) > PAGE else None
    return render(
        request,
        "audit.html",
        nav="Audit",
        entries=entries[:PAGE],
        target=target,
        older=older,
        paged=before is not None,
    )


@router.get("/audit/{entry_id}", response_class=HTMLResponse)
def audit_entry(request: Request, entry_id: int, operator: CurrentOperator, ctx: Context) -> HTMLResponse:
    """One entry, to point a colleague at: another section's entry answers like a missing one."""
    entry = ctx.ledger.audit.entry(entry_id)
    if entry is None or not operator.sees(entry.section):
        raise OutOfScope(NOT_FOUND)
    return render(request, "audit_entry.html", nav="Audit", e=entry)
