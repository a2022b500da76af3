"""The test services themselves: private Redis, per-test PostgreSQL databases, private clusters."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest
import redis
import sqlalchemy as sa

from tests.support.services import (
    PostgresCluster,
    PostgresDatabase,
    RedisServer,
    free_port,
    postgres_answers,
    wait_for_port,
)


def _pid_gone(pid: int, timeout: float = 5.0) -> bool:
    """True once ``pid`` no longer runs (a zombie awaiting its reaper counts as gone)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.05)
    return False


def test_free_port_and_wait_for_port() -> None:
    port = free_port()
    assert port not in (5432, 6379)
    with pytest.raises(TimeoutError):
        wait_for_port("127.0.0.1", port, timeout=0.2)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", port))
        listener.listen()
        wait_for_port("127.0.0.1", port, timeout=2)


def test_redis_restart_on_same_port_keeps_aof_data() -> None:
    with RedisServer(appendonly=True) as server:
        assert server.port != 6379
        client = redis.Redis.from_url(server.url)
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        assert client.config_get("appendfsync") == {"appendfsync": "everysec"}
        assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
        client.set("letter", "sent")
        client.rpush("queue", "m1", "m2")
        port = server.port

        server.stop()
        assert not server.running
        with pytest.raises(redis.ConnectionError):
            client.ping()

        server.start()
        assert server.port == port
        assert client.get("letter") == b"sent"
        assert client.lrange("queue", 0, -1) == [b"m1", b"m2"]
        client.close()
        data_dir = server.data_dir
    assert not server.running
    assert not data_dir.exists()


def test_redis_without_aof_starts_empty_after_restart() -> None:
    with RedisServer(appendonly=False) as server:
        client = redis.Redis.from_url(server.url)
        client.set("k", "v")
        server.stop()
        server.start()
        assert client.get("k") is None
        client.close()


def test_redis_kill_is_a_crash_and_start_recovers() -> None:
    with RedisServer() as server:
        client = redis.Redis.from_url(server.url)
        client.set("k", "v")
        time.sleep(1.1)  # appendfsync everysec: let the write reach the disk
        pid = server.pid
        assert pid is not None
        server.kill()
        assert not server.running
        assert _pid_gone(pid)
        assert not server.ping()
        server.start()
        assert client.get("k") == b"v"
        client.close()


def test_servers_die_with_a_killed_test_process(tmp_path: Path) -> None:
    """A SIGKILLed test run (no atexit) still leaves no server running."""
    script = tmp_path / "owner.py"
    script.write_text(
        "import sys, time\n"
        f"sys.path.insert(0, {str(Path(__file__).resolve().parent.parent)!r})\n"
        "from tests.support.services import RedisServer\n"
        "server = RedisServer().start()\n"
        "print(server.pid, server.data_dir, flush=True)\n"
        "time.sleep(60)\n"
    )
    owner = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout is not None
        pid_text, data_dir = owner.stdout.readline().split(maxsplit=1)
        pid = int(pid_text)
        assert not _pid_gone(pid, timeout=0.1)
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.wait()
    assert _pid_gone(pid)
    shutil.rmtree(data_dir.strip(), ignore_errors=True)  # atexit never ran: later runs sweep such dirs


def _exists(admin_url: str, name: str) -> bool:
    with psycopg.connect(admin_url) as conn:
        return conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is not None


def _use(url: str) -> None:
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("CREATE TABLE t (id int PRIMARY KEY, body text)"))
            conn.execute(sa.text("INSERT INTO t VALUES (1, 'letter')"))
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT body FROM t")).scalar_one() == "letter"
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_postgres_database_created_used_and_dropped() -> None:
    db = PostgresDatabase()
    assert not db.created  # construction does nothing
    with db:
        assert db.url.startswith("postgresql+psycopg://")
        assert db.url.endswith("/" + db.name)
        _use(db.url)
        # a connection a test leaves open must not stop the drop: WITH (FORCE)
        left_open = psycopg.connect(db.libpq_url)
        other = PostgresDatabase().create()  # a second test's database is a different one
        try:
            assert other.name != db.name
        finally:
            other.close()
        admin = db.admin_url
        if not db.private:
            assert _exists(admin, db.name)
    if not db.private:
        assert not _exists(admin, db.name)
    assert left_open.broken or left_open.closed or _connection_dead(left_open)
    left_open.close()


def _connection_dead(conn: psycopg.Connection[tuple[object, ...]]) -> bool:
    try:
        conn.execute("SELECT 1")
    except psycopg.OperationalError:
        return True
    return False


@pytest.mark.postgres
def test_postgres_fallback_starts_a_private_cluster(monkeypatch: pytest.MonkeyPatch) -> None:
    nothing_there = f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"
    monkeypatch.setenv("DISPATCH_TEST_PG", nothing_there)
    assert not postgres_answers(nothing_there)
    with PostgresDatabase() as db:
        assert db.private
        cluster = db.cluster
        assert cluster is not None and cluster.running
        assert cluster.port != 5432
        base, pid = cluster.base_dir, cluster.pid
        assert pid is not None
        if os.geteuid() == 0:
            assert (base / "data").stat().st_uid != 0  # run as the postgres OS user
        _use(db.url)
        assert _exists(cluster.admin_url, db.name)
    assert not cluster.running
    assert _pid_gone(pid)
    assert not base.exists()


@pytest.mark.postgres
def test_postgres_cluster_shared_by_databases() -> None:
    with PostgresCluster() as cluster:
        with PostgresDatabase(cluster=cluster) as one, PostgresDatabase(cluster=cluster) as two:
            assert one.cluster is cluster and not one.private
            _use(one.url)
            _use(two.url)
            assert _exists(cluster.admin_url, one.name)
        assert not _exists(cluster.admin_url, one.name)
        assert not _exists(cluster.admin_url, two.name)
