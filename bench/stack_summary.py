"""Sum py-spy samples of a worker into what the lead can act on.

Input: py-spy ``record --format raw`` files (collapsed stacks, one ``f1;f2;...;leaf N`` line per
distinct stack, root first, each frame ``function (file:line)``). The benchmark records with
``--gil``: only the thread holding the GIL is sampled, so the samples are the worker's Python
CPU time, which is what bounds one worker process however many threads it runs (time spent
waiting for a lock, a socket or SQLite's busy handler is not in them).

Each sample is given one category: walking from the leaf towards the root, the first frame
that belongs to a known part decides (so SQLAlchemy calling ``datetime`` is ledger time,
Jinja2 calling ``re`` is rendering time). Also reported: the same samples by the delivery
step they belong to (the callee of ``DeliveryProcessor.__call__``), and the busiest leaves.

    .venv/bin/python bench/stack_summary.py PROFILE.txt [...]
"""

from __future__ import annotations

import re
import sys
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^():]*)(?::(?P<line>\d+))?\)$")

#: (category, substrings of a frame's file); first match from the leaf up wins
CATEGORIES: list[tuple[str, tuple[str, ...]]] = [
    ("logging (structlog / logging)", ("structlog/", "logging/__init__", "dispatcher/logging.py")),
    ("ledger: SQLAlchemy Core + driver", ("sqlalchemy/", "sqlite3/", "psycopg/", "dispatcher/ledger/")),
    ("render: Jinja2 letters", ("jinja2/", "dispatcher/render/", ".j2", "markupsafe/")),
    ("message: build (build_message, email headers)", ("dispatcher/channels/email/message.py",)),
    ("SMTP: aiosmtplib + asyncio + pool", ("aiosmtplib/", "asyncio/", "selectors.py", "dispatcher/channels/")),
    ("retry wrapper (tenacity)", ("tenacity/",)),
    ("queue: dramatiq + redis-py", ("dramatiq/", "redis/")),
    ("delivery logic (deliver.py, catalog)", ("dispatcher/queue/", "dispatcher/config/", "pydantic")),
]
STDLIB_EMAIL = ("email/",)


def parse(paths: Iterable[Path]) -> Counter[tuple[str, ...]]:
    stacks: Counter[tuple[str, ...]] = Counter()
    for path in paths:
        for line in Path(path).read_text(errors="replace").splitlines():
            stack, _, count = line.rpartition(" ")
            if not stack or not count.isdigit():
                continue
            stacks[tuple(stack.split(";"))] += int(count)
    return stacks


def _file(frame: str) -> str:
    m = _FRAME.match(frame)
    return m.group("file") if m else frame


def _func(frame: str) -> str:
    m = _FRAME.match(frame)
    return m.group("func") if m else frame


#: (category, substring of a frame's file) that claim every sample with such a frame anywhere in
#: the stack, before the leaf-up rules: the sending gate's Redis calls are the gate's, not the queue's
OWNERS: list[tuple[str, str]] = [
    ("sending gate (dispatcher/policy: caps, office hours; its Redis calls)", "dispatcher/policy/"),
]


def categorise(stack: tuple[str, ...]) -> str:
    for name, needle in OWNERS:
        if any(needle in _file(f) for f in stack):
            return name
    for i in range(len(stack) - 1, -1, -1):
        path = _file(stack[i])
        if any(path.startswith(p) or f"/{p}" in path for p in STDLIB_EMAIL) and "dispatcher/" not in path:
            # the standard library's email package: building headers, or serialising for DATA
            # (build_message, and deliver.py's replace_header, both build header objects)
            if any(_func(f) == "flatten_message" for f in stack[:i]):
                return "message: serialise (flatten_message)"
            return "message: build (build_message, email headers)"
        for name, needles in CATEGORIES:
            if any(n in path for n in needles):
                return name
    return "other (threading, interpreter, unknown)"


def step(stack: tuple[str, ...]) -> str:
    """What the delivery was doing: the callee of DeliveryProcessor.__call__, one level deeper
    for _attempt/_send_email; otherwise the thread's role."""
    names = [_func(f) for f in stack]
    if "DeliveryProcessor.__call__" in names:
        i = names.index("DeliveryProcessor.__call__")
        rest = [n for n in names[i + 1 :] if n not in ("DeliveryProcessor._attempt", "DeliveryProcessor._send_email")]
        callee = rest[0] if rest else "DeliveryProcessor.__call__ (own code)"
        if callee.startswith("LoopThread.run"):
            return "worker thread: handing the send to the loop / waiting"
        return f"worker thread: {callee}"
    files = [_file(f) for f in stack]
    if any("asyncio/" in f for f in files):
        return "event-loop thread (SMTP sends)"
    if "ConsumerThread.run" in names:
        return "dramatiq consumer thread (fetch from Redis)"
    if "WorkerThread.run" in names:
        return "worker thread: dramatiq around the actor"
    return "other threads"


def summarise(paths: Iterable[Path], top: int = 12) -> dict[str, Any]:
    stacks = parse(paths)
    total = sum(stacks.values())
    by_cat: Counter[str] = Counter()
    by_step: Counter[str] = Counter()
    leaves: Counter[str] = Counter()
    for stack, n in stacks.items():
        by_cat[categorise(stack)] += n
        by_step[step(stack)] += n
        leaves[stack[-1]] += n

    def share(c: Counter[str], limit: int | None = None) -> dict[str, float]:
        return {k: round(v / total, 3) for k, v in c.most_common(limit)} if total else {}

    return {
        "samples": total,
        "by_category": share(by_cat),
        "by_step": share(by_step, top),
        "top_leaves": share(leaves, top),
    }


def print_summary(console: Any, summary: dict[str, Any]) -> None:
    from rich.table import Table

    for key, title in (
        ("by_category", "worker CPU (GIL-holding samples) by part"),
        ("by_step", "worker CPU by delivery step / thread"),
        ("top_leaves", "busiest leaf frames"),
    ):
        table = Table(title=f"{title} — {summary['samples']} samples", title_justify="left")
        table.add_column("where")
        table.add_column("share", justify="right")
        for name, value in summary[key].items():
            table.add_row(name, f"{value:.1%}")
        console.print(table)


if __name__ == "__main__":
    from rich.console import Console

    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    print_summary(Console(), summarise([Path(p) for p in sys.argv[1:]]))
