"""End-to-end throughput of the dispatcher, against a same-run baseline.

What one repetition does (see docs/benchmarks.md for the reasoning):

One repetition sends everything to ONE SMTP sink (``--sink``): Postfix's C ``smtp-sink`` by
default (bench/postfix_sink.py; installed with apt-get when missing), which costs almost
nothing, or bench/smtp_sink.py (aiosmtpd, counts duplicate Message-IDs). The output names it.

1. **baseline** — a bare aiosmtplib loop: render each letter (Renderer), build it
   (build_message) and send it over ONE reused SMTP connection to the sink. No ledger, no
   queue, no threads: the practical ceiling for one process on this machine.
2. **comparisons** (bench/comparisons.py; ``--no-comparisons`` skips them) — a **bare loop**
   sending letters built beforehand over one aiosmtplib connection (what client and sink can
   do at all), and the **naive actor** (bench/naive_actor.py): dramatiq on the same
   redis-server, its own namespace, the pipeline's processes × threads, each message built
   with EmailMessage and sent with smtplib over a new connection, no ledger, no caps; all
   enqueued first, then drained. Issue 11's aim: the pipeline's workers at ≥ 1.0× its rate.
3. **pipeline** — the real path: a private redis-server, a fresh ledger (SQLite in a temp dir,
   or a fresh PostgreSQL database), ``dispatcher worker --threads N`` subprocesses and a
   ``dispatcher reconcile`` subprocess, all in sandbox mode pointed at the sink. The bench
   process pushes ``deliveries / 5`` appeals through ``Service.intake.submit`` as fast as it
   can, then polls the ledger until every delivery is ``sent``. Worker log level WARNING.
4. **pipeline, INFO logging** — the same once more with ``DISPATCH_LOG_LEVEL=INFO`` (the
   production default), to show what logging costs (only with ``--info-run``: it adds a
   minute, and the default run stays under two).

``--preload`` submits every appeal before the workers start (a pure drain); ``--pace`` submits
at a steady rate (latency without a backlog); ``--profile`` adds a run sampled by py-spy;
``--dkim`` gives the bench section a [dkim] table (fresh keys), so the workers sign every letter
with both algorithms (the baseline stays unsigned). ``--history N`` fills the pipeline's ledger
with N historical appeals first (bench/history.py: 2 sent letters each, to the campaign's
first two recipients); with ``--compare-history`` each repetition runs the pipeline on an empty
ledger and on one with history, alternating which goes first.

Everything listens on 127.0.0.1 only; every wait is bounded.

    .venv/bin/python bench/throughput.py [--deliveries 5000] [--workers 1] [--threads 8]
        [--database-url URL] [--repeat 1] [--info-run] [--profile] [--pace APPEALS_PER_S] [--preload] [--dkim]
        [--sink smtp-sink|python] [--no-comparisons] [--history N [--compare-history] [--history-days 60]]

Figures go to stdout (a table) and, one JSON line per invocation, to
bench/results/throughput.jsonl.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

ROOT = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import aiosmtplib  # noqa: E402
import history as bench_history  # noqa: E402
import redis  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from sqlalchemy import func, select  # noqa: E402

from dispatcher.app import Service  # noqa: E402
from dispatcher.channels.email.message import build_message  # noqa: E402
from dispatcher.config.loader import load_catalog  # noqa: E402
from dispatcher.ledger.models import Attempt, Delivery  # noqa: E402
from dispatcher.logging import configure as configure_logging  # noqa: E402
from dispatcher.render.letters import LetterRequest, Renderer, Supporter  # noqa: E402
from dispatcher.settings import Settings  # noqa: E402
from tests.support.services import PostgresDatabase, RedisServer, free_port, wait_for_port  # noqa: E402

CONFIG_DIR = BENCH / "config"
TEMPLATES_DIR = ROOT / "templates"
RESULTS = BENCH / "results" / "throughput.jsonl"
CAMPAIGN = "BENCH"
SECTION = "bench"
KEY_ENV = "DISPATCH_INTAKE_KEY_BENCH"
PYTHON = sys.executable
EMAIL_LIMITS = "1000000/hour"
DISPATCHER = str(Path(sys.executable).with_name("dispatcher"))
MESSAGE = (
    "I am writing as a member of my local group. Please release everyone detained for who they are,\n"
    "and make sure their families are told where they are held.\n\nThank you for reading this letter."
)

# Not a terminal (a log file, CI): wide enough that the table's rows stay on one line.
console = Console(width=None if sys.stdout.isatty() else 130)
err = Console(stderr=True)


# --------------------------------------------------------------------------- helpers


def log(msg: str) -> None:
    err.print(f"[dim]{time.strftime('%H:%M:%S')}[/dim] {msg}", highlight=False)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def proc_status(pid: int) -> dict[str, str]:
    out: dict[str, str] = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            out[key] = value.strip()
    return out


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of one process (its threads included, its children not)."""
    with open(f"/proc/{pid}/stat") as fh:
        raw = fh.read()
    fields = raw[raw.rindex(")") + 2 :].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def tree_cpu_seconds(pid: int) -> float:
    """CPU of a process and its descendants that are alive now (uvicorn's or dramatiq's workers)."""
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        with contextlib.suppress(OSError):
            total += proc_cpu_seconds(p)
        todo += proc_children(p)
    return total


def append_result(path: Path, line: dict[str, Any]) -> None:
    """One JSON line of a bench's figures, appended to its results file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fh.write(json.dumps(line, separators=(",", ":")) + "\n")
    log(f"appended to {path.relative_to(ROOT)}")


def proc_cmdline(pid: int) -> list[str]:
    with open(f"/proc/{pid}/cmdline", "rb") as fh:
        return [p.decode(errors="replace") for p in fh.read().split(b"\0") if p]


def proc_children(pid: int) -> list[int]:
    kids: list[int] = []
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/children") as fh:
                kids += [int(x) for x in fh.read().split()]
    return kids


def find_worker_pid(root_pid: int) -> int:
    """The pid of the Python process running ``dispatcher worker``: ``root_pid`` itself when it
    was exec'd directly (console script, setpriv), else the descendant that is (a wrapper such
    as py-spy or a shell in between)."""
    todo = [root_pid]
    while todo:
        pid = todo.pop(0)
        with contextlib.suppress(OSError):
            argv = proc_cmdline(pid)
            exe = os.readlink(f"/proc/{pid}/exe")
            if "python" in Path(exe).name and "worker" in argv and any(a.endswith("dispatcher") for a in argv):
                return pid
        todo += proc_children(pid)
    raise RuntimeError(f"no dispatcher worker process under pid {root_pid}")


def die_with_parent() -> list[str]:
    """``setpriv --pdeathsig KILL --`` (it execs: the pid stays the worker's own)."""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "KILL", "--"] if setpriv and sys.platform.startswith("linux") else []


def stop_process(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 30.0) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(sig)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        log(f"[yellow]pid {proc.pid} did not stop within {timeout:.0f} s: killed[/yellow]")
        proc.kill()
        proc.wait()


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no output)"


# --------------------------------------------------------------------------- the sink


class Sink:
    """bench/smtp_sink.py in its own process, on a free loopback port."""

    #: the sink program; a variant (bench/chaos/sink.py) overrides it and its environment
    script: Path = BENCH / "smtp_sink.py"
    kind = "python"

    def env(self) -> dict[str, str] | None:
        return None

    def __init__(self, workdir: Path, name: str):
        self.port = free_port()
        self.status_path = workdir / f"{name}.status.json"
        self.log_path = workdir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Sink:
        with open(self.log_path, "wb") as logf:
            self.proc = subprocess.Popen(
                [
                    *die_with_parent(),
                    PYTHON,
                    str(self.script),
                    "--port",
                    str(self.port),
                    "--status",
                    str(self.status_path),
                    "--max-seconds",
                    "1800",
                    "--parent",
                    str(os.getpid()),
                ],
                env=self.env(),
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 20
        while not self.status_path.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the SMTP sink did not start:\n{tail(self.log_path)}")
            time.sleep(0.05)
        wait_for_port("127.0.0.1", self.port, timeout=10)
        return self

    def status(self) -> dict[str, Any]:
        for _ in range(20):
            with contextlib.suppress(OSError, ValueError):
                return dict(json.loads(self.status_path.read_text()))
            time.sleep(0.01)
        raise RuntimeError("cannot read the sink's status")

    def wait_for(self, messages: int, timeout: float = 10.0) -> dict[str, Any]:
        """The status once at least ``messages`` were counted (or after ``timeout``)."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.status()
            if status["messages"] >= messages or time.monotonic() > deadline:
                return status
            time.sleep(0.1)

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            stop_process(self.proc, timeout=10)


SINKS = ("smtp-sink", "python")


def default_sink() -> str:
    """Postfix's C sink when it is installed or can be (root with apt-get), else ours."""
    from debian import find_program

    if find_program("smtp-sink") or (os.geteuid() == 0 and shutil.which("apt-get")):
        return "smtp-sink"
    return "python"


def make_sink(kind: str, workdir: Path, name: str) -> Any:
    """A sink of ``kind`` (not started: use it with ``with``): "smtp-sink" is Postfix's C
    sink (bench/postfix_sink.py), "python" bench/smtp_sink.py (aiosmtpd, counts duplicates)."""
    if kind == "smtp-sink":
        from postfix_sink import PostfixSink

        return PostfixSink(workdir, name, free_port(), die_with_parent())
    return Sink(workdir, name)


def sink_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """What a sink counted between two of its statuses (one sink serves a whole repetition)."""
    dup = None if after.get("duplicates") is None else after["duplicates"] - before["duplicates"]
    return {
        "messages": after["messages"] - before["messages"],
        "duplicates": dup,
        "cpu_s": after["cpu_s"] - before["cpu_s"],
    }


# --------------------------------------------------------------------------- the ledger


@contextlib.contextmanager
def fresh_database(database_url: str | None, workdir: Path, name: str) -> Iterator[str]:
    """A SQLAlchemy URL of an empty database: a SQLite file in ``workdir`` by default, else a
    new database on the PostgreSQL server that ``database_url`` names, dropped afterwards."""
    if database_url is None:
        yield f"sqlite:///{workdir / f'{name}.sqlite3'}"
        return
    with PostgresDatabase(postgres_admin(database_url), prefix="dispatch_bench") as db:
        yield db.url


def postgres_admin(database_url: str) -> str:
    """The libpq URL of the ``postgres`` database on the server ``database_url`` names;
    SystemExit unless it is a PostgreSQL server on loopback."""
    from sqlalchemy.engine import make_url

    if not database_url.startswith("postgresql"):
        raise SystemExit("--database-url: only postgresql URLs (a server the bench creates a database on)")
    admin = make_url(database_url).set(drivername="postgresql", database="postgres")
    if admin.host not in (None, "", "127.0.0.1", "localhost", "::1"):
        raise SystemExit(f"--database-url: loopback servers only (got host {admin.host!r})")
    return admin.render_as_string(hide_password=False)


# --------------------------------------------------------------------------- appeals and letters


def appeal_payload(i: int, run: str) -> dict[str, Any]:
    return {
        "campaign": CAMPAIGN,
        "section": SECTION,
        "language": "en",
        "supporter": {
            "name": f"Supporter {i} Example",
            "email": f"supporter-{run}-{i}@example.net",
            "city": "Springfield",
            "country": "US",
        },
        "message": MESSAGE,
        "client_ref": f"bench-{run}-{i}",
    }


@dataclass
class Baseline:
    messages: int
    seconds: float
    render_seconds: float
    cpu_seconds: float
    sink: dict[str, Any]

    @property
    def rate(self) -> float:
        return self.messages / self.seconds

    @property
    def smtp_only_rate(self) -> float:
        return self.messages / max(self.seconds - self.render_seconds, 1e-9)


def run_baseline(n: int, sink: Sink) -> Baseline:
    """Render, build and send ``n`` letters one after another over one SMTP connection."""
    catalog = load_catalog(CONFIG_DIR, TEMPLATES_DIR)
    renderer = Renderer(TEMPLATES_DIR)
    campaign = catalog.campaign(CAMPAIGN)
    section = catalog.section(SECTION)
    routes = catalog.routes(CAMPAIGN, SECTION)
    envelope = section.sender.envelope_sender

    async def loop() -> tuple[float, float]:
        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=sink.port, local_hostname="localhost", start_tls=False)
        await smtp.connect()
        render_s = 0.0
        started = time.perf_counter()
        for i in range(n):
            t0 = time.perf_counter()
            target = routes[i % len(routes)].target
            payload = appeal_payload(i // len(routes), "baseline")
            person = payload["supporter"]
            rendered = renderer.render_email(
                LetterRequest(
                    campaign=campaign,
                    section=section,
                    target=target,
                    language="en",
                    supporter=Supporter(person["name"], person["email"], person["city"], person["country"]),
                    message=payload["message"],
                    date=datetime.now(UTC).date(),
                )
            )
            message = build_message(
                delivery_id=f"dl_{uuid.uuid4().hex}",
                section=section,
                to_name=target.name,
                to_address=str(target.email),
                supporter_name=person["name"],
                supporter_email=person["email"],
                subject=rendered.subject,
                text=rendered.text,
                html=rendered.html,
                language=rendered.language,
                date=datetime.now(UTC),
            )
            render_s += time.perf_counter() - t0
            await smtp.send_message(message, sender=envelope, recipients=[str(target.email)])
        elapsed = time.perf_counter() - started
        await smtp.quit()
        return elapsed, render_s

    before = sink.status()
    cpu_before = proc_cpu_seconds(os.getpid())
    elapsed, render_s = asyncio.run(loop())
    cpu = proc_cpu_seconds(os.getpid()) - cpu_before
    return Baseline(n, elapsed, render_s, cpu, sink_delta(before, sink.wait_for(before["messages"] + n)))


# --------------------------------------------------------------------------- the pipeline


@dataclass
class Pipeline:
    log_level: str
    workers: int
    threads: int
    appeals: int
    deliveries: int
    intake_seconds: float
    e2e_seconds: float
    drain_seconds: float
    states: dict[str, int]
    latency_ms: list[float]
    queued_at_missing: int
    worker_hwm_kb: list[int]
    cpu_s: dict[str, float]
    sink: dict[str, Any]
    profile: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)
    #: the historical appeals written into the ledger before the run (bench/history.py)
    history: dict[str, Any] | None = None

    @property
    def sent(self) -> int:
        return self.states.get("sent", 0)

    @property
    def intake_rate(self) -> float:
        return self.appeals / self.intake_seconds

    @property
    def e2e_rate(self) -> float:
        return self.sent / self.e2e_seconds

    @property
    def drain_rate(self) -> float:
        return self.sent / self.drain_seconds


def child_env(settings: Settings, key: str, log_level: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DISPATCH_", "DATABASE_URL", "REDIS_URL"))}
    env.update(
        DATABASE_URL=settings.database_url,
        REDIS_URL=settings.redis_url,
        DISPATCH_REDIS_NAMESPACE=settings.redis_namespace,
        DISPATCH_CONFIG_DIR=str(settings.config_dir),
        DISPATCH_TEMPLATES_DIR=str(settings.templates_dir),
        DISPATCH_VAR_DIR=str(settings.var_dir),
        DISPATCH_SANDBOX_SMTP=f"{settings.sandbox_smtp_host}:{settings.sandbox_smtp_port}",
        DISPATCH_MODE="sandbox",
        DISPATCH_LOG_LEVEL=log_level,
        DISPATCH_PEPPER=settings.pepper,
        # The per-recipient caps (default 30/hour, 200/day) would hold the 5 bench targets to 150
        # letters an hour. A cap that never binds keeps the rate limiter's work in the measurement.
        DISPATCH_EMAIL_LIMITS=EMAIL_LIMITS,
        **{KEY_ENV: key},
    )
    return env


def check_alive(procs: list[subprocess.Popen[bytes]], logs: list[Path]) -> None:
    for proc, path in zip(procs, logs, strict=True):
        if proc.poll() is not None:
            raise RuntimeError(f"worker pid {proc.pid} exited with {proc.returncode}:\n{tail(path)}")


def wait_for_consumers(
    client: redis.Redis,
    namespace: str,
    count: int,
    procs: list[subprocess.Popen[bytes]],
    logs: list[Path],
    already: set[bytes],
) -> None:
    """Until ``count`` dramatiq brokers other than ``already`` have polled Redis: every broker
    registers a heartbeat with its first command (intake's own broker too, when it enqueues)."""
    deadline = time.monotonic() + 60
    while len(set(client.zrange(f"{namespace}:__heartbeats__", 0, -1)) - already) < count:
        check_alive(procs, logs)
        if time.monotonic() > deadline:
            raise RuntimeError("the workers did not start polling the queue within 60 s")
        time.sleep(0.05)


@dataclass
class LedgerFigures:
    states: dict[str, int]
    #: sent_at - queued_at of every sent delivery, ms
    latency_ms: list[float]
    #: sent deliveries whose queued_at is NULL
    queued_at_missing: int
    first_queued: datetime | None
    first_attempt: datetime | None
    last_sent: datetime | None


def ledger_figures(service: Service, since: datetime) -> LedgerFigures:
    """The run's letters: those created from ``since`` on (a ledger with history holds more)."""
    d, a = Delivery.__table__, Attempt.__table__
    mine = d.c.created_at >= since
    with service.ledger.engine.connect() as conn:
        by_state = conn.execute(select(d.c.state, func.count()).where(mine).group_by(d.c.state)).all()
        rows = conn.execute(select(d.c.queued_at, d.c.created_at, d.c.sent_at).where(d.c.state == "sent", mine)).all()
        first_attempt = conn.execute(
            select(func.min(a.c.started_at)).where(a.c.started_at >= since)
        ).scalar_one_or_none()
    latency: list[float] = []
    missing = 0
    first: datetime | None = None
    last: datetime | None = None
    for queued_at, created_at, sent_at in rows:
        if queued_at is None:
            # Intake stamps queued_at only after its enqueue returns; a worker that claimed
            # the letter before that leaves it NULL. created_at is the same instant (intake's
            # `now`), so the latency is still known.
            missing += 1
            queued_at = created_at
        latency.append((sent_at - queued_at).total_seconds() * 1000)
        first = queued_at if first is None or queued_at < first else first
        last = sent_at if last is None or sent_at > last else last
    if first_attempt is not None and first_attempt.tzinfo is None:
        first_attempt = first_attempt.replace(tzinfo=UTC)
    return LedgerFigures({str(state): int(n) for state, n in by_state}, latency, missing, first, first_attempt, last)


def history_recipients(config_dir: Path = CONFIG_DIR) -> tuple[list[tuple[str, str]], str]:
    """The two recipients history letters go to (the bench campaign's first two email routes)
    and the section's sender domain."""
    catalog = load_catalog(config_dir, TEMPLATES_DIR)
    routes = catalog.routes(CAMPAIGN, SECTION)[:2]
    return [(r.target.id, str(r.target.email)) for r in routes], catalog.section(SECTION).sender.domain


def fill_ledger_history(service: Service, appeals: int, days: float) -> dict[str, Any]:
    """``appeals`` historical appeals (2 sent letters each) in the run's migrated ledger."""

    recipients, domain = history_recipients(service.settings.config_dir)
    step = max(appeals // 10, 1)

    def progress(done: int) -> None:
        if done % step < 5000 or done == appeals:
            log(f"history: {done:,}/{appeals:,} appeals written")

    fill = bench_history.fill_history(
        service.ledger.engine,
        appeals,
        campaign=CAMPAIGN,
        section=SECTION,
        recipients=recipients,
        sender_domain=domain,
        days=days,
        retention_days=service.settings.pii_retention_days,
        progress=progress,
    )
    log(
        f"history: {fill.appeals:,} appeals, {fill.deliveries:,} letters and tries each, in {fill.seconds:.0f} s; "
        f"on disk {fill.settle_seconds:.0f} s later"
    )
    return fill.as_dict()


def submit_all(service: Service, appeals: int, run: str, pace: float) -> tuple[int, float, float]:
    """Push the appeals through intake in this thread: (deliveries planned, seconds, CPU seconds)."""
    intake = service.intake
    payloads = [appeal_payload(i, run) for i in range(appeals)]
    cpu_before = proc_cpu_seconds(os.getpid())
    started = time.perf_counter()
    expected = 0
    for i, payload in enumerate(payloads):
        if pace:
            # a steady arrival rate instead of a burst: latency without a backlog
            delay = started + i / pace - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
        expected += len(intake.submit(payload).deliveries)
    return expected, time.perf_counter() - started, proc_cpu_seconds(os.getpid()) - cpu_before


def start_profilers(pids: list[int], workdir: Path, run: str) -> list[tuple[subprocess.Popen[bytes], Path]]:
    spies = []
    for pid in pids:
        out = workdir / f"profile-{run}-{pid}.txt"
        with open(workdir / f"py-spy-{pid}.log", "wb") as errf:
            spy = subprocess.Popen(
                [
                    str(Path(sys.executable).with_name("py-spy")),
                    "record",
                    "--pid",
                    str(pid),
                    "--gil",  # only the GIL holder: the worker's Python CPU time
                    "--rate",
                    "100",
                    "--format",
                    "raw",
                    "--output",
                    str(out),
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=errf,
            )
        spies.append((spy, out))
    time.sleep(1.0)  # py-spy attaches
    return spies


def run_pipeline(
    *,
    appeals: int,
    workers: int,
    threads: int,
    log_level: str,
    database_url: str,
    redis_server: RedisServer,
    workdir: Path,
    sink: Sink,
    profile: bool,
    timeout: float,
    pace: float = 0.0,
    preload: bool = False,
    config_dir: Path = CONFIG_DIR,
    history: int = 0,
    history_days: float = 60.0,
) -> Pipeline:
    run = secrets.token_hex(3)
    key = secrets.token_hex(16)
    settings = Settings(
        config_dir=config_dir,
        templates_dir=TEMPLATES_DIR,
        var_dir=workdir / f"var-{run}",
        database_url=database_url,
        redis_url=redis_server.url,
        redis_namespace=f"bench-{run}",
        mode="sandbox",
        sandbox_smtp_host="127.0.0.1",
        sandbox_smtp_port=sink.port,
        pepper=secrets.token_hex(8),
    )
    service = Service(settings, environ={KEY_ENV: key})
    service.ledger.migrate()
    history_fill = fill_ledger_history(service, history, history_days) if history else None
    # the run's letters are those created from here on (history is at least an hour older)
    since = datetime.now(UTC)
    env = child_env(settings, key, log_level)
    client = redis.Redis.from_url(settings.redis_url)
    procs: list[subprocess.Popen[bytes]] = []
    worker_logs: list[Path] = []
    spies: list[tuple[subprocess.Popen[bytes], Path]] = []
    reconciler: subprocess.Popen[bytes] | None = None
    notes: list[str] = []
    try:
        if preload:
            # Everything on the queue before any worker runs: intake uncontended, then a pure drain.
            expected, intake_s, intake_cpu = submit_all(service, appeals, run, pace)
        before: set[bytes] = set(cast(list[bytes], client.zrange(f"{settings.redis_namespace}:__heartbeats__", 0, -1)))
        for w in range(workers):
            worker_logs.append(workdir / f"worker-{run}-{w}.log")
            with open(worker_logs[-1], "wb") as logf:
                procs.append(
                    subprocess.Popen(
                        [*die_with_parent(), DISPATCHER, "worker", "--threads", str(threads)],
                        env=env,
                        stdin=subprocess.DEVNULL,
                        stdout=logf,
                        stderr=subprocess.STDOUT,
                        cwd=workdir,
                    )
                )
        wait_for_consumers(client, settings.redis_namespace, workers, procs, worker_logs, before)
        worker_pids = [find_worker_pid(p.pid) for p in procs]
        cpu_before = {pid: proc_cpu_seconds(pid) for pid in worker_pids}
        if redis_server.pid:
            cpu_before[redis_server.pid] = proc_cpu_seconds(redis_server.pid)
        sink_before = sink.status()
        with open(workdir / f"reconciler-{run}.log", "wb") as logf:
            reconciler = subprocess.Popen(
                [*die_with_parent(), DISPATCHER, "reconcile", "--interval", "1"],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                cwd=workdir,
            )
        if profile:
            spies = start_profilers(worker_pids, workdir, run)

        if not preload:
            expected, intake_s, intake_cpu = submit_all(service, appeals, run, pace)

        # ---- wait until every delivery is sent (bounded; gives up early without progress)
        deadline = time.monotonic() + timeout
        last_progress, last_count = time.monotonic(), -1
        d = Delivery.__table__
        # A range on the (state, next_attempt_at) index: with a million historical letters a
        # filter on created_at would scan them all five times a second and load the machine.
        sent_now = select(func.count()).where(d.c.state == "sent", d.c.next_attempt_at >= since)
        while True:
            with service.ledger.engine.connect() as conn:
                done = conn.execute(sent_now).scalar_one()
            if done >= expected:
                break
            if done != last_count:
                last_progress, last_count = time.monotonic(), done
            now = time.monotonic()
            if now > deadline or now - last_progress > 60:
                notes.append(f"gave up waiting: {done}/{expected} sent")
                log(f"[red]gave up waiting: {done}/{expected} sent[/red]")
                break
            check_alive(procs, worker_logs)
            time.sleep(0.2)

        # ---- read the processes before stopping them
        hwm = [int(proc_status(pid)["VmHWM"].split()[0]) for pid in worker_pids]
        cpu = {
            "workers": sum(proc_cpu_seconds(pid) - cpu_before[pid] for pid in worker_pids),
            "intake": intake_cpu,
        }
        if redis_server.pid:
            cpu["redis"] = proc_cpu_seconds(redis_server.pid) - cpu_before[redis_server.pid]
        sink_status = sink_delta(sink_before, sink.wait_for(sink_before["messages"] + expected, timeout=5))
        cpu["sink"] = sink_status["cpu_s"]
        if reconciler.poll() is None:
            cpu["reconciler"] = proc_cpu_seconds(reconciler.pid)
        figures = ledger_figures(service, since)
    finally:
        for spy, _ in spies:
            stop_process(spy, signal.SIGINT, timeout=60)
        for proc in procs:
            stop_process(proc)
        if reconciler is not None:
            stop_process(reconciler)
        service.ledger.dispose()
        client.close()
        with contextlib.suppress(Exception):
            service.broker.close()

    for proc in procs:
        if proc.returncode not in (0, -signal.SIGTERM):
            notes.append(f"worker exited with {proc.returncode}")
    last = figures.last_sent
    # first enqueue -> last sent_at, both from the ledger (queued_at is intake's clock at submit)
    e2e_s = (last - figures.first_queued).total_seconds() if last and figures.first_queued else float("nan")
    # first claim (its attempt's start) -> last sent_at: the workers' own pace
    drain_s = (last - figures.first_attempt).total_seconds() if last and figures.first_attempt else float("nan")
    profile_summary = None
    if spies:
        from stack_summary import summarise

        profile_summary = summarise([out for _, out in spies])
    return Pipeline(
        log_level=log_level,
        workers=workers,
        threads=threads,
        appeals=appeals,
        deliveries=expected,
        intake_seconds=intake_s,
        e2e_seconds=e2e_s,
        drain_seconds=drain_s,
        states=figures.states,
        latency_ms=figures.latency_ms,
        queued_at_missing=figures.queued_at_missing,
        worker_hwm_kb=hwm,
        cpu_s={k: round(v, 2) for k, v in cpu.items()},
        sink=sink_status,
        profile=profile_summary,
        notes=notes,
        history=history_fill,
    )


# --------------------------------------------------------------------------- one repetition


def signing_config(workdir: Path) -> Path:
    """bench/config with a [dkim] table and fresh keys, for --dkim."""
    from dispatcher.channels.email import dkim

    config = workdir / "config-dkim"
    shutil.copytree(CONFIG_DIR, config)
    rsa_key, ed25519_key = dkim.generate_keys()
    (config / "keys").mkdir()
    (config / "keys" / "rsa.pem").write_bytes(dkim.private_pem(rsa_key))
    (config / "keys" / "ed25519.pem").write_bytes(dkim.private_pem(ed25519_key))
    section = config / "sections" / f"{SECTION}.toml"
    section.write_text(
        section.read_text()
        + '\n[dkim]\nrsa_selector = "rsa"\ned25519_selector = "ed25519"\n'
        + 'rsa_key_file = "keys/rsa.pem"\ned25519_key_file = "keys/ed25519.pem"\n'
    )
    return config


def one_repetition(
    args: argparse.Namespace, redis_server: RedisServer, workdir: Path, index: int, config_dir: Path = CONFIG_DIR
) -> dict[str, Any]:
    """Baseline, the comparisons and the pipeline run(s), all against ONE sink of ``args.sink``."""
    with make_sink(args.sink, workdir, f"sink-{index}-{secrets.token_hex(2)}") as sink:
        return _one_repetition(args, redis_server, workdir, index, config_dir, sink)


def _one_repetition(
    args: argparse.Namespace, redis_server: RedisServer, workdir: Path, index: int, config_dir: Path, sink: Any
) -> dict[str, Any]:
    appeals = args.deliveries // 5
    n = appeals * 5
    out: dict[str, Any] = {"sink": sink.kind}

    log(f"baseline: {n} letters over one SMTP connection ({sink.kind})")
    base = run_baseline(n, sink)
    out["baseline"] = {
        "messages": base.messages,
        "seconds": round(base.seconds, 3),
        "rate": round(base.rate, 1),
        "render_share": round(base.render_seconds / base.seconds, 3),
        "smtp_only_rate": round(base.smtp_only_rate, 1),
        "cpu_ms_per_letter": round(base.cpu_seconds * 1000 / n, 3),
        "sink_cpu_ms_per_letter": round(base.sink["cpu_s"] * 1000 / n, 3),
        "sink_messages": base.sink["messages"],
        "sink_duplicates": base.sink["duplicates"],
    }
    log(f"baseline: {base.rate:.0f} letters/s")

    if args.comparisons:
        from comparisons import run_bare_loop, run_naive_actor

        log(f"bare loop: {n} letters built beforehand, aiosmtplib over one connection")
        bare = run_bare_loop(n, sink)
        out["bare_loop"] = bare.as_dict()
        log(f"bare loop: {bare.rate:.0f} messages/s")
        log(f"naive actor: {n} messages enqueued, then dramatiq {args.workers} process(es) × {args.threads} threads")
        naive = run_naive_actor(
            n,
            sink,
            redis_url=redis_server.url,
            workers=args.workers,
            threads=args.threads,
            workdir=workdir,
            timeout=args.timeout,
        )
        out["naive_actor"] = naive.as_dict()
        log(f"naive actor: {naive.rate:.0f} messages/s")

    # (name, log level, profiled, historical appeals)
    levels = [("WARNING", "pipeline", False, args.history if not args.compare_history else 0)]
    if args.compare_history:
        # every other repetition runs the ledger with history first: order effects cancel out
        levels.insert(index % 2, ("WARNING", "pipeline_history", False, args.history))
    if args.info_run:
        # every other repetition runs INFO first, so that order effects do not pass for logging's cost
        levels.insert(index % 2, ("INFO", "pipeline_info", False, 0))
    if args.profile and index == 0:
        # an extra run: py-spy pauses the worker ~100 times a second, so its figures are not the measurement
        levels.append((args.profile_level, "pipeline_profiled", True, args.history))
    for level, name, profiled, history in levels:
        log(
            f"{name}: {appeals} appeals → {n} letters, {args.workers} worker(s) × {args.threads} threads, log {level}"
            + (f", {history:,} historical appeals in the ledger" if history else "")
        )
        with fresh_database(args.database_url, workdir, f"ledger-{name}-{secrets.token_hex(2)}") as url:
            p = run_pipeline(
                appeals=appeals,
                workers=args.workers,
                threads=args.threads,
                log_level=level,
                database_url=url,
                redis_server=redis_server,
                workdir=workdir,
                sink=sink,
                profile=profiled,
                timeout=args.timeout,
                pace=args.pace,
                preload=args.preload,
                config_dir=config_dir,
                history=history,
                history_days=args.history_days,
            )
        lat = p.latency_ms or [float("nan")]
        out[name] = {
            "log_level": level,
            "appeals": p.appeals,
            "deliveries": p.deliveries,
            "sent": p.sent,
            "states": p.states,
            "intake_rate": round(p.intake_rate, 1),
            "e2e_seconds": round(p.e2e_seconds, 3),
            "e2e_rate": round(p.e2e_rate, 1),
            "ratio": round(p.e2e_rate / base.rate, 3),
            "drain_rate": round(p.drain_rate, 1),
            "drain_ratio": round(p.drain_rate / base.rate, 3),
            "latency_p50_ms": round(percentile(lat, 50), 1),
            "latency_p99_ms": round(percentile(lat, 99), 1),
            "queued_at_missing": p.queued_at_missing,
            "worker_peak_rss_mb": round(max(p.worker_hwm_kb) / 1024, 1),
            "worker_peak_rss_mb_each": [round(k / 1024, 1) for k in p.worker_hwm_kb],
            "cpu_ms_per_delivery": {k: round(v * 1000 / max(p.deliveries, 1), 3) for k, v in p.cpu_s.items()},
            "sink_messages": p.sink["messages"],
            # the C sink cannot tell duplicates: letters it took beyond those the ledger sent
            "sink_duplicates": p.sink["duplicates"]
            if p.sink["duplicates"] is not None
            else max(p.sink["messages"] - p.sent, 0),
            "notes": p.notes,
        }
        if p.history is not None:
            out[name]["history"] = p.history
        if "bare_loop" in out:
            out[name]["drain_to_bare_loop"] = round(p.drain_rate / out["bare_loop"]["rate"], 3)
        if "naive_actor" in out:
            out[name]["drain_to_naive"] = round(p.drain_rate / out["naive_actor"]["rate"], 3)
            out[name]["e2e_to_naive"] = round(p.e2e_rate / out["naive_actor"]["rate"], 3)
            # CPU of a letter against the naive actor's per message, measured in the same minutes:
            # this machine's speed swings by half between runs, and both sides swing together
            naive_cpu = out["naive_actor"]["cpu_ms_per_message"]
            if naive_cpu:
                out[name]["cpu_to_naive"] = round(out[name]["cpu_ms_per_delivery"]["workers"] / naive_cpu, 3)
        if p.profile is not None:
            out[name]["profile"] = p.profile
        log(
            f"{name}: {p.e2e_rate:.0f} letters/s end to end (ratio {p.e2e_rate / base.rate:.2f}), "
            f"workers alone {p.drain_rate:.0f} letters/s"
            + (f" ({out[name]['drain_to_naive']:.2f}× the naive actor)" if "naive_actor" in out else "")
            + f", intake {p.intake_rate:.0f} appeals/s"
        )
    if "pipeline_info" in out:
        out["info_logging_cost"] = round(1 - out["pipeline_info"]["e2e_rate"] / out["pipeline"]["e2e_rate"], 3)
    if "pipeline_history" in out:
        out["history_drain_ratio"] = round(out["pipeline_history"]["drain_rate"] / out["pipeline"]["drain_rate"], 3)
        out["history_e2e_ratio"] = round(out["pipeline_history"]["e2e_rate"] / out["pipeline"]["e2e_rate"], 3)
    return out


# --------------------------------------------------------------------------- reporting

ROWS: list[tuple[str, str, str]] = [
    # (label, dotted key, format)
    ("baseline: letters/s (1 connection, render+build+send)", "baseline.rate", "{:.0f}"),
    ("baseline: letters/s, SMTP part only", "baseline.smtp_only_rate", "{:.0f}"),
    ("baseline: share of time rendering + building", "baseline.render_share", "{:.0%}"),
    ("baseline: client CPU ms / letter", "baseline.cpu_ms_per_letter", "{:.2f}"),
    ("bare loop: messages/s (built beforehand, aiosmtplib, 1 connection)", "bare_loop.rate", "{:.0f}"),
    ("naive actor: messages/s (dramatiq, EmailMessage, smtplib, new connection each)", "naive_actor.rate", "{:.0f}"),
    ("naive actor: CPU ms / message (its processes)", "naive_actor.cpu_ms_per_message", "{:.2f}"),
    ("intake: appeals/s (1 thread, Service.intake.submit)", "pipeline.intake_rate", "{:.0f}"),
    ("end to end: letters/s (first enqueue → last sent_at)", "pipeline.e2e_rate", "{:.0f}"),
    ("ratio end to end / baseline (target ≥ 0.5)", "pipeline.ratio", "{:.2f}"),
    ("workers alone: letters/s (first claim → last sent_at)", "pipeline.drain_rate", "{:.0f}"),
    ("ratio workers alone / baseline", "pipeline.drain_ratio", "{:.2f}"),
    ("ratio workers alone / naive actor (aim ≥ 1.0)", "pipeline.drain_to_naive", "{:.2f}"),
    ("ratio end to end / naive actor", "pipeline.e2e_to_naive", "{:.2f}"),
    ("ratio workers alone / bare loop", "pipeline.drain_to_bare_loop", "{:.2f}"),
    ("latency sent_at − queued_at p50 (ms)", "pipeline.latency_p50_ms", "{:.0f}"),
    ("latency sent_at − queued_at p99 (ms)", "pipeline.latency_p99_ms", "{:.0f}"),
    ("worker peak RSS, VmHWM (MB)", "pipeline.worker_peak_rss_mb", "{:.1f}"),
    ("worker CPU ms / letter", "pipeline.cpu_ms_per_delivery.workers", "{:.2f}"),
    ("ratio worker CPU per letter / naive actor's per message", "pipeline.cpu_to_naive", "{:.2f}"),
    ("reconciler CPU ms / letter", "pipeline.cpu_ms_per_delivery.reconciler", "{:.2f}"),
    ("intake (bench process) CPU ms / letter", "pipeline.cpu_ms_per_delivery.intake", "{:.2f}"),
    ("redis-server CPU ms / letter", "pipeline.cpu_ms_per_delivery.redis", "{:.2f}"),
    ("sink CPU ms / letter", "pipeline.cpu_ms_per_delivery.sink", "{:.2f}"),
    ("sent / planned", "pipeline.sent", "{:.0f}"),
    ("duplicates at the sink", "pipeline.sink_duplicates", "{:.0f}"),
    ("sent rows with queued_at NULL (claimed before intake stamped them)", "pipeline.queued_at_missing", "{:.0f}"),
    ("INFO logging: end to end letters/s", "pipeline_info.e2e_rate", "{:.0f}"),
    ("INFO logging: ratio to baseline", "pipeline_info.ratio", "{:.2f}"),
    ("INFO logging: worker CPU ms / letter", "pipeline_info.cpu_ms_per_delivery.workers", "{:.2f}"),
    ("INFO logging: throughput lost vs WARNING", "info_logging_cost", "{:.0%}"),
    ("history: appeals in the ledger before the run", "pipeline.history.appeals", "{:,.0f}"),
    ("history: seconds to fill it", "pipeline.history.fill_seconds", "{:.0f}"),
    ("with history: appeals in the ledger before the run", "pipeline_history.history.appeals", "{:,.0f}"),
    ("with history: seconds to fill it", "pipeline_history.history.fill_seconds", "{:.0f}"),
    ("with history: end to end letters/s", "pipeline_history.e2e_rate", "{:.0f}"),
    ("with history: workers alone letters/s", "pipeline_history.drain_rate", "{:.0f}"),
    ("with history: ratio workers alone / naive actor", "pipeline_history.drain_to_naive", "{:.2f}"),
    ("with history: intake appeals/s", "pipeline_history.intake_rate", "{:.0f}"),
    ("with history: worker CPU ms / letter", "pipeline_history.cpu_ms_per_delivery.workers", "{:.2f}"),
    ("with history: reconciler CPU ms / letter", "pipeline_history.cpu_ms_per_delivery.reconciler", "{:.2f}"),
    ("with history: redis-server CPU ms / letter", "pipeline_history.cpu_ms_per_delivery.redis", "{:.2f}"),
    ("with history: latency p50 (ms)", "pipeline_history.latency_p50_ms", "{:.0f}"),
    ("with history / empty ledger: workers alone (aim ≥ 0.9)", "history_drain_ratio", "{:.2f}"),
    ("with history / empty ledger: end to end", "history_e2e_ratio", "{:.2f}"),
]


PIPELINE_RUNS = ("pipeline", "pipeline_history", "pipeline_info", "pipeline_profiled")
SINK_NAMES = {"smtp-sink": "Postfix smtp-sink (C)", "python": "bench/smtp_sink.py (aiosmtpd)"}


def dig(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(obj, dict) or part not in obj:
            return None
        obj = obj[part]
    return obj


def medians(reps: list[dict[str, Any]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for _, key, _ in ROWS:
        values = [v for r in reps if isinstance(v := dig(r, key), int | float)]
        if values:
            out[key] = round(statistics.median(values), 3)
    return out


def print_table(args: argparse.Namespace, reps: list[dict[str, Any]], med: dict[str, float]) -> None:
    title = (
        f"dispatcher throughput — {reps[0]['pipeline']['deliveries']} letters, {args.workers} worker(s) × "
        f"{args.threads} threads, {'PostgreSQL' if args.database_url else 'SQLite'}, {os.cpu_count()} CPUs, "
        f"sink {SINK_NAMES[args.sink]}"
        + (f", intake paced at {args.pace:g} appeals/s" if args.pace else "")
        + (", appeals preloaded before the workers start" if args.preload else "")
        + (", every letter DKIM-signed (RSA + Ed25519)" if args.dkim else "")
        + (
            f", pipeline with {args.history:,} historical appeals against an empty ledger, alternating"
            if args.compare_history
            else (f", {args.history:,} historical appeals in the ledger" if args.history else "")
        )
        + (f", {len(reps)} repetitions" if len(reps) > 1 else "")
    )
    table = Table(title=title, title_justify="left")
    table.add_column("measure")
    table.add_column("median" if len(reps) > 1 else "value", justify="right")
    if len(reps) > 1:
        for i in range(len(reps)):
            table.add_column(f"#{i + 1}", justify="right", style="dim")
    for label, key, fmt in ROWS:
        if key not in med:
            continue
        cells = [fmt.format(med[key])]
        if len(reps) > 1:
            cells += [fmt.format(v) if isinstance(v := dig(r, key), int | float) else "" for r in reps]
        table.add_row(label, *cells)
    console.print(table)
    for i, rep in enumerate(reps, 1):
        for name in PIPELINE_RUNS:
            for note in dig(rep, f"{name}.notes") or []:
                console.print(f"[yellow]#{i} {name}: {note}[/yellow]")
            states = dig(rep, f"{name}.states") or {}
            if set(states) - {"sent"}:
                console.print(f"[yellow]#{i} {name}: deliveries not sent: {states}[/yellow]")
    for rep in reps:
        prof = dig(rep, "pipeline_profiled.profile")
        if prof:
            from stack_summary import print_summary

            print_summary(console, prof)
            break


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain"], capture_output=True, text=True)
    except OSError:
        return None
    return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "") if out.returncode == 0 else None


def record(args: argparse.Namespace, reps: list[dict[str, Any]], med: dict[str, float]) -> None:
    def slim(rep: dict[str, Any]) -> dict[str, Any]:
        rep = json.loads(json.dumps(rep))
        for name in PIPELINE_RUNS:
            if name in rep:
                rep[name].pop("profile", None)
                if not rep[name].get("notes"):
                    rep[name].pop("notes", None)
        return rep

    line = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "args": {
            "deliveries": args.deliveries,
            "workers": args.workers,
            "threads": args.threads,
            "database": "postgresql" if args.database_url else "sqlite",
            "repeat": args.repeat,
            "profile": args.profile,
            "pace": args.pace or None,
            "preload": args.preload,
            "dkim": args.dkim,
            "sink": args.sink,
            "comparisons": args.comparisons,
            **bench_history.recorded_arguments(args),
        },
        "median": med,
        "runs": [slim(r) for r in reps],
    }
    profile = next((p for r in reps if (p := dig(r, "pipeline_profiled.profile"))), None)
    if profile:
        line["profile"] = {k: profile[k] for k in ("samples", "by_category", "by_step")}
    append_result(RESULTS, line)


# --------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description="End-to-end throughput against a same-run baseline.")
    parser.add_argument("--deliveries", type=int, default=5000, help="letters per run (appeals = deliveries / 5)")
    parser.add_argument("--workers", type=int, default=1, help="worker processes")
    parser.add_argument("--threads", type=int, default=8, help="threads per worker (dispatcher worker --threads)")
    parser.add_argument(
        "--database-url",
        default=None,
        help="PostgreSQL server to create a fresh database on, e.g. postgresql+psycopg://postgres@127.0.0.1:5432/ "
        "(default: SQLite in a temp dir)",
    )
    parser.add_argument("--repeat", type=int, default=1, help="run everything K times and report medians")
    parser.add_argument(
        "--info-run", action="store_true", help="one more pipeline run with the workers logging at INFO (its cost)"
    )
    parser.add_argument(
        "--profile", action="store_true", help="one extra WARNING run with the workers sampled by py-spy --gil"
    )
    parser.add_argument(
        "--profile-level", default="WARNING", choices=("WARNING", "INFO"), help="worker log level of the profiled run"
    )
    parser.add_argument(
        "--pace",
        type=float,
        default=0.0,
        help="submit this many appeals/s instead of as fast as possible (latency without a backlog)",
    )
    parser.add_argument(
        "--preload",
        action="store_true",
        help="submit every appeal before the workers start: intake uncontended, then a pure drain",
    )
    parser.add_argument(
        "--dkim", action="store_true", help="the workers DKIM-sign every letter (RSA + Ed25519, fresh keys)"
    )
    parser.add_argument(
        "--sink",
        choices=SINKS,
        default=None,
        help="the SMTP sink every phase sends to: Postfix's smtp-sink (C, installed with apt-get when missing; "
        "the default when available) or bench/smtp_sink.py (aiosmtpd; counts duplicate Message-IDs)",
    )
    parser.add_argument(
        "--no-comparisons",
        dest="comparisons",
        action="store_false",
        help="skip the bare aiosmtplib loop and the naive dramatiq actor",
    )
    bench_history.add_arguments(parser, "the pipeline")
    parser.add_argument("--timeout", type=float, default=600.0, help="longest wait for all letters, seconds")
    parser.add_argument("--no-record", dest="record", action="store_false", help="do not append to the results file")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (logs, ledgers, profiles) and print it")
    args = parser.parse_args()
    if args.deliveries < 5 or args.workers < 1 or args.threads < 1 or args.repeat < 1:
        parser.error("--deliveries ≥ 5, --workers, --threads and --repeat ≥ 1")
    bench_history.check_arguments(parser, args)
    if args.database_url:
        postgres_admin(args.database_url)
    args.sink = args.sink or default_sink()
    if args.sink == "smtp-sink":
        from debian import ensure_smtp_sink

        ensure_smtp_sink()
    log(f"sink: {SINK_NAMES[args.sink]}")
    if args.profile and not Path(sys.executable).with_name("py-spy").exists():
        parser.error("--profile needs py-spy in the venv: .venv/bin/pip install py-spy")
    configure_logging("WARNING")

    reps: list[dict[str, Any]] = []
    tmp = tempfile.mkdtemp(prefix="dispatch-bench-")
    try:
        with RedisServer(appendonly=False) as redis_server:
            workdir = Path(tmp)
            config_dir = signing_config(workdir) if args.dkim else CONFIG_DIR
            for i in range(args.repeat):
                if args.repeat > 1:
                    log(f"[bold]repetition {i + 1}/{args.repeat}[/bold]")
                reps.append(one_repetition(args, redis_server, workdir, index=i, config_dir=config_dir))
    finally:
        if args.keep:
            log(f"work dir kept: {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    med = medians(reps)
    print_table(args, reps, med)
    if args.record:
        record(args, reps, med)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
