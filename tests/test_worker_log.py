"""What the worker's log tells an operator: a letter held back by a cap was not being sent, the
reason it waits reads as a sentence, and a letter the relay refuses for good stands out."""

from __future__ import annotations

import pytest
from structlog.testing import capture_logs

from dispatcher.app import Service
from tests.conftest import appeal_body

SQLITE = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


def email_letter(service: Service) -> str:
    accepted = service.intake.submit(appeal_body())
    return next(d.id for d in accepted.deliveries if d.channel == "email")


def process(service: Service, *letters: str) -> list[dict]:
    handle = service.worker(threads=1)
    try:
        with capture_logs() as logs:
            for letter in letters:
                handle.processor(letter)
    finally:
        handle.loop.run(handle.processor.channels.get("email").aclose(), timeout=10)
        handle.loop.stop()
    return logs


@SQLITE
def test_a_letter_held_back_by_its_cap_is_not_logged_as_sending(settings, environ, smtp):
    service = Service(settings.but(email_limits=("1/hour",)), environ=environ)
    service.ledger.migrate()
    service.intake.enqueuer = None
    first, second = email_letter(service), email_letter(service)  # the same official
    logs = process(service, first, second)
    assert len(smtp.messages) == 1
    of_second = [e for e in logs if e.get("delivery") == second]
    assert [e["event"] for e in of_second] == ["delivery.retry_scheduled"]
    [deferred] = of_second
    assert deferred["outcome"] == "deferred"
    assert deferred["reason"] == "the recipient's cap is used up (1/hour)"
    assert "{" not in str(deferred["reason"])
    service.ledger.dispose()


@SQLITE
def test_a_letter_the_relay_refuses_for_good_is_a_warning(service, smtp):
    service.intake.enqueuer = None
    letter = email_letter(service)
    smtp.script_rcpt([(550, "5.1.1 <ambassador@embassy.example>: Recipient address rejected: User unknown")])
    logs = process(service, letter)
    [failed] = [e for e in logs if e.get("delivery") == letter and e["event"] == "delivery.bounced"]
    assert failed["log_level"] == "warning"
    assert failed["code"] == 550
    assert failed["reason"].startswith("5.1.1 <ambassador@embassy.example>: Recipient address rejected: User unknown")


def test_rendering_a_fax_does_not_fill_the_log_with_weasyprint_progress(tmp_path):
    import io
    import json
    from datetime import UTC, date, datetime

    from dispatcher.config.loader import load_catalog
    from dispatcher.logging import configure, get_logger
    from dispatcher.render import LetterRequest, Renderer, Supporter
    from dispatcher.render.fax import FaxRenderer
    from tests.conftest import ROOT

    out = io.StringIO()
    configure("INFO", stream=out)
    catalog = load_catalog(ROOT / "config", ROOT / "templates").with_demo_copies(date.today())
    campaign = "UA-002-19-DEMO"
    request = LetterRequest(
        campaign=catalog.campaign(campaign),
        section=catalog.section("us"),
        target=catalog.target(campaign, "us", "president"),
        language="en",
        supporter=Supporter(name="Jane Doe", email="jane@example.org", city="Boston", country="US"),
        message="Please act now.",
        date=date(2019, 5, 9),
    )
    document = FaxRenderer(Renderer(ROOT / "templates")).render(request, sent_at=datetime(2019, 5, 10, tzinfo=UTC))
    assert document.pages >= 1
    get_logger("dispatcher.delivery").info("delivery.sent", delivery="dl_1")
    lines = [json.loads(line) for line in out.getvalue().splitlines() if line.strip()]
    assert [line["event"] for line in lines] == ["delivery.sent"]  # ours, and nothing of WeasyPrint's
