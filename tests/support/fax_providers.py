"""Local stand-ins for the Telnyx and Sinch fax APIs: real HTTP servers on loopback.

    with TelnyxServer(api_key="KEY", connection_id="conn-1") as telnyx:
        gateway = TelnyxGateway("KEY", "conn-1", "+41315550100", base_url=telnyx.base_url)
        ...
        telnyx.fail_next("create", 500, after_create=True)   # the fax exists, the answer says 500
        telnyx.complete(fax_id, "failed", failure_reason="user_busy")
        telnyx.send_webhook(fax_id, "fax.failed", url=receiver.url)   # signed with a test key
        assert telnyx.problems == []

Each server follows its provider's documented API (see docs/fax-gateways.md for which facts
are documented and which are assumed) and checks every request field by field: method, path,
auth header, content type, required and unknown fields, E.164 numbers, base64 client_state,
multipart parts and file types. A request that breaks the contract is answered the way the
provider answers it (401, 422, ...) *and* recorded in ``problems``, so a test can tell "the
gateway refused us, as planned" from "our adapter sent something the real API would refuse".

Faults are queued per operation (``create``, ``get``, ``list``, ``media``) and used once each:
a status to answer (optionally after the fax was created), a Retry-After, a body, a delay.

Everything runs in-process: uvicorn in a daemon thread on a free 127.0.0.1 port; ``reset()``
lets a module share one server between tests (stopping uvicorn takes a fifth of a second). Webhooks and
callbacks are sent with a plain httpx client from the calling thread; :class:`WebhookReceiver`
is a tiny http.server that keeps what it receives, raw bytes and headers included.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import re
import socket
import threading
import time
import uuid
from collections import defaultdict, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Self
from urllib.parse import parse_qsl, unquote, urlsplit, urlunsplit

import httpx
import uvicorn
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

E164 = re.compile(r"^\+[1-9]\d{6,14}$")


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


# --------------------------------------------------------------------------------- multipart


@dataclass(frozen=True)
class Part:
    name: str
    data: bytes
    filename: str | None = None
    content_type: str | None = None

    @property
    def text(self) -> str:
        return self.data.decode("utf-8")


def parse_multipart(body: bytes, content_type: str) -> list[Part]:
    """A multipart/form-data body as parts (our own reading, independent of the client's
    encoder). ValueError when it is not well-formed."""
    match = re.search(r'boundary="?([^";]+)"?', content_type)
    if not content_type.lower().startswith("multipart/form-data") or not match:
        raise ValueError(f"not multipart/form-data with a boundary: {content_type!r}")
    delimiter = b"--" + match.group(1).encode("latin-1")
    chunks = body.split(delimiter)
    if len(chunks) < 3 or not chunks[-1].startswith(b"--"):
        raise ValueError("multipart body without its closing delimiter")
    parts = []
    for chunk in chunks[1:-1]:
        if not chunk.startswith(b"\r\n") or not chunk.endswith(b"\r\n"):
            raise ValueError("multipart part not framed by CRLF")
        head, sep, data = chunk[2:-2].partition(b"\r\n\r\n")
        if not sep:
            raise ValueError("multipart part without a blank line after its headers")
        headers = {}
        for line in head.decode("latin-1").split("\r\n"):
            name, colon, value = line.partition(":")
            if not colon:
                raise ValueError(f"bad part header line {line!r}")
            headers[name.strip().lower()] = value.strip()
        disposition = headers.get("content-disposition", "")
        name_match = re.search(r'(?:^|;)\s*name="([^"]*)"', disposition)
        if not disposition.startswith("form-data") or not name_match:
            raise ValueError(f"part without form-data name: {disposition!r}")
        file_match = re.search(r'filename="([^"]*)"', disposition)
        parts.append(
            Part(name_match.group(1), data, file_match.group(1) if file_match else None, headers.get("content-type"))
        )
    return parts


# --------------------------------------------------------------------------------- base server


@dataclass
class Recorded:
    method: str
    path: str
    query: list[tuple[str, str]]
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def parts(self) -> list[Part]:
        return parse_multipart(self.body, self.headers.get("content-type", ""))


@dataclass
class Fault:
    #: status to answer instead of the normal one; None: the normal answer (after ``delay``)
    status: int | None
    after_create: bool = False
    retry_after: str | None = None
    body: Any = None
    delay: float = 0.0


class _Refused(Exception):
    """Answer with this response (and maybe record a problem)."""

    def __init__(self, response: Response):
        self.response = response


class ProviderServer:
    """uvicorn in a thread serving a Starlette app, with recorded requests and queued faults."""

    def __init__(self) -> None:
        self.requests: list[Recorded] = []
        #: contract violations by the client: every test expects this to stay empty
        self.problems: list[str] = []
        self._faults: dict[str, deque[Fault]] = defaultdict(deque)
        self._lock = threading.RLock()
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    # -- lifecycle

    def routes(self) -> list[Route]:
        raise NotImplementedError

    def start(self) -> Self:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            Starlette(routes=self.routes()),
            log_level="warning",
            lifespan="off",
            access_log=False,
            timeout_graceful_shutdown=1,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError(f"{type(self).__name__} did not start")
            time.sleep(0.01)
        return self

    def close(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def reset(self) -> None:
        """Forget every request, problem, fault and fax: one server can serve many tests."""
        with self._lock:
            self.requests.clear()
            self.problems.clear()
            self._faults.clear()
            self._reset_state()

    def _reset_state(self) -> None:
        raise NotImplementedError

    # -- faults and records

    def fail_next(
        self,
        operation: str,
        status: int | None,
        *,
        after_create: bool = False,
        retry_after: str | None = None,
        body: Any = None,
        delay: float = 0.0,
        times: int = 1,
    ) -> None:
        """Queue a fault for the next ``times`` calls of ``operation`` (create, get, list, media).
        ``after_create``: the fax is created and stored first, then the fault answers."""
        with self._lock:
            for _ in range(times):
                self._faults[operation].append(Fault(status, after_create, retry_after, body, delay))

    def _next_fault(self, operation: str) -> Fault | None:
        with self._lock:
            queue = self._faults[operation]
            return queue.popleft() if queue else None

    def requests_to(self, method: str, path_prefix: str) -> list[Recorded]:
        return [r for r in self.requests if r.method == method and r.path.startswith(path_prefix)]

    async def _record(self, request: Request) -> Recorded:
        body = await request.body()
        recorded = Recorded(
            request.method,
            request.url.path,
            parse_qsl(request.url.query, keep_blank_values=True),
            {k.lower(): v for k, v in request.headers.items()},
            body,
        )
        with self._lock:
            self.requests.append(recorded)
        return recorded

    def problem(self, text: str, response: Response) -> _Refused:
        with self._lock:
            self.problems.append(text)
        return _Refused(response)

    async def _faulted(self, fault: Fault | None, create: Any = None) -> Response | None:
        """Apply a fault: None when the normal answer should go out (after any delay)."""
        if fault is None:
            return None
        if fault.after_create and create is not None:
            create()
        if fault.delay:
            await asyncio.sleep(fault.delay)
        if fault.status is None:
            return None
        headers = {"Retry-After": fault.retry_after} if fault.retry_after is not None else {}
        if fault.body is None:
            return Response(status_code=fault.status, headers=headers)
        return JSONResponse(fault.body, status_code=fault.status, headers=headers)


def _url_ok(value: object) -> bool:
    if not isinstance(value, str):
        return False
    parts = urlsplit(value)
    return parts.scheme in ("http", "https") and bool(parts.hostname)


# --------------------------------------------------------------------------------- Telnyx


TELNYX_CREATE_FIELDS = frozenset(
    {
        "connection_id",
        "to",
        "from",
        "from_display_name",
        "media_url",
        "media_name",
        "quality",
        "store_media",
        "store_preview",
        "preview_format",
        "t38_enabled",
        "monochrome",
        "black_threshold",
        "client_state",
        "webhook_url",
    }
)
TELNYX_QUALITIES = frozenset({"normal", "high", "very_high", "ultra_light", "ultra_dark"})
TELNYX_LIST_PARAMS = frozenset(
    {
        "filter[created_at][gte]",
        "filter[created_at][gt]",
        "filter[created_at][lte]",
        "filter[created_at][lt]",
        "filter[direction][eq]",
        "filter[from][eq]",
        "filter[to][eq]",
        "page[number]",
        "page[size]",
    }
)
TELNYX_MEDIA_PARTS = frozenset({"media", "media_name", "ttl_secs"})
TELNYX_EVENT_STATUS = {
    "fax.queued": "queued",
    "fax.media.processed": "media.processed",
    "fax.sending.started": "sending",
    "fax.delivered": "delivered",
    "fax.failed": "failed",
}


def telnyx_errors(status: int, code: str, title: str, detail: str = "", pointer: str | None = None) -> JSONResponse:
    error: dict[str, Any] = {"code": code, "title": title, "detail": detail or title}
    if pointer:
        error["source"] = {"pointer": pointer}
    return JSONResponse({"errors": [error]}, status_code=status)


class TelnyxServer(ProviderServer):
    """``https://api.telnyx.com/v2`` faxes and media, plus signed webhooks."""

    def __init__(self, *, api_key: str = "KEY_test", connection_id: str = "conn-test") -> None:
        super().__init__()
        self.api_key = api_key
        self.connection_id = connection_id
        self.faxes: dict[str, dict[str, Any]] = {}
        #: what only webhooks carry: page_count, call_duration_secs
        self.call_details: dict[str, dict[str, Any]] = {}
        self.media: dict[str, Part] = {}
        self.signing_key = Ed25519PrivateKey.generate()

    def _reset_state(self) -> None:
        self.faxes.clear()
        self.call_details.clear()
        self.media.clear()

    @property
    def public_key_b64(self) -> str:
        """The account public key as Mission Control shows it (base64 of the raw 32 bytes)."""
        raw = self.signing_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        return base64.b64encode(raw).decode()

    def routes(self) -> list[Route]:
        return [
            Route("/v2/faxes", self._faxes_root, methods=["GET", "POST"]),
            Route("/v2/faxes/{fax_id}", self._fax_by_id, methods=["GET"]),
            Route("/v2/media", self._upload_media, methods=["POST"]),
        ]

    # -- test controls

    def complete(
        self,
        fax_id: str,
        status: str,
        *,
        failure_reason: str | None = None,
        page_count: int | None = None,
        call_duration_secs: int | None = None,
    ) -> None:
        with self._lock:
            fax = self.faxes[fax_id]
            fax["status"] = status
            fax["failure_reason"] = failure_reason
            fax["updated_at"] = now_iso()
            self.call_details[fax_id] = {"page_count": page_count, "call_duration_secs": call_duration_secs}

    def event_body(self, fax_id: str, event_type: str) -> bytes:
        """A webhook body as Telnyx documents it (``data`` envelope, ``meta``)."""
        with self._lock:
            fax = dict(self.faxes[fax_id])
            details = self.call_details.get(fax_id, {})
        payload: dict[str, Any] = {
            "connection_id": fax["connection_id"],
            "direction": "outbound",
            "fax_id": fax_id,
            "from": fax["from"],
            "to": fax["to"],
            "status": TELNYX_EVENT_STATUS.get(event_type, fax["status"]),
            "user_id": "5f5a8d06-5ad9-4b24-ae0a-6b6b9e1c6c11",
        }
        if fax.get("client_state"):
            payload["client_state"] = fax["client_state"]
        if fax.get("media_url"):
            payload["original_media_url"] = fax["media_url"]
        if fax.get("media_name"):
            payload["media_name"] = fax["media_name"]
        if event_type == "fax.failed":
            payload["failure_reason"] = fax.get("failure_reason")
        if event_type in ("fax.delivered", "fax.failed"):
            payload.update({k: v for k, v in details.items() if v is not None})
        event = {
            "data": {
                "event_type": event_type,
                "id": str(uuid.uuid4()),
                "occurred_at": now_iso(),
                "record_type": "event",
                "payload": payload,
            },
            "meta": {"attempt": 1, "delivered_to": fax.get("webhook_url") or ""},
        }
        return json.dumps(event).encode()

    def sign(self, body: bytes, timestamp: int, key: Ed25519PrivateKey | None = None) -> dict[str, str]:
        """The two headers Telnyx adds: Ed25519 over ``"{timestamp}|{body}"``, base64."""
        signature = (key or self.signing_key).sign(str(timestamp).encode() + b"|" + body)
        return {
            "telnyx-timestamp": str(timestamp),
            "telnyx-signature-ed25519": base64.b64encode(signature).decode(),
        }

    def send_webhook(
        self,
        fax_id: str,
        event_type: str,
        *,
        url: str | None = None,
        timestamp: int | None = None,
        key: Ed25519PrivateKey | None = None,
    ) -> httpx.Response:
        """POST a signed event to ``url`` (default: the fax's webhook_url), as Telnyx would."""
        target = url or self.faxes[fax_id].get("webhook_url")
        if not target:
            raise ValueError("no webhook URL for this fax")
        body = self.event_body(fax_id, event_type)
        headers = {"content-type": "application/json", **self.sign(body, timestamp or int(time.time()), key)}
        with httpx.Client(timeout=5) as client:
            return client.post(target, content=body, headers=headers)

    # -- handlers

    def _authorized(self, recorded: Recorded) -> None:
        auth = recorded.headers.get("authorization", "")
        if not auth.startswith("Bearer "):
            raise self.problem(
                f"{recorded.method} {recorded.path}: Authorization is not 'Bearer <key>': {auth[:12]!r}",
                telnyx_errors(401, "10009", "Authentication failed"),
            )
        if auth != f"Bearer {self.api_key}":
            raise _Refused(telnyx_errors(401, "10009", "Authentication failed", "The API key is invalid."))

    async def _faxes_root(self, request: Request) -> Response:
        recorded = await self._record(request)
        try:
            self._authorized(recorded)
            if request.method == "POST":
                return await self._create(recorded)
            return await self._list(recorded)
        except _Refused as refused:
            return refused.response

    async def _create(self, recorded: Recorded) -> Response:
        fault = self._next_fault("create")
        if fault and not fault.after_create and (early := await self._faulted(fault)):
            return early
        fax = self._check_create(recorded)
        # the answer describes the fax as it was created, however long it takes to arrive
        answer = dict(fax)

        def store() -> None:
            with self._lock:
                self.faxes[fax["id"]] = fax

        if fault and (late := await self._faulted(fault, store)):
            return late
        store()
        return JSONResponse({"data": answer}, status_code=202)

    def _check_create(self, recorded: Recorded) -> dict[str, Any]:
        where = "POST /v2/faxes"
        if recorded.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            raise self.problem(
                f"{where}: content-type {recorded.headers.get('content-type')!r}",
                telnyx_errors(415, "10014", "Unsupported Media Type"),
            )
        try:
            body = recorded.json()
        except ValueError:
            raise self.problem(f"{where}: body is not JSON", telnyx_errors(400, "10015", "Bad Request")) from None
        if not isinstance(body, dict):
            raise self.problem(f"{where}: body is not an object", telnyx_errors(400, "10015", "Bad Request"))
        unknown = set(body) - TELNYX_CREATE_FIELDS
        if unknown:
            raise self.problem(f"{where}: unknown fields {sorted(unknown)}", telnyx_errors(422, "10015", "Bad Request"))
        for name in ("connection_id", "to", "from"):
            if not isinstance(body.get(name), str) or not body[name]:
                raise self.problem(
                    f"{where}: missing {name}",
                    telnyx_errors(422, "10004", "Missing required parameter", pointer=f"/{name}"),
                )
        if body["connection_id"] != self.connection_id:
            raise self.problem(
                f"{where}: connection_id {body['connection_id']!r}",
                telnyx_errors(422, "10017", "Associated resource does not exist", pointer="/connection_id"),
            )
        if not E164.match(body["from"]):
            raise self.problem(
                f"{where}: from {body['from']!r} is not E.164",
                telnyx_errors(422, "10016", "Phone number must be in +E.164 format", pointer="/from"),
            )
        if not (E164.match(body["to"]) or body["to"].startswith("sip:")):
            # Bad data, not a malformed request: refused as Telnyx would, not a client problem.
            raise _Refused(telnyx_errors(422, "10016", "Phone number must be in +E.164 format", pointer="/to"))
        has_url, has_name = "media_url" in body, "media_name" in body
        if has_url == has_name:
            raise self.problem(
                f"{where}: exactly one of media_url / media_name is required",
                telnyx_errors(422, "10004", "Missing required parameter", pointer="/media_url"),
            )
        if has_url and not _url_ok(body["media_url"]):
            raise self.problem(
                f"{where}: media_url {body['media_url']!r}",
                telnyx_errors(422, "10003", "Invalid URL", pointer="/media_url"),
            )
        if has_name and body["media_name"] not in self.media:
            raise self.problem(
                f"{where}: media_name {body['media_name']!r} was never uploaded",
                telnyx_errors(422, "10005", "Resource not found", pointer="/media_name"),
            )
        if "client_state" in body:
            try:
                base64.b64decode(body["client_state"], validate=True)
            except (binascii.Error, TypeError, ValueError):
                raise self.problem(
                    f"{where}: client_state is not base64",
                    telnyx_errors(422, "10015", "Bad Request", pointer="/client_state"),
                ) from None
        if "quality" in body and body["quality"] not in TELNYX_QUALITIES:
            raise self.problem(f"{where}: quality {body['quality']!r}", telnyx_errors(422, "10015", "Bad Request"))
        if "webhook_url" in body and not _url_ok(body["webhook_url"]):
            raise self.problem(
                f"{where}: webhook_url {body['webhook_url']!r}", telnyx_errors(422, "10003", "Invalid URL")
            )
        stamp = now_iso()
        fax = {
            "record_type": "fax",
            "id": str(uuid.uuid4()),
            "connection_id": body["connection_id"],
            "direction": "outbound",
            "from": body["from"],
            "to": body["to"],
            "quality": body.get("quality", "high"),
            "webhook_url": body.get("webhook_url", ""),
            "webhook_failover_url": "",
            "status": "queued",
            "store_media": False,
            "failure_reason": None,
            "created_at": stamp,
            "updated_at": stamp,
        }
        for optional in ("client_state", "media_url", "media_name"):
            if optional in body:
                fax[optional] = body[optional]
        return fax

    async def _list(self, recorded: Recorded) -> Response:
        if fault := await self._faulted(self._next_fault("list")):
            return fault
        params = dict(recorded.query)
        unknown = set(params) - TELNYX_LIST_PARAMS
        if unknown or len(params) != len(recorded.query):
            raise self.problem(
                f"GET /v2/faxes: unknown or repeated parameters {sorted(unknown)}",
                telnyx_errors(400, "10015", "Bad Request"),
            )
        try:
            number = int(params.get("page[number]", "1"))
            size = int(params.get("page[size]", "20"))
        except ValueError:
            raise self.problem("GET /v2/faxes: page parameters", telnyx_errors(400, "10015", "Bad Request")) from None
        if number < 1 or not 1 <= size <= 250:
            raise self.problem(f"GET /v2/faxes: page {number} size {size}", telnyx_errors(400, "10015", "Bad Request"))
        bounds = {}
        for op in ("gte", "gt", "lte", "lt"):
            if value := params.get(f"filter[created_at][{op}]"):
                try:
                    bounds[op] = datetime.fromisoformat(value)
                except ValueError:
                    raise self.problem(
                        f"GET /v2/faxes: created_at {op} {value!r} is not ISO 8601",
                        telnyx_errors(400, "10015", "Bad Request"),
                    ) from None
        with self._lock:
            faxes = [dict(f) for f in self.faxes.values()]

        def keep(fax: dict[str, Any]) -> bool:
            created = datetime.fromisoformat(fax["created_at"])
            checks = {
                "gte": lambda b: created >= b,
                "gt": lambda b: created > b,
                "lte": lambda b: created <= b,
                "lt": lambda b: created < b,
            }
            if not all(checks[op](b) for op, b in bounds.items()):
                return False
            for name in ("direction", "from", "to"):
                wanted = params.get(f"filter[{name}][eq]")
                if wanted is not None and fax[name] != wanted:
                    return False
            return True

        found = sorted(filter(keep, faxes), key=lambda f: f["created_at"], reverse=True)
        total_pages = max(1, -(-len(found) // size))
        page = found[(number - 1) * size : number * size]
        meta = {"page_number": number, "page_size": size, "total_pages": total_pages, "total_results": len(found)}
        return JSONResponse({"data": page, "meta": meta})

    async def _fax_by_id(self, request: Request) -> Response:
        recorded = await self._record(request)
        try:
            self._authorized(recorded)
        except _Refused as refused:
            return refused.response
        if fault := await self._faulted(self._next_fault("get")):
            return fault
        with self._lock:
            fax = self.faxes.get(request.path_params["fax_id"])
            fax = dict(fax) if fax else None
        if fax is None:
            return telnyx_errors(404, "10005", "Resource not found")
        return JSONResponse({"data": fax})

    async def _upload_media(self, request: Request) -> Response:
        recorded = await self._record(request)
        try:
            self._authorized(recorded)
            if fault := await self._faulted(self._next_fault("media")):
                return fault
            return JSONResponse({"data": self._check_media(recorded)}, status_code=201)
        except _Refused as refused:
            return refused.response

    def _check_media(self, recorded: Recorded) -> dict[str, Any]:
        where = "POST /v2/media"
        try:
            parts = recorded.parts()
        except ValueError as exc:
            raise self.problem(f"{where}: {exc}", telnyx_errors(415, "10014", "Unsupported Media Type")) from None
        names = [p.name for p in parts]
        if set(names) - TELNYX_MEDIA_PARTS or len(names) != len(set(names)):
            raise self.problem(f"{where}: parts {names}", telnyx_errors(422, "10015", "Bad Request"))
        by_name = {p.name: p for p in parts}
        media = by_name.get("media")
        if media is None or media.filename is None:
            raise self.problem(
                f"{where}: no file part 'media'", telnyx_errors(422, "10004", "Missing required parameter")
            )
        if not media.data.startswith(b"%PDF-") or media.content_type != "application/pdf":
            raise self.problem(
                f"{where}: media is not a PDF ({media.content_type})", telnyx_errors(422, "10015", "Bad Request")
            )
        ttl = 172_800
        if "ttl_secs" in by_name:
            try:
                ttl = int(by_name["ttl_secs"].text)
            except ValueError:
                raise self.problem(f"{where}: ttl_secs", telnyx_errors(422, "10015", "Bad Request")) from None
            if not 1 <= ttl <= 630_720_000:
                raise self.problem(f"{where}: ttl_secs {ttl}", telnyx_errors(422, "10015", "Bad Request"))
        name = by_name["media_name"].text if "media_name" in by_name else str(uuid.uuid4())
        with self._lock:
            self.media[name] = media
        created = datetime.now(UTC)
        return {
            "media_name": name,
            "content_type": "application/pdf",
            "created_at": created.isoformat().replace("+00:00", "Z"),
            "updated_at": created.isoformat().replace("+00:00", "Z"),
            "expires_at": (created + timedelta(seconds=ttl)).isoformat().replace("+00:00", "Z"),
        }


# --------------------------------------------------------------------------------- Sinch


SINCH_CREATE_PARTS = frozenset(
    {
        "to",
        "from",
        "file",
        "contentUrl",
        "headerText",
        "headerPageNumbers",
        "headerTimeZone",
        "retryDelaySeconds",
        "labels",
        "callbackUrl",
        "callbackUrlContentType",
        "imageConversionMethod",
        "serviceId",
        "maxRetries",
        "coverPageId",
        "coverPageData",
        "resolution",
    }
)
SINCH_LIST_PARAMS = frozenset(
    {"createTime", "createTime>", "createTime<", "direction", "status", "to", "from", "pageSize", "page", "serviceId"}
)
SINCH_STATUSES = frozenset({"QUEUED", "IN_PROGRESS", "COMPLETED", "FAILURE"})
SINCH_FILE_TYPES: dict[str, tuple[bytes, ...]] = {
    "application/pdf": (b"%PDF-",),
    "image/tiff": (b"II*\x00", b"MM\x00*"),
}


def sinch_error(status: int, error: str, message: str, violations: Iterable[tuple[str, str]] = ()) -> JSONResponse:
    body: dict[str, Any] = {"code": str(status), "error": error, "message": message}
    if violations:
        body["details"] = {"fieldViolations": [{"field": f, "description": d} for f, d in violations]}
    return JSONResponse(body, status_code=status)


def _mask_userinfo(url: str) -> str:
    parts = urlsplit(url)
    if parts.username is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, f"{parts.username}:****@{host}", parts.path, parts.query, parts.fragment))


class SinchServer(ProviderServer):
    """``https://fax.api.sinch.com/v3/projects/{projectId}/faxes`` and completion callbacks."""

    def __init__(self, *, project_id: str = "proj-test", key_id: str = "key-id", key_secret: str = "key-secret"):  # noqa: S107 (a test double)
        super().__init__()
        self.project_id = project_id
        self.key_id = key_id
        self.key_secret = key_secret
        self.faxes: dict[str, dict[str, Any]] = {}
        #: callback URLs as given (the fax object shows them masked, as Sinch does)
        self.callback_urls: dict[str, str] = {}
        self.files: dict[str, list[Part]] = {}

    def _reset_state(self) -> None:
        self.faxes.clear()
        self.callback_urls.clear()
        self.files.clear()

    def routes(self) -> list[Route]:
        return [
            Route("/v3/projects/{project_id}/faxes", self._faxes_root, methods=["GET", "POST"]),
            Route("/v3/projects/{project_id}/faxes/{fax_id}", self._fax_by_id, methods=["GET"]),
        ]

    # -- test controls

    def complete(
        self,
        fax_id: str,
        status: str,
        *,
        error_type: str | None = None,
        error_code: int | None = None,
        error_message: str | None = None,
        pages: int | None = None,
    ) -> None:
        if status not in SINCH_STATUSES:
            raise ValueError(status)
        with self._lock:
            fax = self.faxes[fax_id]
            fax["status"] = status
            if status in ("COMPLETED", "FAILURE"):
                fax["completedTime"] = now_iso()
            if pages is not None:
                fax["numberOfPages"] = pages
            for key, value in (("errorType", error_type), ("errorCode", error_code), ("errorMessage", error_message)):
                if value is None:
                    fax.pop(key, None)
                else:
                    fax[key] = value

    def send_callback(
        self,
        fax_id: str,
        *,
        url: str | None = None,
        status: str | None = None,
        content_type: str = "application/json",
    ) -> httpx.Response:
        """POST a FAX_COMPLETED callback. ``status`` overrides the fax's status in the body
        only (a stale or forged callback); credentials in the URL travel as HTTP Basic."""
        with self._lock:
            fax = dict(self.faxes[fax_id])
            target = url or self.callback_urls.get(fax_id)
            stored = self.files.get(fax_id)
            file = stored[0] if stored else None
        if not target:
            raise ValueError("no callback URL for this fax")
        if status is not None:
            fax["status"] = status
        parts = urlsplit(target)
        headers: dict[str, str] = {}
        if parts.username is not None:
            creds = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
            headers["authorization"] = "Basic " + base64.b64encode(creds).decode()
            target = urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, parts.query, ""))
        event = {"event": "FAX_COMPLETED", "eventTime": now_iso(), "fax": fax}
        with httpx.Client(timeout=5) as client:
            if content_type == "application/json":
                if file is not None:
                    event["file"] = base64.b64encode(file.data).decode()
                    event["fileType"] = "PDF"
                return client.post(target, content=json.dumps(event).encode(), headers=headers)
            files = {"file": (file.filename or "fax.pdf", file.data, "application/pdf")} if file else None
            data = {"event": event["event"], "eventTime": event["eventTime"], "fax": json.dumps(fax)}
            return client.post(target, data=data, files=files, headers=headers)

    # -- handlers

    def _authorized(self, recorded: Recorded, project_id: str) -> None:
        auth = recorded.headers.get("authorization", "")
        expected = "Basic " + base64.b64encode(f"{self.key_id}:{self.key_secret}".encode()).decode()
        if not auth.startswith(("Basic ", "Bearer ")):
            raise self.problem(
                f"{recorded.method} {recorded.path}: no Basic or Bearer Authorization", Response(status_code=401)
            )
        if auth != expected:
            raise _Refused(Response(status_code=401))  # documented: "Empty body" for a wrong key
        if project_id != self.project_id:
            raise self.problem(
                f"{recorded.path}: project {project_id!r}", sinch_error(404, "Not found", "no such project")
            )

    async def _faxes_root(self, request: Request) -> Response:
        recorded = await self._record(request)
        try:
            self._authorized(recorded, request.path_params["project_id"])
            if request.method == "POST":
                return await self._create(recorded)
            return await self._list(recorded)
        except _Refused as refused:
            return refused.response

    async def _create(self, recorded: Recorded) -> Response:
        fault = self._next_fault("create")
        if fault and not fault.after_create and (early := await self._faulted(fault)):
            return early
        fax, files, callback = self._check_create(recorded)

        def store() -> None:
            with self._lock:
                self.faxes[fax["id"]] = fax
                self.files[fax["id"]] = files
                if callback:
                    self.callback_urls[fax["id"]] = callback

        if fault and (late := await self._faulted(fault, store)):
            return late
        store()
        return JSONResponse(fax)

    def _check_create(self, recorded: Recorded) -> tuple[dict[str, Any], list[Part], str | None]:
        where = "POST faxes"
        bad = sinch_error(400, "Bad Request", "The request could not be understood by the server")
        try:
            parts = recorded.parts()
        except ValueError as exc:
            raise self.problem(f"{where}: {exc}", bad) from None
        names = [p.name for p in parts]
        if unknown := set(names) - SINCH_CREATE_PARTS:
            raise self.problem(f"{where}: unknown parts {sorted(unknown)}", bad)
        repeated = {n for n in names if names.count(n) > 1 and n not in ("file", "contentUrl")}
        if repeated:
            raise self.problem(f"{where}: repeated parts {sorted(repeated)}", bad)
        fields = {p.name: p for p in parts if p.name != "file"}
        for part in fields.values():
            if part.filename is not None:
                raise self.problem(f"{where}: field {part.name} sent as a file", bad)
        files = [p for p in parts if p.name == "file"]
        if "to" not in fields:
            raise self.problem(f"{where}: missing to", sinch_error(422, "Invalid parameters", "to is required"))
        to = fields["to"].text
        if not E164.match(to):
            raise _Refused(
                sinch_error(
                    422, "Invalid parameters", "invalid number", [("to", f"The ({to}) is not a valid phone number")]
                )
            )
        if "from" in fields and not E164.match(fields["from"].text):
            raise self.problem(
                f"{where}: from {fields['from'].text!r}",
                sinch_error(422, "Invalid parameters", "invalid from", [("from", "not E.164")]),
            )
        if not files and "contentUrl" not in fields:
            raise self.problem(
                f"{where}: neither file nor contentUrl",
                sinch_error(422, "Invalid parameters", "file or contentUrl", [("file", "required")]),
            )
        for file in files:
            magic = SINCH_FILE_TYPES.get(file.content_type or "")
            if not file.filename or magic is None or not file.data.startswith(magic):
                raise self.problem(
                    f"{where}: file {file.filename!r} ({file.content_type}) is not a PDF or TIFF",
                    sinch_error(422, "Invalid parameters", "file", [("file", "unsupported")]),
                )
        labels: dict[str, str] = {}
        if "labels" in fields:
            if (fields["labels"].content_type or "application/json").split(";")[0] not in (
                "application/json",
                "text/plain",
            ):
                raise self.problem(f"{where}: labels content type {fields['labels'].content_type}", bad)
            try:
                labels = json.loads(fields["labels"].data)
            except ValueError:
                labels = None  # type: ignore[assignment]
            if not isinstance(labels, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in labels.items()
            ):
                raise self.problem(f"{where}: labels is not a JSON object of strings", bad)
        callback = fields["callbackUrl"].text if "callbackUrl" in fields else None
        if callback is not None and not _url_ok(callback):
            raise self.problem(f"{where}: callbackUrl {callback!r}", bad)
        content_type = fields["callbackUrlContentType"].text if "callbackUrlContentType" in fields else None
        if content_type is not None and content_type not in ("multipart/form-data", "application/json"):
            raise self.problem(f"{where}: callbackUrlContentType {content_type!r}", bad)
        max_retries = None
        if "maxRetries" in fields:
            text = fields["maxRetries"].text
            if not text.isdigit() or not 0 <= int(text) <= 5:
                raise self.problem(f"{where}: maxRetries {text!r}", bad)
            max_retries = int(text)
        if "headerText" in fields and len(fields["headerText"].text) > 50:
            raise self.problem(f"{where}: headerText longer than 50", bad)
        fax: dict[str, Any] = {
            "id": "01" + uuid.uuid4().hex[:24].upper(),
            "direction": "OUTBOUND",
            "from": fields["from"].text if "from" in fields else "",
            "to": to,
            "numberOfPages": max(1, sum(f.data.count(b"/Type /Page") - f.data.count(b"/Type /Pages") for f in files)),
            "status": "QUEUED",
            "createTime": now_iso(),
            "headerText": fields["headerText"].text if "headerText" in fields else "",
            "headerPageNumbers": True,
            "headerTimeZone": "America/New_York",
            "retryDelaySeconds": 60,
            "labels": labels,
            "callbackUrlContentType": content_type or "multipart/form-data",
            "imageConversionMethod": "HALFTONE",
            "maxRetries": 3 if max_retries is None else max_retries,
            "retryCount": 0,
            "hasFile": "true",
            "resolution": "FINE",
            "projectId": self.project_id,
            "serviceId": fields["serviceId"].text if "serviceId" in fields else "svc-default",
        }
        if callback:
            fax["callbackUrl"] = _mask_userinfo(callback)
        return fax, files, callback

    async def _list(self, recorded: Recorded) -> Response:
        if fault := await self._faulted(self._next_fault("list")):
            return fault
        params = dict(recorded.query)
        bad = sinch_error(400, "Bad Request", "invalid query")
        if unknown := set(params) - SINCH_LIST_PARAMS:
            raise self.problem(f"GET faxes: unknown parameters {sorted(unknown)}", bad)
        if len(params) != len(recorded.query):
            raise self.problem("GET faxes: repeated parameters", bad)
        try:
            size = int(params.get("pageSize", "100"))
            number = int(params.get("page", "1"))
        except ValueError:
            raise self.problem("GET faxes: page parameters", bad) from None
        if not 1 <= size <= 1000 or number < 1:
            raise self.problem(f"GET faxes: page {number} size {size}", bad)
        if params.get("direction") not in (None, "OUTBOUND", "INBOUND"):
            raise self.problem(f"GET faxes: direction {params['direction']!r}", bad)
        if params.get("status") not in (None, *SINCH_STATUSES):
            raise self.problem(f"GET faxes: status {params['status']!r}", bad)
        week_ago = datetime.now(UTC) - timedelta(days=7)  # documented default window
        with self._lock:
            faxes = [dict(f) for f in self.faxes.values()]

        def keep(fax: dict[str, Any]) -> bool:
            if datetime.fromisoformat(fax["createTime"]) < week_ago:
                return False
            if params.get("direction") and fax["direction"] != params["direction"]:
                return False
            if params.get("status") and fax["status"] != params["status"]:
                return False
            return all(fax[n].startswith(params[n]) for n in ("to", "from") if params.get(n))

        found = sorted(filter(keep, faxes), key=lambda f: f["createTime"], reverse=True)
        total_pages = max(1, -(-len(found) // size))
        return JSONResponse(
            {
                "faxes": found[(number - 1) * size : number * size],
                "pageNumber": number,
                "pageSize": size,
                "totalItems": len(found),
                "totalPages": total_pages,
            }
        )

    async def _fax_by_id(self, request: Request) -> Response:
        recorded = await self._record(request)
        try:
            self._authorized(recorded, request.path_params["project_id"])
        except _Refused as refused:
            return refused.response
        if fault := await self._faulted(self._next_fault("get")):
            return fault
        with self._lock:
            fax = self.faxes.get(request.path_params["fax_id"])
            fax = dict(fax) if fax else None
        if fax is None:
            return sinch_error(404, "Not found", "The resource is not found, not available, or does not exist.")
        return JSONResponse(fax)


# --------------------------------------------------------------------------------- receiver


@dataclass(frozen=True)
class Received:
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes


@dataclass
class WebhookReceiver:
    """Our side of webhooks in tests: keeps each POST as it arrived and answers 200."""

    received: list[Received] = field(default_factory=list)
    _server: ThreadingHTTPServer | None = None
    _thread: threading.Thread | None = None

    def __enter__(self) -> Self:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length)
                parts = urlsplit(self.path)
                receiver.received.append(
                    Received(
                        parts.path,
                        dict(parse_qsl(parts.query)),
                        {k.lower(): v for k, v in self.headers.items()},
                        body,
                    )
                )
                self.send_response(200)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}/hooks/fax"

    def last(self) -> Received:
        return self.received[-1]
