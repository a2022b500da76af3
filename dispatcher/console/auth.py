"""Signing in and out of the console.

``GET /console/login`` shows the form (with its double-submit token, :mod:`.sessions`);
``POST /console/login`` checks the token, the attempt limits, then the password (argon2,
:class:`dispatcher.ledger.operators.Operators`), opens a session and goes on to the page asked
for. ``POST /console/logout`` ends the session (a form, with the session's CSRF token).

Attempts are limited per operator name and per client address (``DISPATCH_CONSOLE_LOGIN_LIMITS``,
``DISPATCH_CONSOLE_LOGIN_IP_LIMITS``), counted in Redis by the caps' limiter so the limits hold
across API processes. A successful sign-in gives its slots back: only failures count. Past a limit
the console answers 429 with ``Retry-After``, without checking the password. When Redis does not
answer, attempts are not counted (logged as ``console.login_unlimited``): the console is what
operators need most when something is down, and each guess still costs an argon2 hash.
"""

from __future__ import annotations

import hashlib
import math
import secrets
from datetime import timedelta
from functools import lru_cache
from typing import Annotated

import redis
from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from dispatcher.console.context import PREFIX, ConsoleContext
from dispatcher.console.pages import redirect, render
from dispatcher.console.scope import ActingOperator, Context
from dispatcher.console.sessions import (
    LOGIN_COOKIE,
    current_session,
    end_session,
    login_token,
    set_login_token,
    set_session,
)
from dispatcher.errors import CsrfRefused, TooManyLogins
from dispatcher.logging import get_logger
from dispatcher.policy.limits import Rate, RateLimiter

log = get_logger("dispatcher.console")

router = APIRouter()


def _safe_next(target: str | None) -> str:
    """Only a page of the console: never another site (an open redirect)."""
    if target and target.startswith(PREFIX + "/") and not target.startswith("//") and "\\" not in target:
        return target
    return PREFIX + "/"


@lru_cache(maxsize=16)
def _rates(texts: tuple[str, ...]) -> tuple[Rate, ...]:
    return tuple(Rate.parse(t) for t in texts)


def _hashed(kind: str, value: str) -> str:
    # Names and addresses are not kept in Redis in clear.
    return hashlib.sha256(f"console-login:{kind}:{value}".encode()).hexdigest()[:32]


class Attempt:
    """One sign-in attempt's slots under the limits; given back if it succeeds."""

    def __init__(self, limiter: RateLimiter | None, ctx: ConsoleContext, name: str, address: str):
        self.limiter = limiter
        self.token = secrets.token_hex(8)
        self.keys = [
            (f"console:login:name:{_hashed('name', name.strip().lower())}", ctx.settings.console_login_limits, "name"),
            (f"console:login:ip:{_hashed('ip', address)}", ctx.settings.console_login_ip_limits, "ip"),
        ]
        self.taken: list[str] = []

    def take(self) -> None:
        """Take a slot under each limit, or raise TooManyLogins (taking none)."""
        if self.limiter is None:
            return
        try:
            for key, texts, kind in self.keys:
                if not texts:
                    continue
                wait = self.limiter.reserve(key, _rates(texts), token=self.token)
                if wait > 0:
                    self.give_back()
                    retry = max(1, math.ceil(wait))
                    whose = "for this name" if kind == "name" else "from your address"
                    log.warning("console.login_limited", limit=kind, retry_after=retry)
                    raise TooManyLogins(
                        f"Too many failed sign-ins {whose}. Wait {retry} seconds, then try again.", retry_after=retry
                    )
                self.taken.append(key)
        except redis.RedisError as exc:
            self.give_back()
            log.warning("console.login_unlimited", error=type(exc).__name__)

    def give_back(self) -> None:
        if self.limiter is None:
            return
        try:
            for key in self.taken:
                self.limiter.cancel(key, self.token)
        except redis.RedisError:
            pass  # the slots expire with their window
        self.taken = []


def _form(
    request: Request, ctx: ConsoleContext, *, status: int = 200, error: str | None = None, name: str = ""
) -> Response:
    token = login_token(request)
    response = render(
        request,
        "login.html",
        status=status,
        csrf=token,
        error=error,
        name=name,
        next=_safe_next(request.query_params.get("next")),
    )
    set_login_token(response, ctx, token)
    return response


@router.get("/login", response_class=HTMLResponse)
def login_page(request: Request, ctx: Context) -> Response:
    if current_session(request, ctx) is not None:
        return RedirectResponse(_safe_next(request.query_params.get("next")), status_code=303)
    return _form(request, ctx)


@router.post("/login", response_class=HTMLResponse)
async def login(
    request: Request,
    ctx: Context,
    name: Annotated[str, Form()] = "",
    password: Annotated[str, Form()] = "",
    csrf: Annotated[str, Form()] = "",
    next: Annotated[str, Form()] = "",
) -> Response:
    cookie = request.cookies.get(LOGIN_COOKIE, "")
    if not cookie or not csrf or not secrets.compare_digest(cookie.encode(), csrf.encode()):
        raise CsrfRefused(
            "The sign-in form was not sent by this console's sign-in page, or it is too old. "
            "Open the sign-in page again and sign in from there."
        )
    address = request.client.host if request.client else "unknown"
    attempt = Attempt(ctx.limiter, ctx, name, address)
    await run_in_threadpool(attempt.take)
    account = await run_in_threadpool(ctx.ledger.operators.verify, name, password)
    if account is None:
        log.info("console.login_failed")
        return _form(request, ctx, status=401, error="Wrong name or password.", name=name)
    attempt.give_back()
    now = ctx.now()
    lifetime = ctx.settings.console_session_hours
    await run_in_threadpool(ctx.ledger.operators.purge_sessions, now)
    opened = await run_in_threadpool(
        ctx.ledger.operators.open_session, account.name, now=now, lifetime=timedelta(hours=lifetime)
    )
    log.info("console.signed_in", operator=account.name, role=account.role)
    response = redirect(_safe_next(next), flash=f"Signed in as {account.name} ({account.describe()}).")
    set_session(response, ctx, opened, now)
    return response


@router.post("/logout")
def logout(request: Request, ctx: Context, operator: ActingOperator) -> Response:
    response = redirect("/login", flash="Signed out.")
    end_session(request, response, ctx)
    log.info("console.signed_out", operator=operator.name)
    return response
