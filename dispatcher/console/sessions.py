"""The console's cookies: the session, and the sign-in form's own CSRF token.

The session cookie holds a random token (the ledger keeps only its SHA-256:
:class:`dispatcher.ledger.operators.Operators`), HttpOnly, SameSite=Strict, path ``/console``,
and Secure where :attr:`Settings.console_cookie_secure` says (live mode, by default). It lasts as
long as the session (``DISPATCH_CONSOLE_SESSION_HOURS``); the ledger's expiry is what counts.

Before there is a session, the sign-in form is protected by a double submit: the form page sets a
random token in a cookie of its own and in a hidden field, and a sign-in is taken only when both
come back equal (a page on another site can send neither the cookie, under SameSite=Strict, nor
read it).
"""

from __future__ import annotations

import secrets
from datetime import datetime

from fastapi import Request, Response

from dispatcher.console.context import PREFIX, ConsoleContext
from dispatcher.ledger.operators import OpenedSession, SessionView

SESSION_COOKIE = "dispatch_console"
LOGIN_COOKIE = "dispatch_console_login"


def _cookie(response: Response, ctx: ConsoleContext, name: str, value: str, max_age: int) -> None:
    response.set_cookie(
        name,
        value,
        max_age=max_age,
        path=PREFIX,
        httponly=True,
        samesite="strict",
        secure=ctx.settings.console_cookie_secure,
    )


def current_session(request: Request, ctx: ConsoleContext) -> SessionView | None:
    token = request.cookies.get(SESSION_COOKIE)
    if not token:
        return None
    return ctx.ledger.operators.session(token, now=ctx.now())


def set_session(response: Response, ctx: ConsoleContext, opened: OpenedSession, now: datetime) -> None:
    _cookie(response, ctx, SESSION_COOKIE, opened.token, max(1, int((opened.expires_at - now).total_seconds())))
    response.delete_cookie(LOGIN_COOKIE, path=PREFIX)


def end_session(request: Request, response: Response, ctx: ConsoleContext) -> None:
    token = request.cookies.get(SESSION_COOKIE)
    if token:
        ctx.ledger.operators.close_session(token)
    response.delete_cookie(SESSION_COOKIE, path=PREFIX)


def login_token(request: Request) -> str:
    """The sign-in form's token: the one its cookie already holds, else a new one."""
    return request.cookies.get(LOGIN_COOKIE) or secrets.token_urlsafe(32)


def set_login_token(response: Response, ctx: ConsoleContext, token: str) -> None:
    _cookie(response, ctx, LOGIN_COOKIE, token, 3600)
