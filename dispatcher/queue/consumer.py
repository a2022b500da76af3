"""dramatiq's Redis consumer, fetching in batches and acknowledging in batches.

dramatiq's own consumer tops its prefetch up whenever a single message is done, and each
acknowledgement is a script call of its own, made by the worker thread that just finished. At
steady state that is two Redis round trips per letter (a fetch of one message, an ack of one),
about a tenth of a worker's CPU per letter. This consumer:

* fetches only once at most half of its prefetch is left (``low_water``), and then tops up to
  the full prefetch, so one fetch carries several messages; while more than that is in hand it
  waits to be woken by an ack instead of polling;
* keeps acknowledgements in :class:`PendingAcks` and sends them in one script call, from the
  consumer thread, before each fetch and whenever it has nothing to hand on; they are therefore
  at most one fetch, or ``timeout`` (the worker's 250 ms), late. Once the consumer is stopped or
  closed, acks go out at once again, so a stopping worker leaves nothing behind.

Why this keeps the delivery contract: an ack only says "do not redeliver". A message whose ack
was still pending when its worker died is redelivered to another worker once the heartbeat
times out, exactly like a message the dead worker was processing, and the ledger's claim makes
it do nothing (its letter is no longer waiting). The script removes a message exactly as
dramatiq's ``ack`` command does (out of the worker's ack set, then its data), so the stranded
message sweep (strays.py) and the queue metrics see the same keys.

Pending acks belong to the broker, per queue, not to one consumer: dramatiq builds a new
consumer after a connection error, and the new one sends what the old could not.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import redis
from dramatiq import Message
from dramatiq.broker import MessageProxy
from dramatiq.brokers.redis import RedisBroker, _RedisConsumer
from dramatiq.common import compute_backoff
from dramatiq.errors import ConnectionClosed

from dispatcher.logging import get_logger

log = get_logger("dispatcher.worker")

#: KEYS: the worker's ack set for the queue, the queue's messages hash; ARGV: message ids.
#: What dramatiq's dispatch script does for "ack", once per id.
_ACK_MANY = """
local acked = 0
for i = 1, #ARGV do
    if redis.call("srem", KEYS[1], ARGV[i]) > 0 then
        redis.call("hdel", KEYS[2], ARGV[i])
        acked = acked + 1
    end
end
return acked
"""


class PendingAcks:
    """Acknowledgements of one queue's messages not yet sent to Redis. Thread-safe: worker threads
    add, the consumer thread sends."""

    def __init__(self, broker: RedisBroker, queue_name: str, script: Any) -> None:
        self._keys = [
            f"{broker.namespace}:__acks__.{broker.broker_id}.{queue_name}",
            f"{broker.namespace}:{queue_name}.msgs",
        ]
        self._script = script
        self._ids: dict[str, None] = {}  # ordered and free of repeats (an ack retried by dramatiq)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._ids)

    def add(self, redis_message_id: str) -> None:
        with self._lock:
            self._ids[redis_message_id] = None

    def send(self) -> None:
        """Send every pending ack in one call; on a connection error they stay pending and
        ``ConnectionClosed`` is raised, as dramatiq's own ack raises it."""
        with self._lock:
            if not self._ids:
                return
            ids, self._ids = list(self._ids), {}
        try:
            self._script(keys=self._keys, args=ids)
        except redis.ConnectionError as exc:
            with self._lock:
                self._ids = dict.fromkeys(ids) | self._ids
            raise ConnectionClosed(exc) from None


class BatchingConsumer(_RedisConsumer):
    """A consumer of one queue; see the module's docstring."""

    broker: BatchingRedisBroker

    def __init__(self, broker: BatchingRedisBroker, queue_name: str, prefetch: int, timeout: int) -> None:
        super().__init__(broker, queue_name, prefetch, timeout)
        self.low_water = prefetch // 2
        self.acks = broker.pending_acks(queue_name)
        self.batching = True
        self._room = threading.Event()

    def ack(self, message: MessageProxy) -> None:
        self.acks.add(message.options["redis_message_id"])
        self.queued_message_ids.discard(message.message_id)
        if not self.batching:
            self.acks.send()
        elif self.outstanding_message_count <= self.low_water:
            self._room.set()

    def nack(self, message: MessageProxy) -> None:
        super().nack(message)
        self._room.set()

    def stop_batching(self) -> None:
        """Send what is pending; from now on every ack goes out at once (the consumer thread,
        which would have sent them, is stopping)."""
        self.batching = False
        self.acks.send()

    def close(self) -> None:
        try:
            self.stop_batching()
        except ConnectionClosed as exc:
            # Still pending in the broker: a consumer built after the reconnect sends them; if
            # the process ends first, they are redelivered and the ledger's claim skips them.
            log.warning("worker.acks_pending", queue=self.queue_name, acks=len(self.acks), error=str(exc))
        super().close()

    def __next__(self) -> MessageProxy | None:
        try:
            while True:
                if self.message_cache:
                    data = self.message_cache.pop(0)
                    if data is None:  # dramatiq's own consumer skips these too (its issue #266)
                        continue
                    self.misses = 0
                    message = Message.decode(data)
                    self.queued_message_ids.add(message.message_id)
                    return MessageProxy(message)

                outstanding = self.outstanding_message_count
                if outstanding <= self.low_water:
                    self.acks.send()
                    self.message_cache = self.broker.do_fetch(self.queue_name, self.prefetch - outstanding)
                    if self.message_cache:
                        continue
                    # The queue is empty: poll less and less often, up to the idle timeout.
                    self.misses, backoff_ms = compute_backoff(self.misses, max_backoff=self.timeout)
                    time.sleep(backoff_ms / 1000)
                    return None

                # Enough in hand: wait for the threads to work it down (an ack wakes us).
                self._room.clear()
                if self.outstanding_message_count > self.low_water:
                    self._room.wait(self.timeout / 1000)
                if self.outstanding_message_count > self.low_water:
                    # Every thread busy for a while (slow sends): acks must not wait for them.
                    self.acks.send()
                    return None
        except redis.ConnectionError as exc:
            raise ConnectionClosed(exc) from None


class BatchingRedisBroker(RedisBroker):
    """dramatiq's Redis broker with :class:`BatchingConsumer` as its consumer."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._ack_many = self.client.register_script(_ACK_MANY)
        self._pending: dict[str, PendingAcks] = {}
        self._pending_lock = threading.Lock()

    @property
    def consumer_class(self) -> type[BatchingConsumer]:
        return BatchingConsumer

    def pending_acks(self, queue_name: str) -> PendingAcks:
        with self._pending_lock:
            found = self._pending.get(queue_name)
            if found is None:
                found = self._pending[queue_name] = PendingAcks(self, queue_name, self._ack_many)
            return found
