"""Appeals end to end: signed intake → ledger → Redis queue → worker → a real SMTP server,
on SQLite and on PostgreSQL. Sandbox mode routes every letter to the test server."""

from __future__ import annotations

import json
from email.headerregistry import Address
from email.utils import getaddresses

import pytest
from structlog.testing import capture_logs

from tests.conftest import Running, appeal_body, make_settings, signed_post, wait_for
from tests.support.services import RedisServer


def email_targets(catalog, campaign: str, section: str):
    return [r.target for r in catalog.routes(campaign, section) if r.channel == "email"]


def deliveries(client, appeal_id: str) -> dict[tuple[str, str], dict]:
    view = client.get(f"/v1/appeals/{appeal_id}").json()
    return {(d["target"], d["channel"]): d for d in view["deliveries"]}


def email_states(client, appeal_id: str) -> dict[str, str]:
    return {t: d["state"] for (t, ch), d in deliveries(client, appeal_id).items() if ch == "email"}


def test_us_appeal_reaches_every_email_target(client, environ, catalog, smtp, running):
    body = appeal_body(message="My own words: <b>free them</b>.\nSecond line.")
    r = signed_post(client, environ, catalog, body)
    assert r.status_code == 202, r.text
    appeal_id = r.json()["appeal_id"]
    targets = email_targets(catalog, "UA-002-19", "us")
    assert targets, "section us writes to at least one target by email"

    wait_for(lambda: set(email_states(client, appeal_id).values()) == {"sent"})
    assert len(smtp.messages) == len(targets)
    section = catalog.section("us")
    for target in targets:
        [received] = [m for m in smtp.messages if target.email in m.rcpt_tos]
        msg = received.message
        assert getaddresses([msg["To"]]) == [(target.name, target.email)]
        assert msg["From"].addresses[0] == Address(
            f"Jane Doe via {section.sender.name}", addr_spec=section.sender.address
        )
        assert msg["Reply-To"].addresses[0].addr_spec == body["supporter"]["email"]
        # the letter's own bounce address (VERP) on the section's bounce domain
        assert received.mail_from.startswith("bounces+")
        assert received.mail_from.endswith("@" + section.bounces.domain)
        assert msg["Content-Language"] == "en"
        text = msg.get_body(("plain",)).get_content()
        html = msg.get_body(("html",)).get_content()
        assert text.startswith(target.salutation["en"])
        assert "I am deeply concerned" in text
        assert "<b>free them</b>" in text  # kept as text in the plain part
        assert "&lt;b&gt;free them&lt;/b&gt;" in html  # escaped in the HTML part
        assert "Jane Doe" in text and "Boston" in text
    # the fax letter goes through the fax lab in sandbox mode, whatever the real number
    fax = [d for (t, ch), d in deliveries(client, appeal_id).items() if ch == "fax"]
    assert fax and all(d["gateway"] in (None, "lab") for d in fax)
    wait_for(
        lambda: {d["state"] for (t, ch), d in deliveries(client, appeal_id).items() if ch == "fax"} == {"delivered"}
    )


def test_letter_follows_the_targets_preferred_language(client, environ, catalog, smtp, running):
    body = appeal_body()
    body["supporter"]["languages"] = ["ru"]
    r = signed_post(client, environ, catalog, body)
    appeal_id = r.json()["appeal_id"]
    wait_for(lambda: set(email_states(client, appeal_id).values()) == {"sent"})
    [received] = smtp.messages
    assert received.message["Content-Language"] == "ru"
    target = email_targets(catalog, "UA-002-19", "us")[0]
    assert received.message.get_body(("plain",)).get_content().startswith(target.salutation["ru"])


def test_redelivered_message_sends_nothing_more(client, environ, catalog, smtp, service, running):
    r = signed_post(client, environ, catalog, appeal_body())
    appeal_id = r.json()["appeal_id"]
    wait_for(lambda: set(email_states(client, appeal_id).values()) == {"sent"})
    sent_before = len(smtp.messages)
    ids = [d["id"] for d in deliveries(client, appeal_id).values() if d["channel"] == "email"]
    # A worker that died after sending but before acknowledging: Redis hands the message out again.
    service.enqueuer.send(ids * 3)
    marker = signed_post(client, environ, catalog, appeal_body())  # a later letter proves the queue drained
    wait_for(lambda: set(email_states(client, marker.json()["appeal_id"]).values()) == {"sent"})
    assert len(smtp.messages) == sent_before + len(email_targets(catalog, "UA-002-19", "us"))
    ids_seen = [m.message["Message-ID"] for m in smtp.messages]
    assert len(ids_seen) == len(set(ids_seen))
    for delivery_id in ids:
        assert [a.outcome for a in service.ledger.views.attempts(delivery_id)] == ["sent"]


def test_450_is_retried_then_delivered(client, environ, catalog, smtp, service, running):
    smtp.script_rcpt([(450, "4.7.1 Greylisted, try again later")])
    r = signed_post(client, environ, catalog, appeal_body())
    appeal_id = r.json()["appeal_id"]
    wait_for(lambda: set(email_states(client, appeal_id).values()) == {"sent"})
    [email] = [d for d in deliveries(client, appeal_id).values() if d["channel"] == "email"]
    attempts = service.ledger.views.attempts(email["id"])
    assert [(a.outcome, a.code) for a in attempts] == [("transient", "450"), ("sent", "250")]
    assert "Greylisted" in attempts[0].text
    assert email["attempts"] == 2
    assert len(smtp.messages) == 1


def test_550_at_rcpt_bounces_suppresses_the_address_and_the_next_letter_is_not_sent(
    client, environ, catalog, smtp, service, running
):
    smtp.script_rcpt([(550, "5.1.1 <nobody>: Recipient address rejected: User unknown")])
    r = signed_post(client, environ, catalog, appeal_body())
    appeal_id = r.json()["appeal_id"]
    wait_for(lambda: set(email_states(client, appeal_id).values()) == {"bounced"})
    [email] = [d for d in deliveries(client, appeal_id).values() if d["channel"] == "email"]
    assert email["last_outcome"] == "permanent"
    assert email["last_code"] == "550"
    assert "User unknown" in email["last_text"]
    assert len(service.ledger.views.attempts(email["id"])) == 1
    assert smtp.messages == []
    recipient = service.ledger.views.delivery(email["id"]).recipient
    # suppressed just after the bounce is recorded (its own transaction)
    wait_for(lambda: service.ledger.suppressions.find("email", recipient.upper()) is not None)

    # the relay would take it now, but the address is known to bounce: nothing is sent by
    # email; us's route to the ambassador has fallback = ["fax"], so a fax stands in for it
    second = signed_post(client, environ, catalog, appeal_body()).json()["appeal_id"]
    wait_for(lambda: set(email_states(client, second).values()) == {"rerouted"})
    [again] = [d for d in deliveries(client, second).values() if d["channel"] == "email"]
    assert again["last_code"] == "suppressed"
    assert "address known to bounce" in again["last_text"] and "sent by fax instead" in again["last_text"]
    appeal = service.ledger.views.appeal(second)
    [fax] = [d for d in appeal.deliveries if d.replaces == again["id"]]
    assert fax.channel == "fax" and fax.target == email["target"]
    assert smtp.messages == []


def test_counters_count_appeals_and_letters(client, environ, catalog, smtp, running):
    ids = [signed_post(client, environ, catalog, appeal_body()).json()["appeal_id"] for _ in range(3)]
    for appeal_id in ids:
        wait_for(lambda a=appeal_id: set(email_states(client, a).values()) == {"sent"})
    counters = client.get("/v1/campaigns/UA-002-19-DEMO/counters").json()
    per_appeal = len(email_targets(catalog, "UA-002-19", "us"))
    assert counters["appeals"] == 3
    assert counters["letters_delivered"] == 3 * per_appeal
    assert counters["by_section"]["us"] == {"appeals": 3, "letters_delivered": 3 * per_appeal}


def test_delivery_log_has_every_step_and_no_personal_data(client, environ, catalog, smtp, running):
    body = appeal_body(message="They took my brother away")
    with capture_logs() as logs:
        r = signed_post(client, environ, catalog, body)
        appeal_id = r.json()["appeal_id"]
        wait_for(lambda: set(email_states(client, appeal_id).values()) == {"sent"})
    email_id = next(d["id"] for d in deliveries(client, appeal_id).values() if d["channel"] == "email")
    events = [e["event"] for e in logs if e.get("delivery") == email_id]
    assert events[:3] == ["delivery.planned", "delivery.queued", "delivery.sending"]
    sent = next(e for e in logs if e["event"] == "delivery.sent" and e["delivery"] == email_id)
    for key in ("appeal", "campaign", "section", "target", "channel", "attempt", "outcome", "code", "latency_ms"):
        assert key in sent, key
    dump = json.dumps(logs, default=str)
    for secret in (body["supporter"]["email"], "Jane Doe", "brother", "Boston"):
        assert secret not in dump


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_appeal_accepted_while_redis_is_down_is_delivered_once_it_is_back(
    tmp_path, database_url, environ, catalog, smtp
):
    from fastapi.testclient import TestClient

    from dispatcher.app import Service

    with RedisServer(appendonly=True) as redis_server:
        settings = make_settings(tmp_path, database_url=database_url, redis_url=redis_server.url, smtp_port=smtp.port)
        service = Service(settings, environ=environ)
        service.ledger.migrate()
        with TestClient(service.api()) as client:
            redis_server.stop()
            r = signed_post(client, environ, catalog, appeal_body())
            assert r.status_code == 202, r.text
            appeal_id = r.json()["appeal_id"]
            assert set(email_states(client, appeal_id).values()) == {"planned"}
            assert client.get("/healthz").json()["queue"].startswith("unavailable")
            redis_server.start()
            with Running(service):
                wait_for(lambda: set(email_states(client, appeal_id).values()) == {"sent"}, timeout=30)
        assert len(smtp.messages) == len(email_targets(catalog, "UA-002-19", "us"))
        service.ledger.dispose()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_worker_dying_after_sending_gets_its_message_requeued_and_nothing_is_resent(
    client, environ, catalog, smtp, service
):
    """The real redelivery path: a worker takes a message, sends and records the letter, then dies
    without acknowledging. Redis hands the message to another worker once the dead one's
    heartbeat times out; the ledger claim makes that a no-op."""
    from dispatcher.app import Service
    from dispatcher.queue.actors import QUEUE

    # the dying worker: another process's broker connection and processor, same ledger and Redis
    dying = Service(service.settings, environ=environ)
    dying_handle = dying.worker(threads=1)
    consumer = dying.broker.consume(QUEUE, prefetch=10, timeout=500)

    r = signed_post(client, environ, catalog, appeal_body())
    email_id = next(d["id"] for d in r.json()["deliveries"] if d["channel"] == "email")
    taken = []
    for message in consumer:
        if message is None:
            continue
        taken.append(message.args[0])
        if message.args[0] == email_id:
            break
    # the dying worker sends with the real processor, records "sent", and never acks
    dying_handle.processor(email_id)
    assert len(smtp.messages) == 1
    dying_handle.loop.run(dying_handle.channels.get("email").aclose())
    dying_handle.loop.stop()
    del consumer  # it dies: no more heartbeats, its messages stay unacknowledged

    # The live worker treats a 1.5 s silence as death and runs maintenance on every command.
    service.broker.heartbeat_timeout = 1_500
    service.broker.maintenance_chance = 1_000_000
    with capture_logs() as logs, Running(service):
        wait_for(
            lambda: any(e["event"] == "delivery.skipped" and e["delivery"] == email_id for e in logs),
            timeout=20,
        )
    assert len(smtp.messages) == 1
    assert [a.outcome for a in service.ledger.views.attempts(email_id)] == ["sent"]
