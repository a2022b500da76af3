"""Telnyx Programmable Fax (API v2) as a :class:`~dispatcher.channels.fax.base.FaxGateway`.

* Send: ``POST /v2/faxes`` (JSON, ``Authorization: Bearer <API key>``) with ``connection_id``,
  ``to``, ``from``, ``client_state`` (base64 of our tag) and the document either as
  ``media_name`` (the PDF uploaded first with ``POST /v2/media``, multipart part ``media``: the
  default, nothing of ours has to be reachable from the internet) or as ``media_url`` (a URL we
  host, from ``media_url_for(job)``; Telnyx downloads it and refuses redirects).
* Look up: ``GET /v2/faxes/{id}``; ``GET /v2/faxes`` filters only by direction, from, to and
  created_at, not by client_state, so :meth:`TelnyxGateway.find_by_tag` scans the recent
  outbound faxes (to the job's number when known) and decodes each ``client_state``.
* Webhooks: :func:`parse_webhook` checks the Ed25519 signature Telnyx puts in
  ``telnyx-signature-ed25519`` over ``"{telnyx-timestamp}|{raw body}"`` with the account's
  public key, refuses stale timestamps, and turns the event into a :class:`FaxReport`.

Telnyx does not retry a failed fax by itself; our ledger does (DESIGN.md).
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

import httpx
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from dispatcher.channels.fax.base import FailureKind, FaxFailure, FaxJob, FaxReport, FaxStatus
from dispatcher.channels.fax.http import (
    FaxNotFound,
    LookupFirstGateway,
    as_float,
    as_int,
    http_error,
    json_body,
    make_client,
    newest_created,
    parse_time,
    transport_error,
)
from dispatcher.errors import (
    AuthenticationFailed,
    DeliveryError,
    FieldProblem,
    InvalidWebhook,
    SignatureExpired,
    TransientError,
)
from dispatcher.keys import load_public_key

GATEWAY = "telnyx"
DEFAULT_BASE_URL = "https://api.telnyx.com"

#: ``status`` of a fax object (GET /v2/faxes) and of webhook payloads
STATUSES: dict[str, FaxStatus] = {
    "queued": FaxStatus.QUEUED,
    "media.processing": FaxStatus.QUEUED,
    "media.processed": FaxStatus.QUEUED,
    "originated": FaxStatus.SENDING,
    "sending": FaxStatus.SENDING,
    "sending.started": FaxStatus.SENDING,
    "delivered": FaxStatus.DELIVERED,
    "failed": FaxStatus.FAILED,
}

#: webhook ``event_type`` of an outbound fax
EVENTS: dict[str, FaxStatus] = {
    "fax.queued": FaxStatus.QUEUED,
    "fax.media.processed": FaxStatus.QUEUED,
    "fax.sending.started": FaxStatus.SENDING,
    "fax.delivered": FaxStatus.DELIVERED,
    "fax.failed": FaxStatus.FAILED,
}

_K = FailureKind
#: documented ``failure_reason`` values → our kinds. Anything else is UNKNOWN (transient), kept
#: verbatim in FaxFailure.code for operators.
FAILURE_REASONS: dict[str, FailureKind] = {
    # the line
    "user_busy": _K.BUSY,
    # A declined call is handled like a busy line: try again later, the lifetime cap ends it.
    "receiver_decline": _K.BUSY,
    "receiver_no_answer": _K.NO_ANSWER,
    "receiver_no_response": _K.NO_ANSWER,  # no alerting/connect within the allotted time
    "destination_unreachable": _K.CONGESTION,
    "receiver_communication_error": _K.CONGESTION,  # general call failure or routing error
    "receiver_recovery_on_timer_expire": _K.CONGESTION,  # SIP 408 / downstream carrier
    # our own concurrency limits: the call was never placed, try again shortly
    "user_channel_limit_exceeded": _K.CONGESTION,
    "connection_channel_limit_exceeded": _K.CONGESTION,
    "outbound_profile_channel_limit_exceeded": _K.CONGESTION,
    # answered, but not by a fax machine
    "fax_initial_communication_timeout": _K.NO_FAX_TONE,
    "receiver_incompatible_destination": _K.NO_FAX_TONE,
    # T.30 broke down after the machines met
    "receiver_call_dropped": _K.INTERRUPTED,
    "fax_signaling_error": _K.INTERRUPTED,
    "invalid_ecm_response_from_receiver": _K.INTERRUPTED,
    # the number
    "receiver_unallocated_number": _K.INVALID_NUMBER,
    "receiver_invalid_number_format": _K.INVALID_NUMBER,
    "destination_invalid": _K.INVALID_NUMBER,
    # our document
    "file_format_invalid": _K.DOCUMENT_REJECTED,
    "file_download_failed": _K.DOCUMENT_REJECTED,
    "file_size_limit_exceeded": _K.DOCUMENT_REJECTED,
    "page_count_limit_exceeded": _K.DOCUMENT_REJECTED,
    "media_processing_exception": _K.DOCUMENT_REJECTED,
    # our account: money
    "account_disabled": _K.FUNDS,
    "outbound_profile_daily_spend_limit_exceeded": _K.FUNDS,
    # Our account may not call there (profile, whitelist, plan, verification). The account
    # must be fixed; failing the letters would lose them, so it is operational. FailureKind
    # has no "not permitted" kind, AUTHENTICATION is the operational one closest to it.
    "no_outbound_profile": _K.AUTHENTICATION,
    "destination_not_in_countries_whitelist": _K.AUTHENTICATION,
    "destination_not_in_service_plan": _K.AUTHENTICATION,
    "unverified_origination_number": _K.AUTHENTICATION,
    "unverified_destination_not_allowed": _K.AUTHENTICATION,
    # Telnyx's own fault
    "service_unavailable": _K.GATEWAY_ERROR,
}

#: Telnyx API error codes that blame the destination number (10002 invalid phone number,
#: 10016 must be +E.164)
_NUMBER_ERROR_CODES = frozenset({"10002", "10016"})


def encode_tag(tag: str) -> str:
    """``client_state`` for a tag: Telnyx requires valid base64."""
    return base64.b64encode(tag.encode("utf-8")).decode("ascii")


def decode_tag(client_state: object) -> str | None:
    if not isinstance(client_state, str) or not client_state:
        return None
    try:
        return base64.b64decode(client_state, validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None  # a fax somebody else created on the account, with their own state


def failure_for(reason: object) -> FaxFailure:
    """TypeError for a reason that is not text: the caller decides whose mistake that is."""
    if reason is not None and not isinstance(reason, str):
        raise TypeError(f"failure_reason is {type(reason).__name__}, not text")
    if not reason:
        return FaxFailure(FailureKind.UNKNOWN, None, "failed without a reason")
    return FaxFailure(FAILURE_REASONS.get(reason, FailureKind.UNKNOWN), reason, reason.replace("_", " "))


def report_from_fax(fax: Mapping[str, Any]) -> FaxReport:
    """A fax object (create answer, GET, list) as a report."""
    raw = str(fax.get("status") or "")
    status = STATUSES.get(raw, FaxStatus.QUEUED)
    created = fax.get("created_at")
    return FaxReport(
        gateway=GATEWAY,
        remote_id=str(fax["id"]),
        status=status,
        tag=decode_tag(fax.get("client_state")),
        pages=as_int(fax.get("page_count")),
        duration_s=as_float(fax.get("call_duration_secs")),
        failure=failure_for(fax.get("failure_reason")) if status is FaxStatus.FAILED else None,
        occurred_at=parse_time(fax.get("updated_at")) or parse_time(created),
        raw_status=raw or None,
        extra={"created_at": str(created)} if created else {},
    )


def report_from_event(event: Mapping[str, Any]) -> FaxReport:
    """A webhook body (already verified) as a report."""
    data = event.get("data", event)  # documented with and without the "data" envelope
    if not isinstance(data, Mapping):
        raise _malformed("data")
    event_type = str(data.get("event_type") or "")
    payload = data.get("payload")
    if not event_type.startswith("fax.") or not isinstance(payload, Mapping) or not payload.get("fax_id"):
        raise _malformed("event_type" if not event_type.startswith("fax.") else "payload")
    raw = str(payload.get("status") or "")
    status = EVENTS.get(event_type) or STATUSES.get(raw, FaxStatus.QUEUED)
    try:
        failure = failure_for(payload.get("failure_reason")) if status is FaxStatus.FAILED else None
    except TypeError:
        raise _malformed("payload", "failure_reason") from None
    return FaxReport(
        gateway=GATEWAY,
        remote_id=str(payload["fax_id"]),
        status=status,
        tag=decode_tag(payload.get("client_state")),
        pages=as_int(payload.get("page_count")),
        duration_s=as_float(payload.get("call_duration_secs")),
        failure=failure,
        occurred_at=parse_time(data.get("occurred_at")),
        raw_status=raw or event_type,
        extra={"event_id": str(data.get("id") or ""), "event_type": event_type},
    )


class TelnyxGateway(LookupFirstGateway):
    name = GATEWAY

    def __init__(
        self,
        api_key: str,
        connection_id: str,
        from_number: str,
        *,
        base_url: str = DEFAULT_BASE_URL,
        media_url_for: Callable[[FaxJob], str] | None = None,
        webhook_url: str | None = None,
        quality: str | None = None,
        media_ttl_s: int = 86_400,
        lookback: timedelta = timedelta(days=7),
        lookup_attempts: int = 2,
        lookup_delay_s: float = 0.5,
        timeout: float | httpx.Timeout | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ):
        self.connection_id = connection_id
        self.from_number = from_number
        self.media_url_for = media_url_for
        self.webhook_url = webhook_url
        self.quality = quality
        self.media_ttl_s = media_ttl_s
        self.lookback = lookback
        super().__init__(lookup_attempts=lookup_attempts, lookup_delay_s=lookup_delay_s)
        self._client = make_client(
            base_url, headers={"Authorization": f"Bearer {api_key}"}, timeout=timeout, transport=transport
        )

    async def get(self, remote_id: str) -> FaxReport:
        response = await self._request("GET", f"/v2/faxes/{quote(remote_id, safe='')}")
        if response.status_code == 404:
            raise FaxNotFound(f"telnyx has no fax {remote_id}", code=404)
        if response.is_error:
            raise _error(response)
        try:
            return report_from_fax(_data(response))
        except (KeyError, TypeError, ValueError) as exc:
            raise TransientError(f"telnyx answered an unreadable fax: {exc}") from exc

    async def check_access(self) -> None:
        """A read-only call that proves the API key (one fax of the account's list): returns, or
        raises the classified error of the refusal (401/403: OperationalError with that code)."""
        response = await self._request("GET", "/v2/faxes", params={"page[number]": 1, "page[size]": 1})
        if response.is_error:
            raise _error(response)

    async def aclose(self) -> None:
        await self._client.aclose()

    # ----------------------------------------------------------------------------- internals

    async def _create_body(self, job: FaxJob) -> dict[str, Any]:
        body: dict[str, Any] = {
            "connection_id": self.connection_id,
            "to": job.to_number,
            "from": job.from_number or self.from_number,
            "client_state": encode_tag(job.tag),
        }
        if self.media_url_for is not None:
            body["media_url"] = self.media_url_for(job)
        else:
            body["media_name"] = await self._upload(job)
        if self.quality:
            body["quality"] = self.quality
        if self.webhook_url:
            body["webhook_url"] = self.webhook_url
        return body

    async def _upload(self, job: FaxJob) -> str:
        # A lost answer here costs at most an orphan file that expires after ttl_secs: no
        # fax exists yet, so a plain retry is safe.
        response = await self._request(
            "POST",
            "/v2/media",
            data={"ttl_secs": str(self.media_ttl_s)},
            files={"media": (f"{job.tag}.pdf", job.pdf, "application/pdf")},
        )
        if response.is_error:
            raise _error(response)
        try:
            name = _data(response).get("media_name")
        except ValueError:
            name = None
        if not name:
            raise TransientError("telnyx media upload answered without a media_name")
        return str(name)

    async def _create_job(self, job: FaxJob) -> FaxReport:
        body = await self._create_body(job)
        return await self._post_create(
            lambda: self._client.post("/v2/faxes", json=body), lambda r: report_from_fax(_data(r)), _error
        )

    async def _find(self, tag: str, to_number: str | None) -> FaxReport | None:
        since = datetime.now(UTC) - self.lookback
        params: dict[str, str | int] = {
            "filter[direction][eq]": "outbound",
            "filter[created_at][gte]": since.isoformat().replace("+00:00", "Z"),
            "page[size]": self.page_size,
        }
        if to_number:
            params["filter[to][eq]"] = to_number
        matches: list[FaxReport] = []
        page, pages = 1, 1
        while page <= pages and page <= 50:  # 5,000 faxes: far more than a week of letters
            response = await self._request("GET", "/v2/faxes", params={**params, "page[number]": page})
            if response.is_error:
                raise _error(response)
            try:
                doc = json_body(response) or {}
                matches += [r for r in map(report_from_fax, doc.get("data") or []) if r.tag == tag]
                pages = int((doc.get("meta") or {}).get("total_pages") or 0)
            except (AttributeError, KeyError, TypeError, ValueError) as exc:
                # Unreadable: we cannot say the fax is absent, so we must not say None.
                raise TransientError(f"telnyx fax list unreadable: {exc}") from exc
            page += 1
        return newest_created(matches)

    async def _request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        try:
            return await self._client.request(method, url, **kwargs)
        except httpx.HTTPError as exc:
            raise transport_error(exc) from exc


# --------------------------------------------------------------------------------- webhooks


def parse_webhook(
    raw_body: bytes,
    headers: Mapping[str, str],
    public_key: bytes | str | Ed25519PublicKey,
    *,
    now: float,
    tolerance: int = 300,
) -> FaxReport:
    """Verify a Telnyx webhook and return what it says.

    ``raw_body`` must be the bytes as received: the signature covers them exactly, so a body
    parsed and re-serialised is refused. ``public_key`` is the account's Ed25519 public key
    (base64 as Mission Control shows it, raw 32 bytes, or PEM). Raises AuthenticationFailed for
    a missing or wrong signature, SignatureExpired when ``telnyx-timestamp`` is more than
    ``tolerance`` seconds from ``now``.
    """
    lowered = {k.lower(): v for k, v in headers.items()}
    signature_b64 = lowered.get("telnyx-signature-ed25519")
    timestamp = lowered.get("telnyx-timestamp")
    if not signature_b64 or not timestamp:
        raise AuthenticationFailed("missing telnyx-signature-ed25519 or telnyx-timestamp header")
    try:
        signature = base64.b64decode(signature_b64, validate=True)
        sent_at = int(timestamp)
    except (binascii.Error, ValueError):
        raise AuthenticationFailed("malformed telnyx signature headers") from None
    try:
        load_public_key(public_key).verify(signature, timestamp.encode("ascii") + b"|" + raw_body)
    except (InvalidSignature, UnicodeEncodeError):
        raise AuthenticationFailed("telnyx webhook signature does not verify") from None
    # Checked after the signature, so the timestamp compared is the one Telnyx signed.
    if abs(now - sent_at) > tolerance:
        raise SignatureExpired(f"telnyx webhook timestamp is {int(now - sent_at)} s from now")
    try:
        event = json.loads(raw_body)
    except (ValueError, RecursionError):  # deep nesting exhausts the parser's stack
        raise _malformed("body") from None
    if not isinstance(event, Mapping):
        raise _malformed("body")
    return report_from_event(event)


# --------------------------------------------------------------------------------- helpers


def _data(response: httpx.Response) -> Mapping[str, Any]:
    doc = json_body(response)
    data = doc.get("data") if isinstance(doc, Mapping) else None
    if not isinstance(data, Mapping):
        raise ValueError("telnyx answer without a data object")
    return data


def _error(response: httpx.Response) -> DeliveryError:
    """Telnyx error bodies: ``{"errors": [{"code", "title", "detail", "source": {"pointer"}}]}``."""
    doc = json_body(response)
    errors = doc.get("errors") if isinstance(doc, Mapping) else None
    errors = [e for e in errors if isinstance(e, Mapping)] if isinstance(errors, list) else []
    detail = "; ".join(" ".join(str(p) for p in (e.get("code"), e.get("title"), e.get("detail")) if p) for e in errors)
    number = any(str(e.get("code")) in _NUMBER_ERROR_CODES or _pointer(e) == "/to" for e in errors)
    document = any(_pointer(e).startswith(("/media", "/contents")) for e in errors)
    return http_error(response, detail=detail, number_problem=number, document_problem=document)


def _pointer(error: Mapping[str, Any]) -> str:
    source = error.get("source")
    return str(source.get("pointer") or "") if isinstance(source, Mapping) else ""


def _malformed(*where: str) -> InvalidWebhook:
    return InvalidWebhook([FieldProblem(where, "not a Telnyx fax event")])
