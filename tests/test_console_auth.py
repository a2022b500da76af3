"""The console's doors: signing in and out, sessions that end, sign-in limits, CSRF on every form,
roles and sections. Through the real API app (TestClient) on a real ledger and a real Redis."""

from __future__ import annotations

import re
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
def test_a_form_too_large_is_not_read(web):
    refused = web.post("/console/login", data={"name": "x" * 70_000, "password": "y", "csrf": "z"})
    assert refused.status_code == 413 and "too large" in refused.text


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


@sqlite_only
def test_cookies_are_secure_in_live_mode(settings):
    assert not settings.console_cookie_secure
    assert settings.but(mode="live").console_cookie_secure
    assert settings.but(console_secure_cookie=True).console_cookie_secure
    assert not settings.but(mode="live", console_secure_cookie=False).console_cookie_secure


def test_console_settings_are_read_from_the_environment_and_checked(monkeypatch):
    from dispatcher.errors import ConfigError
    from dispatcher.settings import Settings

    for name in ("DISPATCH_MODE", "DISPATCH_CONSOLE_SECURE_COOKIE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DISPATCH_CONSOLE_SESSION_HOURS", "0.5")
    monkeypatch.setenv("DISPATCH_CONSOLE_LOGIN_LIMITS", "3/minute, 10/hour")
    monkeypatch.setenv("DISPATCH_CONSOLE_LOGIN_IP_LIMITS", "")
    settings = Settings.from_env()
    assert settings.console_session_hours == 0.5
    assert settings.console_login_limits == ("3/minute", "10/hour")
    assert settings.console_login_ip_limits == ()
    assert not settings.console_cookie_secure
    monkeypatch.setenv("DISPATCH_MODE", "live")
    assert Settings.from_env().console_cookie_secure
    monkeypatch.setenv("DISPATCH_CONSOLE_SECURE_COOKIE", "0")
    assert not Settings.from_env().console_cookie_secure
    for name, value in (("DISPATCH_CONSOLE_SESSION_HOURS", "eight"), ("DISPATCH_CONSOLE_LOGIN_LIMITS", "5/fortnight")):
        monkeypatch.setenv(name, value)
        with pytest.raises(ConfigError, match=name):
            Settings.from_env()
        monkeypatch.delenv(name)


# ---------------------------------------------------------------------------- roles and sections


def _signed_in(web: TestClient, service: Service, role: str, sections: tuple[str, ...] = ()) -> str:
    """Sign ``web`` in as a new operator; returns the page's CSRF token."""
    web.cookies.clear()
    assert sign_in(web, add_operator(service, role, sections)).status_code == 303
    return csrf_of(web.get("/console/channels").text)


def _waiting_email_letter(service: Service) -> str:
    """A us email letter held back by a paused channel (as a worker leaves it)."""
    from sqlalchemy import update

    from dispatcher.ledger.models import Delivery
    from tests.conftest import email_letters

    [letter] = email_letters(service, 1)
    with service.ledger.session() as s:
        s.execute(
            update(Delivery)
            .where(Delivery.id == letter)
            .values(last_outcome="deferred", next_attempt_at=datetime.now(UTC) + timedelta(hours=1))
        )
    return letter


def test_an_operator_pauses_and_resumes_its_sections_channel_and_both_are_audited(web, console_service, clock):
    csrf = _signed_in(web, console_service, "operator", ("us",))
    page = web.get("/console/channels")
    assert '<option value="email:us">' in page.text and '<option value="fax:ch">' not in page.text

    paused = web.post(
        "/console/channels/pause", data={"csrf": csrf, "key": "email:us", "reason": "relay under maintenance"}
    )
    assert paused.status_code == 200 and "email:us paused" in paused.text
    assert console_service.ledger.controls.paused_channels()["email:us"].reason == "relay under maintenance"

    letter = _waiting_email_letter(console_service)
    resumed = web.post("/console/channels/resume", data={"csrf": csrf, "key": "email:us", "reason": "relay back"})
    assert "email:us resumed; 1 waiting letter(s) are due now" in resumed.text
    assert console_service.ledger.controls.paused_channels() == {}
    view = console_service.ledger.views.delivery(letter)
    assert view is not None and view.next_attempt_at is not None and view.next_attempt_at <= clock.now

    entries = console_service.ledger.audit.entries(target_id="email:us")
    operator = entries[0].actor
    assert [(e.action, e.target_id, e.section, e.reason, e.actor) for e in entries] == [
        ("channel.resume", "email:us", "us", "relay back", operator),
        ("channel.pause", "email:us", "us", "relay under maintenance", operator),
    ]
    assert entries[0].detail == "1 waiting letter(s) due now"
    audit = web.get("/console/audit")
    assert "channel.resume" in audit.text and "relay under maintenance" in audit.text


@sqlite_only
def test_a_pause_needs_a_reason(web, console_service):
    csrf = _signed_in(web, console_service, "admin")
    refused = web.post("/console/channels/pause", data={"csrf": csrf, "key": "fax:ch", "reason": "  "})
    assert "fax:ch not paused: say why" in refused.text
    assert console_service.ledger.controls.paused_channels() == {}


@sqlite_only
def test_a_pause_posted_without_the_token_is_refused_and_nothing_changes(web, console_service):
    _signed_in(web, console_service, "admin")
    refused = web.post("/console/channels/pause", data={"key": "fax:ch", "reason": "test"})
    assert refused.status_code == 403 and "Form refused" in refused.text
    assert console_service.ledger.controls.paused_channels() == {}
    assert _actions(console_service) == []


@sqlite_only
def test_a_viewer_cannot_pause_resume_or_unflag(web, console_service):
    now = datetime.now(UTC)
    console_service.ledger.controls.pause_channel("email:us", "relay refused our login", now)
    console_service.ledger.controls.flag_number("+41315550100", "no fax tone", None, now)
    csrf = _signed_in(web, console_service, "viewer", ("us",))
    page = web.get("/console/channels")
    assert "relay refused our login" in page.text and "+41315550100" in page.text
    assert "Resume email:us" not in page.text and "Unflag" not in page.text and "Pause a channel" not in page.text
    for path, data in (
        ("/console/channels/pause", {"key": "fax:us", "reason": "test"}),
        ("/console/channels/resume", {"key": "email:us"}),
        ("/console/numbers/unflag", {"number": "+41315550100"}),
    ):
        refused = web.post(path, data={"csrf": csrf, **data})
        assert refused.status_code == 403, path
        assert "a viewer reads but does not act" in refused.text
    assert set(console_service.ledger.controls.paused_channels()) == {"email:us"}
    assert console_service.ledger.controls.flagged("+41315550100") == "no fax tone"
    assert _actions(console_service) == []


@sqlite_only
def test_an_operator_of_us_sees_nothing_of_ch_and_acts_on_none_of_it(web, console_service):
    ledger = console_service.ledger
    now = datetime.now(UTC)
    ch_letter = console_service.intake.submit(appeal_body_ch()).deliveries[0].id
    ledger.controls.flag_number("+41315550100", "no fax tone", ch_letter, now)
    ledger.controls.pause_channel("fax:ch", "gateway out of funds", now, by="ch-admin")
    ledger.controls.pause_channel("email:us", "relay refused our login", now, by="us-admin")
    [us_entry, ch_entry] = ledger.audit.entries()

    csrf = _signed_in(web, console_service, "operator", ("us",))
    # the paused channel is a fact everyone sees; acting on it is ch's (or an admin's)
    assert "gateway out of funds" in web.get("/console/channels").text
    refused = web.post("/console/channels/resume", data={"csrf": csrf, "key": "fax:ch"})
    assert refused.status_code == 403 and "not a channel of your sections" in refused.text
    # the number shows, the ch letter that flagged it does not; unflagging it is ch's
    channels = web.get("/console/channels").text
    assert "+41315550100" in channels and ch_letter not in channels
    assert web.post("/console/numbers/unflag", data={"csrf": csrf, "number": "+41315550100"}).status_code == 403
    # the audit log: us's entry only, and ch's entry answers like one that does not exist
    audit = web.get("/console/audit").text
    assert "relay refused our login" in audit and "gateway out of funds" not in audit
    assert web.get(f"/console/audit/{us_entry.id}").status_code == 200
    hidden = web.get(f"/console/audit/{ch_entry.id}")
    missing = web.get("/console/audit/999999")
    assert hidden.status_code == missing.status_code == 404
    assert hidden.text == missing.text
    assert web.get(f"/console/audit?target={ch_letter}").text.count("<tr>") == 0
    # unknown channel keys are not found at all
    assert (
        web.post("/console/channels/pause", data={"csrf": csrf, "key": "pigeon:us", "reason": "x"}).status_code == 404
    )
    assert set(ledger.controls.paused_channels()) == {"fax:ch", "email:us"}
    assert ledger.controls.flagged("+41315550100") == "no fax tone"

    # an operator of ch may, and its audit entry is ch's
    csrf = _signed_in(web, console_service, "operator", ("ch",))
    assert ch_letter in web.get("/console/channels").text
    done = web.post("/console/numbers/unflag", data={"csrf": csrf, "number": "+41315550100", "reason": "called them"})
    assert "+41315550100 cleared" in done.text
    entry = ledger.audit.entries()[0]
    assert (entry.action, entry.section, entry.reason) == ("number.unflag", "ch", "called them")


def _actions(service: Service) -> list[str]:
    """The audit log's actions, but for the accounts the test made."""
    return [e.action for e in service.ledger.audit.entries() if not e.action.startswith("operator.")]


def appeal_body_ch() -> dict:
    from tests.conftest import appeal_body

    return appeal_body(section="ch", language="de")


@sqlite_only
def test_the_audit_log_pages_newest_first_and_filters_by_target(web, console_service):
    from dispatcher.ledger.audit import Audit

    start = datetime.now(UTC)
    with console_service.ledger.engine.begin() as conn:
        for n in range(60):
            Audit.record(
                conn,
                actor="maria",
                action="channel.pause",
                target_kind="channel",
                target_id="fax:us" if n % 2 else "email:us",
                now=start + timedelta(seconds=n),
                section="us",
                reason=f"reason {n}",
            )
    _signed_in(web, console_service, "viewer", ("us",))
    first = web.get("/console/audit").text
    assert "reason 59" in first and "reason 10" in first and "reason 9<" not in first
    assert first.index("reason 59") < first.index("reason 58")
    older = re.search(r'href="(/console/audit\?before=\d+)"', first)
    assert older is not None
    second = web.get(older.group(1).replace("&amp;", "&")).text
    assert "reason 9<" in second and "reason 0<" in second and "reason 10<" not in second
    assert "Older entries" not in second and "Newest" in second
    only = web.get("/console/audit?target=email:us").text
    assert only.count("<code>email:us</code>") == 30 and "fax:us" not in only
