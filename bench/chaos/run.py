"""Chaos runs: the delivery contract while workers, Redis and the relay fail mid-run.

Each scenario runs on a fresh SQLite ledger, a fresh private ``redis-server`` with AOF
(tests/support/services.RedisServer), a fresh SMTP sink (bench/chaos/sink.py: bench/smtp_sink.py
plus a Message-ID log, so duplicates are counted across sink restarts) and the BENCH config, with
policy out of the way (``DISPATCH_EMAIL_LIMITS=1000000/hour``, ``DISPATCH_OFFICE_HOURS=0``):

* **kill** — two ``dispatcher worker --threads 4`` processes; one is ``kill -9``ed three times at
  random moments (random fractions of the letters sent) and restarted each time. Production
  defaults throughout: the dead worker's claims come back when the reconciler sees its liveness
  key lapse (30 s TTL, dispatcher/queue/liveness.py), dramatiq requeues its unacknowledged
  messages after its 20 s heartbeat timeout. Per kill the run reports the seconds until the last
  of the dead worker's letters was sent, and the letters still in ``sending`` 60 s after the kill.
* **redis** — Redis is stopped (SIGTERM, AOF fsynced) and started again on the same port and
  data dir mid-run.
* **smtp** — the sink is stopped for 60 s mid-run and a new one started on the same port.

The reconciler runs in this process (its releases are counted), with the production
configuration of ``dispatcher reconcile``. Every scenario must end with every delivery ``sent``;
duplicates at the sink (same Message-ID accepted twice) are counted (kill: at most one per kill,
and each must be a letter whose claim the dead worker held), and attempts per letter are read
from the ``attempts`` table. A letter not
sent at the end is reported with where its message sits in Redis. Everything listens on
127.0.0.1; every scenario is bounded (``--timeout``) and cleans up. Results: a table on stdout
(also as Markdown) and one JSON line per invocation in bench/chaos/results.jsonl; see
docs/chaos.md.

    .venv/bin/python bench/chaos/run.py [--deliveries 5000] [--scenario kill|redis|smtp|all]
        [--timeout 600] [--seed N] [--requeue-after SECONDS] [--keep] [--no-record]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

CHAOS = Path(__file__).resolve().parent
BENCH = CHAOS.parent
ROOT = BENCH.parent
for _p in (ROOT, BENCH):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import redis  # noqa: E402
import throughput as tp  # noqa: E402
from rich.table import Table  # noqa: E402
from sqlalchemy import text  # noqa: E402

from dispatcher.app import Service  # noqa: E402
from dispatcher.logging import configure as configure_logging  # noqa: E402
from dispatcher.queue.reconciler import Reconciler  # noqa: E402
from dispatcher.settings import Settings  # noqa: E402
from tests.support.services import RedisServer  # noqa: E402

log = tp.log
console = tp.console
TERMINAL = ("sent", "delivered", "failed", "expired", "cancelled")
THREADS = 4
#: the contract for a kill: the dead worker's letters are sent within this many seconds
KILL_RECOVERY_S = 60.0
#: attempt rows written when the reconciler takes a dead worker's claim back (either way)
RELEASED_TEXT = "worker stopped answering mid-send%"
SMTP_DOWN_S = 60.0
REDIS_DOWN_S = 5.0
RESULTS = CHAOS / "results.jsonl"
#: --requeue-after (None: the reconciler's production default, 15 minutes)
REQUEUE_AFTER: timedelta | None = None


# --------------------------------------------------------------------------- the sink


class ChaosSink(tp.Sink):
    """tp.Sink running bench/chaos/sink.py (Message-IDs appended to ``ids_path``), optionally
    on a given port (a restart on the port the workers know)."""

    script = CHAOS / "sink.py"

    def __init__(self, workdir: Path, name: str, ids_path: Path, port: int | None = None):
        super().__init__(workdir, name)
        self.ids_path = ids_path
        if port is not None:
            self.port = port

    def env(self) -> dict[str, str] | None:
        return dict(os.environ, CHAOS_SINK_IDS=str(self.ids_path))


def sink_counts(ids_path: Path) -> tuple[int, int, int]:
    """(messages, distinct Message-IDs, duplicates) over every sink process of the run."""
    try:
        ids = [line for line in ids_path.read_text().splitlines() if line]
    except OSError:
        ids = []
    counts = Counter(ids)
    return len(ids), len(counts), sum(n - 1 for n in counts.values())


# --------------------------------------------------------------------------- one scenario's stack


@dataclass
class Outcome:
    scenario: str
    deliveries: int = 0
    states: dict[str, int] = field(default_factory=dict)
    sink_messages: int = 0
    sink_distinct: int = 0
    duplicates: int = 0
    duplicate_ids: list[str] = field(default_factory=list)
    disruptions: int = 0
    disruption_label: str = ""
    wall_s: float = 0.0
    attempts_per_letter: float = 0.0
    max_attempts: int = 0
    attempt_outcomes: dict[str, int] = field(default_factory=dict)
    retried_letters: int = 0
    #: claims the reconciler took back because they went stale (the 11-minute backstop)
    claims_released: int = 0
    #: claims the reconciler took back because their worker's liveness key lapsed
    liveness_released: int = 0
    #: per kill: seconds from the kill until the last of the dead worker's letters was sent
    #: (its claims and the messages it had fetched); None if one was never sent
    recovery_s: list[float | None] = field(default_factory=list)
    #: per kill: the dead worker's letters still in `sending` 60 s after it (None: not looked at)
    sending_after_60s: list[int | None] = field(default_factory=list)
    #: letters the reconciler put on the queue again because they sat in `queued`, unclaimed, for
    #: requeue_after (their message was lost or stranded in Redis)
    requeued_by_reconciler: int = 0
    #: letters the reconciler sent that were planned with no try yet (intake's own enqueue failed)
    outbox_by_reconciler: int = 0
    #: messages the reconciler took out of a worker's dramatiq ack set, where they sat unreceived
    #: (dispatcher/queue/strays.py), and put back on the queue
    stranded_requeued: int = 0
    #: duplicates of letters whose claim never went stale: outside the contract's one window
    dups_outside_window: int = 0
    #: most duplicates from the claims of one dead worker (the contract: at most one per kill)
    max_dups_per_kill: int = 0
    max_latency_s: float = 0.0
    events: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    timed_out: bool = False

    @property
    def sent(self) -> int:
        return self.states.get("sent", 0) + self.states.get("delivered", 0)

    @property
    def failed(self) -> int:
        return self.states.get("failed", 0)

    @property
    def lost(self) -> int:
        return self.deliveries - self.sent


class LedgerSpy:
    """The reconciler's ledger, noting why each letter it releases is due (read before it is
    marked queued): ``requeued`` sat in `queued` unclaimed, ``outbox`` planned with no try."""

    def __init__(self, ledger: Any):
        self._ledger = ledger
        self.requeued: set[str] = set()
        self.outbox: set[str] = set()
        self.lifecycle = _LifecycleSpy(ledger.lifecycle, self._note)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ledger, name)

    def _note(self, ids: list[str]) -> None:
        if ids:
            with self._ledger.engine.connect() as conn:
                rows = conn.execute(
                    text("SELECT id, state, attempts FROM deliveries WHERE id IN (SELECT value FROM json_each(:ids))"),
                    {"ids": json.dumps(ids)},
                ).all()
            for row in rows:
                if row.state == "queued":
                    self.requeued.add(row.id)
                elif row.state == "planned" and row.attempts == 0:
                    self.outbox.add(row.id)


class _LifecycleSpy:
    """``ledger.lifecycle`` with its ``mark_queued`` noted first: every release of the
    reconciler's (paced or not) is marked queued just before it is sent."""

    def __init__(self, lifecycle: Any, note: Any):
        self._lifecycle = lifecycle
        self._note = note

    def __getattr__(self, name: str) -> Any:
        return getattr(self._lifecycle, name)

    def mark_queued(self, ids: list[str], now: datetime) -> int:
        self._note(ids)
        return int(self._lifecycle.mark_queued(ids, now))


class Stack:
    """Redis (AOF), sink, ledger, reconciler (in a thread of this process) and worker slots."""

    def __init__(self, name: str, workdir: Path):
        self.name = name
        self.workdir = workdir
        self.run = secrets.token_hex(3)
        self.redis = RedisServer(appendonly=True)
        self.redis.start()
        self.ids_path = workdir / f"{name}-message-ids.txt"
        self.sinks: list[ChaosSink] = []
        self.sink: ChaosSink | None = None
        self.start_sink()
        assert self.sink is not None
        self.key = secrets.token_hex(16)
        self.settings: Settings = Settings(
            config_dir=tp.CONFIG_DIR,
            templates_dir=tp.TEMPLATES_DIR,
            var_dir=workdir / f"var-{name}",
            database_url=f"sqlite:///{workdir / f'ledger-{name}.sqlite3'}",
            redis_url=self.redis.url,
            redis_namespace=f"chaos-{self.run}",
            mode="sandbox",
            sandbox_smtp_host="127.0.0.1",
            sandbox_smtp_port=self.sink.port,
            pepper=secrets.token_hex(8),
            email_limits=(tp.EMAIL_LIMITS,),
            office_hours=False,
        )
        self.service: Service = Service(self.settings, environ={tp.KEY_ENV: self.key})
        self.service.ledger.migrate()
        self.env: dict[str, str] = tp.child_env(self.settings, self.key, "WARNING") | {"DISPATCH_OFFICE_HOURS": "0"}
        self.client: redis.Redis = redis.Redis.from_url(
            self.settings.redis_url, socket_connect_timeout=2, socket_timeout=5
        )
        self.workers: dict[int, subprocess.Popen[bytes]] = {}
        self.broker_ids: dict[int, str] = {}
        self.worker_logs: dict[int, Path] = {}
        # Production defaults (those of `dispatcher reconcile`), but for --requeue-after.
        config: dict[str, Any] = {}
        if REQUEUE_AFTER is not None:
            config["requeue_after"] = REQUEUE_AFTER
        self.reconciler_config = config
        self._stop: threading.Event = threading.Event()
        reconciler = self.service.reconciler(**config)
        self.reconciler: Reconciler = reconciler
        self.spy: LedgerSpy = LedgerSpy(reconciler.ledger)
        reconciler.ledger = self.spy
        self._reconciler: threading.Thread = threading.Thread(
            target=reconciler.run, args=(self._stop,), name="reconciler", daemon=True
        )
        self._reconciler.start()

    # -- processes

    def start_sink(self, port: int | None = None) -> None:
        sink = ChaosSink(self.workdir, f"{self.name}-sink-{len(self.sinks)}", self.ids_path, port=port)
        sink.__enter__()
        self.sinks.append(sink)
        self.sink = sink

    def stop_sink(self) -> int:
        assert self.sink is not None
        port = self.sink.port
        self.sink.__exit__(None, None, None)
        self.sink = None
        return port

    def start_worker(self, slot: int) -> None:
        ns = self.settings.redis_namespace
        before = set(self.client.zrange(f"{ns}:__heartbeats__", 0, -1))
        path = self.workdir / f"{self.name}-worker-{slot}.log"
        self.worker_logs[slot] = path
        with open(path, "ab") as logf:
            proc = subprocess.Popen(
                [*tp.die_with_parent(), tp.DISPATCHER, "worker", "--threads", str(THREADS)],
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
            )
        self.workers[slot] = proc
        tp.wait_for_consumers(self.client, ns, 1, [proc], [path], before)
        new = set(cast(list[bytes], self.client.zrange(f"{ns}:__heartbeats__", 0, -1))) - before
        # intake's own broker may register at the same moment: keep the id only when unambiguous
        if len(new) == 1:
            self.broker_ids[slot] = next(iter(new)).decode()
        else:
            self.broker_ids.pop(slot, None)

    def kill_worker(self, slot: int) -> Kill:
        """SIGKILL; what the dead worker left: its claims in `sending`, its unacked messages."""
        proc = self.workers[slot]
        pid = tp.find_worker_pid(proc.pid)
        os.kill(pid, signal.SIGKILL)
        at, at_monotonic = datetime.now(UTC), time.monotonic()
        proc.wait(timeout=10)
        with self.service.ledger.engine.connect() as conn:
            claims = [
                str(r.id)
                for r in conn.execute(
                    text("SELECT id FROM deliveries WHERE state = 'sending' AND claimed_by LIKE :p"),
                    {"p": f"%:{pid}:%"},
                )
            ]
        broker_id = self.broker_ids.get(slot)
        # the letters of messages it had fetched and not started: those come back another way
        fetched = [d for d in self.fetched_by(broker_id) if d not in claims] if broker_id is not None else []
        return Kill(pid, at, at_monotonic, claims, fetched, self.unacked(slot), broker_id)

    def fetched_by(self, broker_id: str) -> list[str]:
        """Deliveries whose messages sit in a broker's ack sets (fetched, not acknowledged)."""
        ns = self.settings.redis_namespace
        out: list[str] = []
        with contextlib.suppress(redis.RedisError):
            for key in self.client.scan_iter(f"{ns}:__acks__.{broker_id}.*", count=1000):
                queue = key.decode().rsplit(".", 1)[1]
                members = list(cast(set[bytes], self.client.smembers(key)))
                if not members:
                    continue
                for data in cast(list[bytes | None], self.client.hmget(f"{ns}:{queue}.msgs", members)):
                    with contextlib.suppress(ValueError, KeyError, IndexError, TypeError):
                        out.append(str(json.loads(data or b"")["args"][0]))
        return out

    def sent_at(self, ids: list[str]) -> dict[str, datetime | None]:
        """When each letter was sent (None: not sent)."""
        if not ids:
            return {}
        with self.service.ledger.engine.connect() as conn:
            rows = conn.execute(
                text("SELECT id, state, sent_at FROM deliveries WHERE id IN (SELECT value FROM json_each(:ids))"),
                {"ids": json.dumps(ids)},
            ).all()
        return {str(r.id): stack_time(r.sent_at) if r.state in ("sent", "delivered") else None for r in rows}

    def sending_of(self, pid: int) -> int:
        with self.service.ledger.engine.connect() as conn:
            return int(
                conn.execute(
                    text("SELECT count(*) FROM deliveries WHERE state = 'sending' AND claimed_by LIKE :p"),
                    {"p": f"%:{pid}:%"},
                ).scalar_one()
            )

    def unacked(self, slot: int) -> int:
        broker_id = self.broker_ids.get(slot)
        if broker_id is None:
            return -1
        return self.unacked_of(broker_id)

    def unacked_of(self, broker_id: str) -> int:
        ns = self.settings.redis_namespace
        with contextlib.suppress(redis.RedisError):
            return sum(
                int(self.client.scard(k)) for k in self.client.scan_iter(f"{ns}:__acks__.{broker_id}.*", count=1000)
            )
        return -1

    def check_workers(self) -> None:
        for slot, proc in self.workers.items():
            if proc.poll() is not None:
                raise RuntimeError(
                    f"worker {slot} (pid {proc.pid}) exited with {proc.returncode}:\n{tp.tail(self.worker_logs[slot])}"
                )

    # -- ledger

    def states(self) -> dict[str, int]:
        with self.service.ledger.engine.connect() as conn:
            rows = conn.execute(text("SELECT state, count(*) FROM deliveries GROUP BY state")).all()
        return {str(s): int(n) for s, n in rows}

    def attempts(self) -> tuple[float, int, dict[str, int], int]:
        """(attempt rows per delivery, most rows for one delivery, rows by outcome, deliveries with >1 row)."""
        with self.service.ledger.engine.connect() as conn:
            deliveries = conn.execute(text("SELECT count(*) FROM deliveries")).scalar_one()
            per = conn.execute(text("SELECT delivery_id, count(*) FROM attempts GROUP BY delivery_id")).all()
            by_outcome = conn.execute(text("SELECT outcome, count(*) FROM attempts GROUP BY outcome")).all()
        counts = [int(n) for _, n in per]
        return (
            sum(counts) / max(int(deliveries), 1),
            max(counts, default=0),
            {str(o): int(n) for o, n in by_outcome},
            sum(1 for n in counts if n > 1),
        )

    def locate(self, delivery_ids: list[str]) -> dict[str, list[str]]:
        """Where dramatiq holds the message of each delivery in Redis: the queue list, a delay
        queue, the ack set of a live or dead broker (``ack set of <broker> (heartbeat Ns ago)``)."""
        ns = self.settings.redis_namespace
        wanted = set(delivery_ids)
        found: dict[str, list[str]] = {d: [] for d in delivery_ids}
        by_redis_id: dict[str, str] = {}
        for key in self.client.scan_iter(f"{ns}:*.msgs", count=1000):
            for rid, data in cast(Iterator[tuple[bytes, bytes]], self.client.hscan_iter(key, count=1000)):
                with contextlib.suppress(ValueError, KeyError, IndexError):
                    args = json.loads(data)["args"]
                    if args and args[0] in wanted:
                        by_redis_id[rid.decode()] = args[0]
                        found[args[0]].append(f"message {rid.decode()} in {key.decode()}")
        heartbeats = self.client.zrange(f"{ns}:__heartbeats__", 0, -1, withscores=True)
        beats = {m.decode(): t for m, t in cast(list[tuple[bytes, float]], heartbeats)}
        now_ms = time.time() * 1000
        for key in self.client.scan_iter(f"{ns}:*", count=1000):
            name = key.decode()
            kind = cast(bytes, self.client.type(key)).decode()
            members: list[bytes] = []
            if kind == "list":
                members = cast(list[bytes], self.client.lrange(key, 0, -1))
            elif kind == "set":
                members = list(cast(set[bytes], self.client.smembers(key)))
            elif kind == "zset" and not name.endswith("__heartbeats__"):
                members = cast(list[bytes], self.client.zrange(key, 0, -1))
            for m in members:
                delivery = by_redis_id.get(m.decode(errors="replace"))
                if delivery is None:
                    continue
                where = name
                if ":__acks__." in name:
                    broker = name.split(":__acks__.", 1)[1].rsplit(".", 1)[0]
                    beat = beats.get(broker)
                    age = f"heartbeat {(now_ms - beat) / 1000:.1f} s ago" if beat else "no heartbeat"
                    where = f"ack set of broker {broker} ({age})"
                found[delivery].append(where)
        return found

    # -- teardown

    def close(self) -> None:
        self._stop.set()
        self._reconciler.join(timeout=10)
        for proc in self.workers.values():
            tp.stop_process(proc, timeout=30)
        for sink in self.sinks:
            with contextlib.suppress(Exception):
                sink.__exit__(None, None, None)
        with contextlib.suppress(Exception):
            self.service.broker.close()
        self.service.ledger.dispose()
        with contextlib.suppress(Exception):
            self.client.close()
        self.redis.close()


# --------------------------------------------------------------------------- driving a run


class Submitter(threading.Thread):
    """Pushes the appeals through Service.intake.submit, as throughput.submit_all does, in a
    thread of its own so that the chaos can happen while intake is still busy."""

    def __init__(self, service: Service, appeals: int, run: str):
        super().__init__(name="intake", daemon=True)
        self.service, self.appeals, self.run_id = service, appeals, run
        self.expected = 0
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            for i in range(self.appeals):
                if self.stop.is_set():
                    return
                self.expected += len(self.service.intake.submit(tp.appeal_payload(i, self.run_id)).deliveries)
        except BaseException as exc:  # noqa: BLE001 - reported by the driver
            self.error = exc
        finally:
            self.done.set()


def drive(stack: Stack, outcome: Outcome, appeals: int, timeout: float, step: Any) -> None:
    """Submit, call ``step(sent, elapsed)`` every 0.2 s until every letter is in a final state
    (or ``timeout``), then read the figures into ``outcome``."""
    started = time.monotonic()
    submitter = Submitter(stack.service, appeals, stack.run)
    submitter.start()
    target = appeals * 5
    try:
        while True:
            elapsed = time.monotonic() - started
            states = stack.states()
            sent = states.get("sent", 0) + states.get("delivered", 0)
            final = sum(states.get(s, 0) for s in TERMINAL)
            step(sent, elapsed)
            if submitter.error is not None:
                raise RuntimeError(f"intake failed: {submitter.error!r}")
            if submitter.done.is_set() and final >= submitter.expected and step(None, elapsed) is not False:
                break
            if elapsed > timeout:
                outcome.timed_out = True
                outcome.notes.append(f"timed out after {timeout:.0f} s: {states}")
                log(f"[red]{outcome.scenario}: timed out: {states}[/red]")
                break
            stack.check_workers()
            time.sleep(0.2)
    finally:
        submitter.stop.set()
        submitter.join(timeout=30)
    outcome.wall_s = time.monotonic() - started
    outcome.deliveries = submitter.expected or target
    time.sleep(1.0)  # the sink's last lines
    outcome.states = stack.states()
    outcome.sink_messages, outcome.sink_distinct, outcome.duplicates = sink_counts(stack.ids_path)
    ids = stack.ids_path.read_text().splitlines() if stack.ids_path.exists() else []
    outcome.duplicate_ids = sorted(k for k, n in Counter(line for line in ids if line).items() if n > 1)
    (outcome.attempts_per_letter, outcome.max_attempts, outcome.attempt_outcomes, outcome.retried_letters) = (
        stack.attempts()
    )
    with stack.service.ledger.engine.connect() as conn:
        outcome.claims_released = conn.execute(
            text("SELECT count(*) FROM attempts WHERE text LIKE '%(stale claim)%'")
        ).scalar_one()
        outcome.liveness_released = conn.execute(
            text("SELECT count(*) FROM attempts WHERE text LIKE '%(its liveness lapsed)%'")
        ).scalar_one()
        rows = conn.execute(
            text("SELECT created_at, sent_at FROM deliveries WHERE state = 'sent' AND sent_at IS NOT NULL")
        ).all()
    for row in rows:
        made, went = stack_time(row.created_at), stack_time(row.sent_at)
        if made is not None and went is not None:
            outcome.max_latency_s = max(outcome.max_latency_s, (went - made).total_seconds())
    outcome.requeued_by_reconciler = len(stack.spy.requeued)
    outcome.outbox_by_reconciler = len(stack.spy.outbox)
    strays = stack.reconciler.strays
    outcome.stranded_requeued = strays.requeued if strays is not None else 0
    with stack.service.ledger.engine.connect() as conn:
        stuck = conn.execute(
            text(
                "SELECT id, state, attempts, queued_at, claimed_by, last_outcome, last_text FROM deliveries "
                "WHERE state NOT IN ('sent', 'delivered') LIMIT 20"
            )
        ).all()
    if stuck:
        try:
            where = stack.locate([row.id for row in stuck])
        except redis.RedisError as exc:
            where = {row.id: [f"Redis unreadable: {exc}"] for row in stuck}
        for row in stuck:
            outcome.notes.append(
                f"not sent: {row.id} state={row.state} attempts={row.attempts} queued_at={row.queued_at} "
                f"claimed_by={row.claimed_by} last={row.last_outcome} {row.last_text!r}; "
                f"in Redis: {'; '.join(where.get(row.id, [])) or 'nowhere'}"
            )
    if outcome.duplicate_ids:
        # the contract's one window: the letter's claim was taken back (its worker died mid-send)
        with stack.service.ledger.engine.connect() as conn:
            stale: dict[str, str] = dict(
                conn.execute(
                    text(
                        "SELECT d.message_id, a.worker FROM deliveries d JOIN attempts a ON a.delivery_id = d.id "
                        "WHERE a.text LIKE :t"
                    ),
                    {"t": RELEASED_TEXT},
                ).all()
            )
        by_worker = Counter(stale[m] for m in outcome.duplicate_ids if m in stale)
        outcome.max_dups_per_kill = max(by_worker.values(), default=0)
        outcome.dups_outside_window = sum(1 for m in outcome.duplicate_ids if m not in stale)
        for worker, count in sorted(by_worker.items()):
            outcome.events.append(f"duplicates from letters claimed by dead worker {worker}: {count}")
        if outcome.dups_outside_window:
            outcome.notes.append(f"{outcome.dups_outside_window} duplicate(s) of letters with no released claim")
        outcome.notes.append("duplicate Message-IDs: " + ", ".join(outcome.duplicate_ids[:10]))


def stack_time(value: Any) -> datetime | None:
    """A ledger timestamp read through a raw text() query (SQLite gives strings), in UTC."""
    if value is None:
        return None
    when = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


@dataclass
class Kill:
    """One ``kill -9`` and what the dead worker left behind."""

    pid: int
    at: datetime
    at_monotonic: float
    #: its claims in `sending`
    claims: list[str]
    #: letters whose messages it had fetched and not acknowledged, other than its claims
    fetched: list[str]
    unacked: int
    broker_id: str | None
    #: its letters still in `sending` KILL_RECOVERY_S after the kill (None: not yet looked)
    sending_after: int | None = None

    def recovery(self, sent: dict[str, datetime | None]) -> tuple[float | None, float | None]:
        """Seconds from the kill until the last of its claimed letters and of its fetched letters
        was sent (None: one was not sent)."""

        def last(ids: list[str]) -> float | None:
            times = [sent.get(i) for i in ids]
            if any(t is None for t in times):
                return None
            return max(((t - self.at).total_seconds() for t in times if t is not None), default=0.0)

        return last(self.claims), last(self.fetched)


def event(outcome: Outcome, started: float, msg: str) -> None:
    line = f"t={time.monotonic() - started:6.1f}s {msg}"
    outcome.events.append(line)
    log(f"{outcome.scenario}: {line}")


# --------------------------------------------------------------------------- the scenarios


def scenario_kill(args: argparse.Namespace, workdir: Path, rng: random.Random) -> Outcome:
    out = Outcome("kill", disruption_label="kill -9 of worker 1 (restarted)")
    stack = Stack("kill", workdir)
    try:
        stack.start_worker(0)
        stack.start_worker(1)
        appeals = args.deliveries // 5
        n = appeals * 5
        # three random moments, as fractions of the letters sent, at least 10 % apart
        while True:
            marks = sorted(rng.uniform(0.05, 0.85) for _ in range(3))
            if all(b - a >= 0.1 for a, b in itertools.pairwise(marks)):
                break
        thresholds = [int(m * n) for m in marks]
        started = time.monotonic()
        kills: list[Kill] = []
        #: dead brokers whose ack sets still hold messages: broker id -> when it was killed
        unreturned: dict[str, float] = {}

        def step(sent: int | None, elapsed: float) -> bool:
            for broker_id, at in list(unreturned.items()):
                if stack.unacked_of(broker_id) == 0:
                    # dramatiq's maintenance requeued them: the broker settings' promise (within a minute)
                    del unreturned[broker_id]
                    event(
                        out,
                        started,
                        f"the killed worker's unacked messages were back on the queue after "
                        f"{time.monotonic() - at:.1f} s",
                    )
            for kill in kills:
                if kill.sending_after is None and time.monotonic() - kill.at_monotonic >= KILL_RECOVERY_S:
                    kill.sending_after = stack.sending_of(kill.pid)
                    event(
                        out,
                        started,
                        f"{KILL_RECOVERY_S:.0f} s after the kill of pid {kill.pid}: {kill.sending_after} of its "
                        f"letters in `sending`, {stack.states().get('sending', 0)} in all",
                    )
            if sent is None:
                # every letter is final; wait until the dead workers' ack sets went back and the
                # last kill is 60 s old (nothing may be left in `sending` then)
                return not unreturned and all(k.sending_after is not None for k in kills)
            if thresholds and sent >= thresholds[0]:
                thresholds.pop(0)
                kill = stack.kill_worker(1)
                if kill.broker_id is not None and kill.unacked > 0:
                    unreturned[kill.broker_id] = time.monotonic()
                kills.append(kill)
                out.disruptions += 1
                event(
                    out,
                    started,
                    f"kill -9 worker pid {kill.pid} at {sent}/{n} sent: {len(kill.claims)} claim(s) left in "
                    f"`sending`, {kill.unacked} unacked message(s) in its dramatiq ack set",
                )
                stack.start_worker(1)
                event(out, started, f"worker 1 restarted (pid {stack.workers[1].pid})")
            return True

        drive(stack, out, appeals, args.timeout, step)
        if thresholds:
            out.notes.append(f"only {out.disruptions} of 3 kills happened (the run ended first)")
        # per kill: when the dead worker's letters were taken back and sent (read first: every
        # ledger transaction begins immediately, so no second one may open inside the next)
        sent_at = stack.sent_at([i for kill in kills for i in kill.claims + kill.fetched])
        with stack.service.ledger.engine.connect() as conn:
            for i, kill in enumerate(kills, 1):
                rows = conn.execute(
                    text("SELECT count(*) FROM attempts WHERE worker LIKE :p"), {"p": f"%:{kill.pid}:%"}
                ).scalar_one()
                released = [
                    began + timedelta(milliseconds=float(r.duration_ms or 0))
                    for r in conn.execute(
                        text("SELECT started_at, duration_ms FROM attempts WHERE worker LIKE :p AND text LIKE :t"),
                        {"p": f"%:{kill.pid}:%", "t": RELEASED_TEXT},
                    )
                    if (began := stack_time(r.started_at)) is not None
                ]
                claims_s, fetched_s = kill.recovery(sent_at)
                both = [claims_s, fetched_s]
                recovery = None if None in both else max(x for x in both if x is not None)
                out.recovery_s.append(recovery)
                out.sending_after_60s.append(kill.sending_after)
                release_s = ", ".join(f"{(t - kill.at).total_seconds():.1f}" for t in sorted(released))
                out.events.append(
                    f"kill {i} (pid {kill.pid}): {len(kill.claims)} claim(s) released after [{release_s}] s, "
                    f"the last of them sent after {_secs(claims_s)}; {len(kill.fetched)} other fetched letter(s), "
                    f"the last sent after {_secs(fetched_s)}; all its letters sent after {_secs(recovery)}; "
                    f"{rows} attempt row(s) by it"
                )
        ns = stack.settings.redis_namespace
        leftover = [k.decode() for k in stack.client.scan_iter(f"{ns}:__acks__.*") if stack.client.scard(k)]
        out.events.append(f"non-empty dramatiq ack sets at the end: {len(leftover)}")
    finally:
        stack.close()
    return out


def _secs(value: float | None) -> str:
    return "never" if value is None else f"{value:.1f} s"


def scenario_redis(args: argparse.Namespace, workdir: Path, rng: random.Random) -> Outcome:
    out = Outcome("redis", disruption_label="Redis stop + start (AOF)")
    stack = Stack("redis", workdir)
    try:
        stack.start_worker(0)
        stack.start_worker(1)
        appeals = args.deliveries // 5
        n = appeals * 5
        threshold = int(rng.uniform(0.3, 0.5) * n)
        started = time.monotonic()
        state: dict[str, Any] = {"down_at": None, "done": False}

        def step(sent: int | None, elapsed: float) -> bool:
            if sent is None:
                return bool(state["done"])
            if state["down_at"] is None and sent >= threshold:
                stack.redis.stop()
                state["down_at"] = time.monotonic()
                out.disruptions += 1
                event(out, started, f"Redis stopped (SIGTERM) at {sent}/{n} sent")
            elif (
                state["down_at"] is not None
                and not state["done"]
                and time.monotonic() - state["down_at"] >= REDIS_DOWN_S
            ):
                stack.redis.start()
                state["done"] = True
                event(out, started, f"Redis started again on port {stack.redis.port} at {sent}/{n} sent")
            return True

        drive(stack, out, appeals, args.timeout, step)
    finally:
        stack.close()
    return out


def scenario_smtp(args: argparse.Namespace, workdir: Path, rng: random.Random) -> Outcome:
    out = Outcome("smtp", disruption_label=f"sink down {SMTP_DOWN_S:.0f} s")
    stack = Stack("smtp", workdir)
    try:
        stack.start_worker(0)
        stack.start_worker(1)
        appeals = args.deliveries // 5
        n = appeals * 5
        threshold = int(rng.uniform(0.2, 0.4) * n)
        started = time.monotonic()
        state: dict[str, Any] = {"down_at": None, "port": None, "done": False}

        def step(sent: int | None, elapsed: float) -> bool:
            if sent is None:
                return bool(state["done"])
            if state["down_at"] is None and sent >= threshold:
                state["port"] = stack.stop_sink()
                state["down_at"] = time.monotonic()
                out.disruptions += 1
                event(out, started, f"sink stopped at {sent}/{n} sent")
            elif (
                state["down_at"] is not None
                and not state["done"]
                and time.monotonic() - state["down_at"] >= SMTP_DOWN_S
            ):
                stack.start_sink(port=state["port"])
                state["done"] = True
                event(out, started, f"new sink on port {state['port']} at {sent}/{n} sent: {stack.states()}")
            return True

        drive(stack, out, appeals, args.timeout, step)
    finally:
        stack.close()
    return out


SCENARIOS = {"kill": scenario_kill, "redis": scenario_redis, "smtp": scenario_smtp}


# --------------------------------------------------------------------------- reporting


COLUMNS = (
    "scenario",
    "letters",
    "sent",
    "failed",
    "lost",
    "dups",
    "disrupt.",
    "wall s",
    "att/letter",
    "max att",
    "retried",
    "stale rel.",
    "dead rel.",
    "requeued",
    "stranded",
    "outbox",
    "max lat. s",
    "verdict",
)


def table_rows(outcomes: list[Outcome]) -> list[list[str]]:
    return [
        [
            o.scenario,
            str(o.deliveries),
            str(o.sent),
            str(o.failed),
            str(o.lost),
            str(o.duplicates),
            str(o.disruptions),
            f"{o.wall_s:.0f}",
            f"{o.attempts_per_letter:.3f}",
            str(o.max_attempts),
            str(o.retried_letters),
            str(o.claims_released),
            str(o.liveness_released),
            str(o.requeued_by_reconciler),
            str(o.stranded_requeued),
            str(o.outbox_by_reconciler),
            f"{o.max_latency_s:.0f}",
            verdict(o),
        ]
        for o in outcomes
    ]


def print_table(outcomes: list[Outcome]) -> None:
    table = Table(title=f"dispatcher chaos runs — {os.cpu_count()} CPUs, SQLite, 2 workers × {THREADS} threads")
    for col in COLUMNS:
        table.add_column(col, justify="left" if col in ("scenario", "verdict") else "right")
    for row in table_rows(outcomes):
        table.add_row(*row)
    console.print(table)
    console.print(
        "dups: Message-IDs accepted more than once by the sink(s); disrupt.: kills / restarts done; "
        "att/letter: attempt rows per letter; retried: letters with more than one attempt row; "
        "stale rel.: claims the reconciler took back as stale (11 min); dead rel.: claims it took back "
        "because their worker's liveness key lapsed; requeued: `queued` letters the reconciler "
        "queued again after requeue_after (message lost or stranded); stranded: messages the reconciler took "
        "out of a live worker's ack set, never received, and queued again; outbox: letters with no try the reconciler "
        "queued (intake's enqueue failed); max lat.: slowest created → sent"
    )
    # the same table as Markdown, for docs/chaos.md
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    for row in table_rows(outcomes):
        print("| " + " | ".join(row) + " |")
    for o in outcomes:
        console.print(
            f"[bold]{o.scenario}[/bold] ({o.disruption_label}) states {o.states}; "
            f"attempts by outcome {o.attempt_outcomes}"
        )
        for line in o.events:
            console.print(f"  {line}")
        for note in o.notes:
            console.print(f"  [yellow]{note}[/yellow]")


def verdict(o: Outcome) -> str:
    problems = []
    if o.lost:
        problems.append(f"{o.lost} not sent")
    if o.failed:
        problems.append(f"{o.failed} failed")
    allowed = o.disruptions if o.scenario == "kill" else 0
    if o.duplicates > allowed:
        problems.append(f"{o.duplicates} dup > {allowed}")
    if o.dups_outside_window:
        problems.append(f"{o.dups_outside_window} dup outside the window")
    if o.max_dups_per_kill > 1:
        problems.append(f"{o.max_dups_per_kill} dup from one kill")
    for i, (s, left) in enumerate(zip(o.recovery_s, o.sending_after_60s, strict=True), 1):
        if s is None or s > KILL_RECOVERY_S:
            problems.append(f"kill {i}: letters sent after {_secs(s)}")
        if left:
            problems.append(f"kill {i}: {left} in `sending` after {KILL_RECOVERY_S:.0f} s")
    if o.timed_out:
        problems.append("timed out")
    return "ok" if not problems else "FAIL: " + "; ".join(problems)


def record(args: argparse.Namespace, outcomes: list[Outcome]) -> None:
    line = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "commit": tp.git_commit(),
        "args": {
            "deliveries": args.deliveries,
            "scenario": args.scenario,
            "seed": args.seed,
            "requeue_after": args.requeue_after,
            "timeout": args.timeout,
        },
        "runs": [
            {
                "scenario": o.scenario,
                "deliveries": o.deliveries,
                "states": o.states,
                "lost": o.lost,
                "sink_messages": o.sink_messages,
                "sink_distinct": o.sink_distinct,
                "duplicates": o.duplicates,
                "duplicate_ids": o.duplicate_ids[:20],
                "dups_outside_window": o.dups_outside_window,
                "max_dups_per_kill": o.max_dups_per_kill,
                "disruptions": o.disruptions,
                "wall_s": round(o.wall_s, 1),
                "attempts_per_letter": round(o.attempts_per_letter, 4),
                "max_attempts": o.max_attempts,
                "attempt_outcomes": o.attempt_outcomes,
                "retried_letters": o.retried_letters,
                "claims_released": o.claims_released,
                "liveness_released": o.liveness_released,
                "recovery_s": [None if s is None else round(s, 1) for s in o.recovery_s],
                "sending_after_60s": o.sending_after_60s,
                "requeued_by_reconciler": o.requeued_by_reconciler,
                "outbox_by_reconciler": o.outbox_by_reconciler,
                "stranded_requeued": o.stranded_requeued,
                "max_latency_s": round(o.max_latency_s, 1),
                "events": o.events,
                "notes": o.notes,
                "verdict": verdict(o),
            }
            for o in outcomes
        ],
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with open(RESULTS, "a") as fh:
        fh.write(json.dumps(line) + "\n")
    log(f"appended to {RESULTS.relative_to(ROOT)}")


def main() -> int:
    parser = argparse.ArgumentParser(description="Chaos runs of the dispatcher (kill -9, Redis restart, relay down).")
    parser.add_argument("--deliveries", type=int, default=5000, help="letters per scenario (appeals = deliveries / 5)")
    parser.add_argument("--scenario", choices=(*SCENARIOS, "all"), default="all")
    parser.add_argument("--timeout", type=float, default=600.0, help="longest a scenario may run, seconds")
    parser.add_argument(
        "--requeue-after",
        type=float,
        default=None,
        help="reconciler: seconds before a queued, unclaimed letter gets a new message (default: production, 15 min)",
    )
    parser.add_argument("--seed", type=int, default=None, help="random seed (kill moments)")
    parser.add_argument("--no-record", dest="record", action="store_false", help="do not append to the results")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (logs, ledgers, Message-ID logs)")
    args = parser.parse_args()
    if args.deliveries < 5:
        parser.error("--deliveries ≥ 5")
    if args.seed is None:
        args.seed = secrets.randbelow(1_000_000)
    configure_logging("ERROR")  # the in-process reconciler: its releases are counted from the ledger
    rng = random.Random(args.seed)
    global REQUEUE_AFTER
    if args.requeue_after is not None:
        REQUEUE_AFTER = timedelta(seconds=args.requeue_after)
    names = list(SCENARIOS) if args.scenario == "all" else [args.scenario]
    log(f"seed {args.seed}; scenarios {', '.join(names)}; {args.deliveries} letters each")
    outcomes: list[Outcome] = []
    tmp = tempfile.mkdtemp(prefix="dispatch-chaos-")
    try:
        for name in names:
            log(f"[bold]scenario {name}[/bold]")
            try:
                outcomes.append(SCENARIOS[name](args, Path(tmp), rng))
            except Exception as exc:  # noqa: BLE001 - the other scenarios still run
                log(f"[red]scenario {name} broke: {type(exc).__name__}: {exc}[/red]")
                broken = Outcome(name, notes=[f"scenario broke: {type(exc).__name__}: {exc}"], timed_out=True)
                outcomes.append(broken)
    finally:
        if args.keep:
            log(f"work dir kept: {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    print_table(outcomes)
    if args.record:
        record(args, outcomes)
    return 0 if all(verdict(o) == "ok" for o in outcomes) else 1


if __name__ == "__main__":
    raise SystemExit(main())
