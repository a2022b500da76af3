"""Letters: the search (a form of GET parameters, a results table, pages, the same search as CSV)
and one letter — its facts, its timeline of tries and bounces, the letter as rendered (email text
and HTML, fax pages as PNG) and the actions an operator may take on it: retry now, cancel, hand
back (dispatcher/ledger/actions.py).

Scope: every URL under ``/letters/{id}`` — the page, its HTML, its PNG pages, its actions —
answers 404 for a letter of another section exactly as for one that does not exist; the search and
the CSV only ever read the operator's sections, whatever the parameters say.

A supporter is looked up by the exact email, which the server turns into the ledger's keyed hash
(``supporter_ref``): the email is posted (a form with the CSRF token), never put in a URL, so it
stays out of browser histories and access logs; the results page's URL carries the hash.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, Response, StreamingResponse

from dispatcher.console.context import ConsoleContext
from dispatcher.console.pages import redirect, render
from dispatcher.console.scope import ActingOperator, Context, CurrentOperator, Operator, may_act, visible
from dispatcher.ledger.actions import CANCEL, HAND_BACK, RETRY, ActionRefused, Done, sources_of
from dispatcher.ledger.search import BadCursor, LetterQuery
from dispatcher.ledger.states import State
from dispatcher.ledger.views import DeliveryView
from dispatcher.logging import get_logger

router = APIRouter()
log = get_logger(__name__)

#: results per page
PAGE = 50
#: the search's parameters, in the form's order (``cursor`` pages on)
PARAMS = ("campaign", "section", "target", "channel", "state", "since", "until", "delivery", "appeal", "supporter")

#: the email's HTML shown in a frame: nothing it holds may run, load, or navigate anything
_LETTER_HTML_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; img-src data:; "
    "frame-ancestors 'self'; sandbox",
    "X-Frame-Options": "SAMEORIGIN",
}


@dataclass(frozen=True)
class Search:
    """The search as the form sent it: the query, and what the page echoes back."""

    query: LetterQuery
    params: dict[str, Any]
    problems: tuple[str, ...] = ()

    def url(self, path: str, **extra: str) -> str:
        pairs = [(k, v) for k, v in self.params.items() if k != "state" and v]
        pairs += [("state", s) for s in self.params.get("state", [])]
        pairs += [(k, v) for k, v in extra.items() if v]
        return path + ("?" + urlencode(pairs) if pairs else "")


def _search_of(request: Request) -> Search:
    """The query from the URL's parameters; a parameter that cannot be read is named, not a 500."""
    q = request.query_params
    params: dict[str, Any] = {k: (q.get(k) or "").strip() for k in PARAMS if k != "state"}
    params["state"] = [s for s in q.getlist("state") if s]
    problems = []
    states: list[State] = []
    for s in params["state"]:
        try:
            states.append(State(s))
        except ValueError:
            problems.append(f"no state {s!r}")
    since = until = None
    for key in ("since", "until"):
        if params[key]:
            try:
                day = date.fromisoformat(params[key])
            except ValueError:
                problems.append(f"{key}: give a day as YYYY-MM-DD")
                continue
            start = datetime.combine(day, time(0), tzinfo=UTC)
            if key == "since":
                since = start
            else:
                until = start + timedelta(days=1)  # the whole day
    query = LetterQuery(
        campaign=params["campaign"] or None,
        section=params["section"] or None,
        target=params["target"] or None,
        channel=params["channel"] or None,
        states=tuple(states),
        since=since,
        until=until,
        delivery_id=params["delivery"] or None,
        appeal_id=params["appeal"] or None,
        supporter_ref=params["supporter"] or None,
    )
    return Search(query, params, tuple(problems))


def _choices(ctx: ConsoleContext, operator: Operator) -> dict[str, list[str]]:
    sections = [c for c in ctx.section_codes() if operator.sees(c)]
    campaigns = sorted(
        c for c in ctx.catalog.campaigns if any(c in ctx.catalog.sections[s].campaigns for s in sections)
    )
    channels = sorted({key.partition(":")[0] for key in ctx.channel_keys()})
    return {"sections": sections, "campaigns": campaigns, "channels": channels, "states": [s.value for s in State]}


@router.get("/letters", response_class=HTMLResponse)
def letters(request: Request, operator: CurrentOperator, ctx: Context) -> HTMLResponse:
    search = _search_of(request)
    cursor = request.query_params.get("cursor") or None
    page = None
    problems = list(search.problems)
    if not problems:
        try:
            page = ctx.ledger.search.page(search.query, sections=operator.scope, cursor=cursor, limit=PAGE)
        except BadCursor:
            problems.append("that page link is broken: start again from the first page")
    return render(
        request,
        "letters.html",
        nav="Letters",
        search=search,
        page=page,
        paged=cursor is not None,
        problems=problems,
        choices=_choices(ctx, operator),
        csv_url=search.url("/console/letters.csv"),
        first_url=search.url("/console/letters"),
        next_url=search.url("/console/letters", cursor=page.next_cursor) if page and page.next_cursor else None,
        by_supporter=bool(search.params["supporter"]),
    )


@router.post("/letters/supporter")
def by_supporter(request: Request, operator: ActingOperator, ctx: Context, email: str = Form("")) -> Response:
    """The search by a supporter's exact email: answered with a redirect to the results by its
    keyed hash (the email itself never goes into a URL)."""
    email = email.strip()
    if "@" not in email or ctx.supporter_ref is None:
        return redirect("/letters", flash="Give the supporter's whole email address.", error=True)
    return redirect("/letters?" + urlencode({"supporter": ctx.supporter_ref(email)}))


@router.get("/letters.csv")
def letters_csv(request: Request, operator: CurrentOperator, ctx: Context) -> Response:
    search = _search_of(request)
    if search.problems:
        return redirect(search.url("/letters"), flash="; ".join(search.problems), error=True)
    stamp = ctx.now().strftime("%Y%m%d-%H%M")
    lines: Iterator[str] = ctx.ledger.search.csv(search.query, sections=operator.scope)
    return StreamingResponse(
        lines,
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": f'attachment; filename="letters-{stamp}.csv"'},
    )


# ---------------------------------------------------------------------------- one letter


def _letter(ctx: ConsoleContext, operator: Operator, delivery_id: str) -> DeliveryView:
    """The letter, or 404 for one that does not exist and for another section's alike."""
    view = ctx.ledger.views.delivery(delivery_id)
    visible(operator, view.section if view is not None else None)
    assert view is not None
    return view


@dataclass(frozen=True)
class ActionForm:
    action: str
    path: str
    label: str
    hint: str


_ACTIONS = (
    ActionForm(RETRY, "retry", "Retry now", "Send it again now (a failed or bounced letter gets one more try)."),
    ActionForm(CANCEL, "cancel", "Cancel", "It will not be sent."),
    ActionForm(
        HAND_BACK,
        "hand-back",
        "Hand back",
        "Take it from its worker and queue it again. Only for a worker that is gone or hung: "
        "if the worker is still sending, the letter may go twice.",
    ),
)


@router.get("/letters/{delivery_id}", response_class=HTMLResponse)
def letter(request: Request, delivery_id: str, operator: CurrentOperator, ctx: Context) -> HTMLResponse:
    view = _letter(ctx, operator, delivery_id)
    now = ctx.now()
    appeal = ctx.ledger.views.appeal(view.appeal_id) if view.appeal_id else None
    preview = ctx.previews.of(view, now) if ctx.previews is not None else None
    actions = [a for a in _ACTIONS if view.state in sources_of(a.action)] if operator.acts_on(view.section) else []
    if view.kind != "letter" or view.digest_id is not None:
        actions = [a for a in actions if a.action != RETRY]
    return render(
        request,
        "letter.html",
        nav="Letters",
        letter=view,
        appeal=appeal,
        attempts=ctx.ledger.views.attempts(view.id),
        bounces=ctx.ledger.bounces.of(view.id),
        audit=ctx.ledger.audit.entries(target_id=view.id, sections=operator.scope),
        preview=preview,
        preview_kind=type(preview).__name__ if preview is not None else None,
        actions=actions,
        closure=ctx.ledger.controls.closure(view.campaign),
    )


@router.get("/letters/{delivery_id}/letter.html")
def letter_html(delivery_id: str, operator: CurrentOperator, ctx: Context) -> Response:
    """The email's HTML part, for a sandboxed frame on the letter page."""
    view = _letter(ctx, operator, delivery_id)
    preview = ctx.previews.of(view, ctx.now()) if ctx.previews is not None else None
    html = getattr(preview, "html", None)
    if html is None:
        visible(operator, None)  # no HTML to show: 404
    return HTMLResponse(html, headers=_LETTER_HTML_HEADERS)


@router.get("/letters/{delivery_id}/fax/{page}.png")
def fax_page(delivery_id: str, page: int, operator: CurrentOperator, ctx: Context) -> Response:
    view = _letter(ctx, operator, delivery_id)
    png = ctx.previews.fax_page(view, page, ctx.now()) if ctx.previews is not None else None
    if png is None:
        visible(operator, None)  # no such page: 404
    return Response(png, media_type="image/png", headers={"Cache-Control": "private, no-store"})


# ---------------------------------------------------------------------------- actions


@router.post("/letters/{delivery_id}/{verb}")
def act(
    delivery_id: str,
    verb: str,
    operator: ActingOperator,
    ctx: Context,
    reason: str = Form(""),
    expected: str = Form(""),
) -> Response:
    form = next((a for a in _ACTIONS if a.path == verb), None)
    view = ctx.ledger.views.delivery(delivery_id)
    if form is None:
        visible(operator, None)  # an action that does not exist: 404 like a letter that does not
    may_act(operator, view.section if view is not None else None)
    assert view is not None and form is not None
    back = f"/letters/{delivery_id}"
    reason = reason.strip()
    if not reason:
        return redirect(back, flash=f"{form.label}: say why (the reason goes into the audit log).", error=True)
    expected_state = expected or None
    try:
        done = _take(ctx, operator, view, form.action, reason, expected_state)
    except ActionRefused as refused:
        return redirect(back, flash=f"{form.label} refused: {refused}", error=True)
    log.info(
        "letter.operator_action",
        delivery=done.delivery_id,
        action=done.action,
        operator=operator.name,
        before=done.before.value,
        after=done.after.value,
    )
    note = _enqueue(ctx, done)
    return redirect(back, flash=f"{form.label}: {done.detail}{note}.")


def _take(
    ctx: ConsoleContext, operator: Operator, view: DeliveryView, action: str, reason: str, expected: str | None
) -> Done:
    actions, now = ctx.ledger.actions, ctx.now()
    try:
        state = State(expected) if expected else None
    except ValueError:
        raise ActionRefused(f"no state {expected!r}", code="moved") from None
    if action == RETRY:
        try:
            deadline = ctx.catalog.deadline_at(view.campaign, view.section)
        except KeyError:
            raise ActionRefused(
                f"campaign {view.campaign} / section {view.section} is no longer configured", code="deadline"
            ) from None
        return actions.retry_now(
            view.id, actor=operator.name, reason=reason, now=now, deadline=deadline, expected=state
        )
    if action == CANCEL:
        return actions.cancel(view.id, actor=operator.name, reason=reason, now=now, expected=state)
    return actions.hand_back(view.id, actor=operator.name, reason=reason, now=now, expected=state)


def _enqueue(ctx: ConsoleContext, done: Done) -> str:
    """The retried or handed-back letter's message on the queue, after the commit, as intake does;
    should the queue refuse, the letter waits in the ledger, due now, for the reconciler."""
    if not done.enqueue:
        return ""
    if ctx.enqueuer is not None:
        try:
            ctx.enqueuer.send([done.delivery_id])
            return "; on the queue"
        except Exception as exc:  # noqa: BLE001 - any broker failure: the ledger keeps the letter due
            log.warning("delivery.enqueue_deferred", delivery=done.delivery_id, error=type(exc).__name__)
    ctx.ledger.lifecycle.unmark_queued([done.delivery_id], ctx.now())
    return "; the queue is unavailable, the reconciler will send it"
