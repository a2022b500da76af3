"""The naive worker bench/throughput.py compares the dispatcher's worker path with (issue 11).

What someone would write first: a dramatiq actor that builds each letter with the standard
library (``email.message.EmailMessage``: the same headers as our letters, the same text and
HTML bodies) and sends it with ``smtplib`` over a new connection each time. No ledger, no
caps, no send window, no retries: only what a letter needs to leave.

The bench renders one letter per target with the real templates beforehand and writes them
to the JSON file ``NAIVE_LETTERS`` names (the supporter's name stands in for a placeholder,
so each letter's body is the same size as ours). Environment:

    NAIVE_REDIS_URL   the bench's private redis-server
    NAIVE_NAMESPACE   the dramatiq namespace of this run (never the pipeline's)
    NAIVE_LETTERS     the letters' JSON file
    NAIVE_SINK        host:port of the SMTP sink

Worker (what the bench starts, with the pipeline's processes × threads)::

    dramatiq naive_actor --path bench --processes 2 --threads 4 --queues naive

Enqueue (the bench does it before starting the workers)::

    python bench/naive_actor.py --enqueue 3000
"""

from __future__ import annotations

import argparse
import json
import os
import smtplib
import time
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from pathlib import Path
from typing import Any

import dramatiq
from dramatiq.brokers.redis import RedisBroker

QUEUE = "naive"

broker = RedisBroker(url=os.environ["NAIVE_REDIS_URL"], namespace=os.environ["NAIVE_NAMESPACE"])
dramatiq.set_broker(broker)


def _letters() -> dict[str, Any]:
    return dict(json.loads(Path(os.environ["NAIVE_LETTERS"]).read_text()))


LETTERS = _letters()
PLACEHOLDER = LETTERS["placeholder"]
SINK_HOST, _, SINK_PORT = os.environ["NAIVE_SINK"].rpartition(":")


@dramatiq.actor(queue_name=QUEUE, max_retries=0)
def send_letter(target: int, supporter_name: str, supporter_email: str) -> None:
    letter = LETTERS["targets"][target]
    msg = EmailMessage()
    msg["From"] = f"{supporter_name} via {LETTERS['sender_name']} <{LETTERS['sender_address']}>"
    msg["To"] = f"{letter['to_name']} <{letter['to_address']}>"
    msg["Reply-To"] = f"{supporter_name} <{supporter_email}>"
    msg["Subject"] = letter["subject"]
    msg["Date"] = format_datetime(datetime.now(UTC))
    msg["Message-ID"] = make_msgid(domain=LETTERS["domain"])
    msg.set_content(letter["text"].replace(PLACEHOLDER, supporter_name))
    msg.add_alternative(letter["html"].replace(PLACEHOLDER, supporter_name), subtype="html")
    msg["Content-Language"] = "en"
    with smtplib.SMTP(SINK_HOST, int(SINK_PORT), local_hostname="localhost", timeout=30) as smtp:
        smtp.send_message(msg, from_addr=LETTERS["envelope"], to_addrs=[letter["to_address"]])


def enqueue(count: int) -> float:
    """``count`` messages on the queue, round robin over the targets; seconds it took."""
    started = time.perf_counter()
    targets = len(LETTERS["targets"])
    for i in range(count):
        send_letter.send(i % targets, f"Supporter {i // targets} Example", f"supporter-naive-{i}@example.net")
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description="Enqueue the naive actor's messages.")
    parser.add_argument("--enqueue", type=int, required=True, help="messages to put on the queue")
    args = parser.parse_args()
    seconds = enqueue(args.enqueue)
    print(json.dumps({"enqueued": args.enqueue, "seconds": round(seconds, 3)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
