"""Does stopping Redis strand messages in a live consumer's dramatiq ack set? (docs/chaos.md, finding 2)

One consumer fetches in a loop (``broker.consume(...)``, prefetch 8, our broker settings) from a
queue of 20,000 messages on a private ``redis-server`` with AOF; at a random moment Redis is
stopped with SIGTERM, the consumer's error is noted, Redis is started again on the same data, and
the broker's ack set is compared with the messages the consumer actually received. A message in
the ack set that the consumer never received is stranded: Redis ran the fetch (and wrote it to the
AOF) but its reply never arrived.

    .venv/bin/python bench/chaos/lost_reply.py [--runs 10]
"""

from __future__ import annotations

import argparse
import random
import secrets
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import cast

ROOT = Path(__file__).resolve().parent.parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import redis  # noqa: E402
from dramatiq import Message  # noqa: E402

from dispatcher.queue.actors import ACTOR, QUEUE  # noqa: E402
from dispatcher.queue.broker import make_broker  # noqa: E402
from dispatcher.queue.consumer import BatchingConsumer  # noqa: E402
from dispatcher.settings import Settings  # noqa: E402
from tests.support.services import RedisServer  # noqa: E402


def one_run(n: int, messages: int) -> tuple[int, int, int, str]:
    """(received, in the ack set, stranded, the consumer's error)."""
    tmp = Path(tempfile.mkdtemp(prefix="lost-reply-"))
    with RedisServer(appendonly=True) as server:
        settings = Settings(
            config_dir=tmp,
            templates_dir=tmp,
            var_dir=tmp,
            database_url="sqlite://",
            redis_url=server.url,
            redis_namespace=f"lost-{secrets.token_hex(3)}",
        )
        broker = make_broker(settings)
        broker.declare_queue(QUEUE)
        pipe_broker = make_broker(settings)
        for i in range(messages):
            pipe_broker.enqueue(Message(queue_name=QUEUE, actor_name=ACTOR, args=(f"d{n}-{i}",), kwargs={}, options={}))
        received: set[str] = set()
        error: list[str] = []

        def consume() -> None:
            consumer = broker.consume(QUEUE, prefetch=8)
            assert isinstance(consumer, BatchingConsumer)
            while True:
                try:
                    message = next(consumer)
                except Exception as exc:  # noqa: BLE001 - the point of the exercise
                    error.append(f"{type(exc).__name__}: {exc}")
                    return
                if message is None:
                    continue
                received.add(message.options["redis_message_id"])
                # not acknowledged (everything stays in the ack set), but not counted as outstanding
                consumer.queued_message_ids.discard(message.message_id)

        thread = threading.Thread(target=consume, daemon=True)
        thread.start()
        time.sleep(random.uniform(0.2, 0.6))
        server.stop()  # SIGTERM: AOF flushed
        thread.join(timeout=60)
        server.start()
        client = redis.Redis.from_url(server.url)
        key = f"{settings.redis_namespace}:__acks__.{broker.broker_id}.{QUEUE}"
        acks = {m.decode() for m in cast(set[bytes], client.smembers(key))}
        client.close()
    return len(received), len(acks), len(acks - received), error[0] if error else "no error"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--messages", type=int, default=20_000)
    args = parser.parse_args()
    stranded_runs = 0
    for n in range(args.runs):
        received, acked, stranded, error = one_run(n, args.messages)
        stranded_runs += stranded > 0
        print(f"run {n + 1}: received {received}, in the ack set {acked}, stranded {stranded}; consumer: {error}")
    print(f"runs that stranded messages in the live consumer's ack set: {stranded_runs} of {args.runs}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
