"""What the worker's path costs per letter, by component, in one process under cProfile.

The real path: ``DeliveryProcessor`` (dispatcher/queue/deliver.py) built by ``Service.worker``
exactly as ``dispatcher worker`` builds it, on a fresh SQLite ledger (or a fresh PostgreSQL
database with ``--database-url``), a private ``redis-server`` for the caps and the send window
of the gate, and the bench's SMTP sink (bench/smtp_sink.py) in sandbox mode. The appeals go in
through intake first; then this process calls the processor once per delivery, in one thread,
as a dramatiq worker thread would (it sends too: the email channel is blocking; the event loop
thread, which sent until session 13, is still profiled for whatever else runs there).

Two passes over fresh letters: one plain, timed (CPU of the whole process per letter, wall time
per letter), and one under cProfile with a per-thread CPU clock in the calling thread and in
the event loop's thread, from which the table's components are taken (cumulative CPU of the
named functions; a component's figure includes what it calls, and profiling inflates all of
them by a similar factor, so compare shares and before/after, not absolutes with the plain pass).

    .venv/bin/python bench/worker_path.py [--letters 500] [--dkim] [--log-level WARNING]
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import re
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    # appended: a PYTHONPATH naming another checkout (the code before a change) wins
    sys.path.append(str(ROOT))

from bench.throughput import (  # noqa: E402
    CONFIG_DIR,
    EMAIL_LIMITS,
    KEY_ENV,
    TEMPLATES_DIR,
    Sink,
    appeal_payload,
    fresh_database,
    signing_config,
)
from dispatcher.app import Service  # noqa: E402
from dispatcher.logging import configure as configure_logging  # noqa: E402
from dispatcher.settings import Settings  # noqa: E402
from tests.support.services import RedisServer  # noqa: E402

#: component → (file suffix, function name) whose cumulative time is the component's; the
#: calling thread's unless marked "loop"
COMPONENTS: list[tuple[str, str, str, str]] = [
    ("claim (ledger)", "main", "dispatcher/ledger/lifecycle.py", "claim"),
    ("supporter (ledger read)", "main", "dispatcher/ledger/views.py", "supporter"),
    ("render (Jinja2)", "main", "dispatcher/render/documents.py", "render"),
    ("build the message (build_message)", "main", "dispatcher/channels/email/message.py", "build_message"),
    ("serialise + sign (wire)", "main", "dispatcher/channels/email/channel.py", "wire"),
    ("build the bytes (mime.letter_bytes)", "main", "dispatcher/channels/email/mime.py", "letter_bytes"),
    ("sign (signed)", "main", "dispatcher/channels/email/channel.py", "signed"),
    ("gate.admit (caps, Redis)", "main", "dispatcher/policy/gate.py", "admit"),
    ("finish (ledger)", "main", "dispatcher/ledger/lifecycle.py", "finish"),
    ("parked reports", "main", "dispatcher/queue/reports.py", "apply_parked"),
    ("controls / suppressions", "main", "dispatcher/queue/deliver.py", "_suppressed"),
    ("fallback.record", "main", "dispatcher/queue/fallback.py", "record"),
    ("send (SMTP pool, in the thread)", "main", "dispatcher/channels/email/channel.py", "send"),
]


def thread_profiler() -> cProfile.Profile:
    return cProfile.Profile(time.thread_time)


def cumulative(stats: pstats.Stats, suffix: str, name: str) -> float:
    total = 0.0
    for (filename, _line, func), (_cc, _nc, _tt, ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        if func == name and filename.endswith(suffix):
            total += ct
    return total


def structlog_seconds(stats: pstats.Stats) -> float:
    """Own time of everything in structlog and the json encoder it calls (the log lines)."""
    total = 0.0
    for (filename, _line, _func), (_cc, _nc, tt, _ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        if "/structlog/" in filename:
            total += tt
    return total


#: set in the process that callgrind runs (``--instructions``)
_UNDER_CALLGRIND = "DISPATCH_BENCH_UNDER_CALLGRIND"
_TOTALS = re.compile(r"^totals:\s+(\d+)", re.MULTILINE)


def count_instructions(args: argparse.Namespace) -> int:
    """This bench again under callgrind, collecting only during the plain pass: instructions per
    letter, the same from one run to the next whatever else the machine is doing (CPU time here
    swings by half between runs of the same code). Counts both of the process's threads (the
    worker's and the event loop's), not Redis or the sink."""
    from bench.debian import ensure_program  # (installs valgrind when missing, as root)

    valgrind = ensure_program("valgrind", "valgrind")
    with tempfile.TemporaryDirectory(prefix="dispatch-callgrind-") as tmp:
        out = Path(tmp) / "callgrind.out"
        argv = [
            valgrind,
            "--tool=callgrind",
            "-q",
            "--instr-atstart=no",  # (faster, too, until the plain pass)
            f"--callgrind-out-file={out}",
            sys.executable,
            *sys.argv,
        ]
        started = time.perf_counter()
        subprocess.run(argv, check=True, env={**os.environ, _UNDER_CALLGRIND: "1"}, stdout=subprocess.DEVNULL)
        found = _TOTALS.search(out.read_text(errors="replace"))
        if found is None:
            raise SystemExit(f"no totals in callgrind's output {out}")
        instructions = int(found.group(1))
    print(f"letters: {args.letters}, log level {args.log_level}, DKIM {'on' if args.dkim else 'off'}, under callgrind")
    print(
        f"instructions per letter (worker and loop threads): {instructions / args.letters / 1e6:.3f} M"
        f"  ({time.perf_counter() - started:.0f} s)"
    )
    if args.json:
        args.json.write_text(
            json.dumps({"letters": args.letters, "instructions_per_letter": instructions / args.letters})
        )
    return 0


def callgrind_collect(on: bool) -> None:
    """Switch callgrind's instrumentation of this process (``--instructions``); waits until done."""
    subprocess.run(
        ["callgrind_control", "--instr=on" if on else "--instr=off", str(os.getpid())],
        check=True,
        stdout=subprocess.DEVNULL,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--letters", type=int, default=500, help="letters per pass (two passes + 50 warm-up)")
    parser.add_argument("--dkim", action="store_true", help="the section DKIM-signs (RSA + Ed25519)")
    parser.add_argument("--log-level", default="WARNING", help="the worker's log level (the bench's is WARNING)")
    parser.add_argument("--database-url", default=None, help="PostgreSQL server (default: SQLite in a temp dir)")
    parser.add_argument("--top", type=int, default=0, help="also print the N functions with most own time")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    parser.add_argument(
        "--instructions",
        action="store_true",
        help="run under valgrind's callgrind and count the instructions of the plain pass only (no profiled pass)",
    )
    args = parser.parse_args()
    if args.instructions and not os.environ.get(_UNDER_CALLGRIND):
        return count_instructions(args)
    configure_logging(args.log_level, stream=open(os.devnull, "w"))  # noqa: SIM115 - for the process

    with tempfile.TemporaryDirectory(prefix="dispatch-worker-path-") as tmp:
        workdir = Path(tmp)
        config_dir = signing_config(workdir) if args.dkim else CONFIG_DIR
        with (
            RedisServer() as redis_server,
            Sink(workdir, "sink") as sink,
            fresh_database(args.database_url, workdir, "ledger") as url,
        ):
            figures = run(args, workdir, config_dir, url, redis_server, sink)
    if os.environ.get(_UNDER_CALLGRIND):
        return 0  # the parent prints (count_instructions)
    print_figures(args, figures)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


def run(
    args: argparse.Namespace, workdir: Path, config_dir: Path, url: str, redis_server: RedisServer, sink: Sink
) -> dict[str, Any]:
    key = secrets.token_hex(16)
    settings = Settings(
        config_dir=config_dir,
        templates_dir=TEMPLATES_DIR,
        var_dir=workdir / "var",
        database_url=url,
        redis_url=redis_server.url,
        redis_namespace=f"path-{secrets.token_hex(3)}",
        mode="sandbox",
        sandbox_smtp_host="127.0.0.1",
        sandbox_smtp_port=sink.port,
        pepper=secrets.token_hex(8),
        email_limits=(EMAIL_LIMITS,),
    )
    service = Service(settings, environ={KEY_ENV: key})
    service.ledger.migrate()
    warmup = 50
    total = warmup + 2 * args.letters
    ids: list[str] = []
    for i in range((total + 4) // 5):
        ids += [d.id for d in service.intake.submit(appeal_payload(i, "path")).deliveries]
    handle = service.worker(threads=1)
    processor = handle.processor
    loop = handle.loop
    try:
        for delivery_id in ids[:warmup]:
            processor(delivery_id)
        plain = ids[warmup : warmup + args.letters]
        profiled = ids[warmup + args.letters : total]

        counting = bool(os.environ.get(_UNDER_CALLGRIND))
        if counting:
            callgrind_collect(True)
        cpu0, wall0 = time.process_time(), time.perf_counter()
        for delivery_id in plain:
            processor(delivery_id)
        cpu_plain = (time.process_time() - cpu0) / len(plain)
        wall_plain = (time.perf_counter() - wall0) / len(plain)
        if counting:
            callgrind_collect(False)
            return {"letters": len(plain), "plain_cpu_ms_per_letter": cpu_plain * 1000}

        main_prof, loop_prof = thread_profiler(), thread_profiler()
        started = threading.Event()

        def on_loop(enable: bool) -> None:
            if enable:
                loop_prof.enable()
            else:
                loop_prof.disable()
            started.set()

        loop.loop.call_soon_threadsafe(on_loop, True)
        started.wait(5)
        started.clear()
        main_prof.enable()
        for delivery_id in profiled:
            processor(delivery_id)
        main_prof.disable()
        loop.loop.call_soon_threadsafe(on_loop, False)
        started.wait(5)
        sent = sink.wait_for(total, timeout=10)["messages"]
    finally:
        handle.stop(timeout_ms=5000)
        loop.stop()
    main_stats, loop_stats = pstats.Stats(main_prof), pstats.Stats(loop_prof)
    n = len(profiled)
    components = {}
    for label, thread, suffix, name in COMPONENTS:
        stats = main_stats if thread == "main" else loop_stats
        components[label] = cumulative(stats, suffix, name) * 1000 / n
    components["structlog (own time, both threads)"] = (
        (structlog_seconds(main_stats) + structlog_seconds(loop_stats)) * 1000 / n
    )
    main_total = cumulative(main_stats, "dispatcher/queue/deliver.py", "__call__") * 1000 / n
    loop_total = sum(v[2] for v in loop_stats.stats.values()) * 1000 / n  # type: ignore[attr-defined]
    if args.top:
        main_stats.sort_stats("tottime").print_stats(args.top)
        loop_stats.sort_stats("cumulative").print_stats(args.top)
    return {
        "letters": n,
        "sent_at_sink": sent,
        "plain_cpu_ms_per_letter": cpu_plain * 1000,
        "plain_wall_ms_per_letter": wall_plain * 1000,
        "profiled_worker_thread_ms": main_total,
        "profiled_loop_thread_ms": loop_total,
        "components_ms": components,
        "dkim": args.dkim,
        "log_level": args.log_level,
    }


def print_figures(args: argparse.Namespace, f: dict[str, Any]) -> None:
    print(
        f"letters per pass: {f['letters']}, at the sink: {f['sent_at_sink']}, log level {f['log_level']}, "
        f"DKIM {'on' if f['dkim'] else 'off'}"
    )
    print(
        f"plain pass: process CPU {f['plain_cpu_ms_per_letter']:.2f} ms/letter, "
        f"wall {f['plain_wall_ms_per_letter']:.2f} ms/letter"
    )
    whole = f["profiled_worker_thread_ms"] + f["profiled_loop_thread_ms"]
    print(
        f"profiled pass (thread CPU, cProfile overhead included): worker thread "
        f"{f['profiled_worker_thread_ms']:.2f} ms, loop thread {f['profiled_loop_thread_ms']:.2f} ms per letter"
    )
    print(f"{'component':<40} {'ms/letter':>10} {'share':>7}")
    for label, ms in f["components_ms"].items():
        print(f"{label:<40} {ms:>10.3f} {ms / whole:>7.1%}")


if __name__ == "__main__":
    raise SystemExit(main())
