"""Fixtures: real servers only. A private redis-server for the session (each test has its own
key namespace), a database of each test's own (SQLite file or a fresh PostgreSQL database),
a real SMTP server on loopback, and the real worker and reconciler."""

from __future__ import annotations

import json
import secrets
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from dispatcher.app import Service
from dispatcher.config.loader import load_catalog
from dispatcher.intake.signature import sign
from dispatcher.settings import Settings
from tests.support.services import (
    PostgresDatabase,
    RedisServer,
    free_port,
    postgres_admin_url,
)

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """Commands under test configure logging for the whole process (structlog and the root
    handler); put it back so that one test's configuration never hides another's events."""
    import logging

    import structlog

    import dispatcher.logging as dlog

    saved = structlog.get_config()
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    structlog.configure(**saved)
    root.handlers[:] = handlers
    root.setLevel(level)
    dlog._configured = False


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer(appendonly=False) as server:
        yield server


@pytest.fixture(scope="session")
def pg_admin() -> str:
    """The PostgreSQL server the tests create their databases on: the machine's, else a private
    cluster started once for the whole run."""
    return postgres_admin_url()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'ledger.sqlite3'}"
        return
    admin = request.getfixturevalue("pg_admin")
    with PostgresDatabase(admin) as db:
        yield db.url


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'ledger.sqlite3'}"


@pytest.fixture
def smtp() -> Iterator[Any]:
    from tests.support.smtp import SmtpTestServer

    with SmtpTestServer() as server:
        yield server


@pytest.fixture(scope="session")
def catalog():  # type: ignore[no-untyped-def]
    return load_catalog(ROOT / "config", ROOT / "templates")


@pytest.fixture
def environ(catalog) -> dict[str, str]:  # type: ignore[no-untyped-def]
    """Fresh intake keys for every section, as the server's environment."""
    return {s.intake_key_env: secrets.token_hex(16) for s in catalog.sections.values()}


def make_settings(tmp_path: Path, *, database_url: str, redis_url: str, smtp_port: int, **extra: Any) -> Settings:
    return Settings(
        config_dir=ROOT / "config",
        templates_dir=ROOT / "templates",
        var_dir=tmp_path / "var",
        database_url=database_url,
        redis_url=redis_url,
        redis_namespace=f"t-{uuid.uuid4().hex[:12]}",
        mode="sandbox",
        sandbox_smtp_host="127.0.0.1",
        sandbox_smtp_port=smtp_port,
        demo_campaigns=True,
        retry_base_seconds=0.3,
        # Caps, office hours and intake quotas have tests of their own (test_policy_gate.py,
        # test_intake_quotas.py); elsewhere they would only make tests depend on the day of the
        # week or on how many appeals a test posts.
        **{
            "office_hours": False,
            "email_limits": (),
            "fax_limits": (),
            "section_quota": (),
            "supporter_quota": (),
            "client_ip_quota": (),
            **extra,
        },
    )


@pytest.fixture
def settings(request: pytest.FixtureRequest, tmp_path: Path, database_url: str, redis_server: RedisServer) -> Settings:
    # Only tests that send mail start an SMTP server; the others point sandbox mode at a closed port.
    port = request.getfixturevalue("smtp").port if "smtp" in request.fixturenames else free_port()
    return make_settings(tmp_path, database_url=database_url, redis_url=redis_server.url, smtp_port=port)


@pytest.fixture
def service(settings: Settings, environ: dict[str, str]) -> Iterator[Service]:
    svc = Service(settings, environ=environ)
    svc.ledger.migrate()
    yield svc
    svc.ledger.dispose()


@pytest.fixture
def client(service: Service) -> Iterator[TestClient]:
    with TestClient(service.api(), raise_server_exceptions=False) as c:
        yield c


class Running:
    """A worker and a reconciler running against a service, stopped at teardown."""

    def __init__(self, service: Service, *, threads: int = 4, interval: float = 0.1):
        self.service = service
        self.handle = service.worker(threads=threads)
        self.reconciler = service.reconciler(
            interval=interval, fresh_grace=timedelta(seconds=0.5), housekeeping_every=0.5
        )
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self.reconciler.run, args=(self.stop_event,), daemon=True)

    def __enter__(self) -> Running:
        self.handle.start()
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_event.set()
        self.thread.join(5)
        self.handle.stop(timeout_ms=10_000)


@pytest.fixture
def running(service: Service) -> Iterator[Running]:
    with Running(service) as r:
        yield r


def wait_for(predicate: Callable[[], Any], timeout: float = 15.0, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)


def appeal_body(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "campaign": "UA-002-19-DEMO",
        "section": "us",
        "language": "en",
        "supporter": {
            "name": "Jane Doe",
            "email": f"jane.{uuid.uuid4().hex[:8]}@example.org",
            "city": "Boston",
            "country": "US",
        },
        "message": "Please act now.",
        "client_ref": f"form-{uuid.uuid4().hex[:12]}",
    }
    for key, value in overrides.items():
        if value is None:
            body.pop(key, None)
        else:
            body[key] = value
    return body


def signed_post(
    client: TestClient,
    environ: dict[str, str],
    catalog: Any,
    body: Any,
    *,
    section: str | None = None,
    key: str | None = None,
    timestamp: int | None = None,
    raw: bytes | None = None,
) -> Any:
    data = raw if raw is not None else json.dumps(body).encode()
    code = section or (body.get("section") if isinstance(body, dict) else "us")
    secret = key if key is not None else environ[catalog.section(code).intake_key_env]
    header = sign(secret.encode(), data, timestamp)
    return client.post(
        "/v1/appeals", content=data, headers={"Dispatch-Signature": header, "Content-Type": "application/json"}
    )


def email_letters(service: Service, n: int) -> list[str]:
    """``n`` appeals' email letters, in the ledger and not yet queued; their faxes are cancelled so
    that each appeal has one live letter."""
    from sqlalchemy import update

    from dispatcher.ledger.models import Delivery, State

    service.intake.enqueuer = None
    ids = []
    for _ in range(n):
        accepted = service.intake.submit(appeal_body())
        ids.append(next(d.id for d in accepted.deliveries if d.channel == "email"))
        with service.ledger.session() as s:
            s.execute(
                update(Delivery)
                .where(Delivery.appeal_id == accepted.appeal_id, Delivery.channel != "email")
                .values(state=State.CANCELLED)
            )
    return ids


def enqueue(service: Service, ids: list[str]) -> None:
    """Put letters on the queue as intake and the reconciler do: marked queued first."""
    from datetime import UTC, datetime

    service.ledger.lifecycle.mark_queued(ids, datetime.now(UTC))
    service.enqueuer.send(ids)
