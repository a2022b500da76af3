"""How a scrape is answered (docs/metrics.md, "Processes").

* **One process, one port**: a worker or a reconciler started with ``--metrics-port`` answers
  with its own counters on a small HTTP server of its own; ``dispatcher dev`` and ``dispatcher
  api`` (one process) answer ``/metrics`` on the API with theirs.
* **Several API processes, one port** (``dispatcher api --workers N``): prometheus_client's
  multiprocess mode. Each process writes its counters to memory-mapped files in
  ``PROMETHEUS_MULTIPROC_DIR`` (which ``dispatcher api`` creates empty, or empties, before the
  processes start), and whichever process answers a scrape sums every process's files.

The API also answers with what it reads at scrape time (:mod:`dispatcher.metrics.collectors`):
the ledger's letters by state and the queue in Redis.
"""

from __future__ import annotations

import hmac
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator, Mapping, MutableMapping, Sequence
from pathlib import Path
from wsgiref.simple_server import WSGIServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest, start_http_server
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from dispatcher.metrics.instruments import ApiMetrics
from dispatcher.metrics.middleware import RequestMetrics

#: prometheus_client's switch to multiprocess mode; read when the client is first imported
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
#: ``Authorization: Bearer <this>`` required on the API's /metrics when set
TOKEN_ENV = "DISPATCH_METRICS_TOKEN"  # noqa: S105 - the variable's name, not a secret


class Scrape(Collector):
    """What one scrape answers: this process's counters — or, in multiprocess mode, the sum of
    every process's — followed by what ``extra`` collectors read now."""

    def __init__(
        self, own: CollectorRegistry, extra: Sequence[Collector] = (), environ: Mapping[str, str] = os.environ
    ):
        self.own = own
        self.extra = tuple(extra)
        self.environ = environ

    def collect(self) -> Iterator[Metric]:
        path = self.environ.get(MULTIPROC_ENV)
        if path:
            yield from MultiProcessCollector(None, path=path).collect()
        else:
            yield from self.own.collect()
        for collector in self.extra:
            yield from collector.collect()

    def render(self) -> bytes:
        return generate_latest(self)


def install(app: Starlette, scrape: Scrape, metrics: ApiMetrics, *, token: str | None = None) -> None:
    """``GET /metrics`` on ``app`` (not in its OpenAPI document), and every other request counted."""
    app.add_middleware(RequestMetrics, metrics=metrics)
    expected = f"Bearer {token}".encode() if token else None

    async def endpoint(request: Request) -> Response:
        given = request.headers.get("authorization", "").encode()
        if expected is not None and not hmac.compare_digest(given, expected):
            return Response("metrics need the bearer token\n", status_code=401, headers={"WWW-Authenticate": "Bearer"})
        # the ledger's query and Redis are synchronous: off the event loop
        body = await run_in_threadpool(scrape.render)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    app.add_route("/metrics", endpoint, methods=["GET"], include_in_schema=False)


def serve(scrape: Scrape, port: int, host: str = "127.0.0.1") -> tuple[WSGIServer, threading.Thread]:
    """A worker's or a reconciler's own metrics on ``host:port`` (a daemon thread)."""
    server, thread = start_http_server(port, addr=host, registry=scrape)
    return server, thread


def prepare_multiprocess_dir(environ: MutableMapping[str, str] = os.environ) -> Path | None:
    """Before the API's processes start: the directory their counters go to, empty. The one the
    environment names (emptied: counters of processes from an earlier run must not be summed
    in), else a new private one, set in the environment the processes inherit. Returns the
    directory to remove when the API stops, or None when it was the environment's."""
    named = environ.get(MULTIPROC_ENV)
    if named:
        path = Path(named)
        path.mkdir(parents=True, exist_ok=True)
        for stale in path.glob("*.db"):
            stale.unlink()
        return None
    made = Path(tempfile.mkdtemp(prefix="dispatcher-api-metrics-"))
    environ[MULTIPROC_ENV] = str(made)
    return made


def remove_multiprocess_dir(path: Path | None) -> None:
    if path is not None:
        shutil.rmtree(path, ignore_errors=True)
