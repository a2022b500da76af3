"""``dispatcher preflight`` against real servers on loopback: an SMTP relay with AUTH (plain, and
STARTTLS with a private CA made here), and the Telnyx and Sinch stand-ins. Each thing live mode
needs that is missing or refused is reported with what fixes it; all well is exit status 0.
Nothing is ever sent: the relay sees no MAIL, the gateways no POST."""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import ssl
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from dispatcher.cli import main
from dispatcher.config.loader import load_catalog
from dispatcher.preflight import Finding, check_sandbox_only, run
from dispatcher.sandbox.smtp import LoopbackController
from tests.conftest import ROOT
from tests.support.fax_providers import SinchServer, TelnyxServer
from tests.support.liveconfig import write_config
from tests.support.smtp import SmtpTestServer

USER, PASSWORD = "zz-relay", "right-password"
TELNYX_KEY = "KEY_right"
RELAY = """
[smtp]
host = "127.0.0.1"
port = {port}
tls = "{tls}"
username_env = "TEST_SMTP_USER"
password_env = "TEST_SMTP_PASSWORD"
{extra}
"""
TELNYX = """
[fax]
gateway = "telnyx"
from_number = "020 7946 0000"
base_url = "{base_url}"
api_key_env = "TEST_TELNYX_KEY"
connection_id = "conn-test"
"""
SINCH = """
[fax]
gateway = "sinch"
from_number = "020 7946 0000"
base_url = "{base_url}"
project_id = "proj-test"
key_id_env = "TEST_SINCH_KEY_ID"
key_secret_env = "TEST_SINCH_SECRET"
"""


def config(tmp_path: Path, relay: str, fax: str = "") -> Path:
    return write_config(
        tmp_path,
        campaign_id="TEST-LIVE",
        channel="email",
        address_line='email = "minister@ministry.example"',
        relay_and_gateway=relay + fax,
    )


def settings_for(config_dir: Path):  # type: ignore[no-untyped-def]
    from dispatcher.settings import Settings

    return Settings(
        config_dir=config_dir,
        templates_dir=ROOT / "templates",
        var_dir=config_dir.parent / "var",
        database_url="sqlite://",
        redis_url="redis://127.0.0.1:1/0",
    )


def preflight(config_dir: Path, environ: dict[str, str]) -> list[Finding]:
    catalog = load_catalog(config_dir, ROOT / "templates")
    return asyncio.run(run(catalog, settings_for(config_dir), environ))


def problems(findings: list[Finding]) -> dict[str, tuple[str, str | None]]:
    return {f.check: (f.text, f.fix) for f in findings if not f.ok}


def good_env(telnyx: TelnyxServer | None = None) -> dict[str, str]:
    env = {
        "DISPATCH_INTAKE_KEY_ZZ": "intake-key",
        "TEST_SMTP_USER": USER,
        "TEST_SMTP_PASSWORD": PASSWORD,
        "DISPATCH_PUBLIC_URL": "https://dispatch.example.org",
    }
    if telnyx is not None:
        env |= {"TEST_TELNYX_KEY": TELNYX_KEY, "DISPATCH_TELNYX_PUBLIC_KEY": telnyx.public_key_b64}
    return env


@pytest.fixture
def relay() -> Iterator[SmtpTestServer]:
    with SmtpTestServer(auth={USER: PASSWORD}, auth_required=True) as server:
        yield server


@pytest.fixture(scope="module")
def telnyx() -> Iterator[TelnyxServer]:
    with TelnyxServer(api_key=TELNYX_KEY) as server:
        yield server


# ------------------------------------------------------------------------------- the relay


def test_a_relay_that_refuses_our_login_is_reported_with_the_variables_to_fix(tmp_path, relay):
    cfg = config(tmp_path, RELAY.format(port=relay.port, tls="none", extra=""))
    found = problems(preflight(cfg, good_env() | {"TEST_SMTP_PASSWORD": "wrong"}))
    text, fix = found["relay"]
    assert "login refused: 535" in text
    assert fix == "set TEST_SMTP_USER and TEST_SMTP_PASSWORD"
    assert "wrong" not in text


def test_the_right_login_is_ok_and_nothing_is_sent(tmp_path, relay):
    cfg = config(tmp_path, RELAY.format(port=relay.port, tls="none", extra='ehlo_name = "mx.zz.dispatch.example"'))
    findings = preflight(cfg, good_env())
    assert problems(findings) == {}
    [ok] = [f for f in findings if f.check == "relay"]
    assert "EHLO mx.zz.dispatch.example" in ok.text and "login accepted" in ok.text
    assert relay.commands == ["AUTH", "QUIT"]  # no MAIL: nothing sent
    assert relay.messages == []


def test_unset_relay_credentials_are_named(tmp_path, relay):
    cfg = config(tmp_path, RELAY.format(port=relay.port, tls="none", extra=""))
    env = good_env()
    del env["TEST_SMTP_PASSWORD"]
    assert problems(preflight(cfg, env))["relay"][1] == "set TEST_SMTP_PASSWORD"
    assert relay.commands == []  # not even tried


def test_a_relay_nobody_answers_on_points_at_host_and_port(tmp_path):
    from tests.support.services import free_port

    cfg = config(tmp_path, RELAY.format(port=free_port(), tls="none", extra=""))
    text, fix = problems(preflight(cfg, good_env()))["relay"]
    assert "cannot connect" in text
    assert fix == "config/sections/zz.toml key smtp.host / smtp.port"


# ------------------------------------------------------------------- STARTTLS, private CA


def _certificates(directory: Path) -> tuple[Path, ssl.SSLContext]:
    """A private CA (written to ``directory``) and a server context with a certificate it signed
    for 127.0.0.1."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Preflight test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    ca_file = directory / "relay-ca.pem"
    ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (directory / "relay.pem").write_bytes(
        cert.public_bytes(serialization.Encoding.PEM)
        + key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(directory / "relay.pem")
    return ca_file, server


class _Relay:
    async def handle_DATA(self, server, session, envelope):  # type: ignore[no-untyped-def]
        raise AssertionError("the preflight sent a message")


def _authenticate(server, session, envelope, mechanism, data):  # type: ignore[no-untyped-def]
    ok = isinstance(data, LoginPassword) and (data.login, data.password) == (USER.encode(), PASSWORD.encode())
    return AuthResult(success=ok, handled=False)


class _TlsRelay(LoopbackController):
    def factory(self) -> SMTP:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return super().factory()


@pytest.fixture
def tls_relay(tmp_path) -> Iterator[tuple[int, Path]]:
    (tmp_path / "certs").mkdir()
    ca_file, context = _certificates(tmp_path / "certs")
    controller = _TlsRelay(
        _Relay(),
        hostname="127.0.0.1",
        port=0,
        tls_context=context,
        require_starttls=True,
        authenticator=_authenticate,
        auth_require_tls=True,
    )
    controller.start()
    try:
        yield controller.port, ca_file
    finally:
        controller.stop()


def test_starttls_with_a_private_ca_is_trusted_through_ca_file(tmp_path, tls_relay):
    port, ca_file = tls_relay
    cfg = config(tmp_path, RELAY.format(port=port, tls="starttls", extra=f'ca_file = "{ca_file}"'))
    findings = preflight(cfg, good_env())
    assert problems(findings) == {}
    assert any(f.check == "relay" and "login accepted" in f.text for f in findings)


def test_a_private_ca_not_named_in_ca_file_is_a_tls_problem(tmp_path, tls_relay):
    port, _ = tls_relay
    cfg = config(tmp_path, RELAY.format(port=port, tls="starttls", extra=""))
    text, fix = problems(preflight(cfg, good_env()))["relay"]
    assert "STARTTLS" in text and "certificate verify failed" in text
    assert fix == "config/sections/zz.toml key smtp.tls / smtp.ca_file"


# ------------------------------------------------------------------------ the fax gateways


def test_a_gateway_that_refuses_our_key_is_reported(tmp_path, relay, telnyx):
    telnyx.reset()
    cfg = config(tmp_path, RELAY.format(port=relay.port, tls="none", extra=""), TELNYX.format(base_url=telnyx.base_url))
    found = problems(preflight(cfg, good_env(telnyx) | {"TEST_TELNYX_KEY": "KEY_wrong"}))
    text, fix = found["fax gateway (telnyx)"]
    assert "refuses our key" in text and "401" in text
    assert fix == "set TEST_TELNYX_KEY to a valid key"
    assert telnyx.problems == []
    assert telnyx.requests_to("POST", "/") == []


def test_sinch_is_asked_with_the_sections_project_and_key(tmp_path, relay):
    with SinchServer() as sinch:
        cfg = config(
            tmp_path, RELAY.format(port=relay.port, tls="none", extra=""), SINCH.format(base_url=sinch.base_url)
        )
        env = good_env() | {"DISPATCH_SINCH_CALLBACK_TOKEN": "s" * 32, "TEST_SINCH_KEY_ID": "key-id"}
        refused = problems(preflight(cfg, env | {"TEST_SINCH_SECRET": "wrong"}))
        assert refused["fax gateway (sinch)"][1] == "set TEST_SINCH_KEY_ID and TEST_SINCH_SECRET to a valid key"
        assert problems(preflight(cfg, env | {"TEST_SINCH_SECRET": "key-secret"})) == {}
        assert sinch.problems == [] and sinch.requests_to("POST", "/") == []


def test_an_unset_public_url_is_reported_with_the_variable(tmp_path, relay, telnyx):
    cfg = config(tmp_path, RELAY.format(port=relay.port, tls="none", extra=""), TELNYX.format(base_url=telnyx.base_url))
    env = good_env(telnyx)
    del env["DISPATCH_PUBLIC_URL"]
    text, fix = problems(preflight(cfg, env))["public URL"]
    assert "DISPATCH_PUBLIC_URL is not set" in text
    assert fix is not None and fix.startswith("set DISPATCH_PUBLIC_URL")
    local = problems(preflight(cfg, env | {"DISPATCH_PUBLIC_URL": "https://127.0.0.1:8080"}))
    assert "cannot reach it" in local["public URL"][0]
    wrong_key = problems(preflight(cfg, good_env(telnyx) | {"DISPATCH_TELNYX_PUBLIC_KEY": "bm90IGEga2V5"}))
    assert wrong_key["webhook key"] == (
        "the Telnyx public key decodes to 9 bytes; an Ed25519 public key has 32",
        "set DISPATCH_TELNYX_PUBLIC_KEY",
    )


def test_sandbox_only_campaigns_are_reported(catalog):
    findings = asyncio.run(
        run(catalog, settings_for(ROOT / "config"), {}, sections=["ch"], checks=[check_sandbox_only])
    )
    [finding] = findings
    assert not finding.ok and "UA-002-19 is sandbox_only" in finding.text
    assert finding.fix == "config/sections/ch.toml key campaigns.UA-002-19 (take it out before going live)"


# ------------------------------------------------------------------------------ the command


def test_all_well_is_exit_status_0_and_a_problem_is_1(tmp_path, relay, telnyx, monkeypatch):
    telnyx.reset()
    cfg = config(tmp_path, RELAY.format(port=relay.port, tls="none", extra=""), TELNYX.format(base_url=telnyx.base_url))
    env = good_env(telnyx) | {
        "DISPATCH_CONFIG_DIR": str(cfg),
        "DISPATCH_TEMPLATES_DIR": str(ROOT / "templates"),
        "DISPATCH_VAR_DIR": str(tmp_path / "var"),
        "DISPATCH_MODE": "sandbox",
        "DISPATCH_DEMO_CAMPAIGNS": "0",
    }
    runner = CliRunner()
    result = runner.invoke(main, ["preflight", "--section", "zz"], env=env, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "checking as live mode will run" in result.output
    assert "all well" in result.output
    env["TEST_SMTP_PASSWORD"] = "wrong"
    result = runner.invoke(main, ["preflight"], env=env, catch_exceptions=False)
    assert result.exit_code == 1
    assert "fix: set TEST_SMTP_USER and TEST_SMTP_PASSWORD" in result.output
    assert relay.messages == [] and telnyx.requests_to("POST", "/") == []
