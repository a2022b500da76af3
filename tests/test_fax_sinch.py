"""SinchGateway against a local Sinch Fax API v3 (tests/support/fax_providers.py): real HTTP on
loopback, multipart checked part by part, unsigned callbacks authenticated by the URL's
credentials and confirmed by GET."""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest

from dispatcher.channels.fax.base import FailureKind, FaxGateway, FaxJob, FaxReport, FaxStatus, NoFaxToneError
from dispatcher.channels.fax.http import FaxNotFound
from dispatcher.channels.fax.sinch import (
    TAG_LABEL,
    SinchGateway,
    callback_url,
    failure_for,
    parse_callback,
)
from dispatcher.errors import (
    AuthenticationFailed,
    DocumentRejected,
    InvalidWebhook,
    OperationalError,
    PermanentError,
    TransientError,
)
from tests.support.fax_providers import Received, SinchServer, WebhookReceiver

PROJECT = "c5a4b2d0-4f0e-4b7e-9d1e-2a8c3f6e7b10"
KEY_ID = "0b8a9c7d-key"
KEY_SECRET = "s3cr3t-key-secret"
FROM = "+41315550100"
TO = "+41315550199"
PDF = b"%PDF-1.4\n1 0 obj << /Type /Page >> endobj\n2 0 obj << /Type /Page >> endobj\n%%EOF\n"
TIFF = b"II*\x00" + b"\x00" * 16
HOOK_USER = "sinch"
HOOK_SECRET = "per-deployment-secret-7f3a"


def job(tag: str = "dlv-0001", to: str = TO, **kw: object) -> FaxJob:
    return FaxJob(tag=tag, to_number=to, pdf=PDF, tiff=TIFF, pages=2, **kw)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def sinch_server() -> Iterator[SinchServer]:
    with SinchServer(project_id=PROJECT, key_id=KEY_ID, key_secret=KEY_SECRET) as server:
        yield server


@pytest.fixture
def api(sinch_server: SinchServer) -> Iterator[SinchServer]:
    sinch_server.reset()
    yield sinch_server
    assert sinch_server.problems == []


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    with WebhookReceiver() as r:
        yield r


def make_gateway(api: SinchServer, hook_url: str | None = None, **kw: object) -> SinchGateway:
    return SinchGateway(
        PROJECT,
        kw.pop("key_id", KEY_ID),  # type: ignore[arg-type]
        kw.pop("key_secret", KEY_SECRET),  # type: ignore[arg-type]
        FROM,
        base_url=api.base_url,
        callback_url=hook_url,
        lookup_delay_s=0.05,
        **kw,  # type: ignore[arg-type]
    )


@pytest.fixture
async def gateway(api: SinchServer, receiver: WebhookReceiver) -> AsyncIterator[SinchGateway]:
    gw = make_gateway(api, callback_url(receiver.url, HOOK_USER, HOOK_SECRET), timeout=2.0)
    yield gw
    await gw.aclose()


def only_fax(api: SinchServer) -> dict[str, object]:
    assert len(api.faxes) == 1, api.faxes
    return next(iter(api.faxes.values()))


FAXES = f"/v3/projects/{PROJECT}/faxes"


# ------------------------------------------------------------------------------ sending


async def test_send_posts_multipart_part_by_part(
    api: SinchServer, gateway: SinchGateway, receiver: WebhookReceiver
) -> None:
    assert isinstance(gateway, FaxGateway)
    report = await gateway.send(job(station_id="AMNESTY CH"))

    (create,) = api.requests
    assert (create.method, create.path) == ("POST", FAXES)
    expected_auth = "Basic " + base64.b64encode(f"{KEY_ID}:{KEY_SECRET}".encode()).decode()
    assert create.headers["authorization"] == expected_auth
    assert create.headers["content-type"].startswith("multipart/form-data; boundary=")
    parts = {p.name: p for p in create.parts()}
    assert set(parts) == {
        "to",
        "from",
        "callbackUrl",
        "callbackUrlContentType",
        "maxRetries",
        "headerText",
        "file",
        "labels",
    }
    assert parts["to"].text == TO and parts["from"].text == FROM
    assert parts["callbackUrl"].text == callback_url(receiver.url, HOOK_USER, HOOK_SECRET)
    assert parts["callbackUrlContentType"].text == "application/json"
    assert parts["maxRetries"].text == "0"
    assert parts["headerText"].text == "AMNESTY CH"
    assert (parts["file"].filename, parts["file"].content_type, parts["file"].data) == (
        "dlv-0001.pdf",
        "application/pdf",
        PDF,
    )
    assert parts["labels"].content_type == "application/json"
    assert json.loads(parts["labels"].data) == {TAG_LABEL: "dlv-0001"}
    for name in set(parts) - {"file", "labels"}:
        assert parts[name].filename is None and parts[name].content_type is None, name

    fax = only_fax(api)
    assert "****" in str(fax["callbackUrl"]) and HOOK_SECRET not in str(fax["callbackUrl"])
    assert (report.gateway, report.remote_id, report.tag) == ("sinch", fax["id"], "dlv-0001")
    assert report.status is FaxStatus.QUEUED and report.raw_status == "QUEUED"
    assert report.pages == 2


async def test_tiff_service_id_section_number_and_service_retries(api: SinchServer) -> None:
    gateway = make_gateway(api, send_tiff=True, service_id="svc-42", max_retries=None)
    try:
        await gateway.send(job(from_number="+41225550123"))
    finally:
        await gateway.aclose()
    parts = {p.name: p for p in api.requests[0].parts()}
    assert set(parts) == {"to", "from", "serviceId", "file", "labels"}  # no callback, no maxRetries
    assert (parts["file"].filename, parts["file"].content_type) == ("dlv-0001.tif", "image/tiff")
    assert parts["from"].text == "+41225550123" and parts["serviceId"].text == "svc-42"


# ------------------------------------------------------------------------------ refusals


async def test_wrong_credentials_are_an_operational_authentication_error(api: SinchServer) -> None:
    gateway = make_gateway(api, key_secret="wrong")
    try:
        with pytest.raises(OperationalError) as err:
            await gateway.send(job())
    finally:
        await gateway.aclose()
    assert str(err.value).startswith("401 authentication:")
    assert api.faxes == {}


async def test_402_is_an_operational_funds_error(api: SinchServer, gateway: SinchGateway) -> None:
    api.fail_next(
        "create",
        402,
        body={"code": "402", "error": "Payment required", "message": "You have reached 0 balance on your account"},
    )
    with pytest.raises(OperationalError) as err:
        await gateway.send(job())
    assert str(err.value).startswith("402 funds:") and "0 balance" in str(err.value)


async def test_429_is_transient_with_retry_after(api: SinchServer, gateway: SinchGateway) -> None:
    api.fail_next("create", 429, retry_after="30", body={"code": "429", "error": "Rate limit exceeded", "message": ""})
    with pytest.raises(TransientError) as err:
        await gateway.send(job())
    assert (err.value.code, err.value.retry_after) == (429, 30.0)
    assert api.faxes == {} and not api.requests_to("GET", FAXES)


async def test_invalid_destination_is_a_permanent_invalid_number(api: SinchServer, gateway: SinchGateway) -> None:
    with pytest.raises(PermanentError) as err:
        await gateway.send(job(to="+4"))
    assert str(err.value).startswith("422 invalid_number:")


async def test_unknown_fax_is_fax_not_found(gateway: SinchGateway) -> None:
    with pytest.raises(FaxNotFound):
        await gateway.get("01HXXXXXXXXXXXXXXXXXXXXXXX")


# ------------------------------------------------------------------------------ never twice


async def test_500_after_the_fax_was_created_returns_that_fax(api: SinchServer, gateway: SinchGateway) -> None:
    api.fail_next("create", 500, after_create=True, body={"code": "500", "error": "Internal Server Error"})
    report = await gateway.send(job())

    assert report.remote_id == only_fax(api)["id"] and report.tag == "dlv-0001"
    assert len(api.requests_to("POST", FAXES)) == 1
    (lookup,) = api.requests_to("GET", FAXES)
    assert dict(lookup.query) == {"direction": "OUTBOUND", "pageSize": "100", "to": TO, "page": "1"}


async def test_timeout_after_the_fax_was_created_returns_that_fax(api: SinchServer) -> None:
    gateway = make_gateway(api, timeout=0.3)
    api.fail_next("create", None, after_create=True, delay=1.0)
    try:
        report = await gateway.send(job())
    finally:
        await gateway.aclose()
    assert report.remote_id == only_fax(api)["id"]
    assert len(api.requests_to("POST", FAXES)) == 1


async def test_a_failed_lookup_never_creates_a_second_fax(api: SinchServer, gateway: SinchGateway) -> None:
    api.fail_next("create", 502, after_create=True)
    api.fail_next("list", 503)
    with pytest.raises(TransientError, match="lookup failed"):
        await gateway.send(job())
    report = await gateway.send(job())
    assert report.remote_id == only_fax(api)["id"]
    assert len(api.requests_to("POST", FAXES)) == 1


async def test_find_by_tag_pages_through_and_returns_the_newest(api: SinchServer, gateway: SinchGateway) -> None:
    first = await gateway.send(job("dlv-A"))
    for i in range(3):
        await gateway.send(job(f"dlv-other-{i}", to="+41445550111"))
    again = await gateway.send(job("dlv-A"))
    gateway.page_size = 2

    found = await gateway.find_by_tag("dlv-A")
    assert found is not None and found.remote_id == again.remote_id != first.remote_id
    assert await gateway.find_by_tag("dlv-none") is None
    pages = [dict(r.query)["page"] for r in api.requests_to("GET", FAXES)]
    assert pages == ["1", "2", "3", "1", "2", "3"]


# ------------------------------------------------------------------------------ mapping

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

#: (errorType, errorCode) → kind, written out independently of the adapter's tables
MAPPING = [
    ("CALL_ERROR", 11, FailureKind.INTERRUPTED),
    ("CALL_ERROR", 15, FailureKind.CONGESTION),
    ("CALL_ERROR", 16, FailureKind.NO_ANSWER),
    ("CALL_ERROR", 17, FailureKind.BUSY),
    ("CALL_ERROR", 19, FailureKind.INTERRUPTED),
    ("CALL_ERROR", 30, FailureKind.NO_FAX_TONE),
    ("CALL_ERROR", 32, FailureKind.NO_FAX_TONE),
    ("CALL_ERROR", 34, FailureKind.INVALID_NUMBER),
    ("CALL_ERROR", 43, FailureKind.CONGESTION),
    ("CALL_ERROR", 49, FailureKind.INVALID_NUMBER),
    ("CALL_ERROR", 999, FailureKind.CONGESTION),
    ("FAX_ERROR", 14, FailureKind.NO_FAX_TONE),
    ("FAX_ERROR", 132, FailureKind.NO_FAX_TONE),
    ("FAX_ERROR", 48, FailureKind.NO_ANSWER),
    ("FAX_ERROR", 46, FailureKind.FUNDS),
    ("FAX_ERROR", 113, FailureKind.DOCUMENT_REJECTED),
    ("FAX_ERROR", 133, FailureKind.AUTHENTICATION),
    ("FAX_ERROR", 8, FailureKind.INTERRUPTED),
    ("FAX_ERROR", 22, FailureKind.INTERRUPTED),
    ("FAX_ERROR", 38, FailureKind.INTERRUPTED),
    ("FAX_ERROR", 76, FailureKind.UNKNOWN),
    ("DOCUMENT_CONVERSION_ERROR", 129, FailureKind.DOCUMENT_REJECTED),
    ("DOCUMENT_CONVERSION_ERROR", 133, FailureKind.DOCUMENT_REJECTED),
    ("DOCUMENT_CONVERSION_ERROR", 57, FailureKind.GATEWAY_ERROR),
    ("LINE_ERROR", 1, FailureKind.CONGESTION),
    ("FATAL_ERROR", 1, FailureKind.GATEWAY_ERROR),
    ("GENERAL_ERROR", 1, FailureKind.UNKNOWN),
    ("SOMETHING_NEW", 1, FailureKind.UNKNOWN),
    (None, None, FailureKind.UNKNOWN),
]


@pytest.mark.parametrize("error_type, code, kind", MAPPING)
def test_error_mapping(error_type: str | None, code: int | None, kind: FailureKind) -> None:
    failure = failure_for(error_type, code, "text")
    assert failure.kind is kind
    assert type(failure.error()) is ERROR_CLASS[kind]
    if error_type:
        assert failure.code == f"{error_type}/{code}"


def test_error_code_as_text_is_read() -> None:
    assert failure_for("CALL_ERROR", "17").kind is FailureKind.BUSY


@pytest.mark.parametrize(
    "status, expected",
    [
        ("QUEUED", FaxStatus.QUEUED),
        ("IN_PROGRESS", FaxStatus.SENDING),
        ("COMPLETED", FaxStatus.DELIVERED),
        ("FAILURE", FaxStatus.FAILED),
    ],
)
async def test_status_mapping(api: SinchServer, gateway: SinchGateway, status: str, expected: FaxStatus) -> None:
    sent = await gateway.send(job())
    api.complete(sent.remote_id, status, error_type="CALL_ERROR" if status == "FAILURE" else None, error_code=17)
    report = await gateway.get(sent.remote_id)
    assert (report.status, report.raw_status, report.tag) == (expected, status, "dlv-0001")
    if expected is FaxStatus.FAILED:
        assert report.failure is not None and report.failure.kind is FailureKind.BUSY
    else:
        assert report.failure is None
    if report.final:
        assert report.occurred_at is not None


# ------------------------------------------------------------------------------ callbacks


def test_callback_url_carries_basic_credentials() -> None:
    url = callback_url("https://dispatch.example.org:8443/hooks/sinch?x=1", "sinch", "p@ss:w/rd")
    assert url == "https://sinch:p%40ss%3Aw%2Frd@dispatch.example.org:8443/hooks/sinch?x=1"
    with pytest.raises(ValueError):
        callback_url("http://dispatch.example.org/hooks/sinch", "sinch", "secret")


def parse(hook: Received, *, username: str = HOOK_USER, secret: str = HOOK_SECRET) -> FaxReport:
    return parse_callback(hook.body, hook.headers, username=username, secret=secret, query=hook.query)


async def test_callback_with_credentials_is_read_and_confirmed(
    api: SinchServer, gateway: SinchGateway, receiver: WebhookReceiver
) -> None:
    sent = await gateway.send(job())
    api.complete(sent.remote_id, "COMPLETED", pages=2)
    assert api.send_callback(sent.remote_id).status_code == 200
    hook = receiver.last()
    assert hook.path == "/hooks/fax" and hook.headers["authorization"].startswith("Basic ")

    unconfirmed = parse(hook)
    assert (unconfirmed.remote_id, unconfirmed.tag, unconfirmed.status) == (
        sent.remote_id,
        "dlv-0001",
        FaxStatus.DELIVERED,
    )
    assert unconfirmed.extra["confirmed"] == "false" and unconfirmed.extra["event"] == "FAX_COMPLETED"

    confirmed = await gateway.confirm(unconfirmed)
    assert confirmed.status is FaxStatus.DELIVERED and confirmed.extra["confirmed"] == "true"
    assert confirmed.pages == 2 and confirmed.tag == "dlv-0001"
    assert api.requests[-1].method == "GET" and api.requests[-1].path == f"{FAXES}/{sent.remote_id}"


async def test_multipart_callback_is_read(api: SinchServer, gateway: SinchGateway, receiver: WebhookReceiver) -> None:
    sent = await gateway.send(job())
    api.complete(sent.remote_id, "FAILURE", error_type="CALL_ERROR", error_code=16, error_message="Ring Timeout")
    api.send_callback(sent.remote_id, content_type="multipart/form-data")
    report = parse(receiver.last())
    assert report.status is FaxStatus.FAILED and report.tag == "dlv-0001"
    assert report.failure is not None and report.failure.kind is FailureKind.NO_ANSWER
    assert report.failure.code == "CALL_ERROR/16" and report.failure.text == "Ring Timeout"


@pytest.mark.parametrize(
    "username, secret",
    [(HOOK_USER, "wrong-secret"), ("someone", HOOK_SECRET), (HOOK_USER, HOOK_SECRET + "x")],
    ids=["wrong-secret", "wrong-user", "longer-secret"],
)
async def test_callback_with_wrong_credentials_is_refused(
    api: SinchServer, gateway: SinchGateway, receiver: WebhookReceiver, username: str, secret: str
) -> None:
    sent = await gateway.send(job())
    api.complete(sent.remote_id, "COMPLETED")
    api.send_callback(sent.remote_id, url=callback_url(receiver.url, username, secret))
    with pytest.raises(AuthenticationFailed):
        parse(receiver.last())


async def test_callback_without_credentials_is_refused(
    api: SinchServer, gateway: SinchGateway, receiver: WebhookReceiver
) -> None:
    sent = await gateway.send(job())
    api.send_callback(sent.remote_id, url=receiver.url)
    hook = receiver.last()
    assert "authorization" not in hook.headers
    with pytest.raises(AuthenticationFailed):
        parse(hook)
    with pytest.raises(AuthenticationFailed):  # no secret configured: refuse everything
        parse(hook, secret="")


async def test_callback_with_a_query_token_is_accepted(
    api: SinchServer, gateway: SinchGateway, receiver: WebhookReceiver
) -> None:
    sent = await gateway.send(job())
    api.send_callback(sent.remote_id, url=f"{receiver.url}?token={HOOK_SECRET}")
    assert parse(receiver.last()).remote_id == sent.remote_id
    api.send_callback(sent.remote_id, url=f"{receiver.url}?token=guess")
    with pytest.raises(AuthenticationFailed):
        parse(receiver.last())


async def test_a_callback_that_disagrees_with_the_fax_is_resolved_by_get(
    api: SinchServer, gateway: SinchGateway, receiver: WebhookReceiver
) -> None:
    sent = await gateway.send(job())
    api.complete(sent.remote_id, "FAILURE", error_type="CALL_ERROR", error_code=17, error_message="Busy")
    api.send_callback(sent.remote_id, status="COMPLETED")  # stale, replayed or forged

    hinted = parse(receiver.last())
    assert hinted.status is FaxStatus.DELIVERED  # what the callback claims
    confirmed = await gateway.confirm(hinted)
    assert confirmed.status is FaxStatus.FAILED
    assert confirmed.failure is not None and confirmed.failure.kind is FailureKind.BUSY
    assert confirmed.extra["callback_status"] == "COMPLETED"


async def test_a_callback_for_a_fax_we_do_not_have_is_refused_on_confirm(
    api: SinchServer, gateway: SinchGateway, receiver: WebhookReceiver
) -> None:
    sent = await gateway.send(job())
    api.complete(sent.remote_id, "COMPLETED")
    api.send_callback(sent.remote_id)
    forged_body = json.loads(receiver.last().body)
    forged_body["fax"]["id"] = "01" + uuid.uuid4().hex[:24].upper()
    hook = receiver.last()
    report = parse_callback(json.dumps(forged_body).encode(), hook.headers, username=HOOK_USER, secret=HOOK_SECRET)
    with pytest.raises(AuthenticationFailed):
        await gateway.confirm(report)


def test_callback_that_is_not_a_fax_event_is_refused() -> None:
    auth = {"authorization": "Basic " + base64.b64encode(f"{HOOK_USER}:{HOOK_SECRET}".encode()).decode()}
    # the nested one is deeper than the JSON parser's stack: it used to escape as a 500
    for body in (b"not json", b"[]", b'{"event": "FAX_COMPLETED"}', b"[" * 5000 + b"]" * 5000):
        with pytest.raises(InvalidWebhook):
            parse_callback(body, auth, username=HOOK_USER, secret=HOOK_SECRET)


def test_callback_with_an_error_type_that_is_not_text_is_read_as_an_unknown_failure() -> None:
    auth = {"authorization": "Basic " + base64.b64encode(f"{HOOK_USER}:{HOOK_SECRET}".encode()).decode()}
    body = json.dumps({"fax": {"id": "01F", "status": "FAILURE", "errorType": 5, "errorCode": 3}}).encode()
    report = parse_callback(body, auth, username=HOOK_USER, secret=HOOK_SECRET)
    assert report.failure is not None and report.failure.kind is FailureKind.UNKNOWN
