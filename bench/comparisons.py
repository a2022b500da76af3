"""bench/throughput.py's same-run comparisons with the dispatcher's worker path (issue 11):

* **bare loop** — aiosmtplib over ONE connection sending letters built beforehand: what the
  SMTP client and the sink can do at all (messages/s);
* **naive actor** — bench/naive_actor.py: a dramatiq actor on the same redis-server (its own
  namespace and queue) that builds each letter with ``EmailMessage`` and sends it with smtplib
  over a new connection each time, no ledger, no caps; every message enqueued first, then
  ``dramatiq`` with the pipeline's processes × threads drains them (messages/s). The issue's
  aim is a pipeline at least as fast as this.

Both send to the sink the pipeline sends to, in the same repetition. Rates come from the
sink's own count: the bare loop's from its client's clock, the naive actor's from the sink's
counter polled every 5 ms (first message seen → last one seen).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import aiosmtplib
from throughput import (
    BENCH,
    CAMPAIGN,
    CONFIG_DIR,
    PYTHON,
    SECTION,
    TEMPLATES_DIR,
    appeal_payload,
    die_with_parent,
    proc_cpu_seconds,
    stop_process,
    tail,
    tree_cpu_seconds,
)

from dispatcher.channels.email.message import MESSAGE_POLICY, build_message
from dispatcher.config.catalog import PlannedRoute
from dispatcher.config.loader import load_catalog
from dispatcher.config.models import Section
from dispatcher.render.letters import LetterRequest, RenderedEmail, Renderer, Supporter

DRAMATIQ = str(Path(sys.executable).with_name("dramatiq"))
#: stands for the supporter's name in the letters rendered for the naive actor
PLACEHOLDER = "@@SUPPORTER@@"


class CountingSink(Protocol):
    port: int

    def status(self) -> dict[str, Any]: ...

    def wait_for(self, messages: int, timeout: float = 10.0) -> dict[str, Any]: ...


@dataclass
class Comparison:
    messages: int
    seconds: float
    #: CPU of the client side (the bench process; the dramatiq processes), seconds
    cpu_s: float
    sink_cpu_s: float
    sink_messages: int

    @property
    def rate(self) -> float:
        return self.messages / self.seconds if self.seconds > 0 else float("nan")

    def as_dict(self) -> dict[str, Any]:
        return {
            "messages": self.messages,
            "seconds": round(self.seconds, 3),
            "rate": round(self.rate, 1),
            "cpu_ms_per_message": round(self.cpu_s * 1000 / max(self.messages, 1), 3),
            "sink_cpu_ms_per_message": round(self.sink_cpu_s * 1000 / max(self.messages, 1), 3),
            "sink_messages": self.sink_messages,
        }


def _rendered(run: str) -> tuple[Section, list[PlannedRoute], dict[str, Any], list[RenderedEmail]]:
    """The bench campaign's section, its routes, one bench supporter, and that supporter's
    letter to each route's target rendered with the real templates."""
    catalog = load_catalog(CONFIG_DIR, TEMPLATES_DIR)
    renderer = Renderer(TEMPLATES_DIR)
    campaign = catalog.campaign(CAMPAIGN)
    section = catalog.section(SECTION)
    routes = catalog.routes(CAMPAIGN, SECTION)
    payload = appeal_payload(0, run)
    person = payload["supporter"]
    rendered = [
        renderer.render_email(
            LetterRequest(
                campaign=campaign,
                section=section,
                target=route.target,
                language="en",
                supporter=Supporter(person["name"], person["email"], person["city"], person["country"]),
                message=payload["message"],
                date=datetime.now(UTC).date(),
            )
        )
        for route in routes
    ]
    return section, routes, person, rendered


def _letters_for_targets() -> tuple[list[dict[str, Any]], dict[str, str]]:
    """One rendered letter per route of the bench campaign (the real templates), and the
    section's sender; the supporter's name is left as PLACEHOLDER."""
    section, routes, person, rendered_letters = _rendered("naive")
    letters = [
        {
            "to_name": route.target.name,
            "to_address": str(route.target.email),
            "subject": rendered.subject,
            "text": rendered.text.replace(person["name"], PLACEHOLDER),
            "html": rendered.html.replace(person["name"], PLACEHOLDER),
        }
        for route, rendered in zip(routes, rendered_letters, strict=True)
    ]
    sender = {
        "sender_name": section.sender.name,
        "sender_address": str(section.sender.address),
        "envelope": section.sender.envelope_sender,
        "domain": section.sender.domain,
    }
    return letters, sender


# --------------------------------------------------------------------------- bare loop


def run_bare_loop(n: int, sink: CountingSink) -> Comparison:
    """``n`` letters built beforehand (distinct Message-IDs), sent one after another over one
    aiosmtplib connection: the client and sink's own ceiling, nothing of ours in it."""
    section, routes, person, rendered = _rendered("bare")
    envelope = section.sender.envelope_sender
    raw: list[tuple[str, bytes]] = []
    for i in range(n):
        k = i % len(routes)
        target = routes[k].target
        message = build_message(
            delivery_id=f"dl_{uuid.uuid4().hex}",
            section=section,
            to_name=target.name,
            to_address=str(target.email),
            supporter_name=person["name"],
            supporter_email=person["email"],
            subject=rendered[k].subject,
            text=rendered[k].text,
            html=rendered[k].html,
            language=rendered[k].language,
            date=datetime.now(UTC),
        )
        raw.append((str(target.email), message.as_bytes(policy=MESSAGE_POLICY)))

    async def loop() -> float:
        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=sink.port, local_hostname="localhost", start_tls=False)
        await smtp.connect()
        started = time.perf_counter()
        for rcpt, data in raw:
            await smtp.sendmail(envelope, [rcpt], data)
        elapsed = time.perf_counter() - started
        await smtp.quit()
        return elapsed

    before = sink.status()
    cpu_before = proc_cpu_seconds(os.getpid())
    elapsed = asyncio.run(loop())
    cpu = proc_cpu_seconds(os.getpid()) - cpu_before
    after = sink.wait_for(before["messages"] + n)
    return Comparison(n, elapsed, cpu, after["cpu_s"] - before["cpu_s"], after["messages"] - before["messages"])


# --------------------------------------------------------------------------- naive actor


def run_naive_actor(
    n: int, sink: CountingSink, *, redis_url: str, workers: int, threads: int, workdir: Path, timeout: float
) -> Comparison:
    """Enqueue ``n`` messages for bench/naive_actor.py, then drain them with ``dramatiq``
    (``workers`` processes × ``threads`` threads); the rate is the sink's (first → last)."""
    run = uuid.uuid4().hex[:6]
    letters, sender = _letters_for_targets()
    letters_file = workdir / f"naive-letters-{run}.json"
    letters_file.write_text(json.dumps({"targets": letters, "placeholder": PLACEHOLDER, **sender}))
    env = {
        **os.environ,
        "NAIVE_REDIS_URL": redis_url,
        "NAIVE_NAMESPACE": f"naive-{run}",
        "NAIVE_LETTERS": str(letters_file),
        "NAIVE_SINK": f"127.0.0.1:{sink.port}",
        "PYTHONPATH": str(BENCH),
    }
    done = subprocess.run(
        [PYTHON, str(BENCH / "naive_actor.py"), "--enqueue", str(n)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if done.returncode != 0:
        raise RuntimeError(f"naive actor: enqueue failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    before = sink.status()
    log_path = workdir / f"naive-{run}.log"
    with open(log_path, "wb") as logf:
        proc = subprocess.Popen(
            [
                *die_with_parent(),
                DRAMATIQ,
                "naive_actor",
                "--path",
                str(BENCH),
                "--processes",
                str(workers),
                "--threads",
                str(threads),
                "--queues",
                "naive",
            ],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=logf,
            stderr=subprocess.STDOUT,
            cwd=workdir,
        )
    try:
        first: float | None = None
        first_count = last_count = before["messages"]
        started = last = time.monotonic()
        deadline = time.monotonic() + timeout
        target = before["messages"] + n
        cpu_at_first = 0.0
        while last_count < target:
            if proc.poll() is not None:
                raise RuntimeError(f"naive actor: dramatiq exited with {proc.returncode}:\n{tail(log_path)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"naive actor: {last_count - before['messages']}/{n} sent after {timeout:.0f} s")
            count = sink.status()["messages"]
            now = time.monotonic()
            if count > last_count:
                if first is None:
                    # from the first letter on: the workers' start-up (imports, forks) is not the drain
                    first, first_count = now, count
                    cpu_at_first = tree_cpu_seconds(proc.pid)
                last_count, last = count, now
            time.sleep(0.005)
        cpu = tree_cpu_seconds(proc.pid) - cpu_at_first
    finally:
        stop_process(proc, timeout=30)
    after = sink.status()
    # the letters counted after the first sighting, over the time they took
    measured = last_count - first_count
    # (all of them seen at the first look, as a small run on a busy machine can be: the time
    # since the workers were started is the only measure left, start-up included)
    seconds = (last - first) * n / measured if first is not None and measured > 0 else last - started
    return Comparison(n, seconds, cpu, after["cpu_s"] - before["cpu_s"], after["messages"] - before["messages"])
