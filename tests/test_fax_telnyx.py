"""TelnyxGateway against a local Telnyx API (tests/support/fax_providers.py): real HTTP on
loopback, every request checked field by field by the server and again here."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from fastapi.testclient import TestClient
from structlog.testing import capture_logs

from dispatcher.app import Service
from dispatcher.channels.fax.base import FailureKind, FaxGateway, FaxJob, FaxStatus, NoFaxToneError
from dispatcher.channels.fax.http import FaxNotFound, http_error, parse_retry_after
from dispatcher.channels.fax.telnyx import (
    FAILURE_REASONS,
    TelnyxGateway,
    decode_tag,
    encode_tag,
    failure_for,
    parse_webhook,
)
from dispatcher.errors import (
    AuthenticationFailed,
    BlipError,
    ConfigError,
    DocumentRejected,
    OperationalError,
    PermanentError,
    SignatureExpired,
    TransientError,
)
from dispatcher.settings import Settings
from tests.conftest import make_settings
from tests.support.fax_providers import TelnyxServer, WebhookReceiver
from tests.support.services import RedisServer, free_port

API_KEY = "KEY0123456789ABCDEF"
CONNECTION = "1494404757140276705"
FROM = "+41315550100"
TO = "+41315550199"
PDF = b"%PDF-1.4\n1 0 obj << /Type /Page >> endobj\ntrailer << >>\n%%EOF\n"
TIFF = b"II*\x00" + b"\x00" * 16


def job(tag: str = "dlv-0001", to: str = TO, **kw: object) -> FaxJob:
    return FaxJob(tag=tag, to_number=to, pdf=PDF, tiff=TIFF, pages=1, **kw)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def telnyx_server() -> Iterator[TelnyxServer]:
    with TelnyxServer(api_key=API_KEY, connection_id=CONNECTION) as server:
        yield server


@pytest.fixture
def api(telnyx_server: TelnyxServer) -> Iterator[TelnyxServer]:
    telnyx_server.reset()
    yield telnyx_server
    assert telnyx_server.problems == []


@pytest.fixture
async def gateway(api: TelnyxServer) -> AsyncIterator[TelnyxGateway]:
    gw = TelnyxGateway(API_KEY, CONNECTION, FROM, base_url=api.base_url, timeout=2.0, lookup_delay_s=0.05)
    yield gw
    await gw.aclose()


def only_fax(api: TelnyxServer) -> dict[str, object]:
    assert len(api.faxes) == 1, api.faxes
    return next(iter(api.faxes.values()))


# ------------------------------------------------------------------------------ sending


async def test_send_uploads_the_pdf_then_creates_the_fax(api: TelnyxServer, gateway: TelnyxGateway) -> None:
    assert isinstance(gateway, FaxGateway)
    report = await gateway.send(job())

    upload, create = api.requests
    assert (upload.method, upload.path) == ("POST", "/v2/media")
    assert upload.headers["authorization"] == f"Bearer {API_KEY}"
    parts = {p.name: p for p in upload.parts()}
    assert set(parts) == {"media", "ttl_secs"}
    assert (parts["media"].filename, parts["media"].content_type, parts["media"].data) == (
        "dlv-0001.pdf",
        "application/pdf",
        PDF,
    )
    assert parts["ttl_secs"].text == "86400"

    assert (create.method, create.path) == ("POST", "/v2/faxes")
    assert create.headers["authorization"] == f"Bearer {API_KEY}"
    assert create.headers["content-type"] == "application/json"
    media_name = next(iter(api.media))
    assert create.json() == {
        "connection_id": CONNECTION,
        "to": TO,
        "from": FROM,
        "client_state": base64.b64encode(b"dlv-0001").decode(),
        "media_name": media_name,
    }

    fax = only_fax(api)
    assert report.gateway == "telnyx"
    assert report.remote_id == fax["id"]
    assert report.status is FaxStatus.QUEUED and report.raw_status == "queued"
    assert report.tag == "dlv-0001"
    assert report.failure is None and not report.final


async def test_hosted_media_url_webhook_url_quality_and_section_caller_id(api: TelnyxServer) -> None:
    gateway = TelnyxGateway(
        API_KEY,
        CONNECTION,
        FROM,
        base_url=api.base_url,
        media_url_for=lambda j: f"https://letters.example.org/fax/{j.tag}.pdf?sig=abc",
        webhook_url="https://dispatch.example.org/hooks/telnyx",
        quality="very_high",
    )
    try:
        await gateway.send(job(from_number="+41225550123"))
    finally:
        await gateway.aclose()
    (create,) = api.requests  # no upload
    assert create.json() == {
        "connection_id": CONNECTION,
        "to": TO,
        "from": "+41225550123",
        "client_state": encode_tag("dlv-0001"),
        "media_url": "https://letters.example.org/fax/dlv-0001.pdf?sig=abc",
        "quality": "very_high",
        "webhook_url": "https://dispatch.example.org/hooks/telnyx",
    }


def test_client_state_round_trip_and_foreign_states() -> None:
    assert decode_tag(encode_tag("dlv-ü-42")) == "dlv-ü-42"
    assert decode_tag("not base64!") is None
    assert decode_tag(base64.b64encode(b"\xff\xfe").decode()) is None
    assert decode_tag(None) is None


# ------------------------------------------------------------------------------ refusals


@pytest.mark.parametrize("hosted", [False, True], ids=["upload", "media_url"])
async def test_wrong_api_key_is_an_operational_authentication_error(api: TelnyxServer, hosted: bool) -> None:
    gateway = TelnyxGateway(
        "KEY_wrong",
        CONNECTION,
        FROM,
        base_url=api.base_url,
        media_url_for=(lambda j: "https://letters.example.org/x.pdf") if hosted else None,
    )
    try:
        with pytest.raises(OperationalError) as err:
            await gateway.send(job())
    finally:
        await gateway.aclose()
    assert str(err.value).startswith("401 authentication:")
    assert "10009" in str(err.value)
    assert api.faxes == {}


async def test_402_is_an_operational_funds_error(api: TelnyxServer, gateway: TelnyxGateway) -> None:
    api.fail_next(
        "create", 402, body={"errors": [{"code": "10038", "title": "Insufficient balance", "detail": "Top up"}]}
    )
    with pytest.raises(OperationalError) as err:
        await gateway.send(job())
    assert str(err.value).startswith("402 funds:")
    assert api.faxes == {}


@pytest.mark.parametrize("http_date", [False, True], ids=["seconds", "http-date"])
async def test_429_is_transient_with_retry_after(api: TelnyxServer, gateway: TelnyxGateway, http_date: bool) -> None:
    expected = 120.0 if http_date else 7.0
    header = format_datetime(datetime.now(UTC) + timedelta(seconds=121), usegmt=True) if http_date else "7"
    api.fail_next("create", 429, retry_after=header, body={"errors": [{"code": "10011", "title": "Too many requests"}]})
    with pytest.raises(TransientError) as err:
        await gateway.send(job())
    assert err.value.code == 429
    assert err.value.retry_after == pytest.approx(expected, abs=2)
    assert api.faxes == {}
    assert not api.requests_to("GET", "/v2/faxes")  # certain: nothing to look up


async def test_malformed_destination_is_a_permanent_invalid_number(api: TelnyxServer, gateway: TelnyxGateway) -> None:
    with pytest.raises(PermanentError) as err:
        await gateway.send(job(to="0315550199"))
    assert str(err.value).startswith("422 invalid_number:")


async def test_unknown_fax_is_fax_not_found(gateway: TelnyxGateway) -> None:
    with pytest.raises(FaxNotFound):
        await gateway.get("0ccc7b54-4df3-4bca-a65a-3da1ecc777f0")


async def test_gateway_down_is_a_blip() -> None:
    with TelnyxServer() as gone:
        port = gone.port
    gateway = TelnyxGateway(API_KEY, CONNECTION, FROM, base_url=f"http://127.0.0.1:{port}", timeout=1.0)
    try:
        with pytest.raises(BlipError):
            await gateway.send(job())
    finally:
        await gateway.aclose()


# ------------------------------------------------------------------------------ never twice


async def test_500_after_the_fax_was_created_returns_that_fax(api: TelnyxServer, gateway: TelnyxGateway) -> None:
    api.fail_next("create", 500, after_create=True, body={"errors": [{"code": "10007", "title": "Unexpected error"}]})
    report = await gateway.send(job())

    fax = only_fax(api)
    assert report.remote_id == fax["id"] and report.tag == "dlv-0001"
    assert len(api.requests_to("POST", "/v2/faxes")) == 1
    (lookup,) = api.requests_to("GET", "/v2/faxes")
    query = dict(lookup.query)
    assert query["filter[to][eq]"] == TO
    assert query["filter[direction][eq]"] == "outbound"
    assert datetime.fromisoformat(query["filter[created_at][gte]"]) < datetime.now(UTC)


async def test_timeout_after_the_fax_was_created_returns_that_fax(api: TelnyxServer) -> None:
    gateway = TelnyxGateway(API_KEY, CONNECTION, FROM, base_url=api.base_url, timeout=0.3, lookup_delay_s=0.05)
    api.fail_next("create", None, after_create=True, delay=1.0)
    try:
        report = await gateway.send(job())
    finally:
        await gateway.aclose()
    assert report.remote_id == only_fax(api)["id"]
    assert len(api.requests_to("POST", "/v2/faxes")) == 1


async def test_5xx_without_a_fax_is_transient_and_the_next_send_looks_first(
    api: TelnyxServer, gateway: TelnyxGateway
) -> None:
    api.fail_next("create", 503, retry_after="2")
    with pytest.raises(TransientError) as err:
        await gateway.send(job())
    assert err.value.retry_after == 2.0
    assert api.faxes == {}
    looked = len(api.requests_to("GET", "/v2/faxes"))
    assert looked == 2  # lookup_attempts: the list may lag the create

    report = await gateway.send(job())
    assert report.remote_id == only_fax(api)["id"]
    methods = [(r.method, r.path) for r in api.requests[-3:]]
    assert methods == [("GET", "/v2/faxes"), ("POST", "/v2/media"), ("POST", "/v2/faxes")]


async def test_a_failed_lookup_never_creates_a_second_fax(api: TelnyxServer, gateway: TelnyxGateway) -> None:
    api.fail_next("create", 500, after_create=True)
    api.fail_next("list", 500)
    with pytest.raises(TransientError, match="lookup failed"):
        await gateway.send(job())
    assert len(api.faxes) == 1

    # The worker tries again later: the adapter looks before it creates, and finds the fax.
    report = await gateway.send(job())
    assert report.remote_id == only_fax(api)["id"]
    assert len(api.requests_to("POST", "/v2/faxes")) == 1


async def test_an_unreadable_list_is_not_taken_for_no_fax(api: TelnyxServer, gateway: TelnyxGateway) -> None:
    api.fail_next("create", 500, after_create=True)
    api.fail_next("list", 200, body={"data": [{"record_type": "fax"}], "meta": {"total_pages": 1}})
    with pytest.raises(TransientError, match="unreadable"):
        await gateway.send(job())
    assert len(api.faxes) == 1 and len(api.requests_to("POST", "/v2/faxes")) == 1


async def test_find_by_tag_pages_through_and_returns_the_newest(api: TelnyxServer, gateway: TelnyxGateway) -> None:
    first = await gateway.send(job("dlv-A"))
    for i in range(3):
        await gateway.send(job(f"dlv-other-{i}"))
    again = await gateway.send(job("dlv-A"))  # an operator re-sent it by hand
    gateway.page_size = 2

    found = await gateway.find_by_tag("dlv-A")
    assert found is not None and found.remote_id == again.remote_id != first.remote_id
    assert await gateway.find_by_tag("dlv-none") is None
    pages = [dict(r.query)["page[number]"] for r in api.requests_to("GET", "/v2/faxes")]
    assert pages == ["1", "2", "3", "1", "2", "3"]


# ------------------------------------------------------------------------------ mapping


#: written out here, independently of the adapter's table: documented failure_reason → kind
EXPECTED_KINDS = {
    "user_busy": FailureKind.BUSY,
    "receiver_decline": FailureKind.BUSY,
    "receiver_no_answer": FailureKind.NO_ANSWER,
    "receiver_no_response": FailureKind.NO_ANSWER,
    "destination_unreachable": FailureKind.CONGESTION,
    "receiver_communication_error": FailureKind.CONGESTION,
    "receiver_recovery_on_timer_expire": FailureKind.CONGESTION,
    "user_channel_limit_exceeded": FailureKind.CONGESTION,
    "connection_channel_limit_exceeded": FailureKind.CONGESTION,
    "outbound_profile_channel_limit_exceeded": FailureKind.CONGESTION,
    "fax_initial_communication_timeout": FailureKind.NO_FAX_TONE,
    "receiver_incompatible_destination": FailureKind.NO_FAX_TONE,
    "receiver_call_dropped": FailureKind.INTERRUPTED,
    "fax_signaling_error": FailureKind.INTERRUPTED,
    "invalid_ecm_response_from_receiver": FailureKind.INTERRUPTED,
    "receiver_unallocated_number": FailureKind.INVALID_NUMBER,
    "receiver_invalid_number_format": FailureKind.INVALID_NUMBER,
    "destination_invalid": FailureKind.INVALID_NUMBER,
    "file_format_invalid": FailureKind.DOCUMENT_REJECTED,
    "file_download_failed": FailureKind.DOCUMENT_REJECTED,
    "file_size_limit_exceeded": FailureKind.DOCUMENT_REJECTED,
    "page_count_limit_exceeded": FailureKind.DOCUMENT_REJECTED,
    "media_processing_exception": FailureKind.DOCUMENT_REJECTED,
    "account_disabled": FailureKind.FUNDS,
    "outbound_profile_daily_spend_limit_exceeded": FailureKind.FUNDS,
    "no_outbound_profile": FailureKind.AUTHENTICATION,
    "destination_not_in_countries_whitelist": FailureKind.AUTHENTICATION,
    "destination_not_in_service_plan": FailureKind.AUTHENTICATION,
    "unverified_origination_number": FailureKind.AUTHENTICATION,
    "unverified_destination_not_allowed": FailureKind.AUTHENTICATION,
    "service_unavailable": FailureKind.GATEWAY_ERROR,
    "something_new": FailureKind.UNKNOWN,
}
ERROR_CLASS = {
    FailureKind.BUSY: TransientError,
    FailureKind.NO_ANSWER: TransientError,
    FailureKind.CONGESTION: TransientError,
    FailureKind.INTERRUPTED: TransientError,
    FailureKind.GATEWAY_ERROR: TransientError,
    FailureKind.UNKNOWN: TransientError,
    FailureKind.NO_FAX_TONE: NoFaxToneError,
    FailureKind.INVALID_NUMBER: PermanentError,
    FailureKind.DOCUMENT_REJECTED: DocumentRejected,
    FailureKind.AUTHENTICATION: OperationalError,
    FailureKind.FUNDS: OperationalError,
}


def test_every_documented_reason_is_mapped() -> None:
    assert set(FAILURE_REASONS) == set(EXPECTED_KINDS) - {"something_new"}


@pytest.mark.parametrize("reason, kind", EXPECTED_KINDS.items())
def test_failure_reason_mapping(reason: str, kind: FailureKind) -> None:
    failure = failure_for(reason)
    assert failure.kind is kind
    assert failure.code == reason
    assert type(failure.error()) is ERROR_CLASS[kind]


@pytest.mark.parametrize(
    "reason",
    ["user_busy", "fax_initial_communication_timeout", "receiver_unallocated_number", "file_format_invalid"],
)
async def test_get_reports_the_failure_reason(api: TelnyxServer, gateway: TelnyxGateway, reason: str) -> None:
    sent = await gateway.send(job())
    api.complete(sent.remote_id, "failed", failure_reason=reason)
    report = await gateway.get(sent.remote_id)
    assert report.status is FaxStatus.FAILED and report.final
    assert report.failure is not None and report.failure.kind is EXPECTED_KINDS[reason]
    assert report.tag == "dlv-0001"


@pytest.mark.parametrize(
    "status, expected",
    [
        ("queued", FaxStatus.QUEUED),
        ("media.processed", FaxStatus.QUEUED),
        ("originated", FaxStatus.SENDING),
        ("sending", FaxStatus.SENDING),
        ("delivered", FaxStatus.DELIVERED),
        ("failed", FaxStatus.FAILED),
    ],
)
async def test_status_mapping(api: TelnyxServer, gateway: TelnyxGateway, status: str, expected: FaxStatus) -> None:
    sent = await gateway.send(job())
    api.complete(sent.remote_id, status)
    report = await gateway.get(sent.remote_id)
    assert (report.status, report.raw_status) == (expected, status)
    if expected is FaxStatus.FAILED:
        assert report.failure is not None and report.failure.kind is FailureKind.UNKNOWN


# ------------------------------------------------------------------------------ webhooks


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    with WebhookReceiver() as r:
        yield r


async def test_signed_webhook_is_accepted_and_read(
    api: TelnyxServer, gateway: TelnyxGateway, receiver: WebhookReceiver
) -> None:
    sent = await gateway.send(job())
    api.complete(sent.remote_id, "failed", failure_reason="user_busy", page_count=2, call_duration_secs=41)
    assert api.send_webhook(sent.remote_id, "fax.failed", url=receiver.url).status_code == 200
    hook = receiver.last()

    report = parse_webhook(hook.body, hook.headers, api.public_key_b64, now=time.time())
    assert report.gateway == "telnyx" and report.remote_id == sent.remote_id
    assert report.tag == "dlv-0001"
    assert report.status is FaxStatus.FAILED and report.raw_status == "failed"
    assert report.failure is not None and report.failure.kind is FailureKind.BUSY
    assert report.failure.code == "user_busy"
    assert (report.pages, report.duration_s) == (2, 41.0)
    assert report.occurred_at is not None and report.occurred_at.tzinfo is not None
    assert report.extra["event_type"] == "fax.failed"


@pytest.mark.parametrize(
    "event, status",
    [
        ("fax.queued", FaxStatus.QUEUED),
        ("fax.media.processed", FaxStatus.QUEUED),
        ("fax.sending.started", FaxStatus.SENDING),
        ("fax.delivered", FaxStatus.DELIVERED),
    ],
)
async def test_webhook_event_types(api: TelnyxServer, gateway: TelnyxGateway, event: str, status: FaxStatus) -> None:
    sent = await gateway.send(job())
    api.complete(sent.remote_id, "delivered", page_count=1, call_duration_secs=30)
    body = api.event_body(sent.remote_id, event)
    report = parse_webhook(body, api.sign(body, int(time.time())), api.public_key_b64, now=time.time())
    assert report.status is status and report.failure is None


async def test_webhook_signed_with_another_key_is_refused(
    api: TelnyxServer, gateway: TelnyxGateway, receiver: WebhookReceiver
) -> None:
    sent = await gateway.send(job())
    api.send_webhook(sent.remote_id, "fax.delivered", url=receiver.url, key=Ed25519PrivateKey.generate())
    hook = receiver.last()
    with pytest.raises(AuthenticationFailed) as err:
        parse_webhook(hook.body, hook.headers, api.public_key_b64, now=time.time())
    assert not isinstance(err.value, SignatureExpired)


@pytest.mark.parametrize("skew", [-301, 301, -3600])
async def test_webhook_with_a_stale_timestamp_is_refused(
    api: TelnyxServer, gateway: TelnyxGateway, receiver: WebhookReceiver, skew: int
) -> None:
    sent = await gateway.send(job())
    now = int(time.time())
    api.send_webhook(sent.remote_id, "fax.delivered", url=receiver.url, timestamp=now + skew)
    hook = receiver.last()
    with pytest.raises(SignatureExpired):
        parse_webhook(hook.body, hook.headers, api.public_key_b64, now=now)
    # Within tolerance it is fine.
    assert parse_webhook(hook.body, hook.headers, api.public_key_b64, now=now + skew, tolerance=300)


async def test_re_serialised_body_is_refused(
    api: TelnyxServer, gateway: TelnyxGateway, receiver: WebhookReceiver
) -> None:
    sent = await gateway.send(job())
    api.send_webhook(sent.remote_id, "fax.delivered", url=receiver.url)
    hook = receiver.last()
    same_json = json.dumps(json.loads(hook.body), separators=(",", ":")).encode()
    assert same_json != hook.body and json.loads(same_json) == json.loads(hook.body)
    with pytest.raises(AuthenticationFailed):
        parse_webhook(same_json, hook.headers, api.public_key_b64, now=time.time())


@pytest.mark.parametrize("drop", ["telnyx-signature-ed25519", "telnyx-timestamp"])
def test_webhook_without_signature_headers_is_refused(api: TelnyxServer, drop: str) -> None:
    body = b'{"data": {}}'
    headers = {k: v for k, v in api.sign(body, int(time.time())).items() if k != drop}
    with pytest.raises(AuthenticationFailed):
        parse_webhook(body, headers, api.public_key_b64, now=time.time())


def test_public_key_forms_and_header_case(api: TelnyxServer) -> None:
    key = api.signing_key.public_key()
    raw = key.public_bytes(Encoding.Raw, PublicFormat.Raw)
    pem = key.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo).decode()
    body = json.dumps(
        {"data": {"event_type": "fax.queued", "id": "e1", "payload": {"fax_id": "f1", "status": "queued"}}}
    ).encode()
    headers = {k.title(): v for k, v in api.sign(body, 1_700_000_000).items()}  # Telnyx-Timestamp, ...
    for form in (raw, pem, api.public_key_b64, key):
        report = parse_webhook(body, headers, form, now=1_700_000_010)
        assert (report.remote_id, report.status, report.tag) == ("f1", FaxStatus.QUEUED, None)
    with pytest.raises(ValueError):
        parse_webhook(body, headers, "not a key", now=1_700_000_010)


# ------------------------------------------------------------------------------ webhooks through our API

WEBHOOK = "/v1/webhooks/fax/telnyx"
#: in the bodies below, so that a log line carrying a body is noticed
FAX_ID = "fax-in-the-body-0001"

#: (key, what the refusal says): a key cut short, text of the raw key's length, the wrong kind
MALFORMED_KEYS = [
    ("not a key", "not base64"),
    (base64.b64encode(bytes(24)).decode(), "decodes to 24 bytes"),
    ("0123456789abcdef0123456789abcdef", "decodes to 24 bytes"),
    ("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----", "not readable PEM"),
    ("clé publique", "non-ASCII"),
]


@pytest.fixture
def live_settings(tmp_path, sqlite_url: str, redis_server: RedisServer, telnyx_server: TelnyxServer) -> Settings:
    return make_settings(tmp_path, database_url=sqlite_url, redis_url=redis_server.url, smtp_port=free_port()).but(
        mode="live", telnyx_public_key=telnyx_server.public_key_b64
    )


def our_api(settings: Settings) -> Iterator[TestClient]:
    service = Service(settings, environ={})
    service.ledger.migrate()
    with TestClient(service.api(), raise_server_exceptions=False) as client:
        yield client
    service.ledger.dispose()


@pytest.fixture
def client(live_settings: Settings) -> Iterator[TestClient]:
    yield from our_api(live_settings)


def refusals(logs: list[dict[str, object]]) -> list[dict[str, object]]:
    return [line for line in logs if line["event"] == "webhook.refused"]


def fax_event(**payload: object) -> bytes:
    return json.dumps({"data": {"event_type": "fax.failed", "payload": {"fax_id": FAX_ID, **payload}}}).encode()


@pytest.mark.parametrize("key, why", MALFORMED_KEYS)
def test_malformed_key_is_refused_when_the_settings_are_read(
    monkeypatch: pytest.MonkeyPatch, key: str, why: str
) -> None:
    monkeypatch.setenv("DISPATCH_TELNYX_PUBLIC_KEY", key)
    with pytest.raises(ConfigError) as err:
        Settings.from_env()
    [problem] = err.value.problems
    assert problem.key == "DISPATCH_TELNYX_PUBLIC_KEY" and why in problem.message
    assert key not in str(err.value)


@pytest.mark.parametrize("key, why", MALFORMED_KEYS[:2])
def test_malformed_key_stops_the_api_from_being_built(live_settings: Settings, key: str, why: str) -> None:
    service = Service(live_settings.but(telnyx_public_key=key), environ={})
    with pytest.raises(ConfigError, match=f"DISPATCH_TELNYX_PUBLIC_KEY: .*{why}"):
        service.api()


@pytest.mark.parametrize("how", ["another key", "stale", "unsigned"])
def test_refused_webhook_is_a_401_and_a_warning_without_the_body(
    client: TestClient, telnyx_server: TelnyxServer, how: str
) -> None:
    body = fax_event(failure_reason="user_busy")
    now = int(time.time())
    headers = {
        # a well-formed key, just not the account's: the old symptom was 401s and silence
        "another key": telnyx_server.sign(body, now, Ed25519PrivateKey.generate()),
        "stale": telnyx_server.sign(body, now - 301),
        "unsigned": {},
    }[how]
    with capture_logs() as logs:
        response = client.post(WEBHOOK, content=body, headers=headers)
    assert response.status_code == 401
    reason = response.json()["error"]["code"]
    assert reason == ("stale_signature" if how == "stale" else "invalid_signature")
    [line] = refusals(logs)
    assert line["log_level"] == "warning"
    assert (line["gateway"], line["reason"], line["status"], line["remote_addr"]) == (
        "telnyx",
        reason,
        401,
        "testclient",
    )
    shown = json.dumps(logs)
    assert FAX_ID not in shown and "user_busy" not in shown
    assert all(value not in shown for value in headers.values())


@pytest.mark.parametrize(
    "body, field",
    [
        (b"not json at all", "body"),
        (b"[" * 5000 + b"]" * 5000, "body"),  # deeper than the JSON parser's stack
        (b"[]", "body"),
        (fax_event(failure_reason=5), "payload.failure_reason"),
        (fax_event(failure_reason=["user_busy"]), "payload.failure_reason"),
    ],
)
def test_signed_garbage_is_a_422_naming_what_is_wrong_never_a_500(
    client: TestClient, telnyx_server: TelnyxServer, body: bytes, field: str
) -> None:
    with capture_logs() as logs:
        response = client.post(WEBHOOK, content=body, headers=telnyx_server.sign(body, int(time.time())))
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_webhook" and error["fields"][0]["field"] == field
    [line] = refusals(logs)
    assert (line["reason"], line["status"]) == ("invalid_webhook", 422)
    assert FAX_ID not in json.dumps(logs)


def test_webhooks_refused_before_any_check_are_logged_too(live_settings: Settings) -> None:
    body = fax_event()
    with capture_logs() as logs:
        for client in our_api(live_settings.but(telnyx_public_key="")):
            not_configured = client.post(WEBHOOK, content=body)
            unknown = client.post("/v1/webhooks/fax/faxomatic", content=body)
        for client in our_api(live_settings.but(mode="sandbox")):
            sandbox = client.post(WEBHOOK, content=body)
    assert [r.status_code for r in (not_configured, unknown, sandbox)] == [503, 404, 409]
    assert [(line["gateway"], line["reason"], line["status"]) for line in refusals(logs)] == [
        ("telnyx", "webhook_not_configured", 503),
        ("faxomatic", "not_found", 404),
        ("telnyx", "sandbox_mode", 409),
    ]


def test_retry_after_parsing() -> None:
    assert parse_retry_after("0") == 0.0
    assert parse_retry_after(" 30 ") == 30.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412480.0 - 60) == 60.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None


@pytest.mark.parametrize(
    "status, headers, hints, cls, prefix",
    [
        (401, {}, {}, OperationalError, "401 authentication:"),
        (403, {}, {}, OperationalError, "403 authentication:"),
        (402, {}, {}, OperationalError, "402 funds:"),
        (408, {}, {}, TransientError, "408 gateway_error:"),
        (413, {}, {}, DocumentRejected, "413 document_rejected:"),
        (422, {}, {"number_problem": True}, PermanentError, "422 invalid_number:"),
        (422, {}, {"document_problem": True}, DocumentRejected, "422 document_rejected:"),
        (422, {}, {}, OperationalError, "422 gateway refused the request:"),
        (404, {}, {}, OperationalError, "404 gateway refused the request:"),
        (503, {"retry-after": "9"}, {}, TransientError, "503 gateway_error:"),
        (429, {"retry-after": "3"}, {}, TransientError, "429 rate limited:"),
    ],
)
def test_http_status_classes(
    status: int, headers: dict[str, str], hints: dict[str, bool], cls: type[Exception], prefix: str
) -> None:
    error = http_error(httpx.Response(status, headers=headers), detail="what the gateway said", **hints)
    assert type(error) is cls
    assert str(error).startswith(prefix) and str(error).endswith("what the gateway said")
    assert error.code == status
    assert error.retry_after == (float(headers["retry-after"]) if headers else None)
