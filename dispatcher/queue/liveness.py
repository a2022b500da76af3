"""Workers' liveness, as the reconciler sees it: a worker that dies mid-send gets its claims taken
back within a minute, not after the stale-claim timeout (the actor's 10-minute time limit plus a
minute, which must stay that long because a live worker may legitimately send for that long).

A redelivered message cannot claim a letter in ``sending``, and a claim says nothing about whether
its worker still runs. So each worker process says so itself, in Redis:

* ``<ns>:worker:<worker id>`` — a key with a TTL (``DISPATCH_WORKER_LIVENESS_SECONDS``, 30 s),
  set again every sixth of it (5 s) by a daemon thread of the worker (:class:`Heartbeat`) from
  start until its clean stop has handed its claims back; then it is deleted;
* ``<ns>:workers`` — the set of worker ids that keep such a key. Only a registered worker can be
  seen dead: a claim by a worker that predates liveness (a rolling upgrade) has no key, and its
  claims are left to the stale-claim timeout rather than taken from a live worker.

The reconciler (:class:`DeadWorkers`) looks every sixth of the TTL; a registered worker whose key
is gone on two looks in a row is dead: its claims go back to ``planned`` (due now,
``Lifecycle.release_claims(workers=...)``), the reconciler's next tick puts them on the queue, and
it is struck from the set. With production defaults a worker killed at ``t`` has its key expire
by ``t + 30 s``, is seen dead by ``t + 42 s`` at the latest, and its letters are queued a tick later.

Redis itself going away must not look like every worker dying. A look that fails forgets what
earlier looks saw; and until Redis has been up for a whole TTL no worker is judged, so that after
a restart every live worker has had time to reconnect and set its key again (a Redis without
persistence lost them all; one with AOF may have let them expire while it was down). The price:
a worker that dies while Redis is restarted without its data is no longer in the set, and its
claims wait for the stale-claim timeout, which stays as the backstop.

Why a key per worker rather than dramatiq's heartbeats (``__heartbeats__``): those name broker
instances, not the worker ids the ledger's claims carry, and the intake and reconciler processes
heartbeat there too.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import redis

from dispatcher.logging import get_logger

log = get_logger("dispatcher.liveness")

#: a worker sets its key this many times per TTL: it can miss several renewals (a stalled Redis
#: answers within the client's 10 s socket timeout) before the key lapses
RENEWALS_PER_TTL = 6


def worker_key(namespace: str, worker_id: str) -> str:
    return f"{namespace}:worker:{worker_id}"


def registry_key(namespace: str) -> str:
    return f"{namespace}:workers"


class Heartbeat:
    """A worker process's liveness key, kept set while the process runs."""

    def __init__(self, client: redis.Redis, namespace: str, worker_id: str, ttl_seconds: float):
        self.client = client
        self.namespace = namespace
        self.worker_id = worker_id
        self.ttl_seconds = ttl_seconds
        self.every = ttl_seconds / RENEWALS_PER_TTL
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing = False

    @property
    def key(self) -> str:
        return worker_key(self.namespace, self.worker_id)

    def beat(self) -> bool:
        """Set the key (again: a Redis that restarted may have lost it) and the registration;
        False when Redis does not answer."""
        try:
            pipe = self.client.pipeline(transaction=True)
            pipe.set(self.key, self.worker_id, px=int(self.ttl_seconds * 1000))
            pipe.sadd(registry_key(self.namespace), self.worker_id)
            pipe.execute()
        except redis.RedisError as exc:
            if not self._failing:
                # Once per outage: past the TTL the reconciler may take this worker's claims back.
                log.warning("worker.liveness_unknown", worker=self.worker_id, error=type(exc).__name__)
            self._failing = True
            return False
        if self._failing:
            log.info("worker.liveness_renewed", worker=self.worker_id)
        self._failing = False
        return True

    def start(self) -> None:
        """Register now (before the first claim can be taken), then renew in a daemon thread."""
        if self._thread is not None:
            return
        self.beat()
        self._thread = threading.Thread(target=self._run, name="worker-liveness", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            try:
                self.beat()
            except Exception as exc:  # noqa: BLE001 - this thread must outlive anything: it is the process's pulse
                log.warning("worker.liveness_failed", worker=self.worker_id, error=type(exc).__name__)

    def stop(self) -> None:
        """Stop renewing and delete the key: called once the worker's claims are handed back, so
        the reconciler has nothing to release and no reason to wait for the key to lapse."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.every + 1)
        try:
            pipe = self.client.pipeline(transaction=True)
            pipe.delete(self.key)
            pipe.srem(registry_key(self.namespace), self.worker_id)
            pipe.execute()
        except redis.RedisError as exc:
            # The key lapses on its own; the reconciler then finds no claim to release.
            log.warning("worker.liveness_not_withdrawn", worker=self.worker_id, error=type(exc).__name__)


class DeadWorkers:
    """The reconciler's view: which registered workers stopped renewing their key."""

    def __init__(
        self,
        client: redis.Redis,
        namespace: str,
        *,
        ttl_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.client = client
        self.namespace = namespace
        #: seconds between the reconciler's looks; two in a row must miss a worker's key
        self.every = ttl_seconds / RENEWALS_PER_TTL
        #: Redis must have been up this long before anyone is judged (see the module docstring)
        self.grace_seconds = ttl_seconds
        self.clock = clock
        #: worker id → when its key was first seen missing
        self._missing: dict[str, float] = {}

    @classmethod
    def for_broker(cls, broker: Any, *, ttl_seconds: float) -> DeadWorkers | None:
        """For a dramatiq RedisBroker; None for any other broker (tests' stubs)."""
        from dramatiq.brokers.redis import RedisBroker

        if not isinstance(broker, RedisBroker):
            return None
        return cls(broker.client, broker.namespace, ttl_seconds=ttl_seconds)

    def look(self) -> list[str]:
        """One look; the workers seen dead: registered, and their key missing on this look and on
        an earlier one. Raises redis.RedisError, having forgotten earlier looks."""
        try:
            uptime = float(self.client.info("server")["uptime_in_seconds"])
            workers = sorted(_text(w) for w in self.client.smembers(registry_key(self.namespace)))
            pipe = self.client.pipeline(transaction=False)
            for worker in workers:
                pipe.exists(worker_key(self.namespace, worker))
            present = pipe.execute()
        except redis.RedisError:
            self._missing.clear()
            raise
        if uptime < self.grace_seconds:
            self._missing.clear()
            return []
        now = self.clock()
        self._missing = {
            worker: self._missing.get(worker, now) for worker, there in zip(workers, present, strict=True) if not there
        }
        # The reconciler looks every ``every`` seconds; half of it keeps two looks made in quick
        # succession (by a caller other than the reconciler's loop) from counting as two.
        return [worker for worker, since in self._missing.items() if now - since >= self.every / 2]

    def forget(self, workers: Iterable[str]) -> None:
        """Strike workers whose claims were released from the set (once the ledger has it)."""
        gone = list(workers)
        if not gone:
            return
        self.client.srem(registry_key(self.namespace), *gone)
        for worker in gone:
            self._missing.pop(worker, None)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
