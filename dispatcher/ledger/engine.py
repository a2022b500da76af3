"""The ledger's database engine: SQLite (the default) or PostgreSQL, set up for several
processes writing at once."""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import sqlite3
import threading
import time
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event, make_url
from sqlalchemy.exc import DBAPIError, InvalidatePoolError
from sqlalchemy.pool import NullPool


def new_id(prefix: str) -> str:
    """A new row's id: ``prefix_`` and 32 hex digits, the milliseconds since the epoch (12) then
    80 random bits (20), so that ids sort by the time they were made.

    Why not uuid4: a random primary key sends every new row (and every index on an id, such as
    a letter's appeal) to a random leaf of its B-tree. With a ledger's history that is a page
    read and written per row all over a large file, not the same few pages at the tail: intake
    on a SQLite ledger holding 1 M letters ran at 0.62-0.78x of an empty one with uuid4, 0.97x
    with these (bench/intake.py --history 500000, whose history keeps random ids). 80 random
    bits keep an id unguessable."""
    return f"{prefix}_{time.time_ns() // 1_000_000:012x}{secrets.token_hex(10)}"


_READ_ONLY = "dispatch_read_only"
#: the descriptor whose write turn this thread holds, whichever engine's: a thread that begins a
#: second write transaction inside its first (on another connection, or another engine on the
#: same file) is left to SQLite's busy timeout, an error after 30 s, rather than waiting for
#: itself for ever
_HELD = threading.local()


class WriteTurns:
    """SQLite's writers take turns at a lock file beside the database, blocked in the kernel.

    Why: SQLite's own wait for its write lock is a busy handler that sleeps and polls (1, 2, 5
    ... up to 100 ms between looks). A writer that commits and begins again at once (the API's
    group commit during a burst) finds the lock free every time, while the others sleep
    through each free moment: with a burst coming in, the workers sent 41 letters a second
    instead of 372 (bench/intake.py --draining). A writer blocked in ``flock`` is woken the
    moment the lock is given back, so each gets its turn. SQLite's lock stays the authority
    (BEGIN IMMEDIATE is still taken): a writer that does not know of the file (the sqlite3
    shell, an older process) is only waited for the old way. The kernel drops a dead process's
    lock with its descriptors.
    """

    def __init__(self, path: str):
        self.path = path

    @classmethod
    def beside(cls, database: str | None) -> WriteTurns | None:
        if not database or database == ":memory:" or database.startswith("file:"):
            return None  # a database of one connection, or named by URI: nothing to share
        return cls(f"{database}-writeturn")

    def open(self) -> int:
        """A descriptor of one connection's own (flock is held per open file: two connections
        of one process wait for each other like two processes)."""
        return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def connection_class(self) -> type[sqlite3.Connection]:
        """The sqlite3 connection class of an engine's connections (``factory``)."""
        return type("TurnTakingConnection", (_TurnTakingConnection,), {"turns": self})

    def take(self, fd: int) -> None:
        if getattr(_HELD, "fd", None) is not None:
            return
        fcntl.flock(fd, fcntl.LOCK_EX)
        _HELD.fd = fd

    def give_back(self, fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_UN)
        if getattr(_HELD, "fd", None) == fd:
            _HELD.fd = None


def reading(engine: Engine) -> Engine:
    """``engine`` for transactions that only read: they never take SQLite's write lock. Writing
    through it is a bug (on SQLite it may fail with "database is locked")."""
    return engine.execution_options(**{_READ_ONLY: True})


class _TurnTakingConnection(sqlite3.Connection):
    """A connection that gives its turn back once its transaction has ended: after SQLite's
    COMMIT or ROLLBACK, not before (SQLAlchemy's commit event comes before, and the next writer
    would find SQLite's lock still held, and sleep in its busy handler). The pool's reset on
    check-in is a rollback, and closing drops the lock with the descriptor."""

    turns: WriteTurns

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._turn_fd = self.turns.open()

    def take_turn(self) -> None:
        self.turns.take(self._turn_fd)

    def give_turn_back(self) -> None:
        if self._turn_fd >= 0:
            self.turns.give_back(self._turn_fd)

    def commit(self) -> None:
        try:
            super().commit()
        finally:
            self.give_turn_back()

    def rollback(self) -> None:
        try:
            super().rollback()
        finally:
            self.give_turn_back()

    def close(self) -> None:
        try:
            super().close()
        finally:
            if self._turn_fd >= 0:
                self.give_turn_back()
                os.close(self._turn_fd)
                self._turn_fd = -1


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        # Several worker threads and an API share one file: WAL lets readers run beside the
        # writer, busy_timeout makes writers queue instead of failing with "database is locked".
        connect_args: dict[str, Any] = {"timeout": 30, "check_same_thread": False}
        turns = WriteTurns.beside(make_url(url).database)
        if turns is not None:
            connect_args["factory"] = turns.connection_class()
        # Ten steady connections, as PostgreSQL's below: a worker's eight threads (the default)
        # keep one each (ThreadConnections), two are left for the rest of the process.
        engine = create_engine(url, connect_args=connect_args, pool_size=10, max_overflow=10)

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            # We issue BEGIN ourselves (below), not the sqlite3 module.
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        @event.listens_for(engine, "begin")
        def _begin_immediate(conn: Any) -> None:
            # A deferred transaction that reads and then writes (intake: check for duplicates, then
            # insert) fails at once with "database is locked" when another process wrote in
            # between; the busy timeout never applies to that upgrade. Taking the write lock up
            # front makes writers from several processes queue instead. A transaction that only
            # reads (``reading(engine)``) takes no lock at all: in WAL mode it reads a snapshot
            # beside the writer, instead of queueing behind every other process's writes.
            read_only = conn.get_execution_options().get(_READ_ONLY)
            begin = "BEGIN" if read_only else "BEGIN IMMEDIATE"
            driver = conn.connection.driver_connection
            if turns is not None and not read_only:
                driver.take_turn()
            # On the driver's connection, not through exec_driver_sql: SQLAlchemy's execution
            # path (events, context, result) cost a fifth of a worker's claim or finish for a
            # statement that takes no parameters and returns nothing. Its errors are wrapped
            # as SQLAlchemy would wrap them.
            try:
                driver.execute(begin)
            except sqlite3.Error as exc:
                if turns is not None and not read_only:
                    driver.give_turn_back()
                raise DBAPIError.instance(begin, None, exc, sqlite3.Error) from exc

        return engine
    if url.startswith("postgresql"):
        # psycopg prepares a statement on the server from its fifth run on a connection, and
        # PostgreSQL may then reuse one generic plan, chosen from the statistics of that moment:
        # on a ledger that was small then (a new deployment's first campaign), a sequential scan
        # that it kept as the table grew (intake's release of a batch took 50 ms at 8,000
        # letters instead of 1; bench/intake.py). Planned with each execution's own values
        # instead; the statements stay prepared (parsed once). A worker, whose hot statements
        # are primary-key lookups, goes back to the default: plan_generically.
        engine = create_engine(
            url,
            pool_size=10,
            max_overflow=10,
            connect_args={"options": "-c plan_cache_mode=force_custom_plan"},
        )
        ping_when_idle(engine, IDLE_PING_SECONDS)
        return engine
    return create_engine(url, poolclass=NullPool)


#: a pool's steady connections that no thread keeps (ThreadConnections)
KEPT_BESIDE = 2


class ThreadConnections:
    """One connection of ``engine`` per thread, kept checked out between transactions.

    For a worker's threads, each of which runs two short transactions per letter (the claim and
    the finish): through ``engine.begin()`` each paid a checkout from the pool and a check-in
    (the pool's reset, the connection's wrappers made and dropped): 30-40 us a transaction in
    process, about as much as SQLite's statements, and 5 % of a letter's instructions
    (bench/worker_path.py ``--instructions``). A kept
    connection is dropped by :meth:`drop` after any error in its transaction (its state is
    unknown: a lost connection, a failed rollback) and a fresh one is taken the next time; the
    pool's ping of an idle connection does not apply to it, and a connection that died while
    kept fails its statement, which the worker's claim and finish try once more
    (``Lifecycle``). :meth:`close` returns them all, once their threads are done with them.

    At most the pool's steady size less two are kept (:data:`KEPT_BESIDE`): the other parts of
    the process (a worker's reads of paused channels and suppressions, its dead letters, the
    parked reports) keep the rest and the overflow. A thread beyond that gets None and takes a
    pooled connection for each transaction, as before; so a worker with more threads than the
    pool never waits for a connection none will give back."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        size = getattr(engine.pool, "size", None)  # (NullPool has none: nothing is kept)
        self.limit = max(size() - KEPT_BESIDE, 0) if callable(size) else 0
        self._local = threading.local()
        self._lock = threading.Lock()
        self._kept: set[Connection] = set()

    def get(self) -> Connection | None:
        """The calling thread's connection (a fresh one if it had none, or it was closed), or
        None when as many as :attr:`limit` are kept by other threads."""
        conn: Connection | None = getattr(self._local, "conn", None)
        if conn is not None and not conn.closed and not conn.invalidated:
            return conn
        if conn is not None:
            self.drop(conn)
        with self._lock:
            if len(self._kept) >= self.limit:
                return None
            conn = self.engine.connect()
            self._kept.add(conn)
        self._local.conn = conn
        return conn

    def drop(self, conn: Connection) -> None:
        """Close ``conn`` (the calling thread's): the next :meth:`get` takes a fresh one."""
        if getattr(self._local, "conn", None) is conn:
            self._local.conn = None
        with self._lock:
            self._kept.discard(conn)
        with contextlib.suppress(Exception):  # a dead connection may fail to close cleanly
            conn.close()

    def close(self) -> None:
        """Return every kept connection to the pool: for when no thread uses one any more (a
        worker stopped). A thread that goes on after that takes a fresh one."""
        with self._lock:
            kept, self._kept = self._kept, set()
        for conn in kept:
            with contextlib.suppress(Exception):
                conn.close()


#: a pooled connection unused for longer than this is pinged before it is handed out
IDLE_PING_SECONDS = 1.0
_CHECKED_IN_AT = "dispatch_checked_in_at"


def plan_generically(engine: Engine) -> None:
    """PostgreSQL: the connections of ``engine`` opened from now on leave the server its default
    (``plan_cache_mode = auto``: a statement prepared on a connection may keep one generic
    plan) instead of :func:`make_engine`'s plan per execution; those already pooled are closed.

    For a process whose hot statements find their rows by primary key: a worker's claim and
    finish, whose plan is an index lookup whatever the values. Planning them afresh for every
    letter cost the server's CPU, which the workers share it with: on this 2-core machine the
    drain went from about 450 to 600 letters/s and the worker's own CPU per letter from 2.2 to
    1.7 ms (bench/throughput.py, PostgreSQL, 2 workers x 4 threads)."""
    if engine.dialect.name != "postgresql" or event.contains(engine, "connect", _generic_plans):
        return
    event.listen(engine, "connect", _generic_plans)
    engine.dispose()


def _generic_plans(dbapi_conn: Any, _record: Any) -> None:
    dbapi_conn.execute("SET plan_cache_mode = auto")
    dbapi_conn.commit()  # (psycopg opened a transaction for it; the SET outlives it once committed)


def ping_when_idle(engine: Engine, after: float) -> None:
    """Ping a pooled connection on checkout only when it sat unused for more than ``after``
    seconds; a dead one is replaced (and every connection pooled before it, as ``pool_pre_ping``
    does: one dead connection usually means a restarted server).

    Why not ``pool_pre_ping``: it pings on every checkout, a round trip in each of a worker's two
    transactions per letter (6 % of a PostgreSQL worker's CPU). A connection in steady use was
    alive a moment ago; one that dies in between fails its statement instead, which invalidates
    it (``Connection.execute``, and :class:`dispatcher.ledger.prepared.Prepared` the same way), and
    the worker's claim and finish try once more on a fresh connection (``Lifecycle``)."""
    dialect = engine.dialect

    @event.listens_for(engine, "checkin")
    def _checked_in(_dbapi_conn: Any, record: Any) -> None:
        record.info[_CHECKED_IN_AT] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _ping_if_idle(dbapi_conn: Any, record: Any, _proxy: Any) -> None:
        # (none for a connection just opened: its info is cleared with each new connection)
        checked_in_at = record.info.get(_CHECKED_IN_AT)
        if checked_in_at is None or time.monotonic() - checked_in_at <= after:
            return
        try:
            dialect.do_ping(dbapi_conn)
        except dialect.loaded_dbapi.Error as exc:
            if not dialect.is_disconnect(exc, dbapi_conn, None):
                raise
            # The pool invalidates the connection and checks out a fresh one in its place.
            raise InvalidatePoolError(f"idle connection found dead: {exc}") from exc
