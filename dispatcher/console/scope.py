"""Who is signed in, and what they may see and do: the console's one rule book.

A page handler takes the operator as a FastAPI dependency and asks it before it shows or does
anything::

    from dispatcher.console.scope import ActingOperator, CurrentOperator, may_act, visible

    @router.get("/letters/{delivery_id}")
    def letter(delivery_id: str, operator: CurrentOperator, ctx: Context) -> HTMLResponse:
        row = ctx.ledger.views.delivery(delivery_id)
        visible(operator, row.section if row else None)   # 404 unless it exists in its sections
        ...

    @router.post("/letters/{delivery_id}/retry")
    def retry(delivery_id: str, operator: ActingOperator, ctx: Context) -> RedirectResponse:
        row = ctx.ledger.views.delivery(delivery_id)
        may_act(operator, row.section if row else None)   # 404 as above; 403 for a viewer
        ...   # act, with Audit.record(..., actor=operator.name) in the same transaction
        return redirect(f"/letters/{delivery_id}", flash="Retry queued")

* :data:`CurrentOperator` — the signed-in :class:`Operator`; without a live session a GET is
  redirected to the sign-in page (and back afterwards), any other method too.
* :data:`ActingOperator` — the same for a POST, after checking the form's CSRF token (the hidden
  field ``csrf``, ``{{ csrf_field() }}`` in a template): missing or wrong → 403 and nothing done.
* :meth:`Operator.sees` / :meth:`Operator.acts_on` / :attr:`Operator.is_admin` — the questions;
  :attr:`Operator.scope` — the sections to filter a ledger query by (None: every section).
* :func:`visible` — given the thing's section (None: there is no such thing), raises
  :class:`~dispatcher.errors.OutOfScope` (404, the very page of a thing that does not exist) for
  a missing thing and for another section's, so ids of other sections do not leak;
* :func:`may_act` — :func:`visible`, then :class:`~dispatcher.errors.NotAllowed` (403, a page
  saying why) for an operator who sees it but may not act on it (a viewer);
* :func:`admin_only` — 403 for anyone but an admin; :func:`not_allowed` — the 403 to raise for a
  rule of a page's own.

Roles: a viewer reads its sections (every section if it has none); an operator reads and acts on
its sections' letters and channels; an admin reads and acts on everything and manages operators.
Facts about the whole service (paused channels, workers, queue depth) are shown to everyone.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from dispatcher.console.context import ConsoleContext, context_of
from dispatcher.console.sessions import current_session
from dispatcher.errors import ConsoleError, CsrfRefused, NotAllowed, OutOfScope

#: FastAPI dependency: the console's context (ledger, catalog, settings, Redis, clock)
Context = Annotated[ConsoleContext, Depends(context_of)]

#: what a 404 says, whether the thing does not exist or is another section's
NOT_FOUND = "There is nothing here: no such page, or nothing by that id."


@dataclass(frozen=True)
class Operator:
    """The signed-in operator, as the ledger has it at this request."""

    name: str
    #: viewer, operator or admin
    role: str
    #: the sections it works on; empty: every section
    sections: tuple[str, ...]
    #: the session's CSRF token, for forms
    csrf: str

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    @property
    def can_act(self) -> bool:
        """Whether it may act at all (an operator or an admin)."""
        return self.role in ("operator", "admin")

    @property
    def scope(self) -> tuple[str, ...] | None:
        """The sections to filter ledger queries by; None: every section."""
        return self.sections or None

    def sees(self, section: str | None) -> bool:
        """Whether it may see things of ``section`` (None: a thing of no one section, which only
        those who see every section see)."""
        if not self.sections:
            return True
        return section is not None and section in self.sections

    def acts_on(self, section: str | None) -> bool:
        """Whether it may act on things of ``section``."""
        return self.is_admin or (self.can_act and self.sees(section))

    def describe(self) -> str:
        return f"{self.role}, {'all sections' if not self.sections else 'sections ' + ' '.join(self.sections)}"


class SignInRequired(ConsoleError):
    """No live session: the console answers with the sign-in page (a redirect)."""

    status = 303
    title = "Sign in"


def current_operator(request: Request, ctx: Context) -> Operator:
    """FastAPI dependency: the signed-in operator, or :class:`SignInRequired`."""
    session = current_session(request, ctx)
    if session is None:
        raise SignInRequired("sign in first")
    account = session.operator
    operator = Operator(account.name, account.role, account.sections, session.csrf)
    request.state.operator = operator
    return operator


CurrentOperator = Annotated[Operator, Depends(current_operator)]


async def acting_operator(request: Request, operator: CurrentOperator) -> Operator:
    """FastAPI dependency for POST handlers: the signed-in operator, once the form's CSRF token is
    the session's (else :class:`~dispatcher.errors.CsrfRefused`, 403, and nothing is done)."""
    form = await request.form()
    sent = form.get("csrf")
    if not isinstance(sent, str) or not hmac.compare_digest(sent.encode(), operator.csrf.encode()):
        raise CsrfRefused(
            "This form did not carry your session's security token, so nothing was done. "
            "Go back, reload the page and send the form again."
        )
    return operator


ActingOperator = Annotated[Operator, Depends(acting_operator)]


def visible(operator: Operator, section: str | None) -> None:
    """404 unless the thing exists and is in the operator's sections. ``section``: the thing's
    section, None when there is no such thing."""
    if section is None or not operator.sees(section):
        raise OutOfScope(NOT_FOUND)


def may_act(operator: Operator, section: str | None) -> None:
    """:func:`visible`, then 403 unless the operator may act on ``section``."""
    visible(operator, section)
    if not operator.acts_on(section):
        raise not_allowed(operator)


def not_allowed(operator: Operator, why: str = "this is not one of your sections.") -> NotAllowed:
    """The 403 to raise when ``operator`` may not act: says who is signed in, and ``why`` (a viewer
    is told that viewers do not act, whatever ``why`` says)."""
    return NotAllowed(
        f"You are signed in as {operator.name} ({operator.describe()}): "
        + ("a viewer reads but does not act." if not operator.can_act else why)
    )


def admin_only(operator: Operator) -> None:
    if not operator.is_admin:
        raise NotAllowed(f"Only an admin may do this; you are signed in as {operator.name} ({operator.describe()}).")
