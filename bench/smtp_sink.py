"""A counting SMTP sink for the benchmarks: accepts every message, keeps none.

Runs in a process of its own so that its CPU time is not charged to the process being
measured. It counts messages and distinct Message-IDs (duplicates = messages - distinct) and
publishes the counts as one JSON object, rewritten atomically every 0.2 s and once more on
exit, in the ``--status`` file::

    {"messages": 5000, "distinct": 5000, "duplicates": 0, "no_message_id": 0,
     "first": 1718000000.12, "last": 1718000012.34, "pid": 1234, "cpu_s": 3.1}

``first``/``last`` are the wall-clock times (time.time()) at which the first and the last
message were accepted. Usage (the benchmark starts it for you)::

    .venv/bin/python bench/smtp_sink.py --port 2600 --status /tmp/sink.json

SIGTERM or SIGINT stops it; it also stops by itself after ``--max-seconds`` (default 1 hour),
and when the process that started it goes away (``--parent PID``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import threading
import time
from pathlib import Path

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session


class CountingHandler:
    def __init__(self) -> None:
        self.messages = 0
        self.no_message_id = 0
        self.seen: set[bytes] = set()
        self.first: float | None = None
        self.last: float | None = None

    async def handle_EHLO(
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str, responses: list[str]
    ) -> list[str]:
        # PIPELINING, as smtp-sink and real relays offer it (dispatcher.sandbox.smtp's reasons)
        session.host_name = hostname
        return [*responses[:-1], "250-PIPELINING", responses[-1]]

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        now = time.time()
        content = envelope.original_content or b""
        message_id = _message_id(content)
        if message_id is None:
            self.no_message_id += 1
        else:
            self.seen.add(message_id)
        self.messages += 1
        if self.first is None:
            self.first = now
        self.last = now
        return f"250 2.0.0 Ok: queued as S{self.messages}"

    def status(self) -> dict[str, object]:
        distinct = len(self.seen)
        cpu = os.times()
        return {
            "messages": self.messages,
            "distinct": distinct,
            "duplicates": self.messages - self.no_message_id - distinct,
            "no_message_id": self.no_message_id,
            "first": self.first,
            "last": self.last,
            "pid": os.getpid(),
            "cpu_s": round(cpu.user + cpu.system, 3),
        }


def _message_id(content: bytes) -> bytes | None:
    """The Message-ID header's value, found in the header block without parsing the message."""
    head = content.split(b"\r\n\r\n", 1)[0]
    lower = head.lower()
    at = lower.find(b"\nmessage-id:")
    if at < 0:
        if not lower.startswith(b"message-id:"):
            return None
        start = len(b"message-id:")
    else:
        start = at + len(b"\nmessage-id:")
    end = head.find(b"\r\n", start)
    value = head[start : end if end >= 0 else len(head)]
    # a folded header continues on lines starting with white space
    while end >= 0 and head[end + 2 : end + 3] in (b" ", b"\t"):
        nxt = head.find(b"\r\n", end + 2)
        value += head[end + 2 : nxt if nxt >= 0 else len(head)]
        end = nxt
    return value.strip() or None


def _write_status(path: Path, status: dict[str, object]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(status))
    os.replace(tmp, path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--status", type=Path, required=True, help="JSON status file, rewritten every 0.2 s")
    parser.add_argument("--max-seconds", type=float, default=3600.0, help="stop by itself after this long")
    parser.add_argument("--parent", type=int, default=None, help="stop when this process is gone")
    args = parser.parse_args()
    # aiosmtpd logs every connection at INFO: keep that out of the measurement.
    logging.getLogger("mail.log").setLevel(logging.WARNING)

    handler = CountingHandler()
    controller = Controller(
        handler,
        hostname=args.host,
        port=args.port,
        server_hostname="sink.invalid",  # no reverse DNS lookup per connection
        ident="bench sink (keeps nothing)",
        ready_timeout=10.0,
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    controller.start()
    deadline = time.monotonic() + args.max_seconds
    try:
        _write_status(args.status, handler.status() | {"ready": True})
        while not stop.wait(0.2):
            # The counters are only changed on the controller's loop thread; reading them
            # here may lag by one message, which the next write corrects.
            _write_status(args.status, handler.status() | {"ready": True})
            if time.monotonic() > deadline:
                break
            if args.parent is not None and os.getppid() != args.parent:
                break
    finally:
        controller.stop()
        _write_status(args.status, handler.status() | {"ready": True, "stopped": True})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
