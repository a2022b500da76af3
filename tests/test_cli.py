"""The operator and integrator commands, run through click against a real ledger."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime

import pytest
from click.testing import CliRunner

from dispatcher.cli import main
from dispatcher.intake.signature import compute
from tests.conftest import appeal_body

pytestmark = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


@pytest.fixture
def run(service, monkeypatch):
    monkeypatch.setenv("DATABASE_URL", service.settings.database_url)
    monkeypatch.setenv("DISPATCH_VAR_DIR", str(service.settings.var_dir))
    runner = CliRunner()
    return lambda *args, **kw: runner.invoke(main, list(args), catch_exceptions=False, **kw)


def test_sign_prints_the_header_the_api_checks(run, tmp_path, monkeypatch):
    body = json.dumps({"campaign": "UA-002-19-DEMO", "section": "us"}).encode()
    (tmp_path / "body.json").write_bytes(body)
    monkeypatch.setenv("DISPATCH_INTAKE_KEY_US", "k3y")
    result = run("sign", "--section", "us", "--timestamp", "1700000000", str(tmp_path / "body.json"))
    assert result.exit_code == 0
    assert result.output.strip() == f"t=1700000000,v1={compute(b'k3y', 1700000000, body)}"


def test_sign_names_the_missing_key_variable(run, tmp_path, monkeypatch):
    (tmp_path / "body.json").write_bytes(b"{}")
    monkeypatch.delenv("DISPATCH_INTAKE_KEY_US", raising=False)
    result = run("sign", "--section", "us", str(tmp_path / "body.json"))
    assert result.exit_code == 2
    assert "DISPATCH_INTAKE_KEY_US" in result.output


def test_flagged_numbers_are_listed_and_cleared(run, service):
    service.ledger.controls.flag_number("+442079460103", "no fax tone", "dl_x", datetime.now(UTC))
    listed = run("fax", "flagged")
    assert "+442079460103" in listed.output and "no fax tone" in listed.output
    assert run("fax", "unflag", "+442079460103").exit_code == 0
    assert service.ledger.controls.flagged("+442079460103") is None
    assert run("fax", "unflag", "+442079460103").exit_code == 1


def test_suppressed_addresses_are_listed_and_lifted(run, service):
    assert "no suppressed addresses" in run("suppressions", "list").output
    service.ledger.suppressions.add(
        "email",
        "Ambassador@embassy.example",
        reason="bounced",
        code="5.1.1",
        text="User unknown",
        delivery="dl_x",
        now=datetime.now(UTC),
    )
    listed = run("suppressions", "list", "--json")
    [row] = json.loads(listed.output)
    assert (row["channel"], row["address"], row["code"], row["delivery"]) == (
        "email",
        "ambassador@embassy.example",
        "5.1.1",
        "dl_x",
    )
    assert "ambassador@embassy.example" in run("suppressions", "list").output
    assert run("suppressions", "remove", "AMBASSADOR@embassy.example").exit_code == 0
    assert service.ledger.suppressions.find("email", "ambassador@embassy.example") is None
    gone = run("suppressions", "remove", "ambassador@embassy.example")
    assert gone.exit_code == 1


def test_config_check_reports_file_and_key(run, tmp_path, monkeypatch):
    import shutil

    from tests.conftest import ROOT

    config = tmp_path / "config"
    shutil.copytree(ROOT / "config", config)
    section = config / "sections" / "us.toml"
    section.write_text(section.read_text().replace('target = "president"', 'target = "presidnet"'))
    monkeypatch.setenv("DISPATCH_CONFIG_DIR", str(config))
    result = run("config", "check")
    assert result.exit_code == 1
    assert "sections/us.toml: campaigns.UA-002-19.writes[0].target" in result.output
    assert "presidnet" in result.output


def test_config_check_env_names_a_malformed_telnyx_key(run, environ, monkeypatch):
    for name, value in environ.items():  # every secret the config names is set: only the key is wrong
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("DISPATCH_TELNYX_PUBLIC_KEY", "0123456789abcdef0123456789abcdef")
    result = run("config", "check", "--env")
    assert result.exit_code == 2
    assert "DISPATCH_TELNYX_PUBLIC_KEY" in result.output and "decodes to 24 bytes" in result.output
    assert "0123456789abcdef" not in result.output


def test_api_refuses_to_start_with_a_malformed_telnyx_key(tmp_path, database_url):
    from tests.conftest import ROOT
    from tests.support.services import free_port

    env = {
        **os.environ,
        "DISPATCH_TELNYX_PUBLIC_KEY": "not a key",
        "DISPATCH_VAR_DIR": str(tmp_path / "var"),
        "DATABASE_URL": database_url,
        "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
    }
    # Before the fix the API started and answered every webhook with a 500: here it would run
    # until the timeout.
    done = subprocess.run(
        [sys.executable, "-m", "dispatcher.cli", "api", "--port", str(free_port())],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    assert "DISPATCH_TELNYX_PUBLIC_KEY" in done.stderr and "not base64" in done.stderr
    assert "Traceback" not in done.stderr


def test_forecast_says_when_a_recipients_capacity_is_short(run, service, monkeypatch):
    from dispatcher.queue.forecast import campaign_forecast

    # ch's demo window is 42 days, about 29 working days: at one fax a day, 40 letters cannot fit
    slow = service.settings.but(fax_limits=("1/day",), office_hours=True)
    service.gate.settings = slow
    service.intake.enqueuer = None  # no worker here: the first letter would sit in the queue
    for _ in range(40):
        body = appeal_body(section="ch", language="de")
        body["supporter"]["country"] = "CH"
        service.intake.submit(body)
    rows = campaign_forecast(
        ledger=service.ledger, pacer=service.pacer, campaign="UA-002-19-DEMO", now=datetime.now(UTC)
    )
    faxes = [r.forecast for r in rows if r.forecast.recipient.startswith("fax:")]
    assert len(faxes) == 2  # the President's line and the Berne embassy's
    for f in faxes:
        assert f.waiting == 40
        assert f.rate_per_hour <= 1 / 8 + 1e-9  # one a day over 8 open hours at most
        assert not f.fits and f.shortfall > 0 and f.fits_count + f.shortfall == 40
        assert 20 <= f.fits_count <= 31
    # and the command prints it, saying capacity is short
    monkeypatch.setenv("DISPATCH_DEMO_CAMPAIGNS", "1")
    monkeypatch.setenv("DISPATCH_FAX_LIMITS", "1/day")
    result = run("schedule", "forecast", "UA-002-19-DEMO")
    assert result.exit_code == 0, result.output
    assert "capacity short for 2 recipient(s)" in result.output
