"""An operational error pauses the channel, not the letters: live mode against a real SMTP relay
on loopback that refuses our credentials for a while. Nothing fails; an operator resumes."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from dispatcher.app import Service
from dispatcher.cli import main
from tests.conftest import ROOT, Running, make_settings, wait_for
from tests.support.liveconfig import write_config
from tests.support.smtp import SmtpTestServer

pytestmark = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)

RELAY = """
[smtp]
host = "127.0.0.1"
port = {port}
tls = "none"
username_env = "TEST_SMTP_USER"
password_env = "TEST_SMTP_PASSWORD"
"""


def write_mail_config(tmp_path: Path, port: int) -> Path:
    return write_config(
        tmp_path,
        campaign_id="TEST-MAIL",
        channel="email",
        address_line='email = "minister@example.org"',
        relay_and_gateway=RELAY.format(port=port),
    )


def states(service: Service) -> list[str]:
    from sqlalchemy import select

    from dispatcher.ledger.models import Delivery

    with service.ledger.session() as s:
        return sorted(s.scalars(select(Delivery.state)).all())


def test_relay_refusing_our_credentials_pauses_the_channel_until_resumed(
    tmp_path, database_url, redis_server, monkeypatch
):
    with SmtpTestServer(auth={"dispatch": "s3cret"}, auth_required=True) as relay:
        # The relay refuses our (correct) login for a while: an account locked at the provider.
        relay.script_auth([(535, "5.7.8 Authentication credentials invalid")] * 50)
        settings = make_settings(
            tmp_path, database_url=database_url, redis_url=redis_server.url, smtp_port=relay.port
        ).but(
            mode="live",
            demo_campaigns=False,
            config_dir=write_mail_config(tmp_path, relay.port),
            templates_dir=ROOT / "templates",
        )
        environ = {"DISPATCH_INTAKE_KEY_ZZ": "k", "TEST_SMTP_USER": "dispatch", "TEST_SMTP_PASSWORD": "s3cret"}
        service = Service(settings, environ=environ)
        service.ledger.migrate()
        letters = 4
        with Running(service):
            for n in range(letters):
                service.intake.submit(
                    {
                        "campaign": "TEST-MAIL",
                        "section": "zz",
                        "language": "en",
                        "supporter": {"name": f"Supporter {n}", "email": f"s{n}@example.org", "country": "GB"},
                    }
                )
            wait_for(lambda: "email:zz" in service.ledger.controls.paused_channels(), timeout=30)
            wait_for(lambda: states(service) == ["planned"] * letters, timeout=30)
            assert "535" in service.ledger.controls.paused_channels()["email:zz"].reason
            assert relay.messages == []

            # The operator sees it and, once the provider has unlocked the account, resumes.
            monkeypatch.setenv("DATABASE_URL", settings.database_url)
            listed = CliRunner().invoke(main, ["channel", "list"])
            assert "email:zz" in listed.output and "535" in listed.output
            relay.reset()  # the relay accepts our login again
            resumed = CliRunner().invoke(main, ["channel", "resume", "email:zz"])
            assert resumed.exit_code == 0, resumed.output
            wait_for(lambda: states(service) == ["sent"] * letters, timeout=30)
        assert len(relay.messages) == letters
        assert all(m.login == "dispatch" for m in relay.messages)
        # no letter failed, and the pause cost none of them a try
        from dispatcher.ledger.models import Attempt

        with service.ledger.session() as s:
            from sqlalchemy import select

            outcomes = s.scalars(select(Attempt.outcome)).all()
        assert "failed" not in states(service)
        assert outcomes.count("sent") == letters
