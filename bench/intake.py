"""Intake over HTTP: accepted appeals/s and latency of ``dispatcher api`` under wrk, against the
framework's own ceiling measured in the same run.

What one repetition does (see docs/benchmarks.md, "Intake"):

1. **bare** — wrk against bench/intake_bare.py: a FastAPI app served by uvicorn the same way,
   whose POST /v1/appeals only parses the JSON and answers 202. What the framework and this
   machine can do at all.
2. **intake** — a fresh ledger (SQLite in a temp dir, or a fresh PostgreSQL database with
   ``--database-url``), ``dispatcher api`` on a private redis-server, and NO worker: the queue
   just grows. wrk posts pre-generated, distinct, correctly signed appeals (distinct supporters
   and client_refs), each one once, with 32 connections for ``--duration`` seconds. Afterwards
   the ledger is counted: every 202 must be an appeal in it.

The intake quotas are off (``DISPATCH_SECTION_QUOTA``, ``DISPATCH_SUPPORTER_QUOTA`` and
``DISPATCH_CLIENT_IP_QUOTA`` set to ""): the default section quota, 600/minute, would refuse
all but 10 appeals a second. ``--quotas unbinding`` sets rates that never bind instead, so that
their Redis work stays in the measurement.

Signatures: ``Dispatch-Signature`` with ``t`` a little in the future (now + 240 s), which the
scheme's ±300 s window accepts, so that appeals signed before the bare run are still fresh at
the end of the intake run.

``--history N`` fills the ledger with N historical appeals (bench/history.py) before the
appeals are signed; with ``--compare-history`` each repetition measures intake on an empty
ledger and on one with history, alternating which goes first.

    .venv/bin/python bench/intake.py [--duration 20] [--connections 32] [--database-url URL]
        [--repeat 1] [--api-workers N] [--quotas off|unbinding] [--profile [--profile-gil]
        [--profile-out DIR]]
        [--history N [--compare-history] [--history-days 60]]

wrk (Debian package ``wrk``) is installed with apt-get when missing (as root). Figures go to
stdout (a table) and, one JSON line per invocation, to bench/results/intake.jsonl.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT_DIR = Path(__file__).resolve().parent.parent
if str(ROOT_DIR) not in sys.path:
    sys.path.insert(0, str(ROOT_DIR))

import history as bench_history  # noqa: E402
from debian import ensure_wrk  # noqa: E402
from sqlalchemy import func, select  # noqa: E402
from throughput import (  # noqa: E402
    BENCH,
    CONFIG_DIR,
    DISPATCHER,
    KEY_ENV,
    PYTHON,
    TEMPLATES_DIR,
    appeal_payload,
    append_result,
    child_env,
    console,
    default_sink,
    die_with_parent,
    dig,
    fill_ledger_history,
    fresh_database,
    git_commit,
    log,
    make_sink,
    postgres_admin,
    stop_process,
    tail,
    tree_cpu_seconds,
)

from dispatcher.app import Service  # noqa: E402
from dispatcher.intake import signature  # noqa: E402
from dispatcher.ledger.tables import AP, D  # noqa: E402
from dispatcher.logging import configure as configure_logging  # noqa: E402
from dispatcher.settings import Settings  # noqa: E402
from tests.support.services import RedisServer, free_port, wait_for_port  # noqa: E402

RESULTS = BENCH / "results" / "intake.jsonl"
LUA = BENCH / "intake.lua"
PATH = "/v1/appeals"
#: how far in the future the signatures' ``t`` is: within the scheme's ±300 s, and enough that
#: appeals signed before the bare run are fresh until the intake run ends
SIGN_AHEAD_S = 240
#: the longest --duration those signatures stay fresh for (two runs, bare then intake)
MAX_DURATION_S = (signature.TOLERANCE_SECONDS + SIGN_AHEAD_S - 60) // 2
QUOTA_VARS = ("DISPATCH_SECTION_QUOTA", "DISPATCH_SUPPORTER_QUOTA", "DISPATCH_CLIENT_IP_QUOTA")
UNBINDING_RATE = "1000000000/minute"
#: sequential requests before each wrk run: imports, connection pools and caches are warm
WARMUP_REQUESTS = 20


# --------------------------------------------------------------------------- tools


def api_supports_workers() -> bool:
    out = subprocess.run([DISPATCHER, "api", "--help"], capture_output=True, text=True)
    return "--workers" in out.stdout


def wait_healthy(port: int, proc: subprocess.Popen[bytes], log_path: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}:\n{tail(log_path)}")
        with (
            contextlib.suppress(OSError, urllib.error.URLError),
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as resp,
        ):
            if resp.status == 200:
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"the server did not answer /healthz within {timeout:.0f} s:\n{tail(log_path)}")
        time.sleep(0.1)


# --------------------------------------------------------------------------- appeals


def signed_lines(key: str, first: int, count: int, run: str) -> list[str]:
    """``count`` lines "<Dispatch-Signature>\\t<body>": distinct supporters and client_refs."""
    t = int(time.time()) + SIGN_AHEAD_S
    secret = key.encode()
    lines = []
    for i in range(first, first + count):
        body = json.dumps(appeal_payload(i, run), separators=(",", ":"))
        lines.append(f"t={t},v1={signature.compute(secret, t, body.encode())}\t{body}")
    return lines


def warm_up(port: int, lines: list[str]) -> list[int]:
    """Post ``lines`` one after another; their statuses."""
    statuses = []
    for line in lines:
        header, _, body = line.partition("\t")
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}{PATH}",
            data=body.encode(),
            headers={"Content-Type": "application/json", signature.HEADER: header},
            method="POST",
        )
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:  # noqa: S310 (http://127.0.0.1 only)
                statuses.append(resp.status)
        except urllib.error.HTTPError as exc:
            statuses.append(exc.code)
    return statuses


# --------------------------------------------------------------------------- wrk


@dataclass
class WrkRun:
    seconds: float
    requests: int
    accepted: int
    other_2xx: int
    non_2xx: int
    exhausted: int
    statuses: dict[str, int]
    errors: dict[str, int]
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    server_cpu_s: float

    @property
    def accepted_rate(self) -> float:
        return self.accepted / self.seconds

    def as_dict(self) -> dict[str, Any]:
        return {
            "seconds": round(self.seconds, 2),
            "requests": self.requests,
            "accepted": self.accepted,
            "accepted_rate": round(self.accepted_rate, 1),
            "other_2xx": self.other_2xx,
            "non_2xx": self.non_2xx,
            "exhausted": self.exhausted,
            "statuses": self.statuses,
            "socket_errors": self.errors,
            "p50_ms": round(self.p50_ms, 1),
            "p90_ms": round(self.p90_ms, 1),
            "p99_ms": round(self.p99_ms, 1),
            "max_ms": round(self.max_ms, 1),
            "server_cpu_ms_per_accepted": round(self.server_cpu_s * 1000 / max(self.accepted, 1), 3),
        }


def run_wrk(
    args: argparse.Namespace, wrk: str, port: int, appeals_file: Path, server_pid: int, *, wrap: bool
) -> WrkRun:
    env = {
        **os.environ,
        "INTAKE_APPEALS": str(appeals_file),
        "INTAKE_THREADS": str(args.wrk_threads),
        "INTAKE_WRAP": "1" if wrap else "0",
    }
    cmd = [
        wrk,
        "-t",
        str(args.wrk_threads),
        "-c",
        str(args.connections),
        "-d",
        f"{args.duration}s",
        "--timeout",
        "10s",
        "-s",
        str(LUA),
        f"http://127.0.0.1:{port}{PATH}",
    ]
    cpu_before = tree_cpu_seconds(server_pid)
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.duration + 120)
    cpu = tree_cpu_seconds(server_pid) - cpu_before
    match = re.search(r"^INTAKE_RESULT (\{.*\})$", done.stdout, re.MULTILINE)
    if done.returncode != 0 or match is None:
        raise RuntimeError(f"wrk failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    r = json.loads(match.group(1))
    lat = r["latency_us"]
    return WrkRun(
        seconds=r["duration_us"] / 1e6,
        requests=r["requests"],
        accepted=r["accepted"],
        other_2xx=r["other_2xx"],
        non_2xx=r["non_2xx"],
        exhausted=r["exhausted"],
        statuses=dict(sorted(r["statuses"].items())),
        errors=r["errors"],
        p50_ms=lat["p50"] / 1000,
        p90_ms=lat["p90"] / 1000,
        p99_ms=lat["p99"] / 1000,
        max_ms=lat["max"] / 1000,
        server_cpu_s=cpu,
    )


# --------------------------------------------------------------------------- servers


@contextlib.contextmanager
def server(cmd: list[str], env: dict[str, str] | None, port: int, log_path: Path, cwd: Path) -> Any:
    with open(log_path, "wb") as logf:
        proc = subprocess.Popen(
            [*die_with_parent(), *cmd],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=logf,
            stderr=subprocess.STDOUT,
            cwd=cwd,
        )
    try:
        wait_for_port("127.0.0.1", port, timeout=60)
        wait_healthy(port, proc, log_path)
        yield proc
    finally:
        stop_process(proc, timeout=20)


def api_env(settings: Settings, key: str, args: argparse.Namespace) -> dict[str, str]:
    env = child_env(settings, key, args.log_level)
    rate = "" if args.quotas == "off" else UNBINDING_RATE
    env.update(dict.fromkeys(QUOTA_VARS, rate))
    return env


def py_spy(pid: int, out: Path, log_path: Path, *, gil: bool = False) -> subprocess.Popen[bytes]:
    """Wall-clock samples of every thread of the API (waits included: a request waiting for the
    pool or for SQLite's lock is time the supporter waits); with ``gil``, only the thread that
    holds the GIL: where the process's CPU goes."""
    with open(log_path, "wb") as errf:
        spy = subprocess.Popen(
            [
                str(Path(sys.executable).with_name("py-spy")),
                "record",
                "--pid",
                str(pid),
                "--gil" if gil else "--idle",
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
    time.sleep(1.0)  # py-spy attaches
    return spy


_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^():]*)(?::(?P<line>\d+))?\)$")


def _ours(file: str) -> bool:
    # py-spy names files relative to their sys.path entry: "dispatcher/intake/service.py"
    return file.startswith("dispatcher/") or "/dispatcher/" in file


def summarise_profile(path: Path, top: int = 15) -> dict[str, Any]:
    """Samples of request-handling threads (stacks through dispatcher code), by the innermost
    dispatcher function and the library call it was in, as shares of those samples."""
    by_site: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        parsed = [_FRAME.match(f) for f in frames]
        mine = [i for i, m in enumerate(parsed) if m and _ours(m.group("file"))]
        if not mine:
            continue  # idle pool threads, the event loop between requests
        n = int(count)
        total += n
        i = mine[-1]
        m = parsed[i]
        assert m is not None
        where = f"{m.group('func')} ({Path(m.group('file')).name})"
        callee = parsed[i + 1] if i + 1 < len(parsed) else None
        if callee is not None:
            lib = callee.group("file").split("site-packages/")[-1].split("/")[0]
            where += f" → {lib}:{callee.group('func')}"
        by_site[where] += n
    return {
        "samples": total,
        "top": {k: round(v / total, 3) for k, v in by_site.most_common(top)} if total else {},
    }


def start_drainers(args: argparse.Namespace, env: dict[str, str], workdir: Path, run: str) -> list[Any]:
    """``--draining N``: N ``dispatcher worker --threads 4`` and a ``dispatcher reconcile``,
    started just before wrk, sending what intake queues to the sink (workers sharing the two
    cores with the API, as on a small production machine)."""
    procs = []
    for name, cmd in [
        *[(f"worker-{i}", ["worker", "--threads", "4"]) for i in range(args.draining)],
        ("reconciler", ["reconcile", "--interval", "1"]),
    ]:
        with open(workdir / f"{name}-{run}.log", "wb") as logf:
            procs.append(
                subprocess.Popen(
                    [*die_with_parent(), DISPATCHER, *cmd],
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=logf,
                    stderr=subprocess.STDOUT,
                    cwd=workdir,
                )
            )
    time.sleep(3.0)  # imported and consuming before the load starts
    return procs


# --------------------------------------------------------------------------- one repetition


def one_repetition(
    args: argparse.Namespace, wrk: str, redis_server: RedisServer, workdir: Path, history: int = 0
) -> dict[str, Any]:
    """The bare endpoint, then intake on a fresh ledger holding ``history`` historical appeals."""
    run = secrets.token_hex(3)
    key = secrets.token_hex(16)
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(fresh_database(args.database_url, workdir, f"ledger-{run}"))
        # --draining: the workers send to Postfix's C sink (or the Python one), as in bench/throughput.py
        sink = stack.enter_context(make_sink(default_sink(), workdir, f"sink-{run}")) if args.draining else None
        settings = Settings(
            config_dir=CONFIG_DIR,
            templates_dir=TEMPLATES_DIR,
            var_dir=workdir / f"var-{run}",
            database_url=url,
            redis_url=redis_server.url,
            redis_namespace=f"bench-{run}",
            mode="sandbox",
            pepper=secrets.token_hex(8),
            sandbox_smtp_host="127.0.0.1",
            sandbox_smtp_port=sink.port if sink is not None else 2525,
        )
        service = Service(settings, environ={KEY_ENV: key})
        try:
            service.ledger.migrate()
            # Before the appeals are signed: their signatures are fresh for a few minutes only.
            filled = fill_ledger_history(service, history, args.history_days) if history else None
            # the run's appeals are those created from here on (history is at least an hour older)
            since = datetime.now(UTC)
            out = _measure(args, wrk, run, key, settings, service, workdir, since)
        finally:
            service.ledger.dispose()
            with contextlib.suppress(Exception):
                service.broker.close()
    if filled is not None:
        out["history"] = filled
    return out


def _measure(
    args: argparse.Namespace,
    wrk: str,
    run: str,
    key: str,
    settings: Settings,
    service: Service,
    workdir: Path,
    since: datetime,
) -> dict[str, Any]:
    t0 = time.monotonic()
    lines = signed_lines(key, 0, args.appeals + 2 * WARMUP_REQUESTS, run)
    warm_bare, warm_api, measured = (
        lines[:WARMUP_REQUESTS],
        lines[WARMUP_REQUESTS : 2 * WARMUP_REQUESTS],
        lines[2 * WARMUP_REQUESTS :],
    )
    appeals_file = workdir / f"appeals-{run}.txt"
    appeals_file.write_text("\n".join(measured) + "\n")
    log(f"{len(lines)} signed appeals in {time.monotonic() - t0:.1f} s")
    out: dict[str, Any] = {}

    bare_port = free_port()
    bare_cmd = [PYTHON, str(BENCH / "intake_bare.py"), "--port", str(bare_port), "--workers", str(args.api_workers)]
    with server(bare_cmd, None, bare_port, workdir / f"bare-{run}.log", workdir) as proc:
        warm_up(bare_port, warm_bare)
        log(f"bare endpoint: wrk -c {args.connections} -d {args.duration}s")
        bare = run_wrk(args, wrk, bare_port, appeals_file, proc.pid, wrap=True)
    out["bare"] = bare.as_dict()
    log(f"bare endpoint: {bare.accepted_rate:.0f} 202/s, p99 {bare.p99_ms:.0f} ms")

    api_port = free_port()
    api_cmd = [DISPATCHER, "api", "--host", "127.0.0.1", "--port", str(api_port)]
    if args.api_workers > 1:
        api_cmd += ["--workers", str(args.api_workers)]
    env = api_env(settings, key, args)
    api_log = workdir / f"api-{run}.log"
    with server(api_cmd, env, api_port, api_log, workdir) as proc:
        warm = warm_up(api_port, warm_api)
        if any(s != 202 for s in warm):
            raise RuntimeError(f"warm-up appeals were refused: {Counter(warm)}\n{tail(api_log)}")
        spy = None
        if args.profile:
            spy = py_spy(proc.pid, workdir / f"profile-{run}.txt", workdir / f"py-spy-{run}.log", gil=args.profile_gil)
        drainers = start_drainers(args, env, workdir, run) if args.draining else []
        log(
            f"intake: wrk -c {args.connections} -d {args.duration}s, "
            + (f"{args.draining} workers × 4 threads and a reconciler draining" if drainers else "workers stopped")
        )
        started = datetime.now(UTC)
        try:
            intake = run_wrk(args, wrk, api_port, appeals_file, proc.pid, wrap=False)
        finally:
            ended = datetime.now(UTC)
            if spy is not None:
                stop_process(spy, signal.SIGINT, timeout=60)
            for drainer in drainers:
                stop_process(drainer)
        api_exit_log = tail(api_log, 5)
    with service.ledger.engine.connect() as conn:
        in_ledger = conn.execute(
            select(func.count()).select_from(AP).where(AP.c.created_at >= since)
        ).scalar_one() - len(warm)
        sent = conn.execute(
            select(func.count()).select_from(D).where(D.c.sent_at >= started, D.c.sent_at < ended)
        ).scalar_one()
    out["intake"] = intake.as_dict()
    out["intake"]["appeals_in_ledger"] = in_ledger
    if args.draining:
        out["intake"]["letters_sent_per_s"] = round(sent / (ended - started).total_seconds(), 1)
    out["ratio"] = round(intake.accepted_rate / bare.accepted_rate, 3) if bare.accepted_rate else None
    notes = []
    if intake.exhausted:
        notes.append(f"ran out of pre-generated appeals: the run is not valid, rerun with --appeals > {args.appeals}")
    # requests still in flight when wrk stops are written but their 202s are not counted
    if in_ledger < intake.accepted:
        notes.append(f"{intake.accepted} answered 202 but only {in_ledger} appeals are in the ledger")
    if intake.non_2xx:
        notes.append(f"non-2xx answers {intake.statuses}; the API's log ends:\n{api_exit_log}")
    out["notes"] = notes
    if args.profile:
        out["profile"] = summarise_profile(workdir / f"profile-{run}.txt")
        if args.profile_out:
            args.profile_out.mkdir(parents=True, exist_ok=True)
            shutil.copy(workdir / f"profile-{run}.txt", args.profile_out / f"profile-{run}.txt")
    log(
        f"intake: {intake.accepted_rate:.0f} appeals/s, p50 {intake.p50_ms:.0f} ms, p99 {intake.p99_ms:.0f} ms, "
        f"non-2xx {intake.non_2xx}, ratio to bare {out['ratio']}"
    )
    return out


# --------------------------------------------------------------------------- reporting

ROWS: list[tuple[str, str, str]] = [
    ("intake: accepted appeals/s (202s / wrk's duration)", "intake.accepted_rate", "{:.0f}"),
    ("intake: latency p50 (ms)", "intake.p50_ms", "{:.1f}"),
    ("intake: latency p99 (ms)", "intake.p99_ms", "{:.1f}"),
    ("intake: latency max (ms)", "intake.max_ms", "{:.0f}"),
    ("intake: non-2xx answers", "intake.non_2xx", "{:.0f}"),
    ("intake: socket errors (timeouts)", "intake.socket_errors.timeout", "{:.0f}"),
    ("intake: API CPU ms / accepted appeal", "intake.server_cpu_ms_per_accepted", "{:.2f}"),
    ("intake: appeals in the ledger (≥ the 202s: + those in flight at the end)", "intake.appeals_in_ledger", "{:.0f}"),
    ("intake: 202s", "intake.accepted", "{:.0f}"),
    ("intake: letters sent per second meanwhile (--draining)", "intake.letters_sent_per_s", "{:.0f}"),
    ("bare endpoint: 202/s (FastAPI + uvicorn, parse JSON, answer)", "bare.accepted_rate", "{:.0f}"),
    ("bare endpoint: latency p50 (ms)", "bare.p50_ms", "{:.1f}"),
    ("bare endpoint: latency p99 (ms)", "bare.p99_ms", "{:.1f}"),
    ("bare endpoint: server CPU ms / request", "bare.server_cpu_ms_per_accepted", "{:.2f}"),
    ("ratio intake / bare endpoint", "ratio", "{:.3f}"),
    ("history: appeals in the ledger before the run", "history.appeals", "{:,.0f}"),
    ("history: seconds to fill it", "history.fill_seconds", "{:.0f}"),
    ("with history: appeals in the ledger before the run", "with_history.history.appeals", "{:,.0f}"),
    ("with history: seconds to fill it", "with_history.history.fill_seconds", "{:.0f}"),
    ("with history: accepted appeals/s", "with_history.intake.accepted_rate", "{:.0f}"),
    ("with history: latency p50 (ms)", "with_history.intake.p50_ms", "{:.1f}"),
    ("with history: latency p99 (ms)", "with_history.intake.p99_ms", "{:.1f}"),
    ("with history: non-2xx answers", "with_history.intake.non_2xx", "{:.0f}"),
    ("with history: API CPU ms / accepted appeal", "with_history.intake.server_cpu_ms_per_accepted", "{:.2f}"),
    ("with history: bare endpoint 202/s (its own run)", "with_history.bare.accepted_rate", "{:.0f}"),
    ("with history / empty ledger: accepted appeals/s (aim ≥ 0.9)", "history_ratio", "{:.2f}"),
]


def medians(reps: list[dict[str, Any]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for _, key, _ in ROWS:
        values = [v for r in reps if isinstance(v := dig(r, key), int | float)]
        if values:
            out[key] = round(statistics.median(values), 3)
    return out


def describe(args: argparse.Namespace) -> str:
    return (
        f"dispatcher intake over HTTP — wrk -c {args.connections} -t {args.wrk_threads} -d {args.duration}s, "
        f"{'PostgreSQL' if args.database_url else 'SQLite'}, {args.api_workers} API process(es), "
        + (f"{args.draining} workers × 4 threads draining, " if args.draining else "workers stopped, ")
        + f"API log {args.log_level}, {os.cpu_count()} CPUs"
        + (
            f", intake on an empty ledger and on one with {args.history:,} historical appeals, alternating"
            if args.compare_history
            else (f", {args.history:,} historical appeals in the ledger" if args.history else "")
        )
    )


def print_table(args: argparse.Namespace, reps: list[dict[str, Any]], med: dict[str, float]) -> None:
    title = describe(args) + (f", {len(reps)} repetitions" if len(reps) > 1 else "")
    from rich.table import Table

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
    if args.quotas == "off":
        console.print(
            'Intake quotas are off (DISPATCH_SECTION_QUOTA, DISPATCH_SUPPORTER_QUOTA, DISPATCH_CLIENT_IP_QUOTA = ""): '
            "the default section quota (600/minute) would refuse the load; --quotas unbinding keeps their Redis work."
        )
    else:
        console.print(f"Intake quotas are set to {UNBINDING_RATE}: they never bind, but their Redis work is measured.")
    console.print(
        f"Signatures carry t = now + {SIGN_AHEAD_S} s (the scheme accepts ±{signature.TOLERANCE_SECONDS} s); "
        "every appeal is posted once (distinct supporter and client_ref)."
    )
    for i, rep in enumerate(reps, 1):
        for note in [*(rep.get("notes") or []), *(dig(rep, "with_history.notes") or [])]:
            console.print(f"[yellow]#{i}: {note}[/yellow]")
    for rep in reps:
        prof = rep.get("profile")
        if prof:
            table = Table(
                title=f"API wall-clock samples of request threads ({prof['samples']}; py-spy --idle), "
                "by innermost dispatcher function → the library call it was in",
                title_justify="left",
            )
            table.add_column("where")
            table.add_column("share", justify="right")
            for where, share in prof["top"].items():
                table.add_row(where, f"{share:.1%}")
            console.print(table)
            break


def record(args: argparse.Namespace, reps: list[dict[str, Any]], med: dict[str, float]) -> None:
    line = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "args": {
            "duration": args.duration,
            "connections": args.connections,
            "wrk_threads": args.wrk_threads,
            "api_workers": args.api_workers,
            "database": "postgresql" if args.database_url else "sqlite",
            "quotas": args.quotas,
            "log_level": args.log_level,
            "repeat": args.repeat,
            "profile": args.profile,
            "draining": args.draining,
            **bench_history.recorded_arguments(args),
        },
        "median": med,
        "runs": reps,
    }
    append_result(RESULTS, line)


# --------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description="Intake over HTTP under wrk, against a bare FastAPI endpoint.")
    parser.add_argument("--duration", type=int, default=20, help="seconds of each wrk run")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections")
    parser.add_argument("--wrk-threads", type=int, default=1, help="wrk threads (the server needs the cores)")
    parser.add_argument(
        "--appeals",
        type=int,
        default=0,
        help="pre-generated appeals (default: 4,000 per second of --duration); each is posted once",
    )
    parser.add_argument(
        "--database-url",
        default=None,
        help="PostgreSQL server to create a fresh database on, e.g. postgresql+psycopg://postgres@127.0.0.1:5432/ "
        "(default: SQLite in a temp dir)",
    )
    parser.add_argument("--api-workers", type=int, default=1, help="API processes (dispatcher api --workers)")
    parser.add_argument(
        "--quotas",
        choices=("off", "unbinding"),
        default="off",
        help="off: quota settings empty; unbinding: rates that never bind (their Redis work measured)",
    )
    parser.add_argument(
        "--draining",
        type=int,
        default=0,
        metavar="N",
        help="N workers (× 4 threads) and a reconciler send to a sink during the intake run",
    )
    parser.add_argument("--log-level", default="WARNING", choices=("WARNING", "INFO"), help="the API's log level")
    parser.add_argument("--repeat", type=int, default=1, help="run everything K times and report medians")
    parser.add_argument("--profile", action="store_true", help="sample the API with py-spy during the intake run")
    parser.add_argument(
        "--profile-out", type=Path, help="keep py-spy's raw stacks (collapsed, one file per run) in this directory"
    )
    parser.add_argument(
        "--profile-gil", action="store_true", help="with --profile: sample only the thread holding the GIL (CPU)"
    )
    bench_history.add_arguments(parser, "intake")
    parser.add_argument("--no-record", dest="record", action="store_false", help="do not append to the results file")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (logs, ledgers, profiles) and print it")
    args = parser.parse_args()
    if not 1 <= args.duration <= MAX_DURATION_S:
        parser.error(f"--duration between 1 and {MAX_DURATION_S} s (the signatures' freshness window)")
    if args.connections < 1 or args.wrk_threads < 1 or args.api_workers < 1 or args.repeat < 1:
        parser.error("--connections, --wrk-threads, --api-workers and --repeat ≥ 1")
    args.appeals = args.appeals or 4000 * args.duration
    bench_history.check_arguments(parser, args)
    if args.database_url:
        postgres_admin(args.database_url)
    if args.api_workers > 1 and not api_supports_workers():
        parser.error("--api-workers > 1: this dispatcher api has no --workers option")
    if args.profile and not Path(sys.executable).with_name("py-spy").exists():
        parser.error("--profile needs py-spy in the venv: .venv/bin/pip install py-spy")
    wrk = ensure_wrk()
    configure_logging("WARNING")

    reps: list[dict[str, Any]] = []
    tmp = tempfile.mkdtemp(prefix="dispatch-intake-")
    try:
        with RedisServer(appendonly=False) as redis_server:
            for i in range(args.repeat):
                if args.repeat > 1:
                    log(f"[bold]repetition {i + 1}/{args.repeat}[/bold]")
                if not args.compare_history:
                    reps.append(one_repetition(args, wrk, redis_server, Path(tmp), args.history))
                    continue
                # an empty ledger and one with history, alternating which goes first
                order = [0, args.history] if i % 2 == 0 else [args.history, 0]
                runs = {h: one_repetition(args, wrk, redis_server, Path(tmp), h) for h in order}
                rep = runs[0]
                rep["with_history"] = runs[args.history]
                rep["history_ratio"] = round(
                    runs[args.history]["intake"]["accepted_rate"] / max(rep["intake"]["accepted_rate"], 1e-9), 3
                )
                reps.append(rep)
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
