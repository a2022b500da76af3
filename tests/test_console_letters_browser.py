"""The letters pages in a real browser (headless Debian chromium through Playwright): an operator
signs in, searches the failed letters, opens one, retries it, and watches a real worker send it to
the real SMTP test server; the audit log has the entry. And an operator of us typing a ch letter's
address gets the page of a letter that does not exist. (Every other URL of the section scope is
checked without a browser: tests/test_console_pages.py.)"""

from __future__ import annotations

import pytest

from dispatcher.ledger.states import State
from tests.conftest import Running, appeal_body, email_letters, enqueue, wait_for
from tests.support.console import browser, console_api, console_page  # noqa: F401

pytestmark = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


@pytest.fixture
def settings(settings):  # type: ignore[no-untyped-def]
    # a letter fails after one transient refusal: a failed letter in one try
    return settings.but(retry_max_attempts=1)


def test_an_operator_retries_a_failed_letter_and_a_worker_sends_it(service, smtp, console_page):  # noqa: F811
    [letter] = email_letters(service, 1)
    smtp.script_rcpt([(451, "4.7.1 Please try again later")])
    with Running(service):
        enqueue(service, [letter])
        wait_for(lambda: service.ledger.views.state_of(letter) == State.FAILED)
        assert smtp.messages == []

        page = console_page("operator", ("us",))
        page.click("nav >> text=Letters")
        page.select_option("select[name=state]", ["failed"])
        page.click("form.search button[type=submit]")
        page.wait_for_url("**/console/letters?*state=failed*")
        page.click(f"a[href='/console/letters/{letter}']")
        assert page.inner_text("h1").endswith("failed")
        assert "4.7.1 Please try again later" in page.inner_text("table.timeline")
        # the letter's HTML part shows in its sandboxed frame (the console's headers allow that one frame)
        assert "Yours sincerely" in page.frame_locator("iframe.letter-html").locator("body").inner_text()

        retry = page.locator("form.action", has_text="Retry now")
        retry.locator("input[name=reason]").fill("the relay says it is fixed")
        retry.locator("button").click()
        page.wait_for_url(f"**/console/letters/{letter}")
        assert "Retry now: failed → queued" in page.inner_text(".flash")

        wait_for(lambda: service.ledger.views.state_of(letter) == State.SENT)
        page.reload()
        assert page.inner_text("h1").endswith("sent")
        timeline = page.inner_text("table.timeline")
        assert "letter.retry" in timeline and "the relay says it is fixed" in timeline
    [received] = smtp.messages
    assert received.message["Message-ID"].startswith(f"<{letter}@")

    page.click("nav >> text=Audit")
    log = page.inner_text("main")
    assert "letter.retry" in log and page.account.name in log and letter in log


def test_an_operator_of_us_opening_a_ch_letter_finds_nothing(service, console_page):  # noqa: F811
    service.intake.enqueuer = None
    body = appeal_body(section="ch", language="de")
    body["supporter"]["country"] = "CH"
    theirs = service.intake.submit(body).deliveries[0].id
    page = console_page("operator", ("us",))
    for path in (f"/letters/{theirs}", f"/letters/{theirs}/fax/1.png", "/letters/dl_nothing_here"):
        answer = page.goto(page.console + path)
        assert answer is not None and answer.status == 404
        assert "Not found" in page.inner_text("h1")
    page.goto(page.console + "/letters?section=ch")
    assert theirs not in page.content()
