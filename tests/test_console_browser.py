"""The console in a real browser (Debian's chromium, headless, driven by Playwright): an operator
signs in, reads the overview, pauses and resumes a channel of its section, finds both actions in
the audit log, and signs out. Every file the pages load comes from the console itself."""

from __future__ import annotations

import pytest

from tests.support.console import browser, console_api, console_page  # noqa: F401 - fixtures


@pytest.fixture
def database_url(sqlite_url: str) -> str:
    return sqlite_url


def test_an_operator_pauses_and_resumes_a_channel_and_signs_out(console_page, service):  # noqa: F811
    page = console_page("operator", ("us",))
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    page.reload()
    name = page.account.name

    assert page.inner_text("h1") == "Overview"
    assert name in page.inner_text("header") and "operator, sections us" in page.inner_text("header")
    assert "Letters are counted for your sections only: us." in page.inner_text("main")

    page.click("nav >> text=Channels")
    assert page.inner_text("h1") == "Channels and numbers"
    page.select_option("select[name=key]", "email:us")
    page.fill("form[action$='/channels/pause'] input[name=reason]", "relay maintenance tonight")
    page.click("form[action$='/channels/pause'] button")
    assert "email:us paused" in page.inner_text(".flash")
    assert "relay maintenance tonight" in page.inner_text("#paused + table")
    assert "email:us" in service.ledger.controls.paused_channels()

    page.fill("form[action$='/channels/resume'] input[name=reason]", "maintenance over")
    page.click("text=Resume email:us")
    assert "email:us resumed" in page.inner_text(".flash")
    assert "No channel is paused." in page.inner_text("main")
    assert service.ledger.controls.paused_channels() == {}

    page.click("nav >> text=Audit")
    rows = page.locator("tbody tr")
    assert rows.count() == 2
    newest, oldest = rows.nth(0).inner_text(), rows.nth(1).inner_text()
    assert name in newest and "channel.resume" in newest and "maintenance over" in newest
    assert name in oldest and "channel.pause" in oldest and "relay maintenance tonight" in oldest

    page.click("text=Sign out")
    assert page.inner_text("h1") == "Sign in"
    assert "Signed out." in page.inner_text("main")
    page.goto(page.console + "/channels")
    assert page.inner_text("h1") == "Sign in"  # the session is gone

    # no CDN, no fonts from elsewhere: every request went to the console itself
    assert requested and all(url.startswith(page.console) for url in requested)
