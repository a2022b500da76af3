"""What a worker process pays to send a letter from its threads (issue 11): through the SMTP
pool, as the worker does, against a bare blocking client that does only what must be done.

Several threads (a worker's, default 4) each send their share of the messages to Postfix's
``smtp-sink``, one after another, and the CPU of the whole process is divided by the messages:

* **the pool**: what ``DeliveryProcessor`` does. Each thread takes a send-window ticket, calls
  ``SmtpPool.send`` (blocking, in the thread; it pipelines MAIL, RCPT and DATA: smtp-sink
  offers PIPELINING) and closes the ticket when the send returns, as after recording ``sent``;
* **bare blocking sockets**: each thread has its own connection and sends the same pipelined
  transaction (MAIL + RCPT + DATA in one write, the message once 354 is in), the window a
  ``threading.Lock`` taken before the message and given back after the 250.

The second is a measuring stick, not a client: no error handling, no timeouts, no TLS, no
reply parsing beyond the codes. Until session 13 the pool ran on the worker's event loop; the
same bench then measured 215 µs a message through the loop against 48 for this stick
(docs/benchmarks.md). The modes alternate within each round; medians and ratios are printed.

    .venv/bin/python bench/worker_send_cost.py [--messages 4000] [--threads 4] [--rounds 3]
"""

from __future__ import annotations

import argparse
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().parent
for path in (ROOT, BENCH):
    if str(path) not in sys.path:
        sys.path.append(str(path))

from smtp_client_cost import RECIPIENT, SENDER, alternate_against_sink, letter  # noqa: E402

from dispatcher.channels.email.pool import SmtpPool, wire_data  # noqa: E402
from dispatcher.logging import configure as configure_logging  # noqa: E402
from dispatcher.queue.window import SendWindow  # noqa: E402


def _in_threads(threads: int, messages: int, send: Callable[[int], None]) -> float:
    """CPU of the process per message, ``send(thread index)`` called ``messages`` times in all."""
    each = messages // threads
    barrier = threading.Barrier(threads + 1)

    def work(index: int) -> None:
        barrier.wait()
        for _ in range(each):
            send(index)

    workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for t in workers:
        t.start()
    started = time.process_time()
    barrier.wait()
    for t in workers:
        t.join()
    return (time.process_time() - started) / (each * threads)


def pooled(port: int, data: bytes, messages: int, threads: int) -> float:
    # the pool's own defaults (size 4, the relay timeout bounding every reply), as a worker's
    pool = SmtpPool("127.0.0.1", port, tls="none", local_hostname="localhost")
    window = SendWindow()
    # every connection opened outside the measurement
    warm = [threading.Thread(target=pool.send, args=(data, SENDER, [RECIPIENT])) for _ in range(threads)]
    for t in warm:
        t.start()
    for t in warm:
        t.join()

    def send(_index: int) -> None:
        pool.send(data, SENDER, [RECIPIENT], window=window.ticket())
        window.close()  # (the worker records `sent` here)

    try:
        return _in_threads(threads, messages, send)
    finally:
        pool.close()


class _Blocking:
    """One thread's connection: replies read from a blocking socket, continuations skipped."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.buffer = b""
        self.read(1)
        self.sock.sendall(b"EHLO localhost\r\n")
        self.read(1)

    def read(self, n: int) -> list[int]:
        codes: list[int] = []
        while len(codes) < n:
            while b"\n" not in self.buffer:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise ConnectionError("smtp-sink closed the connection")
                self.buffer += chunk
            line, self.buffer = self.buffer.split(b"\n", 1)
            if line[3:4] != b"-":
                codes.append(int(line[:3]))
        return codes


def blocking(port: int, data: bytes, messages: int, threads: int) -> float:
    wire = wire_data(data)
    assert wire is not None
    group = f"MAIL FROM:<{SENDER}> SIZE={len(data)}\r\nRCPT TO:<{RECIPIENT}>\r\nDATA\r\n".encode()
    window = threading.Lock()
    connections = [_Blocking(port) for _ in range(threads)]

    def send(index: int) -> None:
        conn = connections[index]
        conn.sock.sendall(group)
        codes = conn.read(3)
        with window:
            conn.sock.sendall(wire)
            codes += conn.read(1)
        if codes != [250, 250, 354, 250]:
            raise RuntimeError(f"smtp-sink answered {codes}")

    try:
        return _in_threads(threads, messages, send)
    finally:
        for conn in connections:
            conn.sock.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=4000, help="messages per mode and round")
    parser.add_argument("--threads", type=int, default=4, help="sending threads (a worker's --threads)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; the modes alternate within each")
    args = parser.parse_args()
    configure_logging("WARNING")
    data = letter()
    modes: dict[str, Callable[[int], float]] = {
        "the pool (the worker's way)": lambda port: pooled(port, data, args.messages, args.threads) * 1e6,
        "bare blocking sockets": lambda port: blocking(port, data, args.messages, args.threads) * 1e6,
    }
    alternate_against_sink(
        modes,
        args.rounds,
        f"{args.messages} messages of {len(data):,} bytes per mode and round, {args.threads} threads, smtp-sink",
        base="the pool (the worker's way)",
        width=36,
    )


if __name__ == "__main__":
    main()
