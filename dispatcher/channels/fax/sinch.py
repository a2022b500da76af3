"""Sinch Fax API v3 as a :class:`~dispatcher.channels.fax.base.FaxGateway`.

* Send: ``POST /v3/projects/{projectId}/faxes`` as multipart/form-data with HTTP Basic auth
  (key id : key secret): the PDF (or TIFF) as part ``file``, ``to``, ``from``, ``labels`` (a
  JSON object part carrying our tag under :data:`TAG_LABEL`), ``callbackUrl`` and
  ``callbackUrlContentType: application/json``. ``maxRetries`` is 0 by default: Sinch would
  otherwise redial on its own schedule, outside our office hours and per-number pacing.
* Look up: ``GET .../faxes/{id}``; ``GET .../faxes`` filters by direction, status and number
  (prefix) and, without ``createTime``, covers the prior week. :meth:`SinchGateway.find_by_tag`
  scans those pages for our label.
* Callbacks are **not signed** by Sinch. We give Sinch a callback URL carrying a per-deployment
  secret (basic-auth ``user:secret@`` in the URL, see :func:`callback_url`, or ``?token=``),
  :func:`parse_callback` checks it in constant time, and :meth:`SinchGateway.confirm` asks
  ``GET .../faxes/{id}`` before anything is believed: the callback only says "look now".
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
from collections.abc import Mapping
from dataclasses import replace
from email.parser import BytesParser
from email.policy import HTTP
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import httpx

from dispatcher.channels.fax.base import FailureKind, FaxFailure, FaxJob, FaxReport, FaxStatus
from dispatcher.channels.fax.http import (
    FaxNotFound,
    LookupFirstGateway,
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
    TransientError,
)

GATEWAY = "sinch"
DEFAULT_BASE_URL = "https://fax.api.sinch.com"
#: the label that carries our tag (labels are a free key → value store)
TAG_LABEL = "dispatch_tag"

STATUSES: dict[str, FaxStatus] = {
    "QUEUED": FaxStatus.QUEUED,
    "IN_PROGRESS": FaxStatus.SENDING,
    "COMPLETED": FaxStatus.DELIVERED,
    "FAILURE": FaxStatus.FAILED,
}

_K = FailureKind
#: errorType CALL_ERROR: "the call could not be placed, many times you can just try again"
CALL_ERRORS: dict[int, FailureKind] = {
    11: _K.INTERRUPTED,  # the call dropped prematurely
    15: _K.CONGESTION,
    16: _K.NO_ANSWER,  # ring timeout
    17: _K.BUSY,
    19: _K.INTERRUPTED,  # immediate hangup
    30: _K.NO_FAX_TONE,  # no answer from a fax machine
    32: _K.NO_FAX_TONE,  # incompatible destination: not a fax line
    34: _K.INVALID_NUMBER,  # phone number not operational
    43: _K.CONGESTION,  # problem establishing connection
    49: _K.INVALID_NUMBER,  # the destination number is not active
}
#: errorType FAX_ERROR: the T.30 conversation. Codes not listed broke down mid-document
#: (DCS/training/ECM/page errors): INTERRUPTED, retried.
FAX_ERRORS: dict[int, FailureKind] = {
    14: _K.NO_FAX_TONE,  # timed out waiting for initial communication
    132: _K.NO_FAX_TONE,  # no fax tone detected
    48: _K.NO_ANSWER,  # no answer (receiving machine may be out of paper)
    46: _K.FUNDS,  # insufficient funds, auto recharge failed
    113: _K.DOCUMENT_REJECTED,  # the file for this fax was deleted or is not accessible
    # Not permitted for our account: fix the account, do not fail the letters (operational).
    133: _K.AUTHENTICATION,
    75: _K.UNKNOWN,  # cancelled by user: not by us
    76: _K.UNKNOWN,  # cancelled: timeout exceeded
    79: _K.UNKNOWN,
    119: _K.UNKNOWN,  # simulated
}
#: errorType DOCUMENT_CONVERSION_ERROR: our document, except Sinch failing to store it
DOCUMENT_ERRORS: dict[int, FailureKind] = {57: _K.GATEWAY_ERROR, 69: _K.GATEWAY_ERROR}
#: the kind of an errorType whose code is not in its table
TYPE_DEFAULTS: dict[str, FailureKind] = {
    "CALL_ERROR": _K.CONGESTION,
    "FAX_ERROR": _K.INTERRUPTED,
    "DOCUMENT_CONVERSION_ERROR": _K.DOCUMENT_REJECTED,
    "LINE_ERROR": _K.CONGESTION,
    "FATAL_ERROR": _K.GATEWAY_ERROR,
    "GENERAL_ERROR": _K.UNKNOWN,
}
_BY_TYPE = {"CALL_ERROR": CALL_ERRORS, "FAX_ERROR": FAX_ERRORS, "DOCUMENT_CONVERSION_ERROR": DOCUMENT_ERRORS}


def failure_for(error_type: str | None, error_code: object, message: str | None = None) -> FaxFailure:
    """Our FaxFailure for Sinch's (errorType, errorCode); code kept as ``"TYPE/code"``."""
    kind_type = error_type.upper() if isinstance(error_type, str) else ""
    code = error_code if isinstance(error_code, int) and not isinstance(error_code, bool) else None
    if code is None and isinstance(error_code, str) and error_code.isdigit():
        code = int(error_code)
    table = _BY_TYPE.get(kind_type, {})
    kind = (table.get(code) if code is not None else None) or TYPE_DEFAULTS.get(kind_type, FailureKind.UNKNOWN)
    verbatim = "/".join(str(p) for p in (error_type, error_code) if p is not None) or None
    return FaxFailure(kind, verbatim, message or "")


def report_from_fax(fax: Mapping[str, Any]) -> FaxReport:
    raw = str(fax.get("status") or "")
    status = STATUSES.get(raw, FaxStatus.QUEUED)
    labels = fax.get("labels")
    tag = labels.get(TAG_LABEL) if isinstance(labels, Mapping) else None
    failure = None
    if status is FaxStatus.FAILED:
        failure = failure_for(fax.get("errorType"), fax.get("errorCode"), fax.get("errorMessage"))
    created = fax.get("createTime")
    extra = {"created_at": str(created)} if created else {}
    if isinstance(fax.get("retryCount"), int):
        extra["retry_count"] = str(fax["retryCount"])
    return FaxReport(
        gateway=GATEWAY,
        remote_id=str(fax["id"]),
        status=status,
        tag=str(tag) if tag is not None else None,
        pages=as_int(fax.get("numberOfPages")),
        duration_s=None,  # Sinch reports no line time
        failure=failure,
        occurred_at=parse_time(fax.get("completedTime")) or parse_time(created),
        raw_status=raw or None,
        extra=extra,
    )


def callback_url(base_url: str, username: str, secret: str) -> str:
    """``base_url`` with ``username:secret@`` so that Sinch sends HTTP Basic credentials with
    every callback (Sinch masks them when the fax is read back)."""
    parts = urlsplit(base_url)
    if parts.scheme != "https" and parts.hostname not in ("127.0.0.1", "localhost", "::1"):
        # The secret travels in every callback: never over plain HTTP off this machine.
        raise ValueError("a Sinch callback URL with credentials must use https")
    userinfo = f"{quote(username, safe='')}:{quote(secret, safe='')}"
    host = parts.hostname or ""
    netloc = f"{userinfo}@{'[' + host + ']' if ':' in host else host}{':' + str(parts.port) if parts.port else ''}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def parse_callback(
    raw_body: bytes,
    headers: Mapping[str, str],
    *,
    username: str,
    secret: str,
    query: Mapping[str, str] | None = None,
) -> FaxReport:
    """Check a Sinch callback's credentials and read it. The report is NOT confirmed: pass it to
    :meth:`SinchGateway.confirm`, which asks Sinch what the fax's state really is.

    Accepted credentials: ``Authorization: Basic`` with ``username:secret`` (from a URL made by
    :func:`callback_url`), or a ``token`` query parameter equal to ``secret``. Anything else,
    including a missing secret on our side, raises AuthenticationFailed.
    """
    if not secret:
        raise AuthenticationFailed("no Sinch callback secret configured: refusing every callback")
    lowered = {k.lower(): v for k, v in headers.items()}
    if not (_basic_ok(lowered.get("authorization"), username, secret) or _token_ok(query, secret)):
        raise AuthenticationFailed("Sinch callback without valid credentials")
    event = _callback_fields(raw_body, lowered.get("content-type", ""))
    fax = event.get("fax")
    if isinstance(fax, str):  # multipart callbacks carry the fax as a JSON text field
        try:
            fax = json.loads(fax)
        except (ValueError, RecursionError):
            fax = None
    if not isinstance(fax, Mapping) or not fax.get("id"):
        raise InvalidWebhook([FieldProblem(("fax",), "not a Sinch fax callback")])
    report = report_from_fax(fax)
    extra = {**report.extra, "event": str(event.get("event") or ""), "confirmed": "false"}
    occurred = parse_time(event.get("eventTime")) or report.occurred_at
    return replace(report, extra=extra, occurred_at=occurred)


class SinchGateway(LookupFirstGateway):
    name = GATEWAY

    def __init__(
        self,
        project_id: str,
        key_id: str,
        key_secret: str,
        from_number: str,
        *,
        base_url: str = DEFAULT_BASE_URL,
        callback_url: str | None = None,
        service_id: str | None = None,
        max_retries: int | None = 0,
        send_tiff: bool = False,
        lookup_attempts: int = 2,
        lookup_delay_s: float = 0.5,
        timeout: float | httpx.Timeout | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ):
        self.from_number = from_number
        self.callback_url = callback_url
        self.service_id = service_id
        self.max_retries = max_retries
        self.send_tiff = send_tiff
        super().__init__(lookup_attempts=lookup_attempts, lookup_delay_s=lookup_delay_s)
        self._faxes = f"/v3/projects/{quote(project_id, safe='')}/faxes"
        self._client = make_client(
            base_url, headers={}, auth=(key_id, key_secret), timeout=timeout, transport=transport
        )

    async def get(self, remote_id: str) -> FaxReport:
        response = await self._request("GET", f"{self._faxes}/{quote(remote_id, safe='')}")
        if response.status_code == 404:
            raise FaxNotFound(f"sinch has no fax {remote_id}", code=404)
        if response.is_error:
            raise _error(response)
        try:
            return report_from_fax(_fax(response))
        except (KeyError, TypeError, ValueError) as exc:
            raise TransientError(f"sinch answered an unreadable fax: {exc}") from exc

    async def confirm(self, report: FaxReport) -> FaxReport:
        """What Sinch says about the fax a callback named. The callback's own status is only a
        hint: an unsigned callback could be forged or stale, the GET cannot."""
        try:
            confirmed = await self.get(report.remote_id)
        except FaxNotFound:
            raise AuthenticationFailed(f"callback names fax {report.remote_id}, unknown to this project") from None
        extra = {**confirmed.extra, "confirmed": "true", "callback_status": report.raw_status or ""}
        return replace(confirmed, extra=extra)

    async def check_access(self) -> None:
        """A read-only call that proves the key and the project (one fax of the project's list):
        returns, or raises the classified error of the refusal (401/403: OperationalError)."""
        response = await self._request("GET", self._faxes, params={"pageSize": 1})
        if response.is_error:
            raise _error(response)

    async def aclose(self) -> None:
        await self._client.aclose()

    # ----------------------------------------------------------------------------- internals

    def _form(self, job: FaxJob) -> tuple[dict[str, str], dict[str, tuple[str | None, bytes, str]]]:
        data = {"to": job.to_number, "from": job.from_number or self.from_number}
        if self.callback_url:
            data["callbackUrl"] = self.callback_url
            # the fax object then arrives as JSON, not as a text field of a form
            data["callbackUrlContentType"] = "application/json"
        if self.max_retries is not None:
            data["maxRetries"] = str(self.max_retries)
        if self.service_id:
            data["serviceId"] = self.service_id
        if job.station_id:
            data["headerText"] = job.station_id[:50]
        document = (
            (f"{job.tag}.tif", job.tiff, "image/tiff")
            if self.send_tiff
            else (f"{job.tag}.pdf", job.pdf, "application/pdf")
        )
        files: dict[str, tuple[str | None, bytes, str]] = {
            "file": document,
            # an object in multipart/form-data is a JSON part (OpenAPI's default encoding)
            "labels": (None, json.dumps({TAG_LABEL: job.tag}).encode(), "application/json"),
        }
        return data, files

    async def _create_job(self, job: FaxJob) -> FaxReport:
        data, files = self._form(job)
        return await self._post_create(
            lambda: self._client.post(self._faxes, data=data, files=files), lambda r: report_from_fax(_fax(r)), _error
        )

    async def _find(self, tag: str, to_number: str | None) -> FaxReport | None:
        params: dict[str, str | int] = {"direction": "OUTBOUND", "pageSize": self.page_size}
        if to_number:
            params["to"] = to_number  # a prefix match; the label decides
        matches: list[FaxReport] = []
        page, pages = 1, 1
        while page <= pages and page <= 50:
            response = await self._request("GET", self._faxes, params={**params, "page": page})
            if response.is_error:
                raise _error(response)
            try:
                doc = json_body(response) or {}
                matches += [r for r in map(report_from_fax, doc.get("faxes") or []) if r.tag == tag]
                pages = int(doc.get("totalPages") or 0)
            except (AttributeError, KeyError, TypeError, ValueError) as exc:
                # Unreadable: we cannot say the fax is absent, so we must not say None.
                raise TransientError(f"sinch fax list unreadable: {exc}") from exc
            page += 1
        return newest_created(matches)

    async def _request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        try:
            return await self._client.request(method, url, **kwargs)
        except httpx.HTTPError as exc:
            raise transport_error(exc) from exc


# --------------------------------------------------------------------------------- helpers


def _fax(response: httpx.Response) -> Mapping[str, Any]:
    doc = json_body(response)
    if isinstance(doc, Mapping) and isinstance(doc.get("faxes"), list) and doc["faxes"]:
        doc = doc["faxes"][0]  # the multi-recipient answer shape
    if isinstance(doc, list) and doc:
        doc = doc[0]
    if not isinstance(doc, Mapping) or not doc.get("id"):
        raise ValueError("sinch answer without a fax")
    return doc


def _error(response: httpx.Response) -> DeliveryError:
    """Sinch error bodies: ``{"code", "error", "message", "details": {"fieldViolations": [...]}}``."""
    doc = json_body(response)
    doc = doc if isinstance(doc, Mapping) else {}
    detail = " ".join(str(doc[k]) for k in ("error", "message") if doc.get(k))
    details = doc.get("details")
    violations = details.get("fieldViolations") if isinstance(details, Mapping) else None
    fields = {str(v.get("field")) for v in violations or [] if isinstance(v, Mapping)}
    return http_error(
        response,
        detail=detail,
        number_problem="to" in fields,
        document_problem=bool(fields & {"file", "contentUrl"}),
    )


def _basic_ok(header: str | None, username: str, secret: str) -> bool:
    if not header or header[:6].lower() != "basic ":
        return False
    try:
        given = base64.b64decode(header[6:].strip(), validate=True)
    except binascii.Error:
        return False
    expected = f"{username}:{secret}".encode()
    return hmac.compare_digest(given, expected)


def _token_ok(query: Mapping[str, str] | None, secret: str) -> bool:
    token = (query or {}).get("token")
    return token is not None and hmac.compare_digest(token.encode(), secret.encode())


def _callback_fields(raw_body: bytes, content_type: str) -> Mapping[str, Any]:
    """The callback as a mapping, from a JSON or a multipart/form-data body."""
    if content_type.lower().startswith("multipart/form-data"):
        message = BytesParser(policy=HTTP).parsebytes(
            b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + raw_body
        )
        fields: dict[str, Any] = {}
        for part in message.iter_parts():
            name = part.get_param("name", header="content-disposition")
            if isinstance(name, str) and part.get_filename() is None:
                payload = part.get_payload(decode=True)
                fields[name] = payload.decode("utf-8", "replace") if isinstance(payload, bytes) else ""
        return fields
    try:
        doc = json.loads(raw_body)
    except (ValueError, RecursionError):  # deep nesting exhausts the parser's stack
        raise InvalidWebhook([FieldProblem(("body",), "not JSON")]) from None
    if not isinstance(doc, Mapping):
        raise InvalidWebhook([FieldProblem(("body",), "not a JSON object")])
    return doc
