"""Intake quotas (docs/intake.md, "Quotas"): per section key, per supporter across sections and
per client IP, counted in Redis so they hold across API processes; over quota a form gets 429
with Retry-After and our error body, and is accepted after the wait. Also dev mode's own port and
Redis keys."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from click.testing import CliRunner
from fastapi.testclient import TestClient
from structlog.testing import capture_logs

from dispatcher.app import Service
from dispatcher.cli import main
from dispatcher.intake.signature import sign
from dispatcher.settings import Settings
from tests.conftest import ROOT, appeal_body, make_settings, signed_post
from tests.support.services import free_port, wait_for_port

#: the ledger these tests need is incidental: SQLite only
sqlite = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


def config_with_quota(tmp_path: Path, section: str, intake_table: str) -> Path:
    """A copy of config/ whose ``section`` file has ``intake_table`` as its [intake] table."""
    config = tmp_path / "config"
    shutil.copytree(ROOT / "config", config)
    path = config / "sections" / f"{section}.toml"
    path.write_text(path.read_text() + f"\n[intake]\n{intake_table}\n")
    return config


def quota_service(
    tmp_path: Path,
    database_url: str,
    redis_url: str,
    environ: dict[str, str],
    *,
    config_dir: Path | None = None,
    **extra: Any,
) -> Service:
    settings = make_settings(tmp_path, database_url=database_url, redis_url=redis_url, smtp_port=free_port(), **extra)
    if config_dir is not None:
        settings = settings.but(config_dir=config_dir)
    service = Service(settings, environ=environ)
    service.ledger.migrate()
    return service


def supporter_body(section: str, email: str, **overrides: Any) -> dict[str, Any]:
    body = appeal_body(section=section, language="en", **overrides)
    body["supporter"]["email"] = email
    return body


@sqlite
def test_a_burst_over_the_section_quota_gets_429_and_is_accepted_after_retry_after(
    tmp_path, database_url, redis_server, environ, catalog
):
    # The window is 2 s so that the test waits little: configuration, not the shipped default.
    config = config_with_quota(tmp_path, "us", 'quota = ["3/2second"]')
    service = quota_service(tmp_path, database_url, redis_server.url, environ, config_dir=config)
    with TestClient(service.api(), raise_server_exceptions=False) as client:
        first = appeal_body()
        burst = [first, appeal_body(), appeal_body()]
        for body in burst:
            assert signed_post(client, environ, catalog, body).status_code == 202
        over = appeal_body()
        refused = signed_post(client, environ, catalog, over)
        assert refused.status_code == 429, refused.text
        retry_after = int(refused.headers["Retry-After"])
        assert 1 <= retry_after <= 2
        error = refused.json()["error"]
        assert error["code"] == "quota_exceeded"
        assert (error["quota"], error["limits"], error["retry_after"]) == ("section", ["3/2second"], retry_after)
        assert "section 'us'" in error["message"]

        # A form retrying an appeal it already sent (same client_ref, signed afresh) gets its
        # appeal back, quota full or not: it was charged once, when it was written.
        again = signed_post(client, environ, catalog, first, timestamp=int(time.time()) - 1)
        assert again.status_code == 202, again.text
        assert again.json()["replayed"] is True

        time.sleep(retry_after)  # what the form is told to do
        accepted = signed_post(client, environ, catalog, over)
        assert accepted.status_code == 202, accepted.text
        assert accepted.json()["replayed"] is False


@sqlite
def test_the_supporter_quota_counts_one_email_across_sections_and_keeps_it_out_of_redis(
    tmp_path, database_url, redis_server, environ, catalog
):
    service = quota_service(tmp_path, database_url, redis_server.url, environ, supporter_quota=("2/hour",))
    email = f"Repeat.Signer.{uuid.uuid4().hex[:6]}@example.org"
    with TestClient(service.api(), raise_server_exceptions=False) as client:
        assert signed_post(client, environ, catalog, supporter_body("us", email)).status_code == 202
        assert signed_post(client, environ, catalog, supporter_body("uk", email.lower())).status_code == 202
        refused = signed_post(client, environ, catalog, supporter_body("ca", email))
        assert refused.status_code == 429, refused.text
        assert refused.json()["error"]["quota"] == "supporter"
        assert int(refused.headers["Retry-After"]) > 3000  # an hour's window: about an hour
        # another supporter through the same section is not affected
        assert signed_post(client, environ, catalog, appeal_body(section="ca", language="en")).status_code == 202

    client_redis = redis.Redis.from_url(redis_server.url)
    keys = list(client_redis.scan_iter(f"{service.settings.redis_namespace}:*"))
    assert any(b"quota:supporter:" in k for k in keys)
    stored = b" ".join(
        keys + [m for k in keys if client_redis.type(k) == b"zset" for m in client_redis.zrange(k, 0, -1)]
    )
    assert email.lower().encode() not in stored.lower()
    assert b"repeat.signer" not in stored.lower()


@sqlite
def test_the_client_ip_quota_counts_an_address_and_an_ipv6_host_s_network(
    tmp_path, database_url, redis_server, environ, catalog
):
    service = quota_service(tmp_path, database_url, redis_server.url, environ, client_ip_quota=("1/hour",))
    with TestClient(service.api(), raise_server_exceptions=False) as client:
        assert signed_post(client, environ, catalog, appeal_body(client_ip="203.0.113.7")).status_code == 202
        refused = signed_post(client, environ, catalog, appeal_body(client_ip="203.0.113.7"))
        assert (refused.status_code, refused.json()["error"]["quota"]) == (429, "client_ip")
        assert signed_post(client, environ, catalog, appeal_body(client_ip="203.0.113.8")).status_code == 202
        assert signed_post(client, environ, catalog, appeal_body(client_ip="2001:db8:1:2::a")).status_code == 202
        same_host = signed_post(client, environ, catalog, appeal_body(client_ip="2001:db8:1:2:ffff::b"))
        assert same_host.status_code == 429
        assert signed_post(client, environ, catalog, appeal_body()).status_code == 202  # no client_ip: no IP quota
        bad = signed_post(client, environ, catalog, appeal_body(client_ip="not an address"))
        assert bad.status_code == 422
        [problem] = bad.json()["error"]["fields"]
        assert (problem["field"], problem["code"]) == ("client_ip", "invalid_format")


@sqlite
def test_a_refused_appeal_gives_its_slot_back(tmp_path, database_url, redis_server, environ, catalog):
    service = quota_service(tmp_path, database_url, redis_server.url, environ, section_quota=("2/hour",))
    with TestClient(service.api(), raise_server_exceptions=False) as client:
        body = appeal_body()
        assert signed_post(client, environ, catalog, body).status_code == 202
        # the same client_ref for someone else's appeal: 409, and not counted
        taken = appeal_body(client_ref=body["client_ref"])
        assert signed_post(client, environ, catalog, taken).status_code == 409
        assert signed_post(client, environ, catalog, appeal_body()).status_code == 202
        assert signed_post(client, environ, catalog, appeal_body()).status_code == 429


@sqlite
def test_without_redis_appeals_are_accepted_unchecked_and_the_log_says_so(tmp_path, database_url, environ):
    closed = f"redis://127.0.0.1:{free_port()}/0"
    service = quota_service(tmp_path, database_url, closed, environ, section_quota=("1/hour",))
    with capture_logs() as logs:
        first = service.intake.submit(appeal_body())
        second = service.intake.submit(appeal_body())
    assert not first.replayed and not second.replayed
    unchecked = [e for e in logs if e["event"] == "intake.quota_unchecked"]
    assert len(unchecked) == 2 and unchecked[0]["section"] == "us"


@sqlite
def test_without_redis_the_api_accepts_appeals_unchecked_and_the_log_says_so(tmp_path, database_url, environ, catalog):
    # the API's own path: its quota call is awaited on the event loop (redis.asyncio)
    closed = f"redis://127.0.0.1:{free_port()}/0"
    service = quota_service(tmp_path, database_url, closed, environ, section_quota=("1/hour",))
    with capture_logs() as logs, TestClient(service.api(), raise_server_exceptions=False) as client:
        answers = [signed_post(client, environ, catalog, appeal_body()) for _ in range(2)]
    assert [a.status_code for a in answers] == [202, 202], [a.text for a in answers]
    unchecked = [e for e in logs if e["event"] == "intake.quota_unchecked"]
    assert len(unchecked) == 2 and unchecked[0]["section"] == "us"
    assert unchecked[0]["error"] == "ConnectionError"


def test_config_check_prints_each_sections_quotas(tmp_path, monkeypatch):
    config = config_with_quota(tmp_path, "ch", 'quota = ["600/minute", "20000/day"]\nclient_ip_quota = []')
    monkeypatch.setenv("DISPATCH_CONFIG_DIR", str(config))
    monkeypatch.setenv("DISPATCH_SUPPORTER_QUOTA", "5/hour,20/day")
    result = CliRunner().invoke(main, ["config", "check"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    lines = {
        line.split(" quotas: ")[0].strip(): line.split(" quotas: ")[1]
        for line in result.output.splitlines()
        if " quotas: " in line
    }
    assert lines["ch"] == "section 600/minute, 20000/day · supporter 5/hour, 20/day (default) · client_ip none"
    assert lines["us"].startswith("section 600/minute (default) · supporter 5/hour, 20/day (default)")


def test_config_check_names_a_bad_quota(tmp_path, monkeypatch):
    config = config_with_quota(tmp_path, "us", 'quota = ["lots"]')
    monkeypatch.setenv("DISPATCH_CONFIG_DIR", str(config))
    result = CliRunner().invoke(main, ["config", "check"], catch_exceptions=False)
    assert result.exit_code == 1
    assert "intake.quota" in result.output and "'lots'" in result.output


# --------------------------------------------------------------------------- real processes


def process_env(settings: Settings, environ: dict[str, str], **more: str) -> dict[str, str]:
    return {
        **os.environ,
        **environ,
        "PYTHONPATH": str(ROOT),
        "DATABASE_URL": settings.database_url,
        "REDIS_URL": settings.redis_url,
        "DISPATCH_CONFIG_DIR": str(settings.config_dir),
        "DISPATCH_TEMPLATES_DIR": str(settings.templates_dir),
        "DISPATCH_VAR_DIR": str(settings.var_dir),
        "DISPATCH_DEMO_CAMPAIGNS": "1",
        "DISPATCH_LOG_LEVEL": "WARNING",
        **more,
    }


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@sqlite
def test_two_api_processes_share_the_section_quota(tmp_path, database_url, redis_server, environ, catalog):
    config = config_with_quota(tmp_path, "us", 'quota = ["3/minute"]')
    settings = quota_service(tmp_path, database_url, redis_server.url, environ, config_dir=config).settings
    env = process_env(settings, environ, DISPATCH_REDIS_NAMESPACE=settings.redis_namespace)
    ports = [free_port(), free_port()]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "dispatcher.cli", "api", "--port", str(port)],
            env=env,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for port in ports
    ]
    try:
        for port in ports:
            wait_for_port("127.0.0.1", port, timeout=60)
        key = environ[catalog.section("us").intake_key_env].encode()

        def post(port: int) -> httpx.Response:
            raw = json.dumps(appeal_body()).encode()
            return httpx.post(
                f"http://127.0.0.1:{port}/v1/appeals",
                content=raw,
                headers={"Dispatch-Signature": sign(key, raw), "Content-Type": "application/json"},
                timeout=30,
            )

        a, b = ports
        assert [post(a).status_code, post(a).status_code, post(b).status_code] == [202, 202, 202]
        # b has accepted one appeal itself, but the quota is the section's, wherever it is counted
        refused = post(b)
        assert refused.status_code == 429, refused.text
        assert refused.json()["error"]["quota"] == "section"
        assert int(refused.headers["Retry-After"]) >= 1
        assert post(a).status_code == 429
    finally:
        for proc in procs:
            stop(proc)
        for proc in procs:
            assert proc.stderr is not None
            print(f"api {proc.pid} exited {proc.returncode}:", proc.stderr.read()[-3000:].decode(errors="replace"))


def test_dev_mode_takes_a_port_and_keeps_its_redis_keys_to_itself(tmp_path, redis_server):
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "REDIS_URL": redis_server.url,
        "DISPATCH_VAR_DIR": str(tmp_path / "var"),
        "DISPATCH_LOG_LEVEL": "WARNING",
    }
    for name in ("DISPATCH_REDIS_NAMESPACE", "DATABASE_URL", "DISPATCH_MODE", "DISPATCH_CONFIG_DIR"):
        env.pop(name, None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "dispatcher.cli", "dev", "--port", str(port), "--smtp-port", "0", "--bounces-port", "0"],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for_port("127.0.0.1", port, timeout=60)
        assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10).json()["queue"] == "ok"
        keys = [k.decode() for k in redis.Redis.from_url(redis_server.url).scan_iter("dispatcher*")]
        # the console's dev admin, with the password dev mode keeps in var/
        from dispatcher.dev import dev_keys_from
        from tests.support.console import sign_in

        password = dev_keys_from(tmp_path / "var" / "dev-console.env")["DEV_CONSOLE_PASSWORD"]
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as web:
            assert sign_in(web, name="dev-admin", password=password).status_code == 303
            assert "dev-admin" in web.get("/console/").text
    finally:
        stop(proc)
    assert proc.stdout is not None and proc.stderr is not None
    banner = proc.stdout.read().decode()
    assert f"http://127.0.0.1:{port}" in banner, proc.stderr.read().decode()[-3000:]
    assert f"console      http://127.0.0.1:{port}/console/   sign in as dev-admin / {password}" in banner
    namespace = banner.split("keys under ")[1].split(":")[0]
    assert namespace.startswith("dispatcher-dev-")
    assert any(k.startswith(namespace + ":") for k in keys)  # the worker's heartbeat, the reconciler's lease
    assert not [k for k in keys if k.startswith("dispatcher:")]  # nothing under the production default
