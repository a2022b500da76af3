"""Postfix's C SMTP sink (``smtp-sink`` from the Debian package postfix) for the benchmarks.

It accepts every message and keeps none, at almost no CPU: where bench/smtp_sink.py (aiosmtpd)
spends about as much CPU per letter as a client, this one leaves the cores to what is measured.
It counts messages only (``-c`` prints ``sess=… quit=… mesg=N`` after each "."); it cannot
tell duplicates: the benches compare its count with the ledger's instead.

Same interface as throughput.Sink: ``port``, ``status()`` (messages, duplicates = None,
cpu_s), ``wait_for(messages)``, a context manager. Installed by the bench with apt-get when
missing (bench/debian.py).
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from debian import ensure_smtp_sink

_COUNT = re.compile(rb"mesg=(\d+)")


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        raw = fh.read()
    fields = raw[raw.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class PostfixSink:
    kind = "smtp-sink"

    def __init__(self, workdir: Path, name: str, port: int, prefix: list[str] | None = None):
        self.program = ensure_smtp_sink()
        self.port = port
        self.log_path = workdir / f"{name}.out"
        self.prefix = prefix or []
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> PostfixSink:
        # -u: it refuses to run as root without a user to switch to; -a: no AUTH offered (the
        # sandbox client sends none); -4: loopback IPv4 only; backlog 256 as Postfix's examples.
        argv = [self.program, "-c", "-a", "-4", "-m", "1000"]
        if os.geteuid() == 0:
            argv += ["-u", "nobody"]
        with open(self.log_path, "wb") as out:
            self.proc = subprocess.Popen(
                [*self.prefix, *argv, f"127.0.0.1:{self.port}", "256"],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 10
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"smtp-sink exited with {self.proc.returncode}: {self.log_path.read_text()[-500:]}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.5):
                break
            if time.monotonic() > deadline:
                raise RuntimeError("smtp-sink did not listen within 10 s")
            time.sleep(0.05)
        return self

    def messages(self) -> int:
        """Messages accepted so far (the last counter line of its output)."""
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(0, os.SEEK_END)
                size = fh.tell()
                fh.seek(max(0, size - 256))
                found = _COUNT.findall(fh.read())
        except OSError:
            return 0
        return int(found[-1]) if found else 0

    def status(self) -> dict[str, Any]:
        assert self.proc is not None
        return {"messages": self.messages(), "duplicates": None, "cpu_s": _cpu_seconds(self.proc.pid)}

    def wait_for(self, messages: int, timeout: float = 10.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while self.messages() < messages and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.status()

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
