"""Retries through the ledger, as an operator sees them: the schedule of tries per letter."""

from __future__ import annotations

from datetime import datetime

import pytest

from tests.conftest import appeal_body, signed_post, wait_for

pytestmark = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


def email_of(client, appeal_id: str) -> dict:
    view = client.get(f"/v1/appeals/{appeal_id}").json()
    return next(d for d in view["deliveries"] if d["channel"] == "email")


def test_greylisting_delivers_on_the_third_try_with_the_schedule_recorded(client, environ, catalog, smtp, running):
    smtp.script_rcpt([(450, "4.7.1 Greylisted, please retry"), (450, "4.7.1 Greylisted, please retry")])
    appeal_id = signed_post(client, environ, catalog, appeal_body()).json()["appeal_id"]
    wait_for(lambda: email_of(client, appeal_id)["state"] == "sent", timeout=30)
    email = email_of(client, appeal_id)
    tries = email["tries"]
    assert [(t["number"], t["outcome"], t["code"]) for t in tries] == [
        (1, "transient", "450"),
        (2, "transient", "450"),
        (3, "sent", "250"),
    ]
    at = [datetime.fromisoformat(t["at"]) for t in tries]
    first_gap, second_gap = (at[1] - at[0]).total_seconds(), (at[2] - at[1]).total_seconds()
    base = running.service.settings.retry_base_seconds
    # exponential backoff with ±20 % jitter: about base, then about twice base (plus release latency)
    assert 0.8 * base <= first_gap
    assert 0.8 * 2 * base <= second_gap
    assert len(smtp.messages) == 1
