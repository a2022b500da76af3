"""The ledger's database engine: SQLite (the default) or PostgreSQL, set up for several
processes writing at once."""

from __future__ import annotations

import sqlite3
import time
import uuid
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.exc import DBAPIError, InvalidatePoolError
from sqlalchemy.pool import NullPool


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


_READ_ONLY = "dispatch_read_only"


def reading(engine: Engine) -> Engine:
    """``engine`` for transactions that only read: they never take SQLite's write lock. Writing
    through it is a bug (on SQLite it may fail with "database is locked")."""
    return engine.execution_options(**{_READ_ONLY: True})


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        # Several worker threads and an API share one file: WAL lets readers run beside the
        # writer, busy_timeout makes writers queue instead of failing with "database is locked".
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

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
            begin = "BEGIN" if conn.get_execution_options().get(_READ_ONLY) else "BEGIN IMMEDIATE"
            # On the driver's connection, not through exec_driver_sql: SQLAlchemy's execution
            # path (events, context, result) cost a fifth of a worker's claim or finish for a
            # statement that takes no parameters and returns nothing. Its errors are wrapped
            # as SQLAlchemy would wrap them.
            try:
                conn.connection.driver_connection.execute(begin)
            except sqlite3.Error as exc:
                raise DBAPIError.instance(begin, None, exc, sqlite3.Error) from exc

        return engine
    if url.startswith("postgresql"):
        engine = create_engine(url, pool_size=10, max_overflow=10)
        ping_when_idle(engine, IDLE_PING_SECONDS)
        return engine
    return create_engine(url, poolclass=NullPool)


#: a pooled connection unused for longer than this is pinged before it is handed out
IDLE_PING_SECONDS = 1.0
_CHECKED_IN_AT = "dispatch_checked_in_at"


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
