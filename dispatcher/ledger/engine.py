"""The ledger's database engine: SQLite (the default) or PostgreSQL, set up for several
processes writing at once."""

from __future__ import annotations

import sqlite3
import uuid
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.exc import DBAPIError
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
        # psycopg prepares a statement on the server from its fifth run on a connection, and
        # PostgreSQL may then reuse one generic plan, chosen from the statistics of that moment:
        # on a ledger that was small then (a new deployment's first campaign), a sequential scan
        # that it kept as the table grew (intake's release of a batch took 50 ms at 8,000
        # letters instead of 1; bench/intake.py). Planned with each execution's own values
        # instead; the statements stay prepared (parsed once).
        return create_engine(
            url,
            pool_size=10,
            max_overflow=10,
            pool_pre_ping=True,
            connect_args={"options": "-c plan_cache_mode=force_custom_plan"},
        )
    return create_engine(url, poolclass=NullPool)
