"""Live mode against local servers that follow Telnyx's and Sinch's documented APIs: the worker
sends through the real adapters, and the providers' status webhooks reach our real HTTP server
and settle the letters. Only loopback addresses and a test campaign with fictional numbers."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from dispatcher.app import Service
from tests.conftest import ROOT, Running, make_settings, wait_for
from tests.support.fax_providers import SinchServer, TelnyxServer
from tests.support.liveconfig import write_config
from tests.support.services import free_port
from tests.support.web import LiveApi

pytestmark = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)

RELAY_AND_GATEWAY = """
[smtp]
host = "127.0.0.1"

[fax]
gateway = "{gateway}"
from_number = "020 7946 0000"
base_url = "{base_url}"
api_key_env = "TEST_TELNYX_KEY"
connection_id = "conn-test"
project_id = "proj-test"
key_id_env = "TEST_SINCH_KEY_ID"
key_secret_env = "TEST_SINCH_SECRET"
"""


def write_live_config(tmp_path: Path, gateway: str, base_url: str) -> Path:
    return write_config(
        tmp_path,
        campaign_id="TEST-LIVE",
        channel="fax",
        address_line='fax = "+44 20 7946 0100"',
        relay_and_gateway=RELAY_AND_GATEWAY.format(gateway=gateway, base_url=base_url),
    )


def live_service(
    tmp_path, database_url, redis_server, provider, gateway: str, clock=None, **extra
) -> tuple[Service, LiveApi]:
    port = free_port()
    settings = make_settings(
        tmp_path, database_url=database_url, redis_url=redis_server.url, smtp_port=free_port(), **extra
    ).but(
        mode="live",
        demo_campaigns=False,
        config_dir=write_live_config(tmp_path, gateway, provider.base_url),
        templates_dir=ROOT / "templates",
        public_url=f"http://127.0.0.1:{port}",
    )
    environ = {
        "DISPATCH_INTAKE_KEY_ZZ": "k",
        "TEST_TELNYX_KEY": "KEY_test",
        "TEST_SINCH_KEY_ID": "key-id",
        "TEST_SINCH_SECRET": "key-secret",
    }
    service = Service(settings, environ=environ, **({"clock": clock} if clock else {}))
    service.ledger.migrate()
    return service, LiveApi(service, port)


def submit(service: Service) -> str:
    accepted = service.intake.submit(
        {
            "campaign": "TEST-LIVE",
            "section": "zz",
            "language": "en",
            "supporter": {"name": "Jane Doe", "email": f"jane{time.monotonic_ns()}@example.org", "country": "GB"},
        }
    )
    return accepted.deliveries[0].id


def delivery(service: Service, delivery_id: str) -> dict:
    row = service.ledger.views.delivery(delivery_id)
    assert row is not None
    return {"state": row.state, "remote_id": row.remote_id}


@pytest.fixture
def telnyx() -> Iterator[TelnyxServer]:
    with TelnyxServer() as server:
        yield server


@pytest.fixture
def sinch() -> Iterator[SinchServer]:
    with SinchServer() as server:
        yield server


def test_telnyx_fax_is_sent_then_settled_by_its_signed_webhook(tmp_path, database_url, redis_server, telnyx):
    service, api = live_service(
        tmp_path, database_url, redis_server, telnyx, "telnyx", telnyx_public_key=telnyx.public_key_b64
    )
    with api, Running(service):
        delivery_id = submit(service)
        wait_for(lambda: delivery(service, delivery_id)["state"] == "sent", timeout=30)
        fax_id = delivery(service, delivery_id)["remote_id"]
        [fax] = telnyx.faxes.values()
        assert fax["id"] == fax_id and fax["to"] == "+442079460100" and fax["from"] == "+442079460000"
        assert fax["webhook_url"] == f"{api.url}/v1/webhooks/fax/telnyx"

        # out of order: a progress event after the fax is delivered changes nothing
        telnyx.complete(fax_id, "delivered", page_count=3, call_duration_secs=95)
        assert telnyx.send_webhook(fax_id, "fax.delivered").json() == {"result": "applied"}
        assert telnyx.send_webhook(fax_id, "fax.sending.started").json()["result"].startswith("ignored")
        assert telnyx.send_webhook(fax_id, "fax.delivered").json()["result"].startswith("ignored")  # duplicate
        view = next(d for d in service.ledger.views.appeal(_appeal(service, delivery_id)).as_json()["deliveries"])
        assert view["state"] == "delivered" and view["pages"] == 3 and view["line_seconds"] == 95
        # the line is free again for the next fax to that number
        assert service.lines.holder("+442079460100") is None


def test_telnyx_webhooks_that_fail_verification_are_refused(tmp_path, database_url, redis_server, telnyx):
    service, api = live_service(
        tmp_path, database_url, redis_server, telnyx, "telnyx", telnyx_public_key=telnyx.public_key_b64
    )
    with api, Running(service):
        delivery_id = submit(service)
        wait_for(lambda: delivery(service, delivery_id)["state"] == "sent", timeout=30)
        fax_id = delivery(service, delivery_id)["remote_id"]
        telnyx.complete(fax_id, "delivered", page_count=2, call_duration_secs=60)
        url = f"{api.url}/v1/webhooks/fax/telnyx"
        body = telnyx.event_body(fax_id, "fax.delivered")
        now = int(time.time())

        wrong_key = httpx.post(url, content=body, headers=telnyx.sign(body, now, Ed25519PrivateKey.generate()))
        stale = httpx.post(url, content=body, headers=telnyx.sign(body, now - 301))
        reserialised = json.dumps(json.loads(body), indent=1).encode()
        tampered = httpx.post(url, content=reserialised, headers=telnyx.sign(body, now))
        for response in (wrong_key, stale, tampered):
            assert response.status_code == 401, response.text
        assert stale.json()["error"]["code"] == "stale_signature"
        assert delivery(service, delivery_id)["state"] == "sent"

        assert httpx.post(url, content=body, headers=telnyx.sign(body, now)).json() == {"result": "applied"}
        assert delivery(service, delivery_id)["state"] == "delivered"


def test_telnyx_busy_failure_by_webhook_is_retried_with_a_new_fax(tmp_path, database_url, redis_server, telnyx):
    service, api = live_service(
        tmp_path, database_url, redis_server, telnyx, "telnyx", telnyx_public_key=telnyx.public_key_b64
    )
    with api, Running(service):
        delivery_id = submit(service)
        wait_for(lambda: delivery(service, delivery_id)["state"] == "sent", timeout=30)
        first = delivery(service, delivery_id)["remote_id"]
        telnyx.complete(first, "failed", failure_reason="user_busy")
        assert telnyx.send_webhook(first, "fax.failed").json() == {"result": "applied"}
        # the reconciler releases the retry; the worker finds the failed fax by tag and sends anew
        wait_for(lambda: delivery(service, delivery_id)["remote_id"] not in (first, None), timeout=30)
        assert len(telnyx.faxes) == 2
        attempts = service.ledger.views.attempts(delivery_id)
        assert [a.outcome for a in attempts] == ["transient", "sent"]
        assert attempts[0].code == "user_busy"


def test_telnyx_500_after_create_results_in_exactly_one_fax(tmp_path, database_url, redis_server, telnyx):
    service, api = live_service(
        tmp_path, database_url, redis_server, telnyx, "telnyx", telnyx_public_key=telnyx.public_key_b64
    )
    telnyx.fail_next("create", 500, after_create=True)
    with api, Running(service):
        delivery_id = submit(service)
        wait_for(lambda: delivery(service, delivery_id)["state"] == "sent", timeout=30)
    assert len(telnyx.faxes) == 1
    assert delivery(service, delivery_id)["remote_id"] == next(iter(telnyx.faxes))


def test_telnyx_retry_after_is_honoured(tmp_path, database_url, redis_server, telnyx):
    service, api = live_service(
        tmp_path, database_url, redis_server, telnyx, "telnyx", telnyx_public_key=telnyx.public_key_b64
    )
    telnyx.fail_next("create", 429, retry_after="30")
    with api, Running(service):
        delivery_id = submit(service)
        wait_for(lambda: _view(service, delivery_id)["last_outcome"] == "transient", timeout=30)
        view = _view(service, delivery_id)
    assert view["state"] == "planned" and view["last_code"] == "429"
    tried = datetime.fromisoformat(view["tries"][0]["at"])
    # the base backoff in tests is a fraction of a second: only Retry-After explains 30 s
    assert datetime.fromisoformat(view["next_attempt_at"]) - tried >= timedelta(seconds=30)
    assert telnyx.faxes == {}


def test_telnyx_refusing_our_key_pauses_the_fax_channel_and_fails_nothing(tmp_path, database_url, redis_server, telnyx):
    service, api = live_service(
        tmp_path, database_url, redis_server, telnyx, "telnyx", telnyx_public_key=telnyx.public_key_b64
    )
    service.environ["TEST_TELNYX_KEY"] = "KEY_revoked"  # the account's key was revoked
    with api, Running(service):
        first, second = submit(service), submit(service)
        wait_for(lambda: "fax:zz" in service.ledger.controls.paused_channels(), timeout=30)
        # both letters were held back (the first by the refusal itself, the second by the pause)
        wait_for(lambda: all(_view(service, d)["last_outcome"] in ("operational", "deferred") for d in (first, second)))
    for delivery_id in (first, second):
        view = _view(service, delivery_id)
        assert view["state"] == "planned" and view["attempts"] == 0
    assert "401" in service.ledger.controls.paused_channels()["fax:zz"].reason
    assert telnyx.faxes == {}


def _view(service: Service, delivery_id: str) -> dict:
    return next(
        d
        for d in service.ledger.views.appeal(_appeal(service, delivery_id)).as_json()["deliveries"]
        if d["id"] == delivery_id
    )


def test_sinch_callback_is_confirmed_with_sinch_before_it_counts(tmp_path, database_url, redis_server, sinch):
    service, api = live_service(tmp_path, database_url, redis_server, sinch, "sinch", sinch_callback_token="cb-secret")
    with api, Running(service):
        delivery_id = submit(service)
        wait_for(lambda: delivery(service, delivery_id)["state"] == "sent", timeout=30)
        fax_id = delivery(service, delivery_id)["remote_id"]
        assert sinch.callback_urls[fax_id].startswith("http://dispatch:cb-secret@127.0.0.1")
        # a callback claiming failure while Sinch says the fax is still in progress: believed nothing
        assert sinch.send_callback(fax_id, status="FAILURE").json()["result"] == "ignored: not final"
        assert delivery(service, delivery_id)["state"] == "sent"
        # wrong credentials are refused
        wrong = httpx.post(f"{api.url}/v1/webhooks/fax/sinch", json={"fax": {"id": fax_id}}, auth=("dispatch", "nope"))
        assert wrong.status_code == 401
        sinch.complete(fax_id, "COMPLETED", pages=2)
        assert sinch.send_callback(fax_id).json() == {"result": "applied"}
        assert delivery(service, delivery_id)["state"] == "delivered"


def _appeal(service: Service, delivery_id: str) -> str:
    from sqlalchemy import select

    from dispatcher.ledger.models import Delivery

    with service.ledger.session() as s:
        return s.scalar(select(Delivery.appeal_id).where(Delivery.id == delivery_id))


# ---------------------------------------------------------------------------- late and early reports


class Clock:
    """The service's clock, which a test moves forward (the real time plus a shift)."""

    def __init__(self) -> None:
        self.shift = timedelta(0)

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.shift


def test_a_lost_telnyx_webhook_is_made_up_for_by_asking_telnyx(tmp_path, database_url, redis_server, telnyx):
    clock = Clock()
    service, api = live_service(
        tmp_path, database_url, redis_server, telnyx, "telnyx", clock=clock, telnyx_public_key=telnyx.public_key_b64
    )
    assert service.settings.fax_report_wait_seconds == 30 * 60  # the production default
    with api, Running(service):
        delivery_id = submit(service)
        wait_for(lambda: delivery(service, delivery_id)["state"] == "sent", timeout=30)
        fax_id = delivery(service, delivery_id)["remote_id"]
        asked = lambda: len(telnyx.requests_to("GET", f"/v2/faxes/{fax_id}"))  # noqa: E731
        time.sleep(1.5)  # several housekeeping passes of the reconciler
        view = _view(service, delivery_id)
        assert view["state"] == "sent" and "awaiting the gateway's report" in view["last_text"]
        assert asked() == 0  # not asked before its time
        assert service.lines.holder("+442079460100") == delivery_id
        # Half an hour later Telnyx still has the fax queued: asked once, and not again at every pass.
        clock.shift = timedelta(minutes=31)
        wait_for(lambda: asked() == 1, timeout=30)
        time.sleep(1.5)
        assert asked() == 1 and delivery(service, delivery_id)["state"] == "sent"
        # The fax went through, but its webhook never comes: the next question settles it.
        telnyx.complete(fax_id, "delivered", page_count=2, call_duration_secs=70)
        clock.shift = timedelta(minutes=37)
        wait_for(lambda: delivery(service, delivery_id)["state"] == "delivered", timeout=30)
    # (Telnyx's fax resource has no page count or call time: only its webhooks carry them)
    assert _view(service, delivery_id)["last_text"] == "delivered"
    assert len(telnyx.requests_to("GET", f"/v2/faxes/{fax_id}")) >= 1
    # the number's line is free for the next fax at once, not when its lock expires
    assert service.lines.holder("+442079460100") is None


def test_a_final_webhook_that_overtakes_the_create_answer_is_kept_and_applied(
    tmp_path, database_url, redis_server, telnyx
):
    service, api = live_service(
        tmp_path, database_url, redis_server, telnyx, "telnyx", telnyx_public_key=telnyx.public_key_b64
    )
    # Telnyx creates the fax at once but its 202 takes 1.5 s to reach us.
    telnyx.fail_next("create", None, after_create=True, delay=1.5)
    with api, Running(service):
        delivery_id = submit(service)
        wait_for(lambda: len(telnyx.faxes) == 1, timeout=30)
        [fax_id] = telnyx.faxes
        telnyx.complete(fax_id, "delivered", page_count=1, call_duration_secs=40)
        answer = telnyx.send_webhook(fax_id, "fax.delivered")
        assert answer.status_code == 200 and answer.json()["result"].startswith("parked")
        assert delivery(service, delivery_id)["state"] == "sending"
        # once the create's answer is recorded, the kept report settles the letter
        wait_for(lambda: delivery(service, delivery_id)["state"] == "delivered", timeout=30)
    assert delivery(service, delivery_id)["remote_id"] == fax_id
    assert service.ledger.early_reports.of(delivery_id) == []
    assert service.lines.holder("+442079460100") is None
    assert len(telnyx.faxes) == 1


def test_a_retryable_failure_reported_after_the_campaign_closed_cancels_the_letter(
    tmp_path, database_url, redis_server, telnyx
):
    service, api = live_service(
        tmp_path, database_url, redis_server, telnyx, "telnyx", telnyx_public_key=telnyx.public_key_b64
    )
    with api, Running(service):
        delivery_id = submit(service)
        wait_for(lambda: delivery(service, delivery_id)["state"] == "sent", timeout=30)
        fax_id = delivery(service, delivery_id)["remote_id"]
        assert service.ledger.controls.close_campaign("TEST-LIVE", "the detainee was released", datetime.now(UTC)) == 0
        telnyx.complete(fax_id, "failed", failure_reason="user_busy")
        assert telnyx.send_webhook(fax_id, "fax.failed").json() == {"result": "applied"}
        view = _view(service, delivery_id)
        assert view["state"] == "cancelled"
        assert view["last_text"] == "campaign closed: the detainee was released"
        time.sleep(1.5)  # the reconciler has had its chances to send it again
    assert len(telnyx.faxes) == 1
    assert service.lines.holder("+442079460100") is None
