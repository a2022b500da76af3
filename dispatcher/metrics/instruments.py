"""What each process counts, in memory: a counter's ``inc`` is a dict lookup and an addition, so
the worker's hot path pays no database or Redis round trip for its metrics.

The instruments are grouped by the part of the service that feeds them (worker, late reports,
reconciler, API); a group registers its instruments on first use, so a process shows only what
it does. Labels are fixed words from the code (channel names, states, outcome classes, reasons,
route templates) and the configured section codes: never a supporter, an address, a number or an
id. Names follow Prometheus' conventions: the ``dispatch_`` prefix, the unit in the name, counters
ending in ``_total`` (the client adds it).

This module imports nothing of the service's, so every layer may count.
"""

from __future__ import annotations

from functools import cached_property

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, disable_created_metrics

# No ``*_created`` series beside every counter and histogram: Prometheus does not read them from
# the text format, and they would double what each scrape carries.
disable_created_metrics()

#: seconds inside a channel's send: an email on loopback takes milliseconds, a relay a second, a
#: fax call minutes
SEND_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
#: seconds an API request takes (an appeal's intake is one transaction and one enqueue)
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class WorkerMetrics:
    """Fed by the worker where a try's outcome is recorded (dispatcher/queue/deliver.py)."""

    def __init__(self, registry: CollectorRegistry, line: LineMetrics):
        self.outcomes = Counter(
            "dispatch_outcomes",
            "Tries of letters by the worker, by channel, what became of the letter (result: sent, "
            "delivered, bounced, failed, retry, deferred, rerouted, expired, cancelled, superseded) "
            "and the outcome class (sent, transient, permanent, operational, deferred, ...).",
            ["channel", "result", "class"],
            registry=registry,
        )
        self.deferrals = Counter(
            "dispatch_deferrals",
            "Letters held back without a try counted, by channel and reason (office_hours, recipient_cap, "
            "provider_limit, limits_unavailable, paused, line_busy, operational).",
            ["channel", "reason"],
            registry=registry,
        )
        self.send_seconds = Histogram(
            "dispatch_send_duration_seconds",
            "Seconds inside a channel's send (SMTP conversation, fax call or gateway request).",
            ["channel"],
            buckets=SEND_BUCKETS,
            registry=registry,
        )
        self.skipped = Counter(
            "dispatch_skipped_messages",
            "Queue messages whose letter was already taken or done (a redelivery or a duplicate): nothing sent.",
            registry=registry,
        )
        self.line = line

    def tried(self, channel: str, result: str, outcome: str, reason: str | None) -> None:
        self.outcomes.labels(channel, result, outcome).inc()
        if result == "deferred":
            self.deferrals.labels(channel, reason or outcome).inc()


class LineMetrics:
    """The far side's facts of a letter (a fax: its pages and the seconds the call held the line),
    counted where they are recorded: by the worker when the send reports them at once (the fax
    lab), by the report applier when a gateway's report brings them."""

    def __init__(self, registry: CollectorRegistry):
        self.line_seconds = Counter(
            "dispatch_line_seconds",
            "Seconds of line time the far side reported (fax calls), by channel and gateway.",
            ["channel", "gateway"],
            registry=registry,
        )
        self.pages = Counter(
            "dispatch_pages",
            "Pages the far side reported sent (faxes), by channel and gateway.",
            ["channel", "gateway"],
            registry=registry,
        )

    def record(self, channel: str, gateway: str | None, pages: int | None, line_seconds: float | None) -> None:
        if line_seconds:
            self.line_seconds.labels(channel, gateway or "none").inc(line_seconds)
        if pages:
            self.pages.labels(channel, gateway or "none").inc(pages)


class ReportMetrics:
    """Fed by the report applier (dispatcher/queue/reports.py): gateways' webhooks in the API,
    polls in the reconciler, bounces in ``dispatcher bounces``."""

    def __init__(self, registry: CollectorRegistry, line: LineMetrics):
        self.reports = Counter(
            "dispatch_reports",
            "Late reports about letters already sent, by channel and what they did (the state the letter "
            "moved to, or ignored / parked).",
            ["channel", "result"],
            registry=registry,
        )
        self.line = line


class ReconcilerMetrics:
    """Fed by the reconciler's loop (dispatcher/queue/reconciler.py)."""

    def __init__(self, registry: CollectorRegistry):
        self.ticks = Counter("dispatch_reconciler_ticks", "Reconciler ticks run.", registry=registry)
        self.tick_failures = Counter(
            "dispatch_reconciler_tick_failures",
            "Reconciler ticks that failed (Redis or the database away).",
            registry=registry,
        )
        self.last_tick = Gauge(
            "dispatch_reconciler_last_tick_timestamp_seconds",
            "Unix time of the reconciler's last tick that completed.",
            registry=registry,
            multiprocess_mode="max",
        )
        self.leader = Gauge(
            "dispatch_reconciler_leader",
            "1 while this reconciler holds the lease (it alone releases letters to the queue).",
            registry=registry,
            multiprocess_mode="max",
        )
        self.released = Counter(
            "dispatch_reconciler_released_letters",
            "Letters the reconciler sent to the queue (due, paced, retried, or lost messages).",
            registry=registry,
        )
        self.claims_released = Counter(
            "dispatch_claims_released",
            "Claims taken back from workers (reason: worker_dead, its liveness lapsed; stale, the backstop).",
            ["reason"],
            registry=registry,
        )


class ApiMetrics:
    """Fed by the API's request middleware (:mod:`dispatcher.metrics.middleware`)."""

    def __init__(self, registry: CollectorRegistry):
        self.requests = Counter(
            "dispatch_api_requests",
            "API requests answered, by method, route template (not the raw path) and status.",
            ["method", "route", "status"],
            registry=registry,
        )
        self.seconds = Histogram(
            "dispatch_api_request_duration_seconds",
            "Seconds to answer an API request, by method and route template.",
            ["method", "route"],
            buckets=REQUEST_BUCKETS,
            registry=registry,
        )


class Metrics:
    """A process's instruments on one registry; each group is made on first use."""

    def __init__(self, registry: CollectorRegistry | None = None):
        if registry is None:
            registry = CollectorRegistry(auto_describe=True)
            # process_cpu_seconds_total and friends: a worker's CPU per letter, its memory
            ProcessCollector(registry=registry)
        self.registry = registry

    @cached_property
    def line(self) -> LineMetrics:
        # one per registry: the worker and the report applier of one process share it
        return LineMetrics(self.registry)

    @cached_property
    def worker(self) -> WorkerMetrics:
        return WorkerMetrics(self.registry, self.line)

    @cached_property
    def reports(self) -> ReportMetrics:
        return ReportMetrics(self.registry, self.line)

    @cached_property
    def reconciler(self) -> ReconcilerMetrics:
        return ReconcilerMetrics(self.registry)

    @cached_property
    def api(self) -> ApiMetrics:
        return ApiMetrics(self.registry)
