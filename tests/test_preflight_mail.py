"""``dispatcher preflight`` on what a section's email needs besides its relay: the DKIM keys and
their published records, and the bounce domain (its VERP key, MX and IMAP mailbox).

DNS is a small stand-in handed to the preflight (no test asks the network); the mailbox is a
real dovecot on loopback, and the preflight only logs in and opens the folder read-only."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from dispatcher.channels.email.dkim import generate_keys, private_pem, txt_value
from dispatcher.cli import main
from dispatcher.config.loader import check_environment, load_catalog
from dispatcher.dnslookup import DnsUnanswered
from dispatcher.preflight import Finding, check_bounces, check_dkim, run
from tests.conftest import ROOT
from tests.support.dovecot import DovecotServer
from tests.support.smtp import SmtpTestServer
from tests.test_preflight import PASSWORD, RELAY, USER, config, good_env, settings_for

DOMAIN = "zz.dispatch.example"
VERP_KEY = "v" * 32


class FakeDns:
    """Records by name; a name it was not given does not exist. ``down``: nothing answers."""

    def __init__(self, txt: dict[str, list[str]] | None = None, mx: dict[str, list[str]] | None = None) -> None:
        self.records = {"TXT": txt or {}, "MX": mx or {}}
        self.down = False
        self.asked: list[str] = []

    async def txt(self, name: str) -> list[str] | None:
        return self._answer("TXT", name)

    async def mx(self, name: str) -> list[str] | None:
        return self._answer("MX", name)

    def _answer(self, rdtype: str, name: str) -> list[str] | None:
        self.asked.append(f"{name} {rdtype}")
        if self.down:
            raise DnsUnanswered(f"no answer for {name} {rdtype} within 5 s")
        return self.records[rdtype].get(name)


def findings_of(cfg: Path, environ: dict[str, str], dns: FakeDns, check) -> list[Finding]:  # type: ignore[no-untyped-def]
    catalog = load_catalog(cfg, ROOT / "templates")
    return asyncio.run(run(catalog, settings_for(cfg), environ, checks=[check], dns=dns))


def by_check(findings: list[Finding]) -> dict[str, Finding]:
    return {f.check: f for f in findings}


# ------------------------------------------------------------------------------------ DKIM

DKIM = """
[dkim]
rsa_selector = "rsa-1"
ed25519_selector = "ed-1"
rsa_key_file = "{rsa}"
ed25519_key_file = "{ed}"
"""


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> tuple[Path, Path, str, str]:  # type: ignore[no-untyped-def]
    """Key files and the TXT values that publish them."""
    directory = tmp_path_factory.mktemp("dkim")
    rsa_key, ed_key = generate_keys()
    (directory / "rsa.pem").write_bytes(private_pem(rsa_key))
    (directory / "ed.pem").write_bytes(private_pem(ed_key))
    return directory / "rsa.pem", directory / "ed.pem", txt_value(rsa_key), txt_value(ed_key)


def dkim_config(tmp_path: Path, rsa: Path, ed: Path) -> Path:
    return config(tmp_path, RELAY.format(port=2, tls="none", extra="") + DKIM.format(rsa=rsa, ed=ed))


def test_published_records_that_match_our_keys_are_ok(tmp_path, keys):
    rsa, ed, rsa_txt, ed_txt = keys
    # a zone's line breaks may leave the key in several strings, joined with spaces
    split = rsa_txt[:120] + " " + rsa_txt[120:]
    dns = FakeDns(txt={f"rsa-1._domainkey.{DOMAIN}": [split], f"ed-1._domainkey.{DOMAIN}": [ed_txt]})
    found = by_check(findings_of(dkim_config(tmp_path, rsa, ed), {}, dns, check_dkim))
    assert found["DKIM rsa"].ok and not found["DKIM rsa"].advice
    assert found["DKIM rsa"].text == f"rsa-1._domainkey.{DOMAIN} is published and matches the key"
    assert found["DKIM ed25519"].ok


def test_a_published_key_that_differs_is_a_problem_with_the_record_to_publish(tmp_path, keys):
    rsa, ed, rsa_txt, ed_txt = keys
    other = txt_value(generate_keys()[1])
    dns = FakeDns(txt={f"rsa-1._domainkey.{DOMAIN}": [rsa_txt], f"ed-1._domainkey.{DOMAIN}": [other]})
    found = by_check(findings_of(dkim_config(tmp_path, rsa, ed), {}, dns, check_dkim))
    assert found["DKIM rsa"].ok
    ed25519 = found["DKIM ed25519"]
    assert not ed25519.ok
    assert ed25519.text == f"ed-1._domainkey.{DOMAIN}: the published key differs from ours"
    assert ed25519.fix == f'publish ed-1._domainkey.{DOMAIN}. IN TXT "{ed_txt}"'


def test_a_record_not_published_is_a_problem_and_dns_that_does_not_answer_is_advice(tmp_path, keys):
    rsa, ed, rsa_txt, _ = keys
    cfg = dkim_config(tmp_path, rsa, ed)
    dns = FakeDns()
    missing = by_check(findings_of(cfg, {}, dns, check_dkim))["DKIM rsa"]
    assert not missing.ok and missing.text == f"rsa-1._domainkey.{DOMAIN}: no record published"
    assert missing.fix is not None and missing.fix.startswith(f"publish rsa-1._domainkey.{DOMAIN}. IN TXT ")
    # the long RSA value is cut into strings a TXT record can hold
    assert f'"{rsa_txt[:255]}" "{rsa_txt[255:]}"' in missing.fix
    dns.down = True
    unanswered = by_check(findings_of(cfg, {}, dns, check_dkim))["DKIM rsa"]
    assert unanswered.ok and unanswered.advice
    assert unanswered.text.startswith(f"could not check rsa-1._domainkey.{DOMAIN}: no answer")
    assert unanswered.fix == missing.fix


def test_a_missing_key_file_is_a_problem_naming_file_and_key(tmp_path, keys):
    _, ed, _, _ = keys
    gone = tmp_path / "nowhere" / "rsa.pem"
    dns = FakeDns()
    [finding] = findings_of(dkim_config(tmp_path, gone, ed), {}, dns, check_dkim)
    assert not finding.ok
    assert finding.text == f"key file {gone} does not exist"
    assert finding.fix == "config/sections/zz.toml key dkim.rsa_key_file"
    assert dns.asked == []  # no record is looked up for keys we cannot read


def test_no_dkim_table_is_advice_with_the_command_that_makes_the_keys(tmp_path):
    cfg = config(tmp_path, RELAY.format(port=2, tls="none", extra=""))
    [finding] = findings_of(cfg, {}, FakeDns(), check_dkim)
    assert finding.ok and finding.advice
    assert "letters go out unsigned" in finding.text
    assert finding.fix == "dispatcher dkim keygen --section zz"


# --------------------------------------------------------------------------------- bounces

BOUNCES = """
[bounces]
domain = "bounces.zz.dispatch.example"
{imap}
"""
IMAP = """
[bounces.imap]
host = "127.0.0.1"
port = {port}
tls = "none"
username_env = "TEST_BOUNCE_USER"
password_env = "TEST_BOUNCE_PASSWORD"
{extra}
"""


def bounces_config(tmp_path: Path, imap: str = "") -> Path:
    return config(tmp_path, RELAY.format(port=2, tls="none", extra="") + BOUNCES.format(imap=imap))


def test_no_bounces_table_is_advice_to_add_one(tmp_path):
    cfg = config(tmp_path, RELAY.format(port=2, tls="none", extra=""))
    [finding] = findings_of(cfg, {}, FakeDns(), check_bounces)
    assert finding.ok and finding.advice
    assert "are never read" in finding.text
    assert finding.fix is not None
    assert finding.fix.startswith('add [bounces] domain = "bounces.zz.dispatch.example" to config/sections/zz.toml')
    assert "dispatcher bounces" in finding.fix


def test_the_verp_key_must_be_set_and_long_enough(tmp_path):
    cfg = bounces_config(tmp_path)
    dns = FakeDns(mx={"bounces.zz.dispatch.example": ["bounces-in.dispatch.example"]})
    unset = by_check(findings_of(cfg, {}, dns, check_bounces))["VERP key"]
    assert not unset.ok and "DISPATCH_VERP_KEY is not set" in unset.text
    assert unset.fix is not None and unset.fix.startswith("set DISPATCH_VERP_KEY")
    short = by_check(findings_of(cfg, {"DISPATCH_VERP_KEY": "short"}, dns, check_bounces))["VERP key"]
    assert not short.ok and "shorter than 16" in short.text
    good = findings_of(cfg, {"DISPATCH_VERP_KEY": VERP_KEY}, dns, check_bounces)
    assert [(f.check, f.ok, f.advice) for f in good] == [("VERP key", True, False), ("bounce domain", True, False)]
    assert by_check(good)["bounce domain"].text == "bounces.zz.dispatch.example MX bounces-in.dispatch.example"


def test_a_bounce_domain_without_mx_is_advice_to_point_it_at_the_receiver(tmp_path):
    cfg = bounces_config(tmp_path)
    found = by_check(findings_of(cfg, {"DISPATCH_VERP_KEY": VERP_KEY}, FakeDns(), check_bounces))["bounce domain"]
    assert found.ok and found.advice and found.text == "bounces.zz.dispatch.example has no MX"
    assert found.fix == "point bounces.zz.dispatch.example MX at the host running `dispatcher bounces`"


@pytest.fixture(scope="module")
def dovecot() -> Iterator[DovecotServer]:
    with DovecotServer() as server:
        yield server


def test_the_bounce_mailbox_login_is_checked_without_touching_a_message(tmp_path, dovecot):
    uid = dovecot.append(b"From: mailer-daemon@example.org\r\nSubject: bounce\r\n\r\nbody\r\n")
    cfg = bounces_config(tmp_path, IMAP.format(port=dovecot.port, extra=""))
    env = {"DISPATCH_VERP_KEY": VERP_KEY, "TEST_BOUNCE_USER": dovecot.username}
    dns = FakeDns(mx={"bounces.zz.dispatch.example": ["mx.provider.example"]})

    refused = by_check(findings_of(cfg, env | {"TEST_BOUNCE_PASSWORD": "wrong-Pa55"}, dns, check_bounces))
    mailbox = refused["bounce mailbox"]
    assert not mailbox.ok and "login refused" in mailbox.text and dovecot.username in mailbox.text
    assert "wrong-Pa55" not in mailbox.text
    assert mailbox.fix == "set TEST_BOUNCE_USER and TEST_BOUNCE_PASSWORD"

    accepted = by_check(findings_of(cfg, env | {"TEST_BOUNCE_PASSWORD": dovecot.password}, dns, check_bounces))
    assert accepted["bounce mailbox"].ok
    assert accepted["bounce mailbox"].text.endswith("takes our login; INBOX holds 1 message(s)")
    assert dovecot.uids() == [uid] and dovecot.flags(uid) == set()  # not even \Seen

    unset = by_check(findings_of(cfg, {"DISPATCH_VERP_KEY": VERP_KEY}, dns, check_bounces))["bounce mailbox"]
    assert unset.fix == "set TEST_BOUNCE_USER and TEST_BOUNCE_PASSWORD"


def test_a_bounce_mailbox_folder_that_is_not_there_points_at_the_folder_key(tmp_path, dovecot):
    cfg = bounces_config(tmp_path, IMAP.format(port=dovecot.port, extra='folder = "Bounces"'))
    env = {
        "DISPATCH_VERP_KEY": VERP_KEY,
        "TEST_BOUNCE_USER": dovecot.username,
        "TEST_BOUNCE_PASSWORD": dovecot.password,
    }
    found = by_check(findings_of(cfg, env, FakeDns(), check_bounces))
    assert not found["bounce mailbox"].ok and "'Bounces' cannot be opened" in found["bounce mailbox"].text
    assert found["bounce mailbox"].fix == "config/sections/zz.toml key bounces.imap.folder"
    # a mailbox's domain MX points at its provider, not at `dispatcher bounces`
    assert found["bounce domain"].fix == (
        "point bounces.zz.dispatch.example MX at the mail provider of the [bounces.imap] mailbox"
    )


# ---------------------------------------------------------------------- config check --env


def test_config_check_env_in_live_mode_names_the_verp_key_and_mailbox_variables(tmp_path):
    catalog = load_catalog(bounces_config(tmp_path, IMAP.format(port=993, extra="")))
    env = {"DISPATCH_INTAKE_KEY_ZZ": "k", "TEST_SMTP_USER": "u", "TEST_SMTP_PASSWORD": "p"}
    assert check_environment(catalog, env, live=False) == []
    problems = check_environment(catalog, env, live=True)
    assert [(p.key, p.message.split(";")[0]) for p in problems] == [
        ("bounces.domain", "environment variable DISPATCH_VERP_KEY is not set"),
        ("bounces.imap.username_env", "environment variable TEST_BOUNCE_USER is not set"),
        ("bounces.imap.password_env", "environment variable TEST_BOUNCE_PASSWORD is not set"),
    ]
    env |= {"DISPATCH_VERP_KEY": VERP_KEY, "TEST_BOUNCE_USER": "b", "TEST_BOUNCE_PASSWORD": "p"}
    assert check_environment(catalog, env, live=True) == []


# ------------------------------------------------------------------------------ the command


def test_advice_is_shown_and_does_not_fail_the_preflight(tmp_path):
    with SmtpTestServer(auth={USER: PASSWORD}, auth_required=True) as relay:
        cfg = config(tmp_path, RELAY.format(port=relay.port, tls="none", extra=""))
        env = good_env() | {
            "DISPATCH_CONFIG_DIR": str(cfg),
            "DISPATCH_TEMPLATES_DIR": str(ROOT / "templates"),
            "DISPATCH_VAR_DIR": str(tmp_path / "var"),
            "DISPATCH_MODE": "sandbox",
            "DISPATCH_DEMO_CAMPAIGNS": "0",
        }
        result = CliRunner().invoke(main, ["preflight", "--section", "zz"], env=env, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "advice  DKIM: no [dkim] table" in result.output
    assert "fix: dispatcher dkim keygen --section zz" in result.output
    assert "advice  bounces: no [bounces] table" in result.output
    assert "all well, with 2 piece(s) of advice" in result.output
