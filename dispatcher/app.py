"""Wiring: builds the service's parts from Settings, for the CLI, dev mode, tests and web apps."""

from __future__ import annotations

import os
import secrets
import socket
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import cached_property
from typing import TYPE_CHECKING, Any

import dramatiq

from dispatcher import heap
from dispatcher.channels.base import Channel
from dispatcher.channels.builtin import builtin_channels
from dispatcher.channels.fax.base import FaxGateway
from dispatcher.channels.registry import Channels
from dispatcher.config.catalog import Catalog
from dispatcher.config.loader import load_catalog
from dispatcher.errors import OperationalError
from dispatcher.intake.service import IntakeService
from dispatcher.ledger.models import utcnow
from dispatcher.ledger.store import Ledger
from dispatcher.metrics.instruments import Metrics
from dispatcher.policy.gate import SendingGate
from dispatcher.policy.limits import RateLimiter
from dispatcher.policy.lines import Lines
from dispatcher.policy.pacing import PacingPolicy
from dispatcher.queue.actors import Enqueuer, declare_deliver
from dispatcher.queue.bounces import BounceIntake
from dispatcher.queue.broker import make_broker
from dispatcher.queue.deadletters import DeadLetters
from dispatcher.queue.deliver import DeliveryProcessor
from dispatcher.queue.leader import Lease
from dispatcher.queue.liveness import Heartbeat
from dispatcher.queue.loop import LoopThread
from dispatcher.queue.outcomes import Outcomes
from dispatcher.queue.pacer import Pacer
from dispatcher.queue.reconciler import Reconciler, ReconcilerConfig, reconciler_identity
from dispatcher.queue.reports import ReportApplier
from dispatcher.queue.shutdown import DEFAULT_SHUTDOWN_TIMEOUT_S, InFlight, ShutdownReport, stop_worker
from dispatcher.queue.status import lease_key
from dispatcher.render.documents import Documents, standard_documents
from dispatcher.render.letters import Renderer
from dispatcher.retry import RetryPolicy
from dispatcher.settings import Settings
from dispatcher.supporters import Supporters

if TYPE_CHECKING:
    from dramatiq.brokers.redis import RedisBroker
    from fastapi import FastAPI

    from dispatcher.metrics.exposition import Scrape


def load_configured_catalog(
    settings: Settings, clock: Callable[[], datetime] = utcnow, channels: Channels | None = None
) -> Catalog:
    catalog = load_catalog(settings.config_dir, settings.templates_dir, channels=channels)
    if settings.demo_campaigns:
        catalog = catalog.with_demo_copies(clock().date())
    return catalog


@dataclass
class Service:
    """The parts of one process. Built lazily: the API never opens an SMTP pool, the worker
    never builds the FastAPI app."""

    settings: Settings
    environ: Mapping[str, str] = field(default_factory=lambda: os.environ)
    clock: Callable[[], datetime] = utcnow
    catalog_override: Catalog | None = None
    #: channels besides the shipped ones: (kind, factory) pairs, e.g. a print-and-mail channel
    plugins: Sequence[tuple[type[Any], Callable[[], Channel]]] = ()

    def _channels(self) -> Channels:
        """A registry whose channels are built on first use: one per process part (a worker's
        email channel belongs to that worker's event loop)."""
        registry = builtin_channels(self.settings, self.environ, fax_lab=self._fax_lab)
        for kind, factory in self.plugins:
            registry.register(kind, factory)
        return registry

    def _fax_lab(self) -> FaxGateway:
        # Imported on the first sandbox fax: the lab loads spandsp and Pillow, which an API or
        # an email-only worker does not need.
        from dispatcher.sandbox.faxlab import FaxLab

        return FaxLab(self.settings.var_dir / "sandbox" / "fax")

    @cached_property
    def channels(self) -> Channels:
        return self._channels()

    @cached_property
    def catalog(self) -> Catalog:
        return self.catalog_override or load_configured_catalog(self.settings, self.clock, self.channels)

    @cached_property
    def ledger(self) -> Ledger:
        if self.settings.database_url.startswith("sqlite:///"):
            path = self.settings.database_url.removeprefix("sqlite:///")
            if path and path != ":memory:":
                os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        return Ledger(self.settings.database_url, sent_final_after=self.channels.sent_final_after())

    @cached_property
    def renderer(self) -> Renderer:
        return Renderer(self.settings.templates_dir)

    @cached_property
    def documents(self) -> Documents:
        return standard_documents(self.renderer)

    @cached_property
    def broker(self) -> RedisBroker:
        return make_broker(self.settings)

    @cached_property
    def enqueuer(self) -> Enqueuer:
        return Enqueuer(self.broker)

    @cached_property
    def intake(self) -> IntakeService:
        return IntakeService(
            settings=self.settings,
            catalog=self.catalog,
            ledger=self.ledger,
            enqueuer=self.enqueuer,
            choose_language=self.renderer.choose_language,
            clock=self.clock,
            environ=self.environ,
            paced=lambda target, channel: bool(self.gate.rate_texts(target, channel)),
            channels=self.channels,
            limiter=self.limiter,
        )

    @cached_property
    def supporters(self) -> Supporters:
        """Erasure of a supporter's data (the CLI's, the API's and the console's)."""
        return Supporters(self.ledger, self.settings, self.clock)

    @cached_property
    def lines(self) -> Lines:
        return Lines(self.broker.client, self.settings.redis_namespace)

    @cached_property
    def limiter(self) -> RateLimiter:
        """The caps and the intake quotas, in Redis."""
        return RateLimiter(self.broker.client, self.settings.redis_namespace)

    @cached_property
    def gate(self) -> SendingGate:
        return SendingGate(self.limiter, self.settings, self.channels)

    @cached_property
    def pacer(self) -> Pacer:
        policy = PacingPolicy(
            margin=timedelta(hours=self.settings.pacing_margin_hours),
            slowest_share=self.settings.pacing_slowest_share,
        )
        return Pacer(ledger=self.ledger, catalog=self.catalog, gate=self.gate, policy=policy)

    @cached_property
    def outcomes(self) -> Outcomes:
        return Outcomes(
            RetryPolicy(
                base_seconds=self.settings.retry_base_seconds,
                max_attempts=self.settings.retry_max_attempts,
                max_lifetime_seconds=self.settings.retry_max_lifetime_hours * 3600.0,
            ),
            no_tone_interval_seconds=self.settings.fax_no_tone_interval_seconds,
        )

    @cached_property
    def reports(self) -> ReportApplier:
        return ReportApplier(
            catalog=self.catalog,
            ledger=self.ledger,
            outcomes=self.outcomes,
            channels=self.channels,
            lines=self.lines,
            clock=self.clock,
            metrics=self.metrics.reports,
        )

    @cached_property
    def metrics(self) -> Metrics:
        """This process's counters (docs/metrics.md): the API, worker and reconciler built from
        this service share them, so ``dispatcher dev`` shows them all on one /metrics."""
        return Metrics()

    def scrape(self, *, service_wide: bool = True) -> Scrape:
        """What a scrape of this process answers; ``service_wide``: with the ledger's letters and
        the queue read now (the API's /metrics; a worker's own port shows only its counters)."""
        from dispatcher.ledger.stats import Stats
        from dispatcher.metrics.collectors import LedgerCollector, QueueCollector, channel_keys
        from dispatcher.metrics.exposition import Scrape

        extra = (
            [
                LedgerCollector(Stats(self.ledger.engine), channel_keys=channel_keys(self.catalog), clock=self.clock),
                QueueCollector(self.broker.client, self.settings.redis_namespace),
            ]
            if service_wide
            else []
        )
        return Scrape(self.metrics.registry, extra)

    def bounce_intake(self) -> BounceIntake:
        """What ``dispatcher bounces`` hands each message to: the channel whose letters come back
        (email) reads it, the ledger records it."""
        readers = [name for name in self.channels.names() if self.channels.kind(name).reads_bounces]
        if not readers:
            raise OperationalError("no channel of this service reads bounces")
        return BounceIntake(
            settings=self.settings,
            catalog=self.catalog,
            ledger=self.ledger,
            channel=self.channels.get(readers[0]),
            reports=self.reports,
            clock=self.clock,
        )

    def health(self) -> dict[str, str]:
        from sqlalchemy import text

        out: dict[str, str] = {}
        try:
            with self.ledger.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
            out["ledger"] = "ok"
        except Exception as exc:  # noqa: BLE001 - reported, not raised
            out["ledger"] = f"error: {type(exc).__name__}"
        try:
            self.broker.client.ping()
            out["queue"] = "ok"
        except Exception as exc:  # noqa: BLE001 - intake still works without the queue (outbox)
            out["queue"] = f"unavailable ({type(exc).__name__}); appeals are kept in the ledger"
        out["mode"] = self.settings.mode
        return out

    def api(self) -> FastAPI:
        from dispatcher.intake.api import create_app

        # Channels that take webhooks are built now: one that cannot read its keys stops the
        # API from starting instead of failing every webhook.
        for name in self.channels.names():
            self.channels.get(name)
        app = create_app(
            self.intake,
            health=self.health,
            channels=self.channels if self.settings.live else None,
            reports=self.reports,
        )
        self._mount_console(app)
        from dispatcher.metrics.exposition import TOKEN_ENV, install

        install(app, self.scrape(), self.metrics.api, token=self.environ.get(TOKEN_ENV) or None)
        return app

    def _mount_console(self, app: FastAPI) -> None:
        """The operators' console under /console (docs/console.md), in the API's process."""
        from fastapi.responses import RedirectResponse

        from dispatcher.console import PREFIX, ConsoleContext, create_console

        console = ConsoleContext(
            settings=self.settings,
            catalog=self.catalog,
            ledger=self.ledger,
            redis=self.broker.client,
            limiter=self.limiter,
            clock=self.clock,
            **self._console_pages(),
        )

        @app.get(PREFIX, include_in_schema=False)
        async def _console_root() -> RedirectResponse:
            return RedirectResponse(PREFIX + "/", status_code=307)

        app.mount(PREFIX, create_console(console))

    def _console_pages(self) -> dict[str, Any]:
        """What the campaigns and letters pages need besides the ledger: the queue (a retried
        letter's message), the renderer (the letter as sent), intake's keyed hash (the search by
        a supporter's email) and the pacer (the forecast)."""
        from dispatcher.queue.fallback import Fallback
        from dispatcher.queue.forecast import campaign_forecast
        from dispatcher.queue.preview import Previews

        def forecast(campaign: str, now: datetime) -> list[Any]:
            fallback = Fallback(catalog=self.catalog, channels=self.channels, ledger=self.ledger)
            return list(
                campaign_forecast(ledger=self.ledger, pacer=self.pacer, campaign=campaign, now=now, fallback=fallback)
            )

        return {
            "enqueuer": self.enqueuer,
            "previews": Previews(
                catalog=self.catalog, ledger=self.ledger, channels=self.channels, documents=self.documents
            ),
            "supporter_ref": self.intake.supporter_ref,
            "forecast": forecast,
            "supporters": self.supporters,
        }

    def reconciler(self, **config: Any) -> Reconciler:
        cfg = ReconcilerConfig(**config)
        return Reconciler(
            settings=self.settings,
            catalog=self.catalog,
            ledger=self.ledger,
            enqueuer=self.enqueuer,
            pacer=self.pacer,
            lease=Lease(
                self.broker.client,
                lease_key(self.settings.redis_namespace),
                reconciler_identity(),
                cfg.lease_seconds,
            ),
            config=cfg,
            clock=self.clock,
            # its own channels: a poll's HTTP clients belong to the reconciler's event loop
            channels=self._channels(),
            reports=self.reports,
            metrics=self.metrics.reconciler,
        )

    def worker(self, *, threads: int = 8, **processor_options: Any) -> WorkerHandle:
        """A dramatiq worker consuming deliveries in this process (not yet started)."""
        self.ledger.plan_generically()
        self.ledger.lifecycle.keep_connections()
        loop = LoopThread()
        # Host and pid for operators; a random part because a container restarted after a kill
        # gets the same host name and pid, and must not pass for (and keep alive) the dead one.
        worker_id = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        # its own channels: an email channel and its pools belong to this worker's event loop
        channels = self._channels()
        processor = DeliveryProcessor(
            settings=self.settings,
            catalog=self.catalog,
            ledger=self.ledger,
            channels=channels,
            documents=self.documents,
            lines=self.lines,
            outcomes=self.outcomes,
            gate=self.gate,
            loop=loop,
            worker_id=worker_id,
            parked_reports=self.reports.apply_parked,
            clock=self.clock,
            metrics=self.metrics.worker,
            **processor_options,
        )
        declare_deliver(self.broker, processor)
        in_flight = self._worker_middleware()
        worker = dramatiq.Worker(self.broker, worker_threads=threads, worker_timeout=250)
        return WorkerHandle(
            worker,
            loop,
            channels,
            processor,
            in_flight=in_flight,
            ledger=self.ledger,
            enqueuer=self.enqueuer,
            liveness=Heartbeat(
                self.broker.client, self.settings.redis_namespace, worker_id, self.settings.worker_liveness_seconds
            ),
        )

    def _worker_middleware(self) -> InFlight:
        """Dead letters recorded in the ledger; in-flight messages tracked for a clean shutdown.
        Installed once per broker (a test may build several workers on one service)."""
        middleware = self.broker.middleware
        if not any(isinstance(m, DeadLetters) for m in middleware):
            self.broker.add_middleware(DeadLetters(self.ledger, self.clock))
        in_flight = next((m for m in middleware if isinstance(m, InFlight)), None)
        if in_flight is None:
            in_flight = InFlight()
            self.broker.add_middleware(in_flight)
        return in_flight


def api_from_env() -> FastAPI:
    """The intake API of a process configured by its environment (``dispatcher api --workers``)."""
    app = Service(Settings.from_env()).api()
    heap.settle()
    return app


@dataclass
class WorkerHandle:
    worker: dramatiq.Worker
    loop: LoopThread
    channels: Channels
    processor: DeliveryProcessor
    in_flight: InFlight | None = None
    ledger: Ledger | None = None
    enqueuer: Enqueuer | None = None
    #: the process's liveness key (dispatcher/queue/liveness.py); None: the worker has none, and a
    #: death leaves its claims to the stale-claim timeout
    liveness: Heartbeat | None = None
    _stopped: threading.Event = field(default_factory=threading.Event)

    def start(self) -> None:
        if self.liveness is not None:
            self.liveness.start()  # registered before the first claim
        self.worker.start()

    def stop(self, timeout_ms: int | None = None, *, hurry: threading.Event | None = None) -> ShutdownReport | None:
        """Finish in-flight letters (up to ``timeout_ms``, default 60 s), hand unstarted messages
        back to Redis at once, hand back what is still in flight at the timeout, close connections.
        Returns a :class:`dispatcher.queue.shutdown.ShutdownReport` (None if already stopped)."""
        if self._stopped.is_set():
            return None
        self._stopped.set()
        try:
            report = stop_worker(
                self.worker,
                timeout=DEFAULT_SHUTDOWN_TIMEOUT_S if timeout_ms is None else timeout_ms / 1000,
                in_flight=self.in_flight or InFlight(),
                ledger=self.ledger if self.ledger is not None else self.processor.ledger,
                enqueuer=self.enqueuer or Enqueuer(self.worker.broker),
                worker_id=self.processor.worker_id,
                hurry=hurry,
                clock=self.processor.clock,
            )
        finally:
            # Alive until its claims are handed back (the wait for letters in flight may take the
            # whole shutdown timeout); then nothing is left for the reconciler to take back.
            if self.liveness is not None:
                self.liveness.stop()
        if report.stragglers:
            # A send still runs on the loop; its letter was handed back. Closing the pools would
            # wait on it, and its thread may still record it: leave them to the process exit.
            return report
        (self.ledger if self.ledger is not None else self.processor.ledger).lifecycle.release_connections()
        try:
            for channel in self.channels.built():
                self.loop.run(channel.aclose(), timeout=10)
        finally:
            self.loop.stop()
        return report
