"""``dispatcher preflight``: everything live mode needs, checked section by section before going live.

Each check is a coroutine function of (section, :class:`Context`) returning findings: what is
fine, and what is wrong with the file and key, or the environment variable, that fixes it. The
checks ask in live terms whatever ``DISPATCH_MODE`` says (the preflight is what one runs before
switching it) and never send anything: the relay is left after AUTH, the fax gateways are asked
a read-only question, the bounce mailbox is opened read-only.

A finding is ok, a problem (live mode would not work as configured: exit status 1), or advice
(``ok`` and ``advice``: live mode works, but something worth doing is missing, such as DKIM
keys, or a check that could not be made, such as a DNS lookup with no answer).
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from dkim.util import InvalidTagValueList, parse_tag_value

from dispatcher.channels.builtin import builtin_channels
from dispatcher.channels.email import dkim
from dispatcher.channels.email.channel import EmailChannel
from dispatcher.channels.email.imap import BounceMailbox
from dispatcher.channels.email.probe import RelayRefused, check_relay
from dispatcher.channels.email.relay import ca_path, live_relay, tls_context
from dispatcher.channels.fax.channel import WEBHOOK_KEYS
from dispatcher.channels.fax.gateways import check_access
from dispatcher.channels.registry import Channels
from dispatcher.config.catalog import Catalog
from dispatcher.config.models import Section, ascii_domain
from dispatcher.dnslookup import DnsUnanswered, Lookup, SystemDns
from dispatcher.errors import (
    BlipError,
    DeliveryError,
    MailboxError,
    MailboxFolderMissing,
    MailboxLoginRefused,
    OperationalError,
)
from dispatcher.keys import load_public_key
from dispatcher.settings import Settings

#: seconds for connecting to a relay or gateway and for each of its answers
PROBE_TIMEOUT = 10.0


@dataclass(frozen=True)
class Finding:
    """One thing a check found: fine (``fix`` None and ``ok``), or wrong with what fixes it."""

    section: str
    #: what was checked: "relay", "fax gateway", "public URL", ...
    check: str
    ok: bool
    #: what was found, in a sentence
    text: str
    #: "config/sections/ch.toml key smtp.ca_file" or "set DISPATCH_PUBLIC_URL"
    fix: str | None = None
    #: ok for going live, but worth doing (``fix`` says what): shown, never failing
    advice: bool = False


@dataclass(frozen=True)
class Context:
    settings: Settings
    environ: Mapping[str, str]
    catalog: Catalog
    channels: Channels
    dns: Lookup

    def file_of(self, section: Section) -> str:
        """The section's file as an admin finds it (relative to config/'s parent)."""
        path = self.catalog.sources.get(section.code) or self.catalog.root / "sections" / f"{section.code}.toml"
        try:
            return path.relative_to(self.catalog.root.parent).as_posix()
        except ValueError:
            return str(path)

    def key(self, section: Section, key: str) -> str:
        return f"{self.file_of(section)} key {key}"


Check = Callable[[Section, Context], Awaitable[list[Finding]]]


def _ok(section: Section, check: str, text: str) -> Finding:
    return Finding(section.code, check, True, text)


def _problem(section: Section, check: str, text: str, fix: str) -> Finding:
    return Finding(section.code, check, False, text, fix)


def _advice(section: Section, check: str, text: str, fix: str) -> Finding:
    return Finding(section.code, check, True, text, fix, advice=True)


def _unset(environ: Mapping[str, str], names: Sequence[str | None]) -> list[str]:
    return [n for n in names if n and not environ.get(n, "").strip()]


# ------------------------------------------------------------------------------- the checks


async def check_channels(section: Section, ctx: Context) -> list[Finding]:
    """Each channel the section's routes use has what live mode needs of the section's config."""
    used = {r.channel for cid in section.campaigns for r in ctx.catalog.routes(cid, section.code)}
    findings = []
    for name in sorted(used):
        if name not in ctx.channels:
            findings.append(_problem(section, name, f"no channel {name!r} in this service", ctx.file_of(section)))
            continue
        missing = ctx.channels.kind(name).missing_settings(section, live=True)
        if missing is not None:
            findings.append(_problem(section, name, missing.message, ctx.key(section, missing.key)))
    return findings


async def check_intake_key(section: Section, ctx: Context) -> list[Finding]:
    if _unset(ctx.environ, [section.intake_key_env]):
        return [
            _problem(
                section,
                "intake key",
                "the key its web form signs appeals with is not set",
                f"set {section.intake_key_env}",
            )
        ]
    return [_ok(section, "intake key", f"{section.intake_key_env} is set")]


async def check_relay_login(section: Section, ctx: Context) -> list[Finding]:
    """The relay answers and takes our login: EHLO, STARTTLS, AUTH, QUIT; nothing is sent."""
    if section.smtp is None:
        return []
    relay = live_relay(section)
    where = f"{relay.host}:{relay.port}"
    names = [relay.username_env, relay.password_env]
    unset = _unset(ctx.environ, names)
    if unset:
        return [
            _problem(
                section,
                "relay",
                f"the relay credentials are not set ({', '.join(unset)})",
                f"set {' and '.join(unset)}",
            )
        ]
    ca = ca_path(relay, ctx.settings.config_dir)
    if ca is not None and not ca.is_file():
        return [_problem(section, "relay", f"ca_file {ca} does not exist", ctx.key(section, "smtp.ca_file"))]
    try:
        answer = await check_relay(
            relay,
            username=ctx.environ.get(relay.username_env) if relay.username_env else None,
            password=ctx.environ.get(relay.password_env) if relay.password_env else None,
            tls_context=tls_context(relay, ctx.settings.config_dir),
            timeout=min(PROBE_TIMEOUT, relay.timeout),
        )
    except RelayRefused as exc:
        fixes = {
            "connect": ctx.key(section, "smtp.host / smtp.port"),
            "tls": ctx.key(section, "smtp.tls / smtp.ca_file"),
            "ehlo": ctx.key(section, "smtp.ehlo_name"),
            "login": f"set {' and '.join(n for n in names if n)}"
            if relay.username_env
            else ctx.key(section, "smtp.username_env / smtp.password_env"),
        }
        return [_problem(section, "relay", f"{where}: {exc.message}", fixes[exc.stage])]
    except OperationalError as exc:  # the ca_file is not a PEM file of certificates
        return [_problem(section, "relay", exc.message, ctx.key(section, "smtp.ca_file"))]
    return [_ok(section, "relay", f"{where} (EHLO {relay.ehlo_name}, tls {relay.tls}): {answer}")]


def _sends_email(section: Section, ctx: Context) -> bool:
    used = {r.channel for cid in section.campaigns for r in ctx.catalog.routes(cid, section.code)}
    return any(name in ctx.channels and issubclass(ctx.channels.kind(name), EmailChannel) for name in used)


async def check_dkim(section: Section, ctx: Context) -> list[Finding]:
    """The [dkim] keys can be read, and the records published for their selectors match them;
    where DNS has none or does not answer, the records to publish."""
    config = section.dkim
    if config is None:
        if not _sends_email(section, ctx):
            return []
        # Advice, not a problem: the relay may sign for the domain itself.
        return [
            _advice(
                section,
                "DKIM",
                "no [dkim] table: letters go out unsigned unless the relay signs them, and receivers "
                "with a strict DMARC policy may junk or refuse them",
                f"dispatcher dkim keygen --section {section.code}",
            )
        ]
    unusable = dkim.key_problems(section, ctx.catalog.root, ctx.environ, shown=ctx.file_of(section))
    if unusable:
        return [_problem(section, "DKIM", p.message, ctx.key(section, p.key)) for p in unusable]
    domain = config.domain or ascii_domain(section.sender.domain)
    findings = []
    selectors: list[tuple[dkim.Algorithm, str]] = [("rsa", config.rsa_selector), ("ed25519", config.ed25519_selector)]
    for algorithm, selector in selectors:
        value = dkim.txt_value(dkim.read_key(config, algorithm, ctx.catalog.root, ctx.environ))
        findings.append(await _dkim_record(section, ctx, f"DKIM {algorithm}", selector, domain, value))
    return findings


async def _dkim_record(section: Section, ctx: Context, check: str, selector: str, domain: str, value: str) -> Finding:
    name = f"{selector}._domainkey.{domain}"
    publish = f"publish {dkim.zone_record(selector, domain, value)}"
    try:
        published = await ctx.dns.txt(name)
    except DnsUnanswered as exc:
        return _advice(section, check, f"could not check {name}: {exc}", publish)
    if not published:
        return _problem(section, check, f"{name}: no record published", publish)
    if _public_key_of(value) in {_public_key_of(text) for text in published}:
        return _ok(section, check, f"{name} is published and matches the key")
    return _problem(section, check, f"{name}: the published key differs from ours", publish)


def _public_key_of(record: str) -> str | None:
    """The p= of a DKIM key record, without the whitespace a zone's line breaks may leave in it."""
    try:
        tags = parse_tag_value(record.encode("ascii", "replace"))
    except InvalidTagValueList:
        return None
    key = tags.get(b"p")
    return None if key is None else "".join(key.decode("ascii", "replace").split())


async def check_bounces(section: Section, ctx: Context) -> list[Finding]:
    """Bounces can come back and be read: the VERP key, the bounce domain's MX, the mailbox."""
    bounces = section.bounces
    if bounces is None:
        if not _sends_email(section, ctx):
            return []
        return [
            _advice(
                section,
                "bounces",
                f"no [bounces] table: bounces go to the fixed envelope sender {section.sender.envelope_sender} "
                "and are never read, so an address that no longer exists is written to again and again",
                f'add [bounces] domain = "bounces.{ascii_domain(section.sender.domain)}" to {ctx.file_of(section)} '
                "and run `dispatcher bounces` (docs/deliverability.md)",
            )
        ]
    findings = [_verp_key(section, ctx.environ.get("DISPATCH_VERP_KEY", "").strip())]
    try:
        exchangers = await ctx.dns.mx(bounces.domain)
    except DnsUnanswered as exc:
        exchangers = None
        unanswered: str | None = str(exc)
    else:
        unanswered = None
    where = (
        "the mail provider of the [bounces.imap] mailbox"
        if bounces.imap is not None
        else "the host running `dispatcher bounces`"
    )
    if exchangers:
        findings.append(_ok(section, "bounce domain", f"{bounces.domain} MX {', '.join(exchangers)}"))
    else:
        found = f"could not check {bounces.domain} MX: {unanswered}" if unanswered else f"{bounces.domain} has no MX"
        findings.append(_advice(section, "bounce domain", found, f"point {bounces.domain} MX at {where}"))
    if bounces.imap is not None:
        findings.append(await _bounce_mailbox(section, ctx))
    return findings


def _verp_key(section: Section, value: str) -> Finding:
    fix = "set DISPATCH_VERP_KEY (e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)"
    if not value:
        return _problem(
            section, "VERP key", "DISPATCH_VERP_KEY is not set: live mode signs every bounce address with it", fix
        )
    if len(value) < 16:
        return _problem(section, "VERP key", "DISPATCH_VERP_KEY is shorter than 16 characters", fix)
    return _ok(section, "VERP key", "DISPATCH_VERP_KEY is set")


async def _bounce_mailbox(section: Section, ctx: Context) -> Finding:
    """Log in and open the folder read-only: no message is read, flagged or removed."""
    config = section.bounces.imap if section.bounces is not None else None
    assert config is not None
    names = [config.username_env, config.password_env]
    unset = _unset(ctx.environ, names)
    if unset:
        return _problem(
            section,
            "bounce mailbox",
            f"the mailbox credentials are not set ({', '.join(unset)})",
            f"set {' and '.join(unset)}",
        )
    mailbox = BounceMailbox.from_config(
        config,
        username=ctx.environ[config.username_env],
        password=ctx.environ[config.password_env],
        config_dir=ctx.catalog.root,
        timeout=PROBE_TIMEOUT,
    )
    try:
        count = await asyncio.to_thread(mailbox.check)
    except MailboxLoginRefused as exc:
        return _problem(section, "bounce mailbox", str(exc), f"set {' and '.join(names)}")
    except MailboxFolderMissing as exc:
        return _problem(section, "bounce mailbox", str(exc), ctx.key(section, "bounces.imap.folder"))
    except MailboxError as exc:
        keys = "bounces.imap.host / bounces.imap.port / bounces.imap.tls / bounces.imap.ca_file"
        return _problem(section, "bounce mailbox", str(exc), ctx.key(section, keys))
    return _ok(
        section,
        "bounce mailbox",
        f"{config.host}:{config.port} takes our login; {config.folder} holds {count} message(s)",
    )


async def check_fax_gateway(section: Section, ctx: Context) -> list[Finding]:
    """The gateway accepts our credentials, asked a read-only question."""
    fax = section.fax
    if fax is None:
        return []
    label = f"fax gateway ({fax.gateway})"
    if fax.from_number is None:
        return []  # check_channels names it when the section sends faxes
    unset = _unset(ctx.environ, [env for _, env in fax.secret_envs()])
    if unset:
        return [_problem(section, label, f"the {fax.gateway} credentials are not set", f"set {' and '.join(unset)}")]
    try:
        await check_access(section, ctx.environ, ctx.settings)
    except BlipError as exc:
        return [
            _problem(section, label, f"the gateway does not answer: {exc.message}", ctx.key(section, "fax.base_url"))
        ]
    except DeliveryError as exc:
        if exc.code in (401, 403):
            keys = " and ".join(env for _, env in fax.secret_envs())
            return [_problem(section, label, f"the gateway refuses our key ({exc})", f"set {keys} to a valid key")]
        fix = ctx.key(section, "fax.project_id" if fax.gateway == "sinch" else "fax.connection_id")
        return [_problem(section, label, f"the gateway refused the request: {exc}", fix)]
    return [_ok(section, label, "the gateway accepts our credentials")]


async def check_webhooks(section: Section, ctx: Context) -> list[Finding]:
    """The gateway's reports can reach us: a public https address, and the key that proves them."""
    if section.fax is None:
        return []
    findings = [_public_url(section, ctx.environ.get("DISPATCH_PUBLIC_URL", ""), section.fax.gateway)]
    variable, what = WEBHOOK_KEYS[section.fax.gateway]
    value = ctx.environ.get(variable, "").strip()
    if not value:
        findings.append(_problem(section, "webhook key", f"{variable} is not set: {what}", f"set {variable}"))
    elif (wrong := _key_problem(variable, value)) is not None:
        findings.append(_problem(section, "webhook key", wrong, f"set {variable}"))
    else:
        findings.append(_ok(section, "webhook key", f"{variable} is set and well formed"))
    return findings


async def check_sandbox_only(section: Section, ctx: Context) -> list[Finding]:
    """No campaign whose targets are example data is routed: live mode would hold its letters."""
    findings = []
    for cid in sorted(section.campaigns):
        campaign = ctx.catalog.campaigns.get(cid)
        if campaign is not None and campaign.sandbox_only:
            findings.append(
                _problem(
                    section,
                    "campaigns",
                    f"campaign {cid} is sandbox_only (its targets are example data): live mode sends none of its "
                    "letters",
                    ctx.key(section, f"campaigns.{cid}") + " (take it out before going live)",
                )
            )
    return findings


#: the checks, in the order they are shown. Others plug in here:
CHECKS: list[Check] = [
    check_channels,
    check_intake_key,
    check_relay_login,
    check_dkim,
    check_bounces,
    check_fax_gateway,
    check_webhooks,
    check_sandbox_only,
]


async def run(
    catalog: Catalog,
    settings: Settings,
    environ: Mapping[str, str],
    *,
    sections: Sequence[str] | None = None,
    checks: Sequence[Check] | None = None,
    channels: Channels | None = None,
    dns: Lookup | None = None,
) -> list[Finding]:
    """Every finding of every check for ``sections`` (default: all), section by section;
    ``dns`` answers the DNS questions (default: this machine's resolvers)."""
    ctx = Context(settings, environ, catalog, channels or builtin_channels(), dns or SystemDns())
    findings: list[Finding] = []
    for code in sections if sections is not None else sorted(catalog.sections):
        section = catalog.section(code)
        for check in checks if checks is not None else CHECKS:
            findings += await check(section, ctx)
    return findings


# ------------------------------------------------------------------------------- well formed


def _public_url(section: Section, raw: str, gateway: str) -> Finding:
    url = raw.strip().rstrip("/")
    fix = "set DISPATCH_PUBLIC_URL"
    if not url:
        return _problem(
            section,
            "public URL",
            f"DISPATCH_PUBLIC_URL is not set: {gateway} cannot send its reports (webhooks) to this API",
            f"{fix} to this API's public https address, e.g. https://dispatch.example.org",
        )
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.hostname:
        return _problem(section, "public URL", f"DISPATCH_PUBLIC_URL {url!r} is not an https:// address", fix)
    if _local(parts.hostname):
        return _problem(
            section, "public URL", f"DISPATCH_PUBLIC_URL {url!r} is this machine: {gateway} cannot reach it", fix
        )
    if parts.query or parts.fragment or parts.username:
        return _problem(section, "public URL", "DISPATCH_PUBLIC_URL carries a query, fragment or user name", fix)
    return _ok(section, "public URL", f"{gateway} webhooks go to {url}/v1/webhooks/fax/{gateway}")


def _local(host: str) -> bool:
    if host.lower().rstrip(".") in ("localhost", "localhost.localdomain") or host.lower().endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return address.is_loopback or address.is_private or address.is_link_local or address.is_unspecified


def _key_problem(variable: str, value: str) -> str | None:
    if variable == "DISPATCH_TELNYX_PUBLIC_KEY":
        try:
            load_public_key(value)
        except ValueError as exc:
            return str(exc)
        return None
    # the Sinch callback token: a secret of ours, carried in the callback URL
    if len(value) < 24 or not value.isascii() or any(c.isspace() for c in value):
        return f"{variable} must be at least 24 ASCII characters without spaces (a random secret)"
    return None
