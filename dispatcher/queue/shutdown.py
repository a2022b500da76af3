"""Stopping a worker without stranding letters.

dramatiq's own ``Worker.stop`` waits for the worker threads, *then* stops the consumers and puts
the prefetched messages back; while it waits, the consumers go on fetching. With a slow send in
flight that leaves up to ``2 × threads`` unstarted letters in a stopping process for as long as
the send takes, and whatever it still holds when the process exits stays in its Redis ack set
until the heartbeat timeout and maintenance hand it to another worker. A letter still being sent
at the end keeps its ledger claim until the reconciler's stale-claim timeout (11 minutes).

:func:`stop_worker` does it in this order:

1. worker threads take no new message; consumers stop fetching;
2. every unstarted message goes back to Redis at once — the work queue and, through
   :class:`InFlight`'s ``before_consumer_thread_shutdown``, messages a Redis consumer had fetched
   but not yet handed on (dramatiq drops those on the floor until maintenance requeues them);
3. in-flight letters get up to ``timeout`` to finish and be recorded, while the process keeps
   its heartbeat in Redis (so nobody else takes its messages meanwhile);
4. what is still in flight then is *handed back*: the ledger claims this worker still holds in
   ``sending`` go to ``queued`` (compare-and-set on state and claimant), a fresh message goes on
   the queue for each, and the old message is acknowledged — another worker sends the letter at
   once instead of after the stale-claim timeout;
5. dramatiq's ``Worker.stop`` closes the consumers (and returns its in-memory delayed retries).

The price of step 4: a letter handed back mid-send may already have reached the relay (the
send carried on past the hand-back, or the relay had queued the message and not yet answered
DATA), so it can arrive twice — once per hand-back, with the same Message-ID, as with a worker
killed mid-send. Raise ``--shutdown-timeout`` to make that rarer.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from dramatiq import Broker, Message, Middleware
from dramatiq.broker import MessageProxy
from dramatiq.common import iter_queue

from dispatcher.ledger.models import utcnow
from dispatcher.ledger.store import Ledger
from dispatcher.logging import get_logger
from dispatcher.queue.actors import QUEUE, EnqueueFailed, Enqueuer

log = get_logger("dispatcher.worker")

#: how long a stopping worker waits for its in-flight letters before handing them back
DEFAULT_SHUTDOWN_TIMEOUT_S = 60.0
#: heartbeat while waiting; well under the broker's heartbeat timeout (20 s)
HEARTBEAT_EVERY_S = 5.0


class InFlight(Middleware):
    """Which message each worker thread is processing, and consumer caches handed back on stop."""

    def __init__(self) -> None:
        self._by_thread: dict[int, MessageProxy] = {}
        self._lock = threading.Lock()
        #: unstarted messages handed back from consumer caches at shutdown
        self.cache_returned = 0

    def before_process_message(self, broker: Broker, message: MessageProxy) -> None:
        with self._lock:
            self._by_thread[threading.get_ident()] = message

    def after_process_message(
        self, broker: Broker, message: MessageProxy, *, result: Any = None, exception: BaseException | None = None
    ) -> None:
        with self._lock:
            self._by_thread.pop(threading.get_ident(), None)

    def after_skip_message(self, broker: Broker, message: MessageProxy) -> None:
        self.after_process_message(broker, message)

    def messages(self) -> list[MessageProxy]:
        with self._lock:
            return list(self._by_thread.values())

    def before_consumer_thread_shutdown(self, broker: Broker, thread: Any) -> None:
        """Runs on the consumer's own thread as it stops: a Redis consumer may hold messages it
        fetched (they are in this worker's ack set) but never yielded; put them back now."""
        consumer: Any = getattr(thread, "consumer", None)
        stop_batching = getattr(consumer, "stop_batching", None)
        if stop_batching is not None:
            # Nobody sends batched acks once this thread is gone: the letters still in flight
            # must be acknowledged as they finish.
            try:
                stop_batching()
            except Exception as exc:  # noqa: BLE001 - Redis away: maintenance redelivers them; the claim skips them
                log.warning("worker.acks_pending", error=type(exc).__name__)
        cache = getattr(consumer, "message_cache", None)
        if not cache:
            return
        messages = [MessageProxy(Message.decode(data)) for data in cache if data]
        consumer.message_cache = []
        try:
            thread.requeue_messages(messages)
            with self._lock:
                self.cache_returned += len(messages)
        except Exception as exc:  # noqa: BLE001 - Redis away: maintenance requeues them after the heartbeat timeout
            log.warning("worker.requeue_failed", messages=len(messages), error=type(exc).__name__)


@dataclass
class ShutdownReport:
    seconds: float = 0.0
    #: unstarted messages put back on the queue
    returned: int = 0
    #: letters whose send was still running at the timeout, handed back to the queue
    handed_back: list[str] = field(default_factory=list)
    #: worker threads still running at the end (their sends are abandoned with the process)
    stragglers: int = 0


def stop_worker(
    worker: Any,
    *,
    timeout: float,
    in_flight: InFlight,
    ledger: Ledger,
    enqueuer: Enqueuer,
    worker_id: str,
    hurry: threading.Event | None = None,
    clock: Callable[[], datetime] = utcnow,
) -> ShutdownReport:
    """Stop a started dramatiq ``worker`` as the module docstring says; ``hurry`` set (a second
    signal) cuts the wait for in-flight letters short."""
    started = time.monotonic()
    report = ShutdownReport()
    broker = worker.broker
    log.info("worker.stopping", timeout_s=timeout, in_flight=len(in_flight.messages()))

    # 1. no new work
    for thread in worker.workers:
        thread.stop()
    for consumer in worker.consumers.values():
        consumer.stop()
    for consumer in worker.consumers.values():
        consumer.join(timeout=max(1.0, min(5.0, timeout)))

    # 2. unstarted messages back to Redis now
    report.returned += _requeue_work_queue(worker) + in_flight.cache_returned

    # 3. let in-flight letters finish, keeping our heartbeat
    deadline = started + timeout
    next_beat = time.monotonic() + HEARTBEAT_EVERY_S
    while any(t.is_alive() for t in worker.workers) and time.monotonic() < deadline:
        if hurry is not None and hurry.is_set():
            break
        for thread in worker.workers:
            thread.join(timeout=0.05)
        if time.monotonic() >= next_beat:
            _heartbeat(broker)
            next_beat = time.monotonic() + HEARTBEAT_EVERY_S
        # a thread idle in the work queue's get() may have taken a message after step 2
        report.returned += _requeue_work_queue(worker)

    # 4. hand back what is still in flight
    if any(t.is_alive() for t in worker.workers):
        report.handed_back = _hand_back(worker, in_flight, ledger, enqueuer, worker_id, clock)

    # 5. dramatiq's own close: consumers, delayed retries held in memory
    worker.stop(timeout=100)
    report.stragglers = sum(1 for t in worker.workers if t.is_alive())
    report.seconds = round(time.monotonic() - started, 3)
    log.info(
        "worker.stopped",
        seconds=report.seconds,
        returned=report.returned,
        handed_back=report.handed_back,
        stragglers=report.stragglers,
    )
    return report


def _requeue_work_queue(worker: Any) -> int:
    by_queue: dict[str, list[Any]] = defaultdict(list)
    for item in iter_queue(worker.work_queue):
        by_queue[item.message.queue_name].append(item.message)
        worker.work_queue.task_done()
    returned = 0
    for queue_name, messages in by_queue.items():
        try:
            worker.consumers[queue_name].requeue_messages(messages)
            returned += len(messages)
        except Exception as exc:  # noqa: BLE001 - Redis away: maintenance requeues them later
            log.warning("worker.requeue_failed", queue=queue_name, messages=len(messages), error=type(exc).__name__)
    return returned


def _heartbeat(broker: Any) -> None:
    """Any command of the Redis broker's dispatch script refreshes this worker's heartbeat."""
    do_qsize = getattr(broker, "do_qsize", None) if hasattr(broker, "client") else None
    if do_qsize is None:
        return
    try:
        do_qsize(QUEUE)
    except Exception as exc:  # noqa: BLE001 - Redis away: nothing to keep alive
        log.warning("worker.heartbeat_failed", error=type(exc).__name__)


def _hand_back(
    worker: Any,
    in_flight: InFlight,
    ledger: Ledger,
    enqueuer: Enqueuer,
    worker_id: str,
    clock: Callable[[], datetime],
) -> list[str]:
    now = clock()
    messages = in_flight.messages()
    try:
        released = ledger.lifecycle.hand_back(worker_id, now)
    except Exception as exc:  # noqa: BLE001 - database away: the reconciler's stale-claim release takes over
        log.error("worker.hand_back_failed", step="ledger", error=type(exc).__name__)
        released = []
    if released:
        try:
            enqueuer.send(released)
        except EnqueueFailed as exc:
            # no message: planned, so that the reconciler sends them on its next tick
            ledger.lifecycle.unmark_queued([d for d in released if d not in exc.sent], now)
            log.warning("worker.hand_back_requeue_failed", deliveries=len(released) - len(exc.sent))
    for delivery in released:
        log.warning("delivery.handed_back", delivery=delivery, worker=worker_id, reason="shutdown timeout")
    # The old messages: acknowledged where a fresh one replaced them, else back on the queue (a
    # thread that had not claimed yet, or had just recorded its letter: harmless either way).
    for message in messages:
        consumer = worker.consumers.get(message.queue_name)
        if consumer is None or consumer.consumer is None:
            continue
        try:
            if message.args and message.args[0] in released:
                consumer.consumer.ack(message)
            else:
                consumer.requeue_messages([message])
        except Exception as exc:  # noqa: BLE001 - Redis away: maintenance requeues it; the claim decides
            log.warning("worker.requeue_failed", messages=1, error=type(exc).__name__)
    return released
