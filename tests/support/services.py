"""Private Redis servers and PostgreSQL databases for tests.

Nothing here touches the machine's shared services beyond what a test asks for:

* :class:`RedisServer` runs its own ``redis-server`` on a free loopback port, in a temp dir
  of its own, and can be stopped, killed and restarted on the same port with the same data
  (AOF) — never 127.0.0.1:6379.
* :class:`PostgresDatabase` gives a test a database of its own: a uniquely named database on
  the server at ``$DISPATCH_TEST_PG`` (default ``postgresql://postgres@127.0.0.1:5432/postgres``)
  when one answers there, else on a private cluster (:class:`PostgresCluster`: ``initdb`` into a
  temp dir, ``postgres`` on a free port, run as the ``postgres`` OS user when we are root).
* :func:`postgres_admin_url` is for per-test databases: the server at ``$DISPATCH_TEST_PG``,
  else one private cluster started on first use and shared by the whole test process.

Construction is cheap (nothing starts until ``start()``/``create()`` or ``with``). Teardown is
reliable: ``close()`` is idempotent; whatever is still running when the interpreter exits is
stopped by an ``atexit`` handler; on Linux the server processes also carry a parent-death
signal (``setpriv --pdeathsig KILL``), so even a SIGKILLed test run leaves no server behind.

The system binaries come from Debian's ``redis-server`` and ``postgresql`` packages, which
``scripts/ensure-system-deps.sh`` installs.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import os
import pwd
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import IO, Protocol, Self

import psycopg
from psycopg import sql
from sqlalchemy.engine import make_url

__all__ = [
    "DEFAULT_TEST_PG",
    "PostgresCluster",
    "PostgresDatabase",
    "RedisServer",
    "ServiceError",
    "free_port",
    "postgres_admin_url",
    "postgres_answers",
    "wait_for_port",
]

LOOPBACK = "127.0.0.1"
#: the machine's shared services: never handed out by free_port, never started on
_RESERVED_PORTS = frozenset({5432, 6379})
DEFAULT_TEST_PG = "postgresql://postgres@127.0.0.1:5432/postgres"
_DB_NAME_RE = re.compile(r"^dispatch_test_(\d+)_[0-9a-f]{8}$")


class ServiceError(RuntimeError):
    """A test service could not be started or reached."""


# --------------------------------------------------------------------------- ports


def _port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _ephemeral_low() -> int:
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    return low


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port that nothing listens on at ``host`` now.

    Chosen below the kernel's ephemeral range when possible, so that an outgoing connection
    cannot take it between our stop and restart of a server on the same port.
    """
    low = _ephemeral_low()
    if low > 20000:
        for _ in range(50):
            port = random.randrange(15000, low)
            if port not in _RESERVED_PORTS and _port_is_free(host, port):
                return port
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port = int(sock.getsockname()[1])
        if port not in _RESERVED_PORTS:
            return port
    raise ServiceError(f"no free port found on {host}")


def wait_for_port(host: str, port: int, timeout: float = 10.0) -> None:
    """Wait until something accepts TCP connections at host:port; TimeoutError if not in time."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError as exc:
            if time.monotonic() >= deadline:
                raise TimeoutError(f"nothing accepts connections at {host}:{port}") from exc
            time.sleep(0.02)


# --------------------------------------------------------------------------- process helpers


class _Closable(Protocol):
    def _atexit_cleanup(self) -> None: ...


_live_lock = threading.Lock()
_live: dict[int, _Closable] = {}
_OWNER_PID = os.getpid()


def _register(obj: _Closable) -> None:
    with _live_lock:
        _live[id(obj)] = obj


def _unregister(obj: _Closable) -> None:
    with _live_lock:
        _live.pop(id(obj), None)


@atexit.register
def _cleanup_all() -> None:
    if os.getpid() != _OWNER_PID:  # a forked child must not stop its parent's servers
        return
    with _live_lock:
        objs = list(_live.values())
        _live.clear()
    # databases first (they need their server), then servers
    objs.sort(key=lambda o: 0 if isinstance(o, PostgresDatabase) else 1)
    for obj in objs:
        with contextlib.suppress(Exception):
            obj._atexit_cleanup()


def _die_with_parent_prefix() -> list[str]:
    """``setpriv --pdeathsig KILL --``: the server dies if the test process dies.

    The signal is tied to the thread that forked, so only used from the main thread.
    """
    if not sys.platform.startswith("linux"):
        return []
    if threading.current_thread() is not threading.main_thread():
        return []
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "KILL", "--"] if setpriv else []


def _terminate(proc: subprocess.Popen[bytes], sig: int, timeout: float) -> None:
    """Send ``sig``, wait up to ``timeout`` s, then SIGKILL; always reaps the process."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(sig)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait()


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


_OWNER_FILE = "owner.pid"
_TEMP_PREFIXES = ("dispatch-redis-", "dispatch-pg-", "dispatch-dovecot-")
_swept_dirs = False


def _make_temp_dir(prefix: str) -> Path:
    """A fresh temp dir marked with our pid, after removing those of dead test processes."""
    global _swept_dirs
    # Under root the postgres user must be able to reach the dir: /tmp, not e.g. /root/tmp.
    parent = "/tmp" if os.geteuid() == 0 and os.path.isdir("/tmp") else tempfile.gettempdir()
    if not _swept_dirs:
        _swept_dirs = True
        _sweep_stale_dirs(Path(parent))
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    (path / _OWNER_FILE).write_text(str(os.getpid()))
    return path


def _sweep_stale_dirs(parent: Path) -> None:
    """Remove temp dirs left behind by test processes that were killed (SIGKILL skips atexit)."""
    for prefix in _TEMP_PREFIXES:
        for path in parent.glob(f"{prefix}*"):
            try:
                owner = int((path / _OWNER_FILE).read_text())
            except (OSError, ValueError):
                continue
            if not _pid_alive(owner):
                shutil.rmtree(path, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --------------------------------------------------------------------------- Redis


def _find_redis_server() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    for candidate in ("/usr/bin/redis-server", "/usr/sbin/redis-server", "/usr/local/bin/redis-server"):
        if os.access(candidate, os.X_OK):
            return candidate
    raise ServiceError("redis-server not found: run scripts/ensure-system-deps.sh (Debian package redis-server)")


class RedisServer:
    """A private ``redis-server`` on 127.0.0.1 and a free port, data in a temp dir of its own.

    ``stop()`` then ``start()`` restarts it on the same port with the same data dir, so with
    ``appendonly=True`` everything written before a clean stop is back (and, after ``kill()``,
    everything but at most the last second: ``appendfsync everysec``).

    >>> with RedisServer() as redis_server:
    ...     client = redis.Redis.from_url(redis_server.url)
    """

    host = LOOPBACK

    def __init__(
        self,
        *,
        appendonly: bool = True,
        port: int | None = None,
        data_dir: str | os.PathLike[str] | None = None,
        extra_config: dict[str, str] | None = None,
        start_timeout: float = 10.0,
    ) -> None:
        if port is not None and port in _RESERVED_PORTS:
            raise ValueError(f"port {port} belongs to the machine's shared services")
        self.appendonly = appendonly
        self.extra_config = dict(extra_config or {})
        self.start_timeout = start_timeout
        self._port_fixed = port is not None
        self._port = port if port is not None else free_port()
        self._own_dir = data_dir is None
        self._data_dir: Path | None = Path(data_dir) if data_dir is not None else None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._started_once = False

    # -- what tests use

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0``."""
        return self.url_for(0)

    def url_for(self, db: int) -> str:
        return f"redis://{self.host}:{self._port}/{db}"

    @property
    def data_dir(self) -> Path:
        if self._data_dir is None:
            self._data_dir = _make_temp_dir("dispatch-redis-")
        return self._data_dir

    @property
    def log_path(self) -> Path:
        return self.data_dir / "redis.log"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self.running and self._proc else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def ping(self, timeout: float = 1.0) -> bool:
        """True when the server answers PING with PONG (not while it is still loading)."""
        try:
            with socket.create_connection((self.host, self._port), timeout=timeout) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def start(self) -> Self:
        """Start (or restart) the server; returns once it answers PING. No-op if running."""
        if self.running:
            return self
        attempts = 1 if (self._port_fixed or self._started_once) else 5
        for attempt in range(attempts):
            try:
                self._spawn_and_wait()
            except _PortInUse:
                if attempt == attempts - 1:
                    raise ServiceError(
                        f"port {self._port} is taken: cannot start Redis there\n{_tail(self.log_path)}"
                    ) from None
                self._port = free_port()
                continue
            self._started_once = True
            _register(self)
            return self
        raise AssertionError("unreachable")  # pragma: no cover

    def stop(self, timeout: float = 10.0) -> None:
        """Clean shutdown (SIGTERM: Redis fsyncs its AOF); keeps the data dir for start()."""
        if self._proc is not None:
            _terminate(self._proc, signal.SIGTERM, timeout)
            self._close_log()

    def kill(self) -> None:
        """SIGKILL, as a crash would; keeps the data dir for start()."""
        if self._proc is not None:
            _terminate(self._proc, signal.SIGKILL, 5.0)
            self._close_log()

    def close(self) -> None:
        """Stop the server and remove its data dir (if we made it). Idempotent."""
        _unregister(self)
        self.stop()
        if self._own_dir and self._data_dir is not None:
            shutil.rmtree(self._data_dir, ignore_errors=True)
            self._data_dir = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<RedisServer {self.url} {state} aof={'on' if self.appendonly else 'off'}>"

    # -- internals

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def _write_config(self) -> Path:
        data_dir = self.data_dir
        settings: dict[str, str] = {
            "bind": self.host,
            "port": str(self._port),
            "daemonize": "no",
            "protected-mode": "yes",
            "dir": f'"{data_dir}"',
            "logfile": '""',
            "appendonly": "yes" if self.appendonly else "no",
            "appendfsync": "everysec",
            "maxmemory-policy": "noeviction",
            "save": '""',
        }
        settings.update(self.extra_config)
        conf = data_dir / "redis.conf"
        conf.write_text("".join(f"{key} {value}\n" for key, value in settings.items()))
        return conf

    def _spawn_and_wait(self) -> None:
        if self._port in _RESERVED_PORTS:  # pragma: no cover - guarded in __init__/free_port
            raise ServiceError(f"refusing to start Redis on shared port {self._port}")
        conf = self._write_config()
        self._close_log()
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()/kill()
        self._proc = subprocess.Popen(
            [*_die_with_parent_prefix(), _find_redis_server(), str(conf)],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=self.data_dir,
            start_new_session=True,
        )
        deadline = time.monotonic() + self.start_timeout
        while True:
            if self._proc.poll() is not None:
                self._close_log()
                log = _tail(self.log_path)
                if "Address already in use" in log:
                    raise _PortInUse
                raise ServiceError(f"redis-server exited with {self._proc.returncode}:\n{log}")
            if self.ping(timeout=0.5):
                return
            if time.monotonic() >= deadline:
                _terminate(self._proc, signal.SIGKILL, 5.0)
                self._close_log()
                raise ServiceError(f"redis-server did not answer PING in time:\n{_tail(self.log_path)}")
            time.sleep(0.01)

    def _atexit_cleanup(self) -> None:
        self.close()


class _PortInUse(Exception):
    pass


# --------------------------------------------------------------------------- PostgreSQL


def _libpq_url(url: str) -> str:
    """A libpq/psycopg URL from a SQLAlchemy or libpq one (drops a ``+driver``)."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def postgres_answers(url: str, timeout: float = 2.0) -> bool:
    """True when a PostgreSQL server accepts a connection (and SELECT 1) at ``url``."""
    try:
        with psycopg.connect(_libpq_url(url), connect_timeout=max(1, int(timeout))) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error:
        return False
    return True


def _pg_version_key(path: str) -> tuple[int, ...]:
    version = Path(path).parent.parent.name
    return tuple(int(part) for part in re.findall(r"\d+", version)) or (0,)


def _find_pg_bindir() -> Path:
    override = os.environ.get("DISPATCH_PG_BINDIR")
    candidates: list[Path] = [Path(override)] if override else []
    initdbs = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=_pg_version_key, reverse=True)
    candidates += [Path(p).parent for p in initdbs]
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(Path(os.path.realpath(on_path)).parent)
    for bindir in candidates:
        if (bindir / "initdb").exists() and (bindir / "postgres").exists():
            return bindir
    raise ServiceError(
        "PostgreSQL server binaries (initdb, postgres) not found: run scripts/ensure-system-deps.sh "
        "(Debian package postgresql) or set DISPATCH_PG_BINDIR"
    )


def _pg_os_user() -> pwd.struct_passwd | None:
    """The OS user to run initdb/postgres as: ``postgres`` when we are root, else ourselves."""
    if os.geteuid() != 0:
        return None
    name = os.environ.get("DISPATCH_PG_OS_USER", "postgres")
    try:
        return pwd.getpwnam(name)
    except KeyError:
        raise ServiceError(
            f"running as root, and there is no OS user {name!r} to run PostgreSQL as "
            "(the Debian package postgresql creates it)"
        ) from None


class PostgresCluster:
    """A private PostgreSQL cluster: ``initdb`` into a temp dir, ``postgres`` on a free port.

    Listens on 127.0.0.1 only, unix socket in its own dir, trust auth, superuser ``postgres``,
    durability off (fsync=off) for speed. Run as the ``postgres`` OS user when we are root.
    ``close()`` stops it and removes its files.
    """

    host = LOOPBACK

    def __init__(self, *, port: int | None = None, start_timeout: float = 30.0) -> None:
        if port is not None and port in _RESERVED_PORTS:
            raise ValueError(f"port {port} belongs to the machine's shared services")
        self.start_timeout = start_timeout
        self._port_fixed = port is not None
        self._port = port if port is not None else free_port()
        self._base: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._started_once = False

    @property
    def port(self) -> int:
        return self._port

    @property
    def admin_url(self) -> str:
        """libpq URL of the ``postgres`` database as superuser ``postgres``."""
        return f"postgresql://postgres@{self.host}:{self._port}/postgres"

    @property
    def base_dir(self) -> Path:
        if self._base is None:
            raise ServiceError("cluster not initialised yet: call start()")
        return self._base

    @property
    def data_dir(self) -> Path:
        return self.base_dir / "data"

    @property
    def log_path(self) -> Path:
        return self.base_dir / "postgres.log"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self.running and self._proc else None

    def start(self) -> Self:
        """initdb (first time only) and start the server; returns once it accepts queries."""
        if self.running:
            return self
        if self._base is None:
            self._initdb()
        attempts = 1 if (self._port_fixed or self._started_once) else 5
        for attempt in range(attempts):
            try:
                self._spawn_and_wait()
            except _PortInUse:
                if attempt == attempts - 1:
                    raise ServiceError(f"port {self._port} is taken\n{_tail(self.log_path)}") from None
                self._port = free_port()
                continue
            self._started_once = True
            _register(self)
            return self
        raise AssertionError("unreachable")  # pragma: no cover

    def stop(self, timeout: float = 15.0) -> None:
        """Fast shutdown (SIGINT), then SIGKILL if it takes longer than ``timeout``."""
        if self._proc is not None:
            _terminate(self._proc, signal.SIGINT, timeout)
            self._proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def close(self) -> None:
        """Stop the server and remove the cluster's files. Idempotent."""
        _unregister(self)
        self.stop()
        if self._base is not None:
            shutil.rmtree(self._base, ignore_errors=True)
            self._base = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<PostgresCluster {self.admin_url} {'running' if self.running else 'stopped'}>"

    # -- internals

    def _child_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(LC_ALL="C", LANG="C")
        user = _pg_os_user()
        if user is not None:
            env.update(HOME=str(self._base), USER=user.pw_name, LOGNAME=user.pw_name)
        return env

    def _popen(self, args: list[str], log: IO[bytes]) -> subprocess.Popen[bytes]:
        """Start a PostgreSQL program as the right OS user, output to ``log``."""
        user = _pg_os_user()
        return subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=str(self._base),
            env=self._child_env(),
            user=user.pw_uid if user else None,
            group=user.pw_gid if user else None,
            extra_groups=[] if user else None,
            start_new_session=True,
        )

    def _initdb(self) -> None:
        bindir = _find_pg_bindir()
        user = _pg_os_user()
        base = _make_temp_dir("dispatch-pg-")
        if user is not None:
            os.chown(base, user.pw_uid, user.pw_gid)
        self._base = base
        _register(self)  # from here on there are files to remove
        with open(base / "initdb.log", "wb") as log:
            proc = self._popen(
                [
                    str(bindir / "initdb"),
                    "--pgdata",
                    str(base / "data"),
                    "--username",
                    "postgres",
                    "--auth",
                    "trust",
                    "--encoding",
                    "UTF8",
                    "--locale",
                    "C",
                    "--no-sync",
                ],
                log,
            )
            try:
                returncode = proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                _terminate(proc, signal.SIGKILL, 5.0)
                raise ServiceError(f"initdb took too long:\n{_tail(base / 'initdb.log')}") from None
        if returncode != 0:
            raise ServiceError(f"initdb failed ({returncode}):\n{_tail(base / 'initdb.log')}")

    def _spawn_and_wait(self) -> None:
        bindir = _find_pg_bindir()
        if self._log is None:
            self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self._proc = self._popen(
            [
                *_die_with_parent_prefix(),
                str(bindir / "postgres"),
                "-D",
                str(self.data_dir),
                "-p",
                str(self._port),
                "-k",
                str(self.base_dir),
                "-c",
                f"listen_addresses={self.host}",
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
                "-c",
                "max_connections=200",
            ],
            self._log,
        )
        deadline = time.monotonic() + self.start_timeout
        while True:
            if self._proc.poll() is not None:
                log = _tail(self.log_path)
                self._proc = None
                if "Address already in use" in log or "could not bind" in log:
                    raise _PortInUse
                raise ServiceError(f"postgres exited at start:\n{log}")
            if postgres_answers(self.admin_url, timeout=1):
                return
            if time.monotonic() >= deadline:
                _terminate(self._proc, signal.SIGKILL, 5.0)
                self._proc = None
                raise ServiceError(f"postgres did not accept connections in time:\n{_tail(self.log_path)}")
            time.sleep(0.05)

    def _atexit_cleanup(self) -> None:
        self.close()


_shared_lock = threading.Lock()
_shared_admin_url: str | None = None
_stale_swept: set[str] = set()


def _env_admin_url() -> str:
    return os.environ.get("DISPATCH_TEST_PG") or DEFAULT_TEST_PG


def postgres_admin_url() -> str:
    """An admin (superuser) libpq URL for tests to create their databases on.

    The server at ``$DISPATCH_TEST_PG`` (default ``postgresql://postgres@127.0.0.1:5432/postgres``)
    when it answers; otherwise one private :class:`PostgresCluster`, started on the first call
    and shared by the whole process (stopped and removed at exit). Decided once per process.
    Use with ``PostgresDatabase(postgres_admin_url())`` for cheap per-test databases.
    """
    global _shared_admin_url
    with _shared_lock:
        if _shared_admin_url is None:
            url = _env_admin_url()
            if not postgres_answers(url):
                url = PostgresCluster().start().admin_url
            _shared_admin_url = url
        return _shared_admin_url


def _sweep_stale_databases(admin: str) -> None:
    """Drop ``dispatch_test_<pid>_*`` databases left by dead test processes on a loopback server."""
    if admin in _stale_swept:
        return
    _stale_swept.add(admin)
    if make_url(admin).host not in (None, "", "localhost", "127.0.0.1", "::1"):
        return
    try:
        with psycopg.connect(admin, autocommit=True, connect_timeout=2) as conn:
            names = [row[0] for row in conn.execute("SELECT datname FROM pg_database")]
            for name in names:
                match = _DB_NAME_RE.match(name)
                if match and not _pid_alive(int(match.group(1))):
                    _drop_database(conn, name)
    except psycopg.Error:
        pass


def _drop_database(conn: psycopg.Connection[tuple[object, ...]], name: str) -> None:
    ident = sql.Identifier(name)
    try:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(ident))
    except psycopg.errors.SyntaxError:  # PostgreSQL < 13
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(ident))


class PostgresDatabase:
    """A PostgreSQL database of a test's own, dropped (WITH (FORCE)) on close.

    Where it lives:

    * ``cluster=`` given: on that :class:`PostgresCluster` (started if needed).
    * ``admin_url=`` given: on that server, which must answer (no fallback).
    * neither: on the server at ``$DISPATCH_TEST_PG`` if it answers, else on a private cluster
      this object starts and removes again on close (``.private`` is then True).

    Nothing happens until :meth:`create` (or ``with``). ``.url`` is the SQLAlchemy URL
    (``postgresql+psycopg://...``), ``.libpq_url`` the same for psycopg/psql.
    """

    def __init__(
        self,
        admin_url: str | None = None,
        *,
        cluster: PostgresCluster | None = None,
        prefix: str = "dispatch_test",
    ) -> None:
        if admin_url is not None and cluster is not None:
            raise ValueError("give admin_url or cluster, not both")
        if not re.fullmatch(r"[a-z_][a-z0-9_]{0,30}", prefix):
            raise ValueError(f"bad database name prefix {prefix!r}")
        self._admin_arg = admin_url
        self._cluster = cluster
        self._own_cluster: PostgresCluster | None = None
        self._private = False
        self.name = f"{prefix}_{os.getpid()}_{secrets.token_hex(4)}"
        self._admin: str | None = None
        self._created = False

    @property
    def admin_url(self) -> str:
        """libpq URL of the admin database on the server holding this database."""
        if self._admin is None:
            raise ServiceError("database not created yet: call create()")
        return self._admin

    @property
    def libpq_url(self) -> str:
        """``postgresql://user@host:port/<name>``, for psycopg.connect or psql."""
        return make_url(self.admin_url).set(database=self.name).render_as_string(hide_password=False)

    @property
    def url(self) -> str:
        """SQLAlchemy URL: ``postgresql+psycopg://user@host:port/<name>``."""
        return (
            make_url(self.admin_url)
            .set(drivername="postgresql+psycopg", database=self.name)
            .render_as_string(hide_password=False)
        )

    @property
    def cluster(self) -> PostgresCluster | None:
        """The private cluster holding the database, if it is on one."""
        return self._cluster or self._own_cluster

    @property
    def private(self) -> bool:
        """True when the database lives on a private cluster this object started."""
        return self._private

    @property
    def created(self) -> bool:
        return self._created

    def create(self) -> Self:
        """Find or start the server and CREATE DATABASE. No-op if already created."""
        if self._created:
            return self
        if self._cluster is not None:
            admin = self._cluster.start().admin_url
        elif self._admin_arg is not None:
            admin = _libpq_url(self._admin_arg)
            if not postgres_answers(admin):
                raise ServiceError(f"no PostgreSQL server answers at {admin}")
        else:
            admin = _libpq_url(_env_admin_url())
            if not postgres_answers(admin):
                self._own_cluster = PostgresCluster()
                self._private = True
                try:
                    admin = self._own_cluster.start().admin_url
                except BaseException:
                    self._own_cluster.close()
                    self._own_cluster = None
                    self._private = False
                    raise
        self._admin = admin
        if self._own_cluster is None:
            _sweep_stale_databases(admin)
        with psycopg.connect(admin, autocommit=True, connect_timeout=5) as conn:
            # template0: nobody is ever connected to it, so parallel creates never collide
            conn.execute(
                sql.SQL("CREATE DATABASE {} TEMPLATE template0 ENCODING 'UTF8'").format(sql.Identifier(self.name))
            )
        self._created = True
        _register(self)
        return self

    def drop(self) -> None:
        """DROP DATABASE ... WITH (FORCE): also ends connections a test left open."""
        if not self._created:
            return
        self._created = False
        try:
            with psycopg.connect(self.admin_url, autocommit=True, connect_timeout=5) as conn:
                _drop_database(conn, self.name)
        except psycopg.OperationalError:
            if self._own_cluster is None and self._cluster is None:
                raise
            # a private cluster already stopped takes its databases with it

    def close(self) -> None:
        """Drop the database and stop a private cluster this object started. Idempotent."""
        _unregister(self)
        try:
            self.drop()
        finally:
            if self._own_cluster is not None:
                self._own_cluster.close()
                self._own_cluster = None

    def __enter__(self) -> Self:
        return self.create()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        where = self._admin or "(not created)"
        return f"<PostgresDatabase {self.name} on {where}{' private' if self.private else ''}>"

    def _atexit_cleanup(self) -> None:
        self.close()
