"""Operators' accounts and their console sessions.

* Accounts: a name, a role (:data:`ROLES`), the sections it works on (none: every section) and an
  argon2id password hash (argon2-cffi's defaults, rehashed on the next sign-in when they change).
  Adding, changing a password and removing are audited in their own transaction.
* Sessions: :meth:`Operators.open_session` returns a random token for the cookie; the ledger keeps
  only its SHA-256, with the session's CSRF token and its expiry, so a copy of the ledger signs
  nobody in. A session past its expiry is as good as gone (and purged at the next sign-in).

A password is checked in about the same time whether the name exists or not (a dummy hash is
verified for an unknown name), so timing does not tell which names exist.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import secrets
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import Engine, delete, insert, select, update
from sqlalchemy.exc import IntegrityError

from dispatcher.errors import OperatorError
from dispatcher.ledger.audit import Audit
from dispatcher.ledger.engine import reading
from dispatcher.ledger.tables import OP, OS

#: a viewer reads; an operator also acts on its sections' letters and channels; an admin acts on
#: everything and manages operators
ROLES: tuple[str, ...] = ("viewer", "operator", "admin")
#: shortest password accepted
MIN_PASSWORD = 12
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")


@dataclass(frozen=True)
class OperatorAccount:
    name: str
    role: str
    #: the sections it works on; empty: every section
    sections: tuple[str, ...]
    created_at: datetime
    password_changed_at: datetime

    @classmethod
    def of(cls, r: Any) -> OperatorAccount:
        return cls(r.name, r.role, tuple(r.sections.split()), r.created_at, r.password_changed_at)

    def describe(self) -> str:
        return f"{self.role}, sections {' '.join(self.sections) if self.sections else 'all'}"


@dataclass(frozen=True)
class OpenedSession:
    #: for the cookie; never stored
    token: str
    csrf: str
    expires_at: datetime


@dataclass(frozen=True)
class SessionView:
    operator: OperatorAccount
    csrf: str
    expires_at: datetime


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def check_password(password: str) -> None:
    if len(password) < MIN_PASSWORD:
        raise OperatorError(f"the password is shorter than {MIN_PASSWORD} characters")


class Operators:
    def __init__(self, engine: Engine, hasher: PasswordHasher | None = None):
        self.engine = engine
        #: for reads: on SQLite a deferred transaction, which takes no write lock (engine.py)
        self.reads = reading(engine)
        self.hasher = hasher or PasswordHasher()
        self._dummy: str | None = None

    # ------------------------------------------------------------------ accounts

    def add(
        self,
        name: str,
        password: str,
        *,
        role: str,
        sections: Sequence[str] = (),
        now: datetime,
        actor: str,
        known_sections: Collection[str] | None = None,
    ) -> OperatorAccount:
        """Create an account; OperatorError for a bad name, role, section or password, or a name
        that is taken. ``known_sections``: the configured sections (None: not checked here).

        An admin works on every section (no sections); an operator needs at least one (acting on
        every section is an admin's job); a viewer without sections reads every section."""
        if not _NAME.match(name):
            raise OperatorError(
                f"name {name!r}: 1 to 64 letters, digits, '.', '_', '@' or '-', starting with a letter or digit"
            )
        if role not in ROLES:
            raise OperatorError(f"unknown role {role!r} (roles: {', '.join(ROLES)})")
        codes = tuple(dict.fromkeys(sections))
        if known_sections is not None:
            unknown = [c for c in codes if c not in known_sections]
            if unknown:
                raise OperatorError(
                    f"unknown section {unknown[0]!r} (known: {', '.join(sorted(known_sections)) or 'none'})"
                )
        if role == "admin" and codes:
            raise OperatorError("an admin works on every section: give no section")
        if role == "operator" and not codes:
            raise OperatorError("an operator works on named sections: give at least one (or make it an admin)")
        check_password(password)
        hashed = self.hasher.hash(password)
        try:
            with self.engine.begin() as conn:
                conn.execute(
                    insert(OP).values(
                        name=name,
                        role=role,
                        sections=" ".join(codes),
                        password_hash=hashed,
                        created_at=now,
                        password_changed_at=now,
                    )
                )
                account = OperatorAccount(name, role, codes, now, now)
                Audit.record(
                    conn,
                    actor=actor,
                    action="operator.add",
                    target_kind="operator",
                    target_id=name,
                    now=now,
                    detail=account.describe(),
                )
        except IntegrityError:
            raise OperatorError(f"an operator named {name!r} exists already") from None
        return account

    def passwd(self, name: str, password: str, *, now: datetime, actor: str) -> None:
        """Set a new password; every session of the operator ends (a stolen session with it)."""
        check_password(password)
        hashed = self.hasher.hash(password)
        with self.engine.begin() as conn:
            changed = conn.execute(
                update(OP).where(OP.c.name == name).values(password_hash=hashed, password_changed_at=now)
            ).rowcount
            if changed == 0:
                raise OperatorError(f"no operator named {name!r}")
            ended = conn.execute(delete(OS).where(OS.c.operator == name)).rowcount
            Audit.record(
                conn,
                actor=actor,
                action="operator.passwd",
                target_kind="operator",
                target_id=name,
                now=now,
                detail=f"{ended} session(s) ended",
            )

    def remove(self, name: str, *, now: datetime, actor: str) -> bool:
        """Remove the account and its sessions; False if there was none."""
        with self.engine.begin() as conn:
            conn.execute(delete(OS).where(OS.c.operator == name))
            if conn.execute(delete(OP).where(OP.c.name == name)).rowcount == 0:
                return False
            Audit.record(conn, actor=actor, action="operator.remove", target_kind="operator", target_id=name, now=now)
            return True

    def get(self, name: str) -> OperatorAccount | None:
        with self.reads.connect() as conn:
            row = conn.execute(select(OP).where(OP.c.name == name)).one_or_none()
        return None if row is None else OperatorAccount.of(row)

    def list(self) -> list[OperatorAccount]:
        with self.reads.connect() as conn:
            rows = conn.execute(select(OP).order_by(OP.c.name)).all()
        return [OperatorAccount.of(r) for r in rows]

    def verify(self, name: str, password: str) -> OperatorAccount | None:
        """The account if ``password`` is its password, else None (also for an unknown name, after
        as much work as a known one). A hash made with older parameters is replaced."""
        with self.reads.connect() as conn:
            row = conn.execute(select(OP).where(OP.c.name == name)).one_or_none()
        if row is None:
            with contextlib.suppress(VerificationError, InvalidHashError):
                self.hasher.verify(self._dummy_hash(), password)
            return None
        try:
            self.hasher.verify(row.password_hash, password)
        except (VerificationError, InvalidHashError):
            return None
        if self.hasher.check_needs_rehash(row.password_hash):
            with self.engine.begin() as conn:
                conn.execute(
                    update(OP)
                    .where(OP.c.name == name, OP.c.password_hash == row.password_hash)
                    .values(password_hash=self.hasher.hash(password))
                )
        return OperatorAccount.of(row)

    def _dummy_hash(self) -> str:
        if self._dummy is None:
            self._dummy = self.hasher.hash(secrets.token_hex(16))
        return self._dummy

    # ------------------------------------------------------------------ sessions

    def open_session(self, name: str, *, now: datetime, lifetime: timedelta) -> OpenedSession:
        opened = OpenedSession(secrets.token_urlsafe(32), secrets.token_urlsafe(32), now + lifetime)
        with self.engine.begin() as conn:
            conn.execute(
                insert(OS).values(
                    token_hash=token_hash(opened.token),
                    operator=name,
                    csrf=opened.csrf,
                    created_at=now,
                    expires_at=opened.expires_at,
                )
            )
        return opened

    def session(self, token: str, *, now: datetime) -> SessionView | None:
        """The live session of ``token`` with its operator as the ledger has it now (a changed
        role applies at once); None for an unknown or expired token."""
        with self.reads.connect() as conn:
            row = conn.execute(
                select(OP, OS.c.csrf, OS.c.expires_at)
                .select_from(OS.join(OP, OP.c.name == OS.c.operator))
                .where(OS.c.token_hash == token_hash(token), OS.c.expires_at > now)
            ).one_or_none()
        return None if row is None else SessionView(OperatorAccount.of(row), row.csrf, row.expires_at)

    def close_session(self, token: str) -> bool:
        with self.engine.begin() as conn:
            return conn.execute(delete(OS).where(OS.c.token_hash == token_hash(token))).rowcount == 1

    def purge_sessions(self, now: datetime) -> int:
        """Delete expired sessions; how many."""
        with self.engine.begin() as conn:
            return conn.execute(delete(OS).where(OS.c.expires_at <= now)).rowcount
