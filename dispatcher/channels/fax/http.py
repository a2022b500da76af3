"""httpx plumbing shared by the HTTP fax gateways: timeouts, Retry-After, HTTP status → error class.

Every gateway adapter talks to its API through :func:`make_client` and turns a refusal into a
classified :class:`~dispatcher.errors.DeliveryError` with :func:`http_error`. The one question
this module answers for all of them is "did the create certainly not happen?":

| what happened on a create                         | created? | class                                    |
| ------------------------------------------------- | -------- | ---------------------------------------- |
| connection refused / connect timeout              | no       | BlipError                                |
| read timeout, reset, protocol error after sending | maybe    | look the fax up by tag first             |
| 5xx, or a 2xx we cannot read                      | maybe    | look the fax up by tag first             |
| 429 (Retry-After honoured)                        | no       | TransientError                           |
| 401 / 403                                         | no       | OperationalError (credentials)           |
| 402                                               | no       | OperationalError (funds)                 |
| 413, or a 4xx blaming the document                | no       | DocumentRejected (a PermanentError)      |
| 4xx blaming the destination number                | no       | PermanentError (invalid number)          |
| other 4xx: our request does not fit the API       | no       | OperationalError (pause, fail nothing)   |
"""

from __future__ import annotations

import asyncio
import email.utils
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import httpx

from dispatcher.channels.fax.base import FailureKind, FaxFailure, FaxJob, FaxReport, newest
from dispatcher.errors import BlipError, DeliveryError, DispatchError, OperationalError, PermanentError, TransientError

#: connect fast (a dead gateway should not hold a worker), but give an upload time to finish
DEFAULT_TIMEOUT = httpx.Timeout(30.0, connect=10.0)

#: errors raised before the request left this machine: nothing can have been created
NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout, httpx.UnsupportedProtocol)


class FaxNotFound(PermanentError):
    """The gateway has no fax with this id (or not in our account)."""


class UncertainCreate(DispatchError):
    """A create whose outcome we do not know: the fax may exist. Carries the error to raise
    if a lookup by tag finds nothing."""

    def __init__(self, error: DeliveryError):
        super().__init__(str(error))
        self.error = error


class LookupFirstGateway:
    """What every HTTP fax gateway shares: no gateway has an idempotency key, so a create whose
    outcome is unknown (timeout, reset, 5xx, unreadable answer) is followed by a lookup by our
    tag, and a tag whose create stayed unknown is looked up before the next create. Subclasses
    say how to create a fax and how to find one by tag; nothing else of this logic is theirs.
    """

    name: str
    lookup_attempts: int = 2
    lookup_delay_s: float = 0.5
    #: faxes per list page when looking a tag up
    page_size: int = 100

    def __init__(self, *, lookup_attempts: int = 2, lookup_delay_s: float = 0.5):
        self.lookup_attempts = max(1, lookup_attempts)
        self.lookup_delay_s = lookup_delay_s
        #: tags whose create had an unknown outcome in this process: look before creating again
        self._uncertain: set[str] = set()

    async def _create_job(self, job: FaxJob) -> FaxReport:
        """POST the fax (via :meth:`_post_create`)."""
        raise NotImplementedError

    async def _find(self, tag: str, to_number: str | None) -> FaxReport | None:
        raise NotImplementedError

    async def send(self, job: FaxJob) -> FaxReport:
        if job.tag in self._uncertain and (found := await self._find(job.tag, job.to_number)):
            self._uncertain.discard(job.tag)
            return found
        try:
            report = await self._create_job(job)
        except UncertainCreate as exc:
            self._uncertain.add(job.tag)
            found = await self._look_after_uncertain(job, exc.error)
            if found is None:
                raise exc.error from None
            report = found
        self._uncertain.discard(job.tag)
        return report

    async def find_by_tag(self, tag: str) -> FaxReport | None:
        return await self._find(tag, None)

    async def _post_create(
        self,
        post: Callable[[], Awaitable[httpx.Response]],
        parse: Callable[[httpx.Response], FaxReport],
        error: Callable[[httpx.Response], DeliveryError],
    ) -> FaxReport:
        """One create request, its failures sorted into certain (raised) and uncertain."""
        try:
            response = await post()
        except httpx.HTTPError as exc:
            if sent_uncertainly(exc):
                raise UncertainCreate(transport_error(exc)) from exc
            raise transport_error(exc) from exc
        if response.status_code >= 500:
            raise UncertainCreate(error(response))
        if response.is_error:
            raise error(response)
        try:
            return parse(response)
        except (KeyError, TypeError, ValueError) as exc:
            # Accepted, but we cannot tell which fax: the lookup by tag will.
            raise UncertainCreate(TransientError(f"{self.name} accepted the fax with an unreadable answer")) from exc

    async def _look_after_uncertain(self, job: FaxJob, cause: DeliveryError) -> FaxReport | None:
        for attempt in range(self.lookup_attempts):
            if attempt:
                await asyncio.sleep(self.lookup_delay_s)  # the list may lag the create
            try:
                found = await self._find(job.tag, job.to_number)
            except DeliveryError as exc:
                # We cannot tell whether the fax exists: never create blindly.
                raise TransientError(f"create outcome unknown ({cause}) and lookup failed ({exc})") from exc
            if found is not None:
                return found
        return None


def make_client(
    base_url: str,
    *,
    headers: Mapping[str, str],
    auth: httpx.Auth | tuple[str, str] | None = None,
    timeout: float | httpx.Timeout | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=base_url.rstrip("/"),
        headers={"Accept": "application/json", **headers},
        auth=auth,
        timeout=DEFAULT_TIMEOUT if timeout is None else timeout,
        transport=transport,
        # Gateways answer with JSON or an error, never a redirect; following one could send
        # our credentials somewhere else.
        follow_redirects=False,
    )


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds from a Retry-After header: delta-seconds or an HTTP-date (RFC 9110 §10.2.3)."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:  # an HTTP-date is GMT by definition
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def json_body(response: httpx.Response) -> Any:
    """The parsed JSON body, or None when there is none or it is not JSON."""
    try:
        return response.json()
    except ValueError:
        return None


def http_error(
    response: httpx.Response,
    *,
    detail: str = "",
    number_problem: bool = False,
    document_problem: bool = False,
) -> DeliveryError:
    """The DESIGN.md class of a refusal. ``number_problem`` / ``document_problem`` say that the
    gateway's error body blames the destination number or our document."""
    status = response.status_code
    text = detail or response.reason_phrase or f"HTTP {status}"
    retry_after = parse_retry_after(response.headers.get("retry-after"))
    if status == 429:
        return TransientError(f"rate limited: {text}", code=status, retry_after=retry_after)
    if status >= 500 or status == 408:
        kind = FailureKind.GATEWAY_ERROR
    elif status in (401, 403):
        kind = FailureKind.AUTHENTICATION
    elif status == 402:
        kind = FailureKind.FUNDS
    elif status == 413 or document_problem:
        kind = FailureKind.DOCUMENT_REJECTED
    elif number_problem:
        kind = FailureKind.INVALID_NUMBER
    else:
        kind = None
    if kind is not None:
        error = FaxFailure(kind, str(status), text).error()
        # HTTP refusals carry the status as an int, as SMTP replies do; gateway reasons
        # (webhooks, lookups) keep their own codes as text.
        error.code = status
        error.retry_after = retry_after
        return error
    # Our request does not fit the API (a renamed field, a wrong connection id): every letter
    # would fail the same way, so pause the channel rather than fail letters one by one.
    return OperationalError(f"gateway refused the request: {text}", code=status)


def transport_error(exc: httpx.HTTPError) -> DeliveryError:
    """A request that got no HTTP answer."""
    what = type(exc).__name__
    return BlipError(f"{what}: {exc}" if str(exc) else what)


def sent_uncertainly(exc: httpx.HTTPError) -> bool:
    """True when the request may have reached the gateway (so the fax may exist)."""
    return not isinstance(exc, NOT_SENT)


# ------------------------------------------------------------------------ answer fields


def parse_time(value: object) -> datetime | None:
    """An ISO-8601 timestamp from a gateway answer (``Z`` allowed); naive ones are UTC."""
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def as_int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def as_float(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def newest_created(reports: Sequence[FaxReport]) -> FaxReport | None:
    """The fax created last (``extra["created_at"]``); among equals, the most advanced. A tag
    can have several faxes when an operator re-sent one by hand."""
    if not reports:
        return None
    epoch = datetime.fromtimestamp(0, UTC)

    def created(report: FaxReport) -> datetime:
        return parse_time(report.extra.get("created_at")) or epoch

    latest = max(created(r) for r in reports)
    return newest([r for r in reports if created(r) == latest])
