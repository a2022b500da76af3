"""What the SMTP client costs per letter, against bare clients that only count replies (issue 11).

One connection to Postfix's ``smtp-sink`` (C, almost no CPU of its own), one sender sending
the same letter (``mime.letter_bytes``, about 5 KB, quoted-printable) over and over, CPU of this
process per message, three ways:

* **pool**: ``SmtpPool.send``, what a worker does: a blocking socket in the calling thread;
  smtp-sink offers PIPELINING, so MAIL, RCPT and DATA go in one write, then the message: two
  round trips;
* **raw, 4 trips**: MAIL, RCPT, DATA and the message one after another over a bare
  ``asyncio.Protocol`` that only counts reply lines (an asyncio client's floor, as the pool
  was until session 12);
* **raw, pipelined**: MAIL, RCPT and DATA in one write (RFC 2920 PIPELINING, which smtp-sink
  and Postfix offer), then the message, over the same bare protocol (the floor of the asyncio
  pool of session 12, before the pool moved to the worker's threads).

The raw clients are measuring sticks, not a client: no error handling, no timeouts. The modes
alternate within each round; the medians and the ratios to the pool are printed.

    .venv/bin/python bench/smtp_client_cost.py [--messages 4000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().parent
for path in (ROOT, BENCH):
    if str(path) not in sys.path:
        sys.path.append(str(path))

from postfix_sink import PostfixSink  # noqa: E402

from dispatcher.channels.email.pool import SmtpPool, wire_data  # noqa: E402
from dispatcher.logging import configure as configure_logging  # noqa: E402
from tests.support.smtp import french_letter_bytes  # noqa: E402

SENDER = "bounces@bench.example.org"
RECIPIENT = "ambassador@embassy.example.org"


def letter() -> bytes:
    paragraph = (
        "Je vous écris au sujet des militants détenus depuis le mois dernier, dont la santé "
        "inquiète leurs familles et leurs avocats, et je vous demande d'intervenir."
    )
    return french_letter_bytes(
        text="Madame l'Ambassadrice,\n\n" + "\n\n".join([paragraph] * 8) + "\n",
        html="<p>Madame l'Ambassadrice,</p>" + f"<p>{paragraph}</p>" * 8,
        to_address=RECIPIENT,
        delivery_id="d-bench",
    )


class _Replies(asyncio.Protocol):
    """Counts complete reply lines (continuations skipped) and wakes whoever waits for n."""

    def __init__(self) -> None:
        self.buffer = b""
        self.codes: list[int] = []
        self.needed = 0
        self.waiter: asyncio.Future[None] | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while b"\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\n", 1)
            if line[3:4] != b"-":
                self.codes.append(int(line[:3]))
        if self.waiter is not None and len(self.codes) >= self.needed and not self.waiter.done():
            self.waiter.set_result(None)

    async def expect(self, n: int) -> list[int]:
        self.needed = n
        if len(self.codes) < n:
            self.waiter = asyncio.get_running_loop().create_future()
            await self.waiter
        got, self.codes = self.codes[:n], self.codes[n:]
        return got


async def _raw(port: int, data: bytes, messages: int, pipelined: bool) -> float:
    loop = asyncio.get_running_loop()
    transport, replies = await loop.create_connection(_Replies, "127.0.0.1", port)
    await replies.expect(1)
    transport.write(b"EHLO localhost\r\n")
    await replies.expect(1)
    wire = wire_data(data)
    assert wire is not None
    envelope = [f"MAIL FROM:<{SENDER}>\r\n".encode(), f"RCPT TO:<{RECIPIENT}>\r\n".encode(), b"DATA\r\n"]
    started = time.process_time()
    for _ in range(messages):
        if pipelined:
            transport.write(b"".join(envelope))
            codes = await replies.expect(3)
        else:
            codes = []
            for command in envelope:
                transport.write(command)
                codes += await replies.expect(1)
        transport.write(wire)
        codes += await replies.expect(1)
        if codes != [250, 250, 354, 250]:
            raise RuntimeError(f"smtp-sink answered {codes}")
    cpu = time.process_time() - started
    transport.close()
    return cpu


def _pool(port: int, data: bytes, messages: int) -> float:
    # The pool's own defaults (timeout, size): one thread sending in turn uses one connection.
    pool = SmtpPool("127.0.0.1", port, tls="none", local_hostname="localhost")
    pool.send(data, SENDER, [RECIPIENT])  # connect and EHLO outside the measurement
    started = time.process_time()
    for _ in range(messages):
        pool.send(data, SENDER, [RECIPIENT])
    cpu = time.process_time() - started
    pool.close()
    return cpu


def alternate_against_sink(
    modes: dict[str, Callable[[int], float]], rounds: int, heading: str, *, base: str, width: int = 42
) -> None:
    """Run each mode once a round against one smtp-sink (the order reversed every other round),
    each returning µs of CPU a message for the sink's port; print each figure, then the medians
    and their ratio to ``base``'s."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    results: dict[str, list[float]] = {name: [] for name in modes}
    with tempfile.TemporaryDirectory(prefix="dispatch-smtp-cost-") as tmp, PostfixSink(Path(tmp), "sink", port):
        print(heading)
        for round_ in range(rounds):
            names = list(modes) if round_ % 2 == 0 else list(reversed(modes))
            for name in names:
                results[name].append(modes[name](port))
                print(f"  round {round_ + 1}: {name}: {results[name][-1]:.0f} µs of CPU a message")
    reference = statistics.median(results[base])
    print(f"{'mode':{width}s} {'CPU µs/message, median':>24s} {'÷ ' + base.split(' (')[0]:>14s}")
    for name, figures in results.items():
        median = statistics.median(figures)
        print(f"{name:{width}s} {median:24.0f} {median / reference:14.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=4000, help="messages per mode and round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; the modes alternate within each")
    args = parser.parse_args()
    configure_logging("WARNING")  # as the worker benches run: the pool's debug lines would be timed
    data = letter()

    def per_message(run: Callable[[int], Coroutine[Any, Any, float]]) -> Callable[[int], float]:
        return lambda port: asyncio.run(run(port)) * 1e6 / args.messages

    modes: dict[str, Callable[[int], float]] = {
        "pool (pipelined, 2 round trips)": lambda port: _pool(port, data, args.messages) * 1e6 / args.messages,
        "raw protocol, 4 round trips": per_message(lambda port: _raw(port, data, args.messages, pipelined=False)),
        "raw protocol, pipelined (2 round trips)": per_message(
            lambda port: _raw(port, data, args.messages, pipelined=True)
        ),
    }
    alternate_against_sink(
        modes,
        args.rounds,
        f"{args.messages} messages of {len(data):,} bytes per mode and round, one connection to smtp-sink",
        base="pool (pipelined, 2 round trips)",
    )


if __name__ == "__main__":
    main()
