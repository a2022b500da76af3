"""Dead letters: queue messages dramatiq gave up on, recorded in the ledger.

dramatiq retries an actor that raised (``MAX_RETRIES`` = 3, i.e. four runs in all); after the
last it *nacks* the message, and the Redis broker moves it from the queue to the dead-letter
queue: the sorted set ``<namespace>:<queue>.XQ`` (message ids scored by the time they died) and
the hash ``<namespace>:<queue>.XQ.msgs`` (id → encoded message). Redis deletes them after
``dead_message_ttl`` (30 days, ``queue/broker.py``). Sending failures never get there — they
are recorded and retried from the ledger — so a dead letter means the actor itself crashed
four times, and the likely cause is the database being unreachable.

Two recorders, idempotent on dramatiq's ``message_id``:

* :class:`DeadLetters`, a dramatiq middleware on the worker's broker, records the message right
  after the nack (``after_nack``). Its write fails when the database is what broke;
* :class:`DeadLetterSweep`, run by the reconciler's housekeeping, reads the dead-letter queue in
  Redis and records whatever is missing.

Whichever records a dead letter first logs one ``delivery.dead_lettered`` event (ids, actor,
exception type: no personal data; the actor only ever gets a delivery id). The delivery itself
never depended on the message: a dead letter whose delivery is still ``queued`` is made due
again (``Ledger.record_dead_letters``), and the reconciler sends it.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any

from dramatiq import Broker, Message, Middleware
from dramatiq.broker import MessageProxy

from dispatcher.ledger.models import utcnow
from dispatcher.ledger.store import Ledger
from dispatcher.logging import get_logger
from dispatcher.queue.actors import QUEUE

log = get_logger("dispatcher.deadletters")

#: the reason kept in the ledger: the exception's type and first line, this long at most
REASON_MAX = 300
#: messages read from Redis per round trip in the sweep
SWEEP_BATCH = 200


def _clip(text: str) -> str:
    text = text.strip()
    return text if len(text) <= REASON_MAX else text[: REASON_MAX - 1] + "…"


def reason_of_exception(exc: BaseException) -> str:
    """``module.Type: first line of the text``, as the last line of a traceback has it."""
    lines = "".join(traceback.format_exception_only(type(exc), exc)).splitlines()
    return _clip(lines[0] if lines else type(exc).__name__)


def reason_of_traceback(text: str | None) -> str | None:
    """The exception line of a formatted traceback (dramatiq keeps one in the message's options).

    It is the first unindented line after the last frame (``  File "…"`` and its indented source
    and caret lines); the exception's own text may run on over several lines, indented or not."""
    if not text:
        return None
    lines = text.rstrip().splitlines()
    frames = [i for i, line in enumerate(lines) if line.startswith('  File "')]
    i = frames[-1] + 1 if frames else 0
    while i < len(lines) and (not lines[i].strip() or lines[i][:1].isspace()):
        i += 1
    return _clip(lines[i] if i < len(lines) else lines[-1])


def _error_type(reason: str | None) -> str | None:
    """The exception's class name alone, for the log (its text may quote SQL and parameters)."""
    if not reason:
        return None
    head = reason.split(":", 1)[0].strip()
    return head.rsplit(".", 1)[-1] or None


def dead_letter_row(message: Message | MessageProxy, failed_at: datetime, reason: str | None) -> dict[str, Any]:
    args = message.args or ()
    return {
        "message_id": message.message_id,
        "delivery_id": str(args[0])[:40] if args else None,
        "queue": message.queue_name.removesuffix(".DQ").removesuffix(".XQ"),
        "actor": message.actor_name,
        "reason": reason,
        "failed_at": failed_at,
    }


def log_dead_letter(row: dict[str, Any], *, recorded_by: str, retries: Any = None) -> None:
    log.error(
        "delivery.dead_lettered",
        message_id=row["message_id"],
        delivery=row["delivery_id"],
        queue=row["queue"],
        actor=row["actor"],
        error=_error_type(row["reason"]),
        retries=retries,
        failed_at=row["failed_at"].isoformat(),
        recorded_by=recorded_by,
    )


class DeadLetters(Middleware):
    """Records every message the worker's broker dead-letters, right after the nack."""

    def __init__(self, ledger: Ledger, clock: Callable[[], datetime] = utcnow):
        self.ledger = ledger
        self.clock = clock

    def after_nack(self, broker: Broker, message: MessageProxy) -> None:
        exc = getattr(message, "_exception", None)
        reason = reason_of_exception(exc) if exc is not None else reason_of_traceback(message.options.get("traceback"))
        row = dead_letter_row(message, self.clock(), reason)
        try:
            new = self.ledger.housekeeping.record_dead_letters([row], self.clock())
        except Exception as write_error:  # noqa: BLE001 - most likely the very outage that killed it
            log.warning(
                "dead_letter.not_recorded",
                message_id=row["message_id"],
                delivery=row["delivery_id"],
                error=type(write_error).__name__,
                note="the reconciler's sweep records it from Redis",
            )
            return
        if new:
            log_dead_letter(row, recorded_by="worker", retries=message.options.get("retries"))


class DeadLetterSweep:
    """Records the dead letters in Redis that the ledger does not have yet.

    Remembers (in memory) the Redis ids it has reconciled, so that each run reads only the ids
    of the dead-letter queue and fetches the messages of new ones; the first run of a process
    reads them all once.
    """

    def __init__(
        self,
        client: Any,
        namespace: str,
        ledger: Ledger,
        *,
        queues: Iterable[str] = (QUEUE,),
        clock: Callable[[], datetime] = utcnow,
    ):
        self.client = client
        self.namespace = namespace
        self.ledger = ledger
        self.queues = tuple(queues)
        self.clock = clock
        self._seen: dict[str, set[str]] = {queue: set() for queue in self.queues}

    @classmethod
    def for_broker(cls, broker: Any, ledger: Ledger, **kwargs: Any) -> DeadLetterSweep | None:
        """A sweep of ``broker``'s dead-letter queues; None for brokers that are not Redis."""
        client, namespace = getattr(broker, "client", None), getattr(broker, "namespace", None)
        if client is None or namespace is None:
            return None
        return cls(client, namespace, ledger, **kwargs)

    def xq_key(self, queue: str) -> str:
        return f"{self.namespace}:{queue}.XQ"

    def run(self) -> int:
        """One sweep of every queue; returns how many dead letters were newly recorded."""
        return sum(self._sweep(queue) for queue in self.queues)

    def _sweep(self, queue: str) -> int:
        key = self.xq_key(queue)
        entries = {_text(rid): score for rid, score in self.client.zrange(key, 0, -1, withscores=True)}
        seen = self._seen[queue]
        seen.intersection_update(entries)  # forget what Redis has expired
        fresh = [rid for rid in entries if rid not in seen]
        recorded = 0
        for start in range(0, len(fresh), SWEEP_BATCH):
            batch = fresh[start : start + SWEEP_BATCH]
            rows: list[dict[str, Any]] = []
            retries: dict[str, Any] = {}
            for rid, data in zip(batch, self.client.hmget(f"{key}.msgs", batch), strict=True):
                if data is None:  # expired between the two reads
                    continue
                try:
                    message = Message.decode(data)
                except Exception as exc:  # noqa: BLE001 - not ours to fix; say so once
                    log.warning("dead_letter.unreadable", queue=queue, redis_id=rid, error=type(exc).__name__)
                    continue
                failed_at = datetime.fromtimestamp(entries[rid] / 1000, UTC)
                # The stored message is the one the last run fetched: its traceback is the one
                # before the last (dramatiq updates options in memory only); same cause in practice.
                row = dead_letter_row(message, failed_at, reason_of_traceback(message.options.get("traceback")))
                rows.append(row)
                retries[row["message_id"]] = message.options.get("retries")
            new = set(self.ledger.housekeeping.record_dead_letters(rows, self.clock()))
            for row in rows:
                if row["message_id"] in new:
                    log_dead_letter(row, recorded_by="sweep", retries=retries.get(row["message_id"]))
            recorded += len(new)
            seen.update(batch)
        return recorded


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
