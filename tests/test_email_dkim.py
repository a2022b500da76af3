"""DKIM: what the email channel sends verifies, independently, with both algorithms.

Letters go through the real channel (prepare, then deliver) to a real SMTP server on loopback;
the bytes it received are checked by dkimpy's verifier, which looks the keys up through a DNS
stub holding the records an operator would publish (dkim.txt_value, or what ``dispatcher dkim
keygen`` printed).
"""

from __future__ import annotations

import re
import stat
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import dkim as dkimpy
import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from dispatcher.channels.base import Outgoing, Status
from dispatcher.channels.email import dkim
from dispatcher.channels.email.channel import EmailChannel
from dispatcher.cli import main
from dispatcher.config.loader import check_environment, load_catalog
from dispatcher.config.models import Section, Target
from dispatcher.errors import ConfigError, OperationalError
from dispatcher.render.letters import RenderedEmail
from dispatcher.settings import Settings
from tests.support.smtp import SmtpTestServer, make_section
from tests.test_config import SECTION_FILE, ConfigTree

TARGET = Target(
    id="ambassador",
    name="Ambassador Jane Smith",
    country="US",
    salutation={"en": "Dear Ambassador,"},
    languages=["en"],
    timezone="America/New_York",
    email="ambassador@embassy.example.org",
)
DOMAIN = "aiusa.example.org"  # make_section()'s sender domain


# ---------------------------------------------------------------------------- helpers


def pem(key: dkim.PrivateKey) -> bytes:
    return dkim.private_pem(key)


class Dns:
    """The DKIM records of a zone, as dkimpy's ``dnsfunc`` asks for them."""

    def __init__(self) -> None:
        self.records: dict[str, str] = {}

    def publish(self, selector: str, domain: str, value: str) -> None:
        self.records[f"{selector}._domainkey.{domain}."] = value

    def __call__(self, name: bytes, timeout: float = 5) -> bytes | None:
        value = self.records.get(name.decode("ascii"))
        return None if value is None else value.encode("ascii")


def verdicts(data: bytes, dns: Dns) -> dict[bytes, bool]:
    """Each DKIM-Signature of ``data`` verified on its own: algorithm → passed."""
    found: dict[bytes, bool] = {}
    count = len(re.findall(rb"(?im)^DKIM-Signature:", data))
    for idx in range(count):
        verifier = dkimpy.DKIM(data)
        try:
            ok = bool(verifier.verify(idx=idx, dnsfunc=dns))
        except dkimpy.DKIMException:
            ok = False
        found[verifier.signature_fields[b"a"]] = ok
    return found


def from_domain(data: bytes) -> str:
    match = re.search(rb"(?im)^From:.*?<[^@>]+@([^>]+)>", data.replace(b"\r\n ", b" "))
    assert match is not None
    return match.group(1).decode()


def signature_tags(data: bytes) -> list[dict[bytes, bytes]]:
    headers, _ = dkimpy.rfc822_parse(data)
    return [
        dkimpy.util.parse_tag_value(re.sub(rb"\s+", b"", value))
        for name, value in headers
        if name.lower() == b"dkim-signature"
    ]


BOTH_PASS = {b"rsa-sha256": True, b"ed25519-sha256": True}
BOTH_FAIL = {b"rsa-sha256": False, b"ed25519-sha256": False}


@pytest.fixture(scope="module")
def keypair() -> tuple[rsa.RSAPrivateKey, ed25519.Ed25519PrivateKey]:
    return dkim.generate_keys()


@pytest.fixture
def config_dir(tmp_path: Path, keypair: tuple[rsa.RSAPrivateKey, ed25519.Ed25519PrivateKey]) -> Path:
    directory = tmp_path / "config"
    (directory / "keys").mkdir(parents=True)
    (directory / "keys" / "rsa.pem").write_bytes(pem(keypair[0]))
    (directory / "keys" / "ed25519.pem").write_bytes(pem(keypair[1]))
    return directory


@pytest.fixture
def dns(keypair: tuple[rsa.RSAPrivateKey, ed25519.Ed25519PrivateKey]) -> Dns:
    zone = Dns()
    for domain in (DOMAIN, "example.org"):
        zone.publish("rsa-1", domain, dkim.txt_value(keypair[0]))
        zone.publish("ed-1", domain, dkim.txt_value(keypair[1]))
    return zone


def signed_section(**dkim_table: Any) -> Section:
    table = {
        "rsa_selector": "rsa-1",
        "ed25519_selector": "ed-1",
        "rsa_key_file": "keys/rsa.pem",
        "ed25519_key_file": "keys/ed25519.pem",
        **dkim_table,
    }
    return Section.model_validate({**make_section().model_dump(), "dkim": {k: v for k, v in table.items() if v}})


@pytest.fixture
def server() -> Iterator[SmtpTestServer]:
    with SmtpTestServer() as smtp:
        yield smtp


def make_channel(config_dir: Path, port: int, environ: Mapping[str, str] | None = None) -> EmailChannel:
    settings = Settings(
        config_dir=config_dir,
        templates_dir=config_dir,
        var_dir=config_dir.parent / "var",
        database_url="sqlite://",
        redis_url="redis://127.0.0.1:1/0",
    ).but(sandbox_smtp_port=port)
    return EmailChannel(settings, environ=environ or {}, blip_wait=0.01)


def outgoing(
    section: Section,
    tag: str = "d-0001",
    *,
    supporter: str = "Zoë Müller",
    subject: str = "Free the detained activists",
    target: Target = TARGET,
) -> Outgoing:
    return Outgoing(
        tag=tag,
        message_id=f"<{tag}@{section.sender.domain}>",
        recipient=str(target.email),
        section=section,
        target=target,
        sender_name=supporter,
        reply_to="zoe@example.net",
        document=RenderedEmail(
            subject=subject,
            text="Dear Ambassador,\n\nI urge you to release them.\n.\nA line that is only a dot, above.\n",
            html="<p>Dear Ambassador,</p><p>I urge you to release them.</p>",
            language="en",
        ),
        date=datetime(2024, 3, 5, 12, 0, tzinfo=UTC),
        attempt=1,
    )


async def send_all(channel: EmailChannel, letters: list[Outgoing]) -> None:
    try:
        for letter in letters:
            report = await channel.deliver(channel.prepare(letter))
            assert report.status is Status.ACCEPTED
    finally:
        await channel.aclose()


# ---------------------------------------------------------------------------- what is sent


async def test_every_letter_the_channel_sends_passes_both_signatures(
    config_dir: Path, dns: Dns, server: SmtpTestServer
) -> None:
    section = signed_section()
    letters = [
        outgoing(section, "d-0001"),
        # Non-ASCII names and subject: encoded words in a 7-bit message, signed as sent.
        outgoing(section, "d-0002", supporter="Søren Ødegård-Łukasiewicz", subject="Освободите активистов — срочно"),
        outgoing(section, "d-0003", supporter="", subject="Free them " + "now " * 40),
    ]
    await send_all(make_channel(config_dir, server.port), letters)

    assert len(server.messages) == 3
    for received in server.messages:
        assert received.data.isascii()
        assert verdicts(received.data, dns) == BOTH_PASS
        rsa_tags, ed_tags = signature_tags(received.data)  # RSA on top: some verifiers read only the first
        assert (rsa_tags[b"a"], ed_tags[b"a"]) == (b"rsa-sha256", b"ed25519-sha256")
        for tags in (rsa_tags, ed_tags):
            assert tags[b"d"].decode() == DOMAIN == from_domain(received.data)
            assert tags[b"c"] == b"relaxed/relaxed"
            assert tags[b"h"].split(b":") == [
                b"from",
                b"to",
                b"subject",
                b"date",
                b"message-id",
                b"reply-to",
                b"mime-version",
                b"content-type",
                b"content-language",
            ]
        assert (rsa_tags[b"s"], ed_tags[b"s"]) == (b"rsa-1", b"ed-1")
    # The letter was not changed on the way into the signer: its Message-ID is the planned one.
    assert server.messages[1].message["Message-ID"] == f"<d-0002@{DOMAIN}>"
    assert "Освободите" in server.messages[1].message["Subject"]


async def test_a_letter_altered_in_transit_fails_both_signatures(
    config_dir: Path, dns: Dns, server: SmtpTestServer
) -> None:
    await send_all(make_channel(config_dir, server.port), [outgoing(signed_section())])
    data = server.messages[0].data
    assert verdicts(data, dns) == BOTH_PASS

    body_at = data.index(b"\r\n\r\n") + 4
    one_byte = data[:body_at] + data[body_at:].replace(b"Content-Type", b"Content-Typo", 1)
    subject = data.replace(b"Subject: Free the detained", b"Subject: Free the detainee", 1)
    added = data.replace(b"\r\nFrom:", b"\r\nFrom: x@evil.example\r\nFrom:", 1)
    for altered in (one_byte, subject, added):
        assert altered != data
        assert verdicts(altered, dns) == BOTH_FAIL
    # Whitespace a relay may refold is forgiven by relaxed/relaxed.
    refolded = data.replace(b"Subject: Free the detained", b"Subject:   Free  the\r\n detained", 1)
    assert verdicts(refolded, dns) == BOTH_PASS


async def test_a_parent_domain_signs_for_dmarc_alignment(config_dir: Path, dns: Dns, server: SmtpTestServer) -> None:
    await send_all(make_channel(config_dir, server.port), [outgoing(signed_section(domain="Example.ORG"))])
    data = server.messages[0].data
    assert {tags[b"d"] for tags in signature_tags(data)} == {b"example.org"}
    assert verdicts(data, dns) == BOTH_PASS


async def test_unsigned_without_a_dkim_table(config_dir: Path, server: SmtpTestServer) -> None:
    await send_all(make_channel(config_dir, server.port), [outgoing(make_section())])
    assert b"DKIM-Signature" not in server.messages[0].data


async def test_keys_from_environment_variables(
    tmp_path: Path, keypair: tuple[rsa.RSAPrivateKey, ed25519.Ed25519PrivateKey], dns: Dns, server: SmtpTestServer
) -> None:
    section = signed_section(
        rsa_key_file=None, ed25519_key_file=None, rsa_key_env="DKIM_RSA_US", ed25519_key_env="DKIM_ED25519_US"
    )
    environ = {
        "DKIM_RSA_US": pem(keypair[0]).decode(),
        # An env file holds one line: the PEM's line breaks written as \n.
        "DKIM_ED25519_US": pem(keypair[1]).decode().replace("\n", "\\n"),
    }
    await send_all(make_channel(tmp_path, server.port, environ), [outgoing(section)])
    assert verdicts(server.messages[0].data, dns) == BOTH_PASS


def test_signatures_verify_for_any_message_shape(keypair: tuple[rsa.RSAPrivateKey, ed25519.Ed25519PrivateKey]) -> None:
    dns = Dns()
    dns.publish("r", "example.org", dkim.txt_value(keypair[0]))
    dns.publish("e", "example.org", dkim.txt_value(keypair[1]))
    signer = dkim.DkimSigner("example.org", [dkim.SigningKey("r", keypair[0]), dkim.SigningKey("e", keypair[1])])
    shapes = [
        b"From: a@example.org\r\nSubject: empty body\r\n\r\n",
        b"From: a@example.org\r\nSubject: blank body\r\n\r\n\r\n\r\n",
        b"From: a@example.org\r\nTo: b@example.net\r\n\r\ntrailing blank lines\r\n\r\n\r\n",
        b"From: a@example.org\r\nX-Long: " + b"word " * 60 + b"\r\n\r\nbody \t with  spaces \r\n",
        b"From: a@example.org\r\n\r\nspace at a line end \r\nno newline at the end",
        b"From: a@example.org\nSubject: LF line ends\n\nbody\nlines  \n\n",
        b"From: a@example.org\r\nSubject: a bare LF\r\n\r\nbody\nmore\r\n",
    ]
    for message in shapes:
        assert verdicts(signer.sign(message), dns) == BOTH_PASS


# ---------------------------------------------------------------------------- keys that cannot be used


async def test_unusable_keys_stop_the_channel_without_showing_them(
    config_dir: Path, keypair: tuple[rsa.RSAPrivateKey, ed25519.Ed25519PrivateKey], server: SmtpTestServer
) -> None:
    (config_dir / "keys" / "ed25519.pem").unlink()
    channel = make_channel(config_dir, server.port)
    try:
        with pytest.raises(OperationalError) as info:
            channel.prepare(outgoing(signed_section()))
    finally:
        await channel.aclose()
    message = str(info.value)
    assert "dkim.ed25519_key_file" in message and "keys/ed25519.pem does not exist" in message
    assert "sections/us.toml" in message
    assert "PRIVATE KEY" not in message
    assert server.messages == []


def write_key(path: Path, key: Any, password: bytes | None = None) -> None:
    encryption = serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption()
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption))


def short_rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505 (refused: the point)


def problems_for(section: Section, config_dir: Path, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    return {p.key: p.message for p in dkim.key_problems(section, config_dir, environ or {}, shown="x.toml")}


@pytest.mark.parametrize(
    ("setup", "key", "says"),
    [
        (lambda d, k: (d / "keys" / "rsa.pem").unlink(), "dkim.rsa_key_file", "rsa.pem does not exist"),
        (
            lambda d, k: ((d / "keys" / "rsa.pem").unlink(), (d / "keys" / "rsa.pem").mkdir()),
            "dkim.rsa_key_file",
            "cannot be read: Is a directory",
        ),
        (
            lambda d, k: (d / "keys" / "rsa.pem").write_bytes(pem(k[1])),
            "dkim.rsa_key_file",
            "holds a key of another type; an RSA private key is needed here",
        ),
        (
            lambda d, k: (d / "keys" / "ed25519.pem").write_text("not a key\n"),
            "dkim.ed25519_key_file",
            "does not hold a PEM private key",
        ),
        (
            lambda d, k: write_key(d / "keys" / "ed25519.pem", k[1], b"secret"),
            "dkim.ed25519_key_file",
            "holds an encrypted key",
        ),
        (
            lambda d, k: write_key(d / "keys" / "rsa.pem", short_rsa_key()),
            "dkim.rsa_key_file",
            "holds a 1024-bit RSA key; use 2048 bits or more",
        ),
    ],
    ids=["missing", "unreadable", "wrong-type", "not-a-key", "encrypted", "short-rsa"],
)
def test_key_file_problems_name_the_key_and_the_file(
    config_dir: Path,
    keypair: tuple[rsa.RSAPrivateKey, ed25519.Ed25519PrivateKey],
    setup: Callable[[Path, Any], Any],
    key: str,
    says: str,
) -> None:
    setup(config_dir, keypair)
    problems = problems_for(signed_section(), config_dir)
    assert list(problems) == [key]
    assert says in problems[key]
    assert str(config_dir / "keys") in problems[key]
    assert "BEGIN" not in problems[key]


def test_key_variable_problems_name_the_variable_never_its_value(config_dir: Path) -> None:
    section = signed_section(
        rsa_key_file=None, ed25519_key_file=None, rsa_key_env="DKIM_RSA_US", ed25519_key_env="DKIM_ED25519_US"
    )
    problems = problems_for(section, config_dir, {"DKIM_ED25519_US": "-----BEGIN PRIVATE KEY-----\nc2VjcmV0\n"})
    assert problems == {
        "dkim.rsa_key_env": "environment variable DKIM_RSA_US is not set; set it to the PEM text of an RSA private key",
        "dkim.ed25519_key_env": "environment variable DKIM_ED25519_US does not hold a PEM private key",
    }
    with pytest.raises(ConfigError) as info:
        dkim.load_signer(section, config_dir, {})
    assert [p.key for p in info.value.problems] == ["dkim.rsa_key_env", "dkim.ed25519_key_env"]


# ---------------------------------------------------------------------------- the config files


DKIM_TABLE = """
[dkim]
rsa_selector = "rsa-1"
ed25519_selector = "ed-1"
rsa_key_file = "keys/rsa.pem"
ed25519_key_env = "DISPATCH_DKIM_ED25519_ZZ"
"""


@pytest.fixture
def tree(tmp_path: Path) -> ConfigTree:
    tree = ConfigTree(tmp_path)
    tree.write(SECTION_FILE, tree.read(SECTION_FILE) + DKIM_TABLE)
    return tree


def problem_at(tree: ConfigTree, key: str) -> str:
    problems = {p.key: p for p in tree.problems()}
    assert key in problems, "\n".join(map(str, problems.values()))
    assert problems[key].file == "config/sections/zz.toml"
    return problems[key].message


def test_the_dkim_table_loads_and_signs_as_the_senders_domain(tree: ConfigTree) -> None:
    config = load_catalog(tree.dir).section("zz").dkim
    assert config is not None
    assert (config.domain, config.rsa_key_file, config.ed25519_key_env) == (
        "zz.dispatch.example",
        "keys/rsa.pem",
        "DISPATCH_DKIM_ED25519_ZZ",
    )


def test_a_signing_domain_that_would_not_align_is_refused(tree: ConfigTree) -> None:
    tree.edit(SECTION_FILE, 'rsa_selector = "rsa-1"', 'domain = "dispatch-example.org"\nrsa_selector = "rsa-1"')
    message = problem_at(tree, "dkim.domain")
    assert "'dispatch-example.org' is neither the sender's domain 'zz.dispatch.example' nor a parent" in message
    tree.edit(SECTION_FILE, 'domain = "dispatch-example.org"', 'domain = "dispatch.example"')
    assert load_catalog(tree.dir).section("zz").dkim.domain == "dispatch.example"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("old", "new", "key", "says"),
    [
        ('rsa_key_file = "keys/rsa.pem"', "", "dkim.rsa_key_file", "rsa_key_file or rsa_key_env is needed"),
        (
            'rsa_key_file = "keys/rsa.pem"',
            'rsa_key_file = "keys/rsa.pem"\nrsa_key_env = "DKIM_RSA"',
            "dkim.rsa_key_file",
            "both set; set exactly one",
        ),
        ('ed25519_selector = "ed-1"', 'ed25519_selector = "RSA-1"', "dkim.ed25519_selector", "each key needs its own"),
        ('ed25519_selector = "ed-1"', 'ed25519_selector = "ed 1"', "dkim.ed25519_selector", "a selector is a DNS"),
        ('ed25519_selector = "ed-1"', "", "dkim.ed25519_selector", "required key 'ed25519_selector' is missing"),
        ('rsa_selector = "rsa-1"', 'rsa_selector = "rsa-1"\nkey = "x"', "dkim.key", "unknown key 'key'"),
    ],
    ids=["no-rsa-key", "two-rsa-keys", "same-selector", "bad-selector", "no-selector", "unknown-key"],
)
def test_dkim_table_problems_name_file_and_key(tree: ConfigTree, old: str, new: str, key: str, says: str) -> None:
    tree.edit(SECTION_FILE, old, new)
    assert says in problem_at(tree, key)


def test_a_key_pasted_into_the_table_is_not_echoed(tree: ConfigTree) -> None:
    tree.edit(SECTION_FILE, '"keys/rsa.pem"', '"""-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkq\n"""')
    message = problem_at(tree, "dkim.rsa_key_file")
    assert message == "must be the PATH of a PEM file, never the key itself"


def test_config_check_env_says_which_key_is_missing(tree: ConfigTree, tmp_path: Path) -> None:
    catalog = load_catalog(tree.dir)
    env = {"DISPATCH_INTAKE_KEY_ZZ": "k"}
    problems = check_environment(catalog, env, live=False)
    assert [(p.file, p.key) for p in problems] == [
        ("config/sections/zz.toml", "dkim.rsa_key_file"),
        ("config/sections/zz.toml", "dkim.ed25519_key_env"),
    ]
    assert f"key file {tree.dir.resolve() / 'keys' / 'rsa.pem'} does not exist" in problems[0].message
    assert "DISPATCH_DKIM_ED25519_ZZ is not set" in problems[1].message

    rsa_key, ed25519_key = dkim.generate_keys()
    (tree.dir / "keys").mkdir()
    (tree.dir / "keys" / "rsa.pem").write_bytes(pem(rsa_key))
    env["DISPATCH_DKIM_ED25519_ZZ"] = pem(ed25519_key).decode()
    assert check_environment(catalog, env, live=False) == []

    assert cli(tree, tmp_path, "config", "check", "--env", env=env).exit_code == 0
    (tree.dir / "keys" / "rsa.pem").write_bytes(pem(ed25519_key))
    result = cli(tree, tmp_path, "config", "check", "--env", env=env)
    assert result.exit_code == 1
    assert "sections/zz.toml: dkim.rsa_key_file:" in result.output
    assert "holds a key of another type" in result.output


# ---------------------------------------------------------------------------- keygen


def cli(tree: ConfigTree, tmp_path: Path, *args: str, env: Mapping[str, str] | None = None) -> Any:
    templates = tmp_path / "templates"
    for language in ("en", "fr"):
        (templates / "UA-900-24" / language).mkdir(parents=True, exist_ok=True)
    environ = {
        "DISPATCH_CONFIG_DIR": str(tree.dir),
        "DISPATCH_TEMPLATES_DIR": str(templates),
        "DISPATCH_VAR_DIR": str(tmp_path / "var"),
        **(env or {}),
    }
    return CliRunner().invoke(main, list(args), env=environ, catch_exceptions=False)


def keygen(tree: ConfigTree, tmp_path: Path, *args: str, section: str = "zz") -> Any:
    return cli(tree, tmp_path, "dkim", "keygen", "--section", section, *args)


async def test_keygen_writes_keys_whose_printed_records_verify_what_is_sent(
    tmp_path: Path, server: SmtpTestServer
) -> None:
    tree = ConfigTree(tmp_path)
    result = keygen(tree, tmp_path, "--rsa-selector", "r2024", "--ed25519-selector", "e2024")
    assert result.exit_code == 0, result.output

    keys = tmp_path / "var" / "dkim" / "zz"
    for name in ("r2024.pem", "e2024.pem"):
        assert stat.S_IMODE((keys / name).stat().st_mode) == 0o600
    records = [line for line in result.output.splitlines() if " IN TXT " in line]
    assert [line.split()[0] for line in records] == [
        "r2024._domainkey.zz.dispatch.example.",
        "e2024._domainkey.zz.dispatch.example.",
    ]
    zone = Dns()
    for line in records:
        strings = re.findall(r'"([^"]*)"', line)
        assert all(len(s) <= 255 for s in strings)
        name = line.split()[0]
        zone.records[name] = "".join(strings)
    assert len(re.findall(r'"([^"]*)"', records[0])) == 2  # RSA-2048's record does not fit one string
    assert "k=ed25519" in zone.records["e2024._domainkey.zz.dispatch.example."]

    # The printed table, pasted into the section file, is what the service signs with.
    table = result.output[result.output.index("\n[dkim]\n") :]
    tree.write(SECTION_FILE, tree.read(SECTION_FILE) + "\n" + table)
    catalog = load_catalog(tree.dir)
    assert check_environment(catalog, {"DISPATCH_INTAKE_KEY_ZZ": "k"}, live=False) == []
    section = catalog.section("zz")
    office = catalog.campaign("UA-900-24").targets["office"]
    await send_all(make_channel(tree.dir, server.port), [outgoing(section, target=office)])
    assert verdicts(server.messages[0].data, zone) == BOTH_PASS

    before = (keys / "r2024.pem").read_bytes()
    again = keygen(tree, tmp_path, "--rsa-selector", "r2024", "--ed25519-selector", "e2024")
    assert again.exit_code == 1 and "--force" in again.output
    assert (keys / "r2024.pem").read_bytes() == before
    forced = keygen(tree, tmp_path, "--rsa-selector", "r2024", "--ed25519-selector", "e2024", "--force")
    assert forced.exit_code == 0
    assert [line for line in forced.output.splitlines() if " IN TXT " in line] != records


def test_keygen_refuses_an_unknown_section(tmp_path: Path) -> None:
    result = keygen(ConfigTree(tmp_path), tmp_path, section="qq")
    assert result.exit_code == 2 and "unknown section 'qq'" in result.output
