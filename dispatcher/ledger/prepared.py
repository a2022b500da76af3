"""The worker's hottest statements, compiled once and run on the driver's cursor.

Why: per letter a worker runs three statements (the claim, the attempt row, the finish) in two
transactions. Through ``Connection.execute`` each paid SQLAlchemy's execution path — cache key,
execution context, events, result set-up — for more CPU than SQLite spent running it (about
0.3 ms a letter, uncontended, bench/worker_path.py). These statements never change from one
letter to the next, so they are compiled once per dialect, and each execution only binds.

What stays SQLAlchemy's: the SQL (compiled by the dialect, as ``execute`` would compile it),
the transaction and the pooled connection (``engine.begin()``: the caller's), every value's
conversion both ways (each bind parameter's and each returned column's own processors, so a
datetime is written and read exactly as ``execute`` writes and reads it), and the errors
(handled by the connection's own handler, as ``execute`` handles them: wrapped, and a lost
connection invalidated). What it skips: events on
statement execution (the ledger registers none) and Python-side column defaults (refused at
construction, so a statement that would need them cannot be prepared by mistake).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NoReturn

from sqlalchemy import Connection, Dialect
from sqlalchemy.sql.dml import Insert, UpdateBase

#: a named bind parameter as psycopg's paramstyle writes it: %(name)s
_NAMED = re.compile(r"%\((\w+)\)s")


def _failed(conn: Connection, exc: Exception, sql: str, args: Any, cursor: Any) -> NoReturn:
    """Raise ``exc`` as ``Connection.execute`` raises a driver's error, by SQLAlchemy's own
    handler: wrapped in its DBAPIError, and, when the dialect says the connection is gone
    (``is_disconnect``), with ``connection_invalidated`` set, the connection invalidated and
    every connection pooled before it recycled at its next checkout. Wrapped by hand, the error
    left all that to a ROLLBACK failing after it: in a transaction psycopg's does (and its error
    takes the statement's place); in autocommit no ROLLBACK goes out, and the dead connection
    went back to the pool."""
    conn._handle_dbapi_exception(exc, sql, args, cursor, None)
    raise AssertionError("unreachable: SQLAlchemy's handler raises")  # pragma: no cover


class PreparedRow:
    """One returned row: its columns by name, as a Row from ``execute`` gives them."""

    __slots__ = ("_values",)

    def __init__(self, values: dict[str, Any]) -> None:
        self._values = values

    def __getattr__(self, name: str) -> Any:
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(name) from None


class Prepared:
    """``statement`` compiled for ``dialect``; :meth:`run` executes it in the caller's
    transaction. ``column_keys``: for an INSERT, the columns it is given (as ``execute`` would
    compile it for a dict with those keys)."""

    def __init__(self, statement: UpdateBase, dialect: Dialect, column_keys: Sequence[str] | None = None) -> None:
        if isinstance(statement, Insert):
            table = statement.table
            for column in table.columns:
                if column.default is not None and column.key not in (column_keys or ()):
                    raise ValueError(f"{table}.{column.key} has a Python-side default: execute it instead")
        compiled = statement.compile(dialect=dialect, column_keys=list(column_keys) if column_keys else None)
        self._compiled = compiled
        self.sql = compiled.string
        #: positional paramstyles (SQLite's qmark): the order of the values; None for named ones
        self._order: Sequence[str] | None = compiled.positiontup
        self._binds: dict[str, Callable[[Any], Any]] = {}
        for bind, name in compiled.bind_names.items():  # (anonymous ones by their compiled names)
            # (the dialect's own form of the type: SQLite's DateTime writes its own string)
            process = bind.type.dialect_impl(dialect).bind_processor(dialect)
            if process is not None:
                self._binds[name] = process
        self._columns: list[tuple[str, Callable[[Any], Any] | None]] = []
        for returned in statement.exported_columns:
            if returned.key is None:
                raise ValueError("every returned column needs a name")
            self._columns.append((returned.key, returned.type.dialect_impl(dialect).result_processor(dialect, None)))
        self._dbapi_error: type[Exception] = dialect.loaded_dbapi.Error
        #: an INSERT's bind names in the compiled order, each with its processor (run_many)
        self._spec: list[tuple[str, Callable[[Any], Any] | None]] | None = None
        #: for psycopg (a named paramstyle): ``COPY table (columns) FROM STDIN``, the columns in
        #: the order of ``_spec``
        self._copy: str | None = None
        if isinstance(statement, Insert) and column_keys:
            if self._order is not None:
                names = list(self._order)
            else:
                head, values, group = self.sql.rpartition(" VALUES ")
                names = _NAMED.findall(group)
                if not values or not group.startswith("(") or not head.startswith("INSERT INTO "):
                    raise ValueError(f"cannot read the VALUES of {self.sql!r}")
                if dialect.driver != "psycopg":
                    raise ValueError(f"run_many knows psycopg's COPY, not {dialect.driver}'s")
                self._copy = f"COPY {head.removeprefix('INSERT INTO ')} FROM STDIN"
            if sorted(names) != sorted(column_keys):
                raise ValueError(f"{statement.table}: bind names {names} are not the column keys {list(column_keys)}")
            self._spec = [(name, self._binds.get(name)) for name in names]

    def run_many(self, conn: Connection, rows: Sequence[Mapping[str, Any]]) -> None:
        """An INSERT of ``rows``, each with exactly the ``column_keys`` it was prepared for: the
        intake's batches (one statement per table for a whole group commit). SQLite's driver
        runs ``executemany`` in process; for PostgreSQL the rows go by ``COPY``.

        Why COPY: one INSERT of many VALUES groups had psycopg parse a statement of a thousand
        placeholders in Python for every batch (too long for its statement cache), and the
        server plan it; COPY sends the rows as data. A batch of 32 appeals went from 5.3 to
        1.2 ms of the writer's CPU and from 12 to 5 ms of wall time, and a batch of one is no
        slower (its round trips: the COPY, then the rows with its end). A unique key that
        the rows break fails the COPY, as it fails an INSERT: an IntegrityError."""
        spec = self._spec
        if spec is None:
            raise ValueError("run_many is for an INSERT prepared with its column_keys")
        width = len(spec)
        args: list[Any] = []
        # A batch repeats its values (every letter of an appeal has the same times four times
        # over): each distinct one is converted once.
        # (by type too: 1 and True are equal keys, and need not convert alike)
        converted: dict[tuple[Callable[[Any], Any], type, Any], Any] = {}

        def convert(process: Callable[[Any], Any], value: Any) -> Any:
            key = (process, type(value), value)
            try:
                return converted[key]
            except KeyError:
                out = converted[key] = process(value)
                return out
            except TypeError:  # unhashable
                return process(value)

        for row in rows:
            if len(row) != width:
                raise ValueError(f"a row has columns {sorted(row)}; prepared for {[n for n, _ in spec]}")
            values = [row[name] if process is None else convert(process, row[name]) for name, process in spec]
            args.append(values)
        cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
        sql = self.sql if self._copy is None else self._copy
        try:
            if self._copy is None:
                cursor.executemany(sql, args)
            else:
                with cursor.copy(sql) as copy:
                    for values in args:
                        copy.write_row(values)
        except self._dbapi_error as exc:
            _failed(conn, exc, sql, args, cursor)
        finally:
            cursor.close()

    def run(self, conn: Connection, params: Mapping[str, Any]) -> list[PreparedRow]:
        """Execute with ``params`` (by bind name) in ``conn``'s transaction; the returned rows."""
        values = self._compiled.construct_params(params)
        for name, process in self._binds.items():
            values[name] = process(values[name])
        args: Any = values if self._order is None else [values[name] for name in self._order]
        cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
        try:
            cursor.execute(self.sql, args)
            # (an INSERT may return its new primary key unasked, PostgreSQL's implicit RETURNING)
            rows = cursor.fetchall() if self._columns else []
        except self._dbapi_error as exc:
            _failed(conn, exc, self.sql, args, cursor)
        finally:
            cursor.close()
        columns = self._columns
        return [
            PreparedRow(
                {
                    name: value if process is None else process(value)
                    for (name, process), value in zip(columns, row, strict=True)
                }
            )
            for row in rows
        ]
