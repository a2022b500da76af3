"""The console's doors: signing in and out, sessions that end, sign-in limits, CSRF on every form,
roles and sections. Through the real API app (TestClient) on a real ledger and a real Redis."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from dispatcher.app import Service
from dispatcher.ledger.tables import OS
from tests.support.console import add_operator, csrf_of, sign_in

sqlite_only = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


class Clock:
    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def console_service(settings, environ, clock) -> Iterator[Service]:  # type: ignore[no-untyped-def]
    svc = Service(settings.but(console_login_limits=("3/minute",)), environ=environ, clock=clock)
    svc.ledger.migrate()
    yield svc
    svc.ledger.dispose()


@pytest.fixture
def web(console_service: Service) -> Iterator[TestClient]:
    with TestClient(console_service.api(), raise_server_exceptions=False) as c:
        yield c


def test_signing_in_opens_the_console_and_signing_out_closes_it(web, console_service):
    account = add_operator(console_service, "operator", ("us",))
    door = web.get("/console/?since=1h", follow_redirects=False)
    assert door.status_code == 303
    assert door.headers["location"] == "/console/login?next=/console/%3Fsince%3D1h"

    answer = sign_in(web, account)
    assert answer.status_code == 303 and answer.headers["location"] == "/console/"
    cookie = next(c for c in answer.headers.get_list("set-cookie") if c.startswith("dispatch_console="))
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/console" in cookie
    assert "Secure" not in cookie  # sandbox mode serves plain HTTP on loopback
    token = web.cookies.get("dispatch_console", path="/console")
    with console_service.ledger.session(read_only=True) as s:
        stored = s.execute(select(OS.c.token_hash)).scalars().all()
    assert len(stored) == 1 and token not in stored[0]  # only its hash is kept

    page = web.get("/console/")
    assert page.status_code == 200
    assert account.name in page.text and "operator, sections us" in page.text
    assert f"Signed in as {account.name}" in page.text

    out = web.post("/console/logout", data={"csrf": csrf_of(page.text)}, follow_redirects=False)
    assert out.status_code == 303 and out.headers["location"] == "/console/login"
    # the old cookie opens nothing any more
    web.cookies.set("dispatch_console", token, path="/console")
    assert web.get("/console/", follow_redirects=False).status_code == 303
    with console_service.ledger.session(read_only=True) as s:
        assert s.execute(select(OS.c.token_hash)).all() == []


@sqlite_only
def test_a_wrong_password_or_an_unknown_name_is_refused_alike(web, console_service):
    account = add_operator(console_service, "viewer")
    wrong = sign_in(web, name=account.name, password="not-the-password")
    unknown = sign_in(web, name="nobody-at-all", password=account.password)
    for answer in (wrong, unknown):
        assert answer.status_code == 401
        assert "Wrong name or password." in answer.text
        assert "dispatch_console=" not in " ".join(answer.headers.get_list("set-cookie"))
    assert web.get("/console/", follow_redirects=False).status_code == 303


@sqlite_only
def test_failed_sign_ins_are_limited_per_name(web, console_service):
    account = add_operator(console_service, "admin")
    other = add_operator(console_service, "viewer")
    for _ in range(3):
        assert sign_in(web, name=account.name, password="guess-guess-guess").status_code == 401
    # the fourth try is refused before the password is looked at, even the right one
    limited = sign_in(web, account)
    assert limited.status_code == 429
    assert int(limited.headers["Retry-After"]) > 0
    assert "Too many failed sign-ins for this name" in limited.text
    # another name from the same address is not held back
    assert sign_in(web, other).status_code == 303


@sqlite_only
def test_successful_sign_ins_do_not_count_towards_the_limit(web, console_service):
    account = add_operator(console_service, "viewer")
    for _ in range(5):
        web.cookies.clear()
        assert sign_in(web, account).status_code == 303


@sqlite_only
def test_a_session_ends_when_it_expires(web, console_service, clock):
    account = add_operator(console_service, "viewer")
    sign_in(web, account)
    clock.now += timedelta(hours=7, minutes=59)
    assert web.get("/console/", follow_redirects=False).status_code == 200
    clock.now += timedelta(minutes=2)
    expired = web.get("/console/", follow_redirects=False)
    assert expired.status_code == 303 and expired.headers["location"].startswith("/console/login")


@sqlite_only
def test_a_form_without_the_sessions_token_is_refused(web, console_service):
    account = add_operator(console_service, "admin")
    sign_in(web, account)
    for data in ({}, {"csrf": "forged"}):
        refused = web.post("/console/logout", data=data, follow_redirects=False)
        assert refused.status_code == 403
        assert "Form refused" in refused.text and "nothing was done" in refused.text
    # still signed in: the forged sign-out did nothing
    assert web.get("/console/", follow_redirects=False).status_code == 200


@sqlite_only
def test_the_sign_in_form_needs_its_own_token(web, console_service):
    account = add_operator(console_service, "admin")
    forged = web.post(
        "/console/login",
        data={"name": account.name, "password": account.password, "csrf": "made-up"},
        follow_redirects=False,
    )
    assert forged.status_code == 403
    assert web.get("/console/", follow_redirects=False).status_code == 303


@sqlite_only
def test_a_sign_in_goes_back_to_the_page_asked_for_and_never_elsewhere(web, console_service):
    account = add_operator(console_service, "admin")
    page = web.get("/console/login?next=/console/audit")
    form = {"name": account.name, "password": account.password, "csrf": csrf_of(page.text)}
    assert 'value="/console/audit"' in page.text
    back = web.post("/console/login", data={**form, "next": "/console/audit"}, follow_redirects=False)
    assert back.headers["location"] == "/console/audit"
    web.cookies.clear()
    page = web.get("/console/login")
    form["csrf"] = csrf_of(page.text)
    away = web.post("/console/login", data={**form, "next": "https://elsewhere.example/"}, follow_redirects=False)
    assert away.headers["location"] == "/console/"


def test_cookies_are_secure_in_live_mode(settings):
    assert not settings.console_cookie_secure
    assert settings.but(mode="live").console_cookie_secure
    assert settings.but(console_secure_cookie=True).console_cookie_secure
