"""SQLite's writers take turns at a lock file beside the database (dispatcher/ledger/engine.py,
WriteTurns): a writer waits for the one in a transaction and goes on the moment it ends, however
it ends, and a dead process's turn is not kept."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from sqlalchemy import text

from dispatcher.ledger.engine import make_engine, reading


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / "ledger.sqlite3"
    engine = make_engine(f"sqlite:///{path}")
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE t (n INTEGER)"))
    engine.dispose()
    return path


@pytest.mark.parametrize("ends", ["committed", "rolled back"])
def test_a_writer_waits_for_the_transaction_in_progress_and_goes_when_it_ends(db: Path, ends: str) -> None:
    """A transaction holds its turn until it ends, however it ends; meanwhile another thread's
    write waits, and it goes through once the first has ended."""
    engine = make_engine(f"sqlite:///{db}")
    started, end, done = threading.Event(), threading.Event(), threading.Event()
    failures: list[BaseException] = []

    def holder() -> None:
        try:
            with engine.begin() as conn:
                conn.execute(text("INSERT INTO t VALUES (1)"))
                started.set()
                assert end.wait(10)
                if ends == "rolled back":
                    raise RuntimeError("the transaction fails and is rolled back")
        except RuntimeError as exc:
            failures.append(exc)

    def writer() -> None:
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO t VALUES (2)"))
        done.set()

    first = threading.Thread(target=holder)
    first.start()
    assert started.wait(10)
    second = threading.Thread(target=writer)
    second.start()
    assert not done.wait(0.5)  # waiting for its turn
    end.set()
    first.join(10)
    assert done.wait(10), "the second writer never got its turn"
    second.join(10)
    assert len(failures) == (ends == "rolled back")
    with engine.connect() as conn:
        assert sorted(conn.execute(text("SELECT n FROM t")).scalars()) == ([1, 2] if ends == "committed" else [2])
    assert stat.S_IMODE(os.stat(f"{db}-writeturn").st_mode) == 0o600


def test_readers_do_not_wait_for_a_writers_turn(db: Path) -> None:
    engine = make_engine(f"sqlite:///{db}")
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO t VALUES (1)"))
        # another thread reads the committed snapshot while this transaction holds the turn
        seen: list[int] = []

        def read() -> None:
            with reading(engine).connect() as other:
                seen.extend(other.execute(text("SELECT count(*) FROM t")).scalars())

        reader = threading.Thread(target=read)
        reader.start()
        reader.join(10)
        assert seen == [0]


#: a process that holds a write transaction open until it is killed
_HOLDER = """
import sys, time
from sqlalchemy import text
from dispatcher.ledger.engine import make_engine
engine = make_engine("sqlite:///" + sys.argv[1])
with engine.begin() as conn:
    conn.execute(text("INSERT INTO t VALUES (1)"))
    print("holding", flush=True)
    time.sleep(60)
"""


def test_a_killed_process_holding_its_turn_does_not_keep_it(db: Path) -> None:
    """``kill -9`` in the middle of a write transaction: the kernel drops the dead process's
    lock (and SQLite's), and the next writer goes on."""
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            _HOLDER,
            str(db),
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "holding"
        engine = make_engine(f"sqlite:///{db}")
        done = threading.Event()

        def write() -> None:
            with engine.begin() as conn:
                conn.execute(text("INSERT INTO t VALUES (2)"))
            done.set()

        threading.Thread(target=write, daemon=True).start()
        assert not done.wait(0.5)  # the live holder's turn is respected
        holder.send_signal(signal.SIGKILL)
        assert done.wait(20), "the dead process's turn was kept"
        with engine.connect() as conn:
            assert list(conn.execute(text("SELECT n FROM t")).scalars()) == [2]
    finally:
        holder.kill()
        holder.wait(10)
