"""Erasing a supporter from the console (an admin's): a form, a preview in counts, a confirmation.

Three steps, every one a POST with the CSRF token, so the supporter's email is never in a URL,
the browser's history or an access log (it travels in the form's body, and in a hidden field of
the confirmation step):

1. ``GET /supporters/erase`` — the form: an appeal id or an email, optionally a section and a
   campaign to narrow to, and a reason (required: it goes into the audit entry);
2. ``POST /supporters/erase`` without a confirmation — what the erasure would do, in counts only
   (appeals, letters to cancel, being sent, already sent; no name or email shown back), and a box
   to type ``ERASE`` (or the appeal id) in;
3. the same POST with the confirmation typed — :meth:`dispatcher.supporters.Supporters.erase`
   with the operator's name as the actor, then a redirect to the empty form with the report's
   counts as the flash message (a reload does not erase again).

Nothing matching answers with a message and writes nothing, not even an audit entry. Erasure
concerns whichever section the supporter wrote in, so only an admin reaches these pages; anyone
else gets the 403 page. What erasing does and keeps: docs/privacy.md.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, Response

from dispatcher.console.context import ConsoleContext
from dispatcher.console.pages import redirect, render
from dispatcher.console.scope import ActingOperator, Context, CurrentOperator, admin_only
from dispatcher.errors import NotFound
from dispatcher.supporters import ErasureReport, Supporters

router = APIRouter()

PATH = "/supporters/erase"
#: what to type to confirm an erasure by email (by appeal id, the id does too)
CONFIRM_WORD = "ERASE"


def _supporters(ctx: ConsoleContext) -> Supporters:
    return ctx.supporters or Supporters(ctx.ledger, ctx.settings, ctx.clock)


def _page(request: Request, ctx: ConsoleContext, *, status: int = 200, **context: Any) -> HTMLResponse:
    return render(
        request, "erase.html", status=status, nav="Erase", sections=ctx.section_codes(), word=CONFIRM_WORD, **context
    )


@router.get(PATH, response_class=HTMLResponse)
def erase_form(request: Request, operator: CurrentOperator, ctx: Context) -> HTMLResponse:
    admin_only(operator)
    return _page(request, ctx, form={})


def _summary(report: ErasureReport) -> str:
    if report.status == "already_erased":
        head = f"Already erased: {len(report.appeal_ids)} appeal(s), nothing more to blank"
    else:
        head = f"Erased {report.appeals_erased} appeal(s)"
        if report.appeals_erased < len(report.appeal_ids):
            head += f" ({len(report.appeal_ids) - report.appeals_erased} erased before)"
    return (
        f"{head}: {report.letters_cancelled} letter(s) cancelled, {report.letters_in_flight} being sent left to "
        f"finish, {report.letters_out} already sent kept in the counts, {report.texts_redacted} text(s) redacted, "
        f"{report.sandbox_files_removed} sandbox file(s) deleted. The audit log has the entry."
    )


@router.post(PATH, response_class=HTMLResponse)
def erase(
    request: Request,
    operator: ActingOperator,
    ctx: Context,
    appeal_id: str = Form(""),
    email: str = Form(""),
    section: str = Form(""),
    campaign: str = Form(""),
    reason: str = Form(""),
    confirm: str | None = Form(None),
) -> Response:
    """Steps 2 and 3 (see the module's doc): without ``confirm`` the preview, with it the erasure."""
    admin_only(operator)
    appeal_id, email, section, campaign, reason = (v.strip() for v in (appeal_id, email, section, campaign, reason))
    # What the form is shown again with: never the email (it is not echoed into any page).
    form = {"appeal_id": appeal_id, "section": section, "campaign": campaign, "reason": reason}
    problem = None
    if bool(appeal_id) == bool(email):
        problem = "Give an appeal id or the supporter's email: one of them."
    elif email and "@" not in email:
        problem = "Give the supporter's whole email address."
    elif not reason:
        problem = "Give a reason (a request's reference, who asked): it goes into the audit log."
    if problem is not None:
        return _page(request, ctx, status=400, form=form, problem=problem)

    supporters = _supporters(ctx)
    who = supporters.who(
        appeal_id=appeal_id or None, email=email or None, section=section or None, campaign=campaign or None
    )
    try:
        appeals = supporters.preview(who)
    except NotFound as exc:
        return _page(request, ctx, status=404, form=form, problem=f"Nothing to erase: {exc.message}. Nothing was done.")

    expected = {CONFIRM_WORD} | ({appeal_id} if appeal_id else set())
    if confirm is None or confirm.strip() not in expected:
        return _page(
            request,
            ctx,
            form=form,
            carried={**form, "email": email},
            preview={
                "appeals": len(appeals),
                "already_erased": sum(a.already_erased for a in appeals),
                "sections": sorted({a.section for a in appeals}),
                "campaigns": sorted({a.campaign for a in appeals}),
                "waiting": sum(a.waiting for a in appeals),
                "in_flight": sum(a.in_flight for a in appeals),
                "out": sum(a.out for a in appeals),
            },
            by_email=bool(email),
            wrong=confirm is not None,
        )
    try:
        report = supporters.erase(who, actor=operator.name, reason=reason)
    except NotFound as exc:  # gone between the preview and the confirmation
        return _page(request, ctx, status=404, form=form, problem=f"Nothing to erase: {exc.message}. Nothing was done.")
    return redirect(PATH, flash=_summary(report))
