"""Wiring: builds the service's parts from Settings, for the CLI, dev mode, tests and web apps."""

from __future__ import annotations

import os
import secrets
import socket
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import cached_property
from typing import Any

from dispatcher.config.catalog import Catalog
from dispatcher.config.loader import load_catalog
from dispatcher.intake.service import IntakeService
from dispatcher.ledger.models import utcnow
from dispatcher.ledger.store import Ledger
from dispatcher.render.letters import Renderer
from dispatcher.settings import Settings


def load_configured_catalog(settings: Settings, clock: Callable[[], datetime] = utcnow) -> Catalog:
    catalog = load_catalog(settings.config_dir, settings.templates_dir)
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

    @cached_property
    def catalog(self) -> Catalog:
        return self.catalog_override or load_configured_catalog(self.settings, self.clock)

    @cached_property
    def ledger(self) -> Ledger:
        if self.settings.database_url.startswith("sqlite:///"):
            path = self.settings.database_url.removeprefix("sqlite:///")
            if path and path != ":memory:":
                os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        return Ledger(self.settings.database_url, sent_final_after={"email": timedelta(0)})

    @cached_property
    def renderer(self) -> Renderer:
        return Renderer(self.settings.templates_dir)

    @cached_property
    def broker(self) -> Any:
        from dispatcher.queue.broker import make_broker

        return make_broker(self.settings)

    @cached_property
    def enqueuer(self) -> Any:
        from dispatcher.queue.actors import Enqueuer

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
        )

    @cached_property
    def fax_lines(self) -> Any:
        from dispatcher.channels.fax.lines import FaxLines

        return FaxLines(self.broker.client, self.settings.redis_namespace)

    @cached_property
    def gate(self) -> Any:
        from dispatcher.policy.gate import SendingGate
        from dispatcher.policy.limits import RateLimiter

        return SendingGate(RateLimiter(self.broker.client, self.settings.redis_namespace), self.settings)

    @cached_property
    def pacer(self) -> Any:
        from datetime import timedelta

        from dispatcher.policy.pacing import PacingPolicy
        from dispatcher.queue.pacer import Pacer

        policy = PacingPolicy(
            margin=timedelta(hours=self.settings.pacing_margin_hours),
            slowest_share=self.settings.pacing_slowest_share,
        )
        return Pacer(ledger=self.ledger, catalog=self.catalog, gate=self.gate, policy=policy)

    @cached_property
    def outcomes(self) -> Any:
        from dispatcher.queue.outcomes import Outcomes
        from dispatcher.retry import RetryPolicy

        return Outcomes(
            RetryPolicy(
                base_seconds=self.settings.retry_base_seconds,
                max_attempts=self.settings.retry_max_attempts,
                max_lifetime_seconds=self.settings.retry_max_lifetime_hours * 3600.0,
            ),
            no_tone_interval_seconds=self.settings.fax_no_tone_interval_seconds,
        )

    @cached_property
    def fax_status(self) -> Any:
        from dispatcher.queue.faxstatus import FaxStatusApplier

        return FaxStatusApplier(
            catalog=self.catalog, ledger=self.ledger, outcomes=self.outcomes, lines=self.fax_lines, clock=self.clock
        )

    @cached_property
    def fax_webhooks(self) -> Any:
        from dispatcher.channels.fax.channel import FaxChannel
        from dispatcher.channels.fax.webhooks import FaxWebhooks

        return FaxWebhooks(
            settings=self.settings,
            catalog=self.catalog,
            ledger=self.ledger,
            apply=self.fax_status.apply,
            channel=FaxChannel(self.settings, self.environ),
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

    def api(self) -> Any:
        from dispatcher.intake.api import create_app

        return create_app(self.intake, health=self.health, fax_webhooks=self.fax_webhooks)

    def reconciler(self, **config: Any) -> Any:
        from dispatcher.queue.leader import Lease
        from dispatcher.queue.reconciler import Reconciler, ReconcilerConfig, reconciler_identity

        cfg = ReconcilerConfig(**config)
        return Reconciler(
            settings=self.settings,
            catalog=self.catalog,
            ledger=self.ledger,
            enqueuer=self.enqueuer,
            pacer=self.pacer,
            lease=Lease(
                self.broker.client,
                f"{self.settings.redis_namespace}:reconciler:lease",
                reconciler_identity(),
                cfg.lease_seconds,
            ),
            config=cfg,
            clock=self.clock,
        )

    def worker(self, *, threads: int = 8, **processor_options: Any) -> WorkerHandle:
        """A dramatiq worker consuming deliveries in this process (not yet started)."""
        import dramatiq

        from dispatcher.channels.email.channel import EmailChannel
        from dispatcher.channels.fax.channel import FaxChannel
        from dispatcher.queue.actors import declare_deliver
        from dispatcher.queue.deliver import DeliveryProcessor
        from dispatcher.queue.liveness import Heartbeat
        from dispatcher.queue.loop import LoopThread

        loop = LoopThread()
        # Host and pid for operators; a random part because a container restarted after a kill
        # gets the same host name and pid, and must not pass for (and keep alive) the dead one.
        worker_id = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        email = EmailChannel(self.settings, self.environ)
        fax = FaxChannel(self.settings, self.environ)
        processor = DeliveryProcessor(
            settings=self.settings,
            catalog=self.catalog,
            ledger=self.ledger,
            renderer=self.renderer,
            email=email,
            fax=fax,
            fax_renderer=LazyFaxRenderer(self.renderer),
            lines=self.fax_lines,
            outcomes=self.outcomes,
            gate=self.gate,
            loop=loop,
            worker_id=worker_id,
            clock=self.clock,
            **processor_options,
        )
        declare_deliver(self.broker, processor)
        in_flight = self._worker_middleware()
        worker = dramatiq.Worker(self.broker, worker_threads=threads, worker_timeout=250)
        return WorkerHandle(
            worker,
            loop,
            email,
            processor,
            fax,
            in_flight=in_flight,
            ledger=self.ledger,
            enqueuer=self.enqueuer,
            liveness=Heartbeat(
                self.broker.client, self.settings.redis_namespace, worker_id, self.settings.worker_liveness_seconds
            ),
        )

    def _worker_middleware(self) -> Any:
        """Dead letters recorded in the ledger; in-flight messages tracked for a clean shutdown.
        Installed once per broker (a test may build several workers on one service)."""
        from dispatcher.queue.deadletters import DeadLetters
        from dispatcher.queue.shutdown import InFlight

        middleware = self.broker.middleware
        if not any(isinstance(m, DeadLetters) for m in middleware):
            self.broker.add_middleware(DeadLetters(self.ledger, self.clock))
        in_flight = next((m for m in middleware if isinstance(m, InFlight)), None)
        if in_flight is None:
            in_flight = InFlight()
            self.broker.add_middleware(in_flight)
        return in_flight


class LazyFaxRenderer:
    """The fax renderer, imported on the first fax: WeasyPrint costs an email-only worker about
    30 MB and a second of start-up for nothing."""

    def __init__(self, renderer: Renderer):
        self._renderer = renderer
        self._fax: Any = None
        self._lock = threading.Lock()

    def render(self, req: Any, *, sent_at: datetime) -> Any:
        if self._fax is None:
            with self._lock:
                if self._fax is None:
                    from dispatcher.render.fax import FaxRenderer

                    self._fax = FaxRenderer(self._renderer)
        return self._fax.render(req, sent_at=sent_at)


@dataclass
class WorkerHandle:
    worker: Any
    loop: Any
    email: Any
    processor: Any
    fax: Any = None
    in_flight: Any = None
    ledger: Any = None
    enqueuer: Any = None
    #: the process's liveness key (dispatcher/queue/liveness.py); None: the worker has none, and a
    #: death leaves its claims to the stale-claim timeout
    liveness: Any = None
    _stopped: threading.Event = field(default_factory=threading.Event)

    def start(self) -> None:
        if self.liveness is not None:
            self.liveness.start()  # registered before the first claim
        self.worker.start()

    def stop(self, timeout_ms: int | None = None, *, hurry: threading.Event | None = None) -> Any:
        """Finish in-flight letters (up to ``timeout_ms``, default 60 s), hand unstarted messages
        back to Redis at once, hand back what is still in flight at the timeout, close connections.
        Returns a :class:`dispatcher.queue.shutdown.ShutdownReport` (None if already stopped)."""
        from dispatcher.queue.actors import Enqueuer
        from dispatcher.queue.shutdown import DEFAULT_SHUTDOWN_TIMEOUT_S, InFlight, stop_worker

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
            # wait on it: leave them to the process exit.
            return report
        try:
            self.loop.run(self.email.aclose(), timeout=10)
            if self.fax is not None:
                self.loop.run(self.fax.aclose(), timeout=10)
        finally:
            self.loop.stop()
        return report
