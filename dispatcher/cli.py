"""The ``dispatcher`` command."""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import click
from rich.console import Console

if TYPE_CHECKING:
    from dispatcher.app import Service
    from dispatcher.queue.forecast import FallbackPreview

from dispatcher import heap
from dispatcher.errors import ConfigError
from dispatcher.settings import Settings

err = Console(stderr=True)


def _settings() -> Settings:
    try:
        return Settings.from_env()
    except ConfigError as exc:
        _refuse_to_start(exc)


def _refuse_to_start(exc: ConfigError) -> NoReturn:
    for problem in exc.problems:
        # One line per problem, however narrow the terminal: these end up in service logs.
        err.print(f"[red]error[/red] {problem}", highlight=False, soft_wrap=True)
    sys.exit(2)


def _iso(value: object) -> str:
    """JSON for the datetimes of the ledger's views."""
    from datetime import datetime

    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"not JSON: {type(value).__name__}")


def _service(settings: Settings | None = None) -> Service:
    from dispatcher.app import Service

    return Service(settings or _settings())


def _metrics_options(command: Callable[..., None]) -> Callable[..., None]:
    """``--metrics-port`` and ``--metrics-host``: this process's own metrics (docs/metrics.md)."""
    command = click.option(
        "--metrics-host",
        default="127.0.0.1",
        show_default=True,
        help="Address the metrics port listens on (0.0.0.0 for a Prometheus on another machine).",
    )(command)
    return click.option(
        "--metrics-port",
        type=int,
        default=None,
        help="Serve this process's Prometheus metrics on this port (/metrics); default: none.",
    )(command)


def _serve_metrics(service: Service, port: int | None, host: str) -> None:
    if port is not None:
        from dispatcher.metrics.exposition import serve

        serve(service.scrape(service_wide=False), port, host)


def _stop_on_signals(stop: threading.Event) -> None:
    def handler(signum: int, _frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


@click.group()
def main() -> None:
    """Appeal dispatch service: signed appeals in, letters to officials out."""
    from dispatcher.logging import configure

    configure(os.environ.get("DISPATCH_LOG_LEVEL", "INFO"))


# ---------------------------------------------------------------------------- config


@main.group()
def config() -> None:
    """Check the configuration in config/."""


@config.command("check")
@click.option("--env/--no-env", "check_env", default=False, help="Also check that the secrets it names are set.")
def config_check(check_env: bool) -> None:
    """Validate every campaign and section file; report each problem with file and key."""
    from dispatcher.config.loader import check_environment, load_catalog
    from dispatcher.intake.quotas import quotas_of

    settings = _settings()
    try:
        catalog = load_catalog(settings.config_dir, settings.templates_dir)
    except ConfigError as exc:
        for problem in exc.problems:
            err.print(f"[red]error[/red] {problem}", highlight=False)
        err.print(f"{len(exc.problems)} problem(s) in {settings.config_dir}")
        sys.exit(1)
    problems = check_environment(catalog, os.environ, live=settings.live) if check_env else []
    for problem in problems:
        err.print(f"[red]error[/red] {problem}", highlight=False)
    out = Console()
    out.print(
        f"{len(catalog.campaigns)} campaign(s), {len(catalog.sections)} section(s) in {settings.config_dir}: "
        + ("[green]ok[/green]" if not problems else f"[red]{len(problems)} problem(s)[/red]")
    )
    for section in catalog.sections.values():
        for campaign_id in section.campaigns:
            routes = ", ".join(f"{r.target.id}/{r.channel}" for r in catalog.routes(campaign_id, section.code))
            out.print(f"  {section.code:>3} {campaign_id}: {routes}", highlight=False)
        quotas = " · ".join(f"{q.name} {q.describe()}" for q in quotas_of(section, settings))
        out.print(f"  {section.code:>3} quotas: {quotas}", highlight=False, soft_wrap=True)
    sys.exit(1 if problems else 0)


# ---------------------------------------------------------------------------- preflight


@main.command()
@click.option("--section", "section_codes", multiple=True, help="Only this section (repeatable), e.g. ch.")
def preflight(section_codes: tuple[str, ...]) -> None:
    """Check everything live mode needs, section by section, and say what to fix: the relay takes
    our login (nothing is sent), the fax gateway takes our key (a read-only call), the webhooks'
    address and keys, no sandbox-only campaign routed, the DKIM keys and their DNS records, the
    bounce domain, its VERP key and mailbox. Exit status 1 when anything is wrong; advice
    (no DKIM, no [bounces], DNS that did not answer) is shown but does not fail."""
    import asyncio

    from rich.markup import escape

    from dispatcher.config.loader import load_catalog
    from dispatcher.preflight import run

    settings = _settings()
    try:
        catalog = load_catalog(settings.config_dir, settings.templates_dir)
    except ConfigError as exc:
        _refuse_to_start(exc)
    unknown = [c for c in section_codes if c not in catalog.sections]
    if unknown:
        err.print(f"unknown section {unknown[0]!r} (known: {', '.join(sorted(catalog.sections))})", highlight=False)
        sys.exit(2)
    out = Console()
    if not settings.live:
        out.print(f"DISPATCH_MODE is {settings.mode}: checking as live mode will run", highlight=False)
    findings = asyncio.run(run(catalog, settings, os.environ, sections=list(section_codes) or None))
    shown = None
    for finding in findings:
        if finding.section != shown:
            shown = finding.section
            out.print(f"[bold]section {shown}[/bold]", highlight=False)
        if finding.advice:
            mark = "[yellow]advice[/yellow] "
        else:
            mark = "[green]ok[/green]     " if finding.ok else "[red]problem[/red]"
        out.print(f"  {mark} {escape(finding.check)}: {escape(finding.text)}", highlight=False, soft_wrap=True)
        if finding.fix:
            out.print(f"          fix: {escape(finding.fix)}", highlight=False, soft_wrap=True)
    problems = sum(not f.ok for f in findings)
    if problems:
        out.print(f"[red]{problems} problem(s)[/red]: live mode would not work as configured", highlight=False)
        sys.exit(1)
    advice = sum(f.advice for f in findings)
    if advice:
        out.print(
            f"[green]all well[/green], with {advice} piece(s) of advice: ready for DISPATCH_MODE=live", highlight=False
        )
        return
    out.print("[green]all well[/green]: ready for DISPATCH_MODE=live", highlight=False)


# ---------------------------------------------------------------------------- signing


@main.command()
@click.option("--section", "section_code", required=True, help="Section code, e.g. us.")
@click.option("--timestamp", type=int, default=None, help="Unix seconds to sign with (default: now).")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, allow_dash=True))
def sign(section_code: str, timestamp: int | None, file: str) -> None:
    """Print the Dispatch-Signature header value for the body in FILE ('-' for stdin)."""
    from dispatcher.config.loader import load_catalog
    from dispatcher.dev import dev_keys
    from dispatcher.intake.signature import sign as make

    settings = _settings()
    catalog = load_catalog(settings.config_dir)
    if section_code not in catalog.sections:
        err.print(f"unknown section {section_code!r} (known: {', '.join(sorted(catalog.sections))})")
        sys.exit(2)
    env = catalog.section(section_code).intake_key_env
    key = os.environ.get(env) or dev_keys(settings).get(env)
    if not key:
        err.print(f"the intake key of section {section_code!r} is read from ${env}, which is not set")
        sys.exit(2)
    body = sys.stdin.buffer.read() if file == "-" else Path(file).read_bytes()
    click.echo(make(key.encode(), body, timestamp))


# ---------------------------------------------------------------------------- DKIM


@main.group()
def dkim() -> None:
    """DKIM keys of the sections' letters (docs/email.md)."""


@dkim.command("keygen")
@click.option("--section", "section_code", required=True, help="Section code, e.g. us.")
@click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where the private keys go (default: <var dir>/dkim/<section>/).",
)
@click.option("--force", is_flag=True, help="Overwrite key files that are already there.")
@click.option("--rsa-selector", default=None, help="Default: rsa-<YYYYMM> (a new selector for a new key).")
@click.option("--ed25519-selector", default=None, help="Default: ed25519-<YYYYMM>.")
def dkim_keygen(
    section_code: str, directory: Path | None, force: bool, rsa_selector: str | None, ed25519_selector: str | None
) -> None:
    """Write an RSA-2048 and an Ed25519 private key for a section (mode 0600), and print the DNS
    TXT records to publish and the [dkim] table for its section file."""
    from datetime import UTC, datetime

    from dispatcher.channels.email import dkim as keys
    from dispatcher.config.loader import load_catalog
    from dispatcher.config.models import DkimConfig, ascii_domain

    settings = _settings()
    try:
        catalog = load_catalog(settings.config_dir)
    except ConfigError as exc:
        _refuse_to_start(exc)
    if section_code not in catalog.sections:
        err.print(f"unknown section {section_code!r} (known: {', '.join(sorted(catalog.sections))})")
        sys.exit(2)
    section = catalog.section(section_code)
    month = datetime.now(UTC).strftime("%Y%m")
    rsa_selector = rsa_selector or f"rsa-{month}"
    ed25519_selector = ed25519_selector or f"ed25519-{month}"
    domain = section.dkim.domain if section.dkim and section.dkim.domain else ascii_domain(section.sender.domain)
    directory = (directory or settings.var_dir / "dkim" / section_code).absolute()
    paths = {"rsa": directory / f"{rsa_selector}.pem", "ed25519": directory / f"{ed25519_selector}.pem"}
    # The table printed below must load: check the selectors as the config loader will.
    try:
        DkimConfig(
            domain=domain,
            rsa_selector=rsa_selector,
            ed25519_selector=ed25519_selector,
            rsa_key_file=str(paths["rsa"]),
            ed25519_key_file=str(paths["ed25519"]),
        )
    except ValueError as exc:
        err.print(f"cannot use these selectors: {exc}", highlight=False)
        sys.exit(2)
    existing = [path for path in paths.values() if path.exists()]
    if existing and not force:
        err.print(f"{', '.join(map(str, existing))} already there; --force overwrites (and retires the old key)")
        sys.exit(1)
    rsa_key, ed25519_key = keys.generate_keys()
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    for path, key in ((paths["rsa"], rsa_key), (paths["ed25519"], ed25519_key)):
        # Created 0600 from the start: the key is never readable by others, not even briefly.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), 0o600)
            fh.write(keys.private_pem(key))

    def shown(path: Path) -> str:
        # Relative to the config directory when both sit in one deployment, as the loader reads it.
        config_dir = settings.config_dir.absolute()
        if config_dir.parent in path.parents:
            return os.path.relpath(path, config_dir)
        return str(path)

    # click.echo, not rich: a DNS record must come out as one unwrapped line.
    click.echo(f"Wrote {paths['rsa']} (RSA 2048) and {paths['ed25519']} (Ed25519), readable by their owner only.")
    click.echo("\nPublish these DNS records (one TXT record per selector):\n")
    click.echo(keys.zone_record(rsa_selector, domain, keys.txt_value(rsa_key)))
    click.echo(keys.zone_record(ed25519_selector, domain, keys.txt_value(ed25519_key)))
    source = catalog.sources.get(section_code)
    click.echo(f"\nOnce they resolve, put this table in {source or 'the section file'} (in place of an earlier one):\n")
    click.echo("[dkim]")
    click.echo(f'domain = "{domain}"')
    click.echo(f'rsa_selector = "{rsa_selector}"')
    click.echo(f'ed25519_selector = "{ed25519_selector}"')
    click.echo(f'rsa_key_file = "{shown(paths["rsa"])}"')
    click.echo(f'ed25519_key_file = "{shown(paths["ed25519"])}"')


# ---------------------------------------------------------------------------- ledger


@main.group()
def ledger() -> None:
    """The delivery ledger."""


@ledger.command("migrate")
def ledger_migrate() -> None:
    """Create or upgrade the ledger's tables (DATABASE_URL)."""
    service = _service()
    service.ledger.migrate()
    Console().print(f"ledger at {service.ledger.engine.url.render_as_string(hide_password=True)} is up to date")


@ledger.command("states")
@click.option("--mermaid", "form", flag_value="mermaid", default=True, help="A Mermaid state diagram (the default).")
@click.option("--table", "form", flag_value="table", help="A Markdown table: event, from, to, why.")
def ledger_states(form: str) -> None:
    """Print a letter's states and moves, generated from the state table (docs/architecture.md
    holds this very text)."""
    from dispatcher.ledger import states

    click.echo(states.mermaid() if form == "mermaid" else states.table_markdown(), nl=False)


@ledger.command("show")
@click.argument("appeal_id")
def ledger_show(appeal_id: str) -> None:
    """Show an appeal's deliveries and every attempt."""
    from rich.table import Table

    service = _service()
    view = service.ledger.views.appeal(appeal_id)
    if view is None:
        err.print(f"no appeal {appeal_id!r}")
        sys.exit(1)
    table = Table(title=f"{view.appeal_id} · {view.campaign} · {view.section}")
    for col in ("delivery", "target", "channel", "lang", "state", "tries", "last"):
        table.add_column(col)
    for d in view.deliveries:
        last = " ".join(str(x) for x in (d.last_outcome, d.last_code, d.last_text) if x)
        table.add_row(d.id, d.target, d.channel, d.language, d.state, str(d.attempts), last)
    Console().print(table)


# ---------------------------------------------------------------------------- campaigns


@main.group()
def campaign() -> None:
    """Campaign lifecycle."""


@campaign.command("close")
@click.argument("campaign_id")
@click.option("--reason", required=True, help="Why, e.g. 'detainee released on 3 March'.")
def campaign_close(campaign_id: str, reason: str) -> None:
    """Close CAMPAIGN_ID early: new appeals get 410, every waiting letter in every section is cancelled."""
    from dispatcher.ledger.models import utcnow

    cancelled = _service().ledger.controls.close_campaign(campaign_id, reason, utcnow(), by=_cli_actor())
    if cancelled is None:
        err.print(f"{campaign_id} is already closed")
        sys.exit(1)
    Console().print(f"{campaign_id} closed; {cancelled} waiting letter(s) cancelled")


# ---------------------------------------------------------------------------- supporters


@main.group()
def supporters() -> None:
    """Supporters' data: erasure on request (docs/privacy.md)."""


@supporters.command("erase")
@click.option("--appeal", "appeal_id", default=None, help="The appeal's id (ap_...).")
@click.option("--email", default=None, help="Every appeal of this email ('-': read it from stdin, out of the history).")
@click.option("--section", default=None, help="Only this section's appeals, e.g. us.")
@click.option("--campaign", default=None, help="Only this campaign's appeals.")
@click.option("--reason", default=None, help="Why, for the audit log (no personal data), e.g. 'request #123'.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def supporters_erase(
    appeal_id: str | None, email: str | None, section: str | None, campaign: str | None, reason: str | None, yes: bool
) -> None:
    """Erase a supporter's personal data everywhere it is kept; their letters not yet sent are
    cancelled, the anonymous counts stay. Says what it will erase, then what it erased (counts)."""
    import getpass

    from dispatcher.errors import NotFound

    if (appeal_id is None) == (email is None):
        raise click.UsageError("give --appeal or --email (one of them)")
    if email == "-":
        email = sys.stdin.readline().strip()
        if not email:
            raise click.UsageError("no email on stdin")
    service = _service()
    who = service.supporters.who(appeal_id=appeal_id, email=email, section=section, campaign=campaign)
    out = Console(highlight=False, soft_wrap=True)
    try:
        appeals = service.supporters.preview(who)
    except NotFound as exc:
        err.print(f"[red]error[/red] {exc}", highlight=False)
        sys.exit(1)
    named = "this supporter" if email is not None else f"appeal {appeal_id}"
    out.print(f"Erasing {named}: {len(appeals)} appeal(s)")
    for a in appeals:
        state = (
            "already erased"
            if a.already_erased
            else f"{a.waiting} letter(s) waiting to cancel, {a.in_flight} being sent, {a.out} sent (kept, counted)"
        )
        out.print(f"  {a.appeal_id}  {a.section}  {a.campaign}  {state}")
    if not yes and not click.confirm("Erase their personal data now? This cannot be undone", err=True):
        err.print("nothing erased")
        sys.exit(1)
    user = getpass.getuser()
    report = service.supporters.erase(who, actor=f"cli:{user}", reason=reason)
    if report.status == "already_erased":
        out.print("Already erased; nothing more to do" + _files_note(report.sandbox_files_removed))
        return
    out.print(
        f"Erased {report.appeals_erased} appeal(s): {report.letters_cancelled} letter(s) cancelled, "
        f"{report.letters_in_flight} being sent left to finish, {report.letters_out} sent kept in the counts, "
        f"{report.texts_redacted} text(s) redacted" + _files_note(report.sandbox_files_removed)
    )


def _files_note(removed: int) -> str:
    return f", {removed} sandbox file(s) removed" if removed else ""


# ---------------------------------------------------------------------------- schedule


@main.group()
def schedule() -> None:
    """Pacing of letters towards their deadlines."""


@schedule.command("forecast")
@click.argument("campaign_id")
def schedule_forecast(campaign_id: str) -> None:
    """Per recipient of CAMPAIGN_ID's waiting letters: how many wait, the pace, when the last
    goes, and whether the recipient's capacity carries them all before the deadline."""
    from rich.table import Table

    from dispatcher.ledger.models import utcnow
    from dispatcher.queue.fallback import Fallback
    from dispatcher.queue.forecast import campaign_forecast

    service = _service()
    if campaign_id not in service.catalog.campaigns:
        err.print(f"unknown campaign {campaign_id!r} (known: {', '.join(sorted(service.catalog.campaigns))})")
        sys.exit(2)
    fallback = Fallback(catalog=service.catalog, channels=service.channels, ledger=service.ledger)
    rows = campaign_forecast(
        ledger=service.ledger, pacer=service.pacer, campaign=campaign_id, now=utcnow(), fallback=fallback
    )
    if not rows:
        Console().print(f"no letters of {campaign_id} are waiting")
        return
    table = Table(title=f"forecast for {campaign_id} (all waiting letters of each recipient)")
    for col in (
        "recipient",
        "waiting",
        "letters/open hour",
        "first",
        "last",
        "before deadline",
        "with digests",
        "by fallback",
    ):
        table.add_column(col)
    for row in rows:
        f, digest = row.forecast, row.digest
        verdict = "all" if f.fits else f"[red]{f.fits_count}; {f.shortfall} would miss it[/red]"
        if digest is not None:
            after = digest.after
            fits = "all make it" if after.fits else f"{after.shortfall} would still miss it"
            with_digests = f"{digest.letters} letters in {digest.digests or 'a waiting'} digest(s); {fits}"
        else:
            with_digests = "-" if f.fits else "off"
        table.add_row(
            f.recipient,
            str(f.waiting),
            f"{f.rate_per_hour:.2f}",
            f.first_at.isoformat(timespec="minutes") if f.first_at else "-",
            f.last_at.isoformat(timespec="minutes") if f.last_at else "-",
            verdict,
            with_digests,
            _by_fallback(row.fallback),
        )
    Console().print(table)
    short = [r.forecast for r in rows if not r.forecast.fits and r.digest is None]
    if short:
        Console().print(
            f"[red]capacity short for {len(short)} recipient(s): raise their caps, allow digests "
            "(digest = true on the section's route), or accept that some letters will expire[/red]"
        )
    if any(r.digest is not None for r in rows):
        Console().print("digests are on for some routes: the scheduler bundles those letters when the line is short")


def _by_fallback(preview: FallbackPreview | None) -> str:
    if preview is None:
        return "-"
    parts = [f"{n} by {channel}" for channel, n in sorted(preview.rerouted.items())]
    if preview.failing:
        parts.append(f"[red]{preview.failing} will fail (no fallback)[/red]")
    return f"{preview.reason}: " + ", ".join(parts)


# ---------------------------------------------------------------------------- channels


@main.group()
def channel() -> None:
    """Channels paused after an operational error (a relay refusing our credentials...)."""


@channel.command("list")
def channel_list() -> None:
    """Show paused channels and why."""
    paused = _service().ledger.controls.paused_channels()
    if not paused:
        Console().print("no channel is paused")
        return
    for key, info in paused.items():
        Console().print(f"{key}  paused {info.paused_at.isoformat()}: {info.reason}", highlight=False)


@channel.command("resume")
@click.argument("key")
def channel_resume(key: str) -> None:
    """Resume KEY (e.g. email:us) once its cause is fixed; its waiting letters go out now."""
    from dispatcher.ledger.models import utcnow

    released = _service().ledger.controls.resume_channel(key, utcnow(), by=_cli_actor())
    if released is None:
        err.print(f"{key} is not paused")
        sys.exit(1)
    Console().print(f"{key} resumed; {released} waiting letter(s) are due now")


# ---------------------------------------------------------------------------- fax


@main.group()
def fax() -> None:
    """Fax lines that need an operator."""


@fax.command("flagged")
def fax_flagged() -> None:
    """List numbers that answered without a fax tone; letters to them wait."""
    from rich.table import Table

    rows = _service().ledger.controls.flagged_numbers()
    if not rows:
        Console().print("no flagged numbers")
        return
    table = Table(title="flagged fax numbers")
    for col in ("number", "flagged at", "last delivery", "reason"):
        table.add_column(col)
    for row in rows:
        table.add_row(row.number, row.flagged_at.isoformat(), row.delivery or "", row.reason)
    Console().print(table)


@fax.command("unflag")
@click.argument("number")
def fax_unflag(number: str) -> None:
    """Clear NUMBER (E.164) after checking it by hand; its waiting letters go out again."""
    from dispatcher.ledger.models import utcnow

    if not _service().ledger.controls.unflag_number(number, now=utcnow(), by=_cli_actor()):
        err.print(f"{number} is not flagged")
        sys.exit(1)
    Console().print(f"{number} cleared; letters waiting for it are sent at their next try")


# ---------------------------------------------------------------------------- operators


def _cli_actor() -> str:
    """Who acts from the command line, as the audit log names them."""
    import getpass

    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):  # no user name in a bare container
        return f"cli:uid-{os.getuid()}"


def _new_password(from_stdin: bool) -> str:
    if from_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = click.prompt("Password", hide_input=True, confirmation_prompt="Repeat the password")
    return str(password)


@main.group()
def operators() -> None:
    """Accounts of the operators' console (docs/console.md): viewers, operators and admins."""


@operators.command("add")
@click.argument("name")
@click.option("--role", type=click.Choice(["viewer", "operator", "admin"]), required=True)
@click.option(
    "--section",
    "sections",
    multiple=True,
    help="A section it works on (repeatable); none: every section (a viewer, an admin).",
)
@click.option("--password-stdin", is_flag=True, help="Read the password from the first line of stdin.")
def operators_add(name: str, role: str, sections: tuple[str, ...], password_stdin: bool) -> None:
    """Create the console account NAME; the password is asked for twice (or read from stdin)."""
    from dispatcher.config.loader import load_catalog
    from dispatcher.errors import OperatorError
    from dispatcher.ledger.models import utcnow

    settings = _settings()
    try:
        known = load_catalog(settings.config_dir).sections
    except ConfigError as exc:
        _refuse_to_start(exc)
    unknown = [code for code in sections if code not in known]
    if unknown:
        err.print(f"unknown section {unknown[0]!r} (known: {', '.join(sorted(known))})", highlight=False)
        sys.exit(2)
    password = _new_password(password_stdin)
    try:
        account = _service(settings).ledger.operators.add(
            name, password, role=role, sections=sections, now=utcnow(), actor=_cli_actor(), known_sections=known
        )
    except OperatorError as exc:
        err.print(f"[red]error[/red] {exc}", highlight=False)
        sys.exit(1)
    Console().print(f"operator {account.name} added ({account.describe()})", highlight=False)


@operators.command("passwd")
@click.argument("name")
@click.option("--password-stdin", is_flag=True, help="Read the password from the first line of stdin.")
def operators_passwd(name: str, password_stdin: bool) -> None:
    """Set NAME's password; every console session of NAME ends."""
    from dispatcher.errors import OperatorError
    from dispatcher.ledger.models import utcnow

    service = _service()
    if service.ledger.operators.get(name) is None:
        err.print(f"no operator named {name!r}", highlight=False)
        sys.exit(1)
    password = _new_password(password_stdin)
    try:
        service.ledger.operators.passwd(name, password, now=utcnow(), actor=_cli_actor())
    except OperatorError as exc:
        err.print(f"[red]error[/red] {exc}", highlight=False)
        sys.exit(1)
    Console().print(f"password of {name} changed; its sessions ended", highlight=False)


@operators.command("remove")
@click.argument("name")
def operators_remove(name: str) -> None:
    """Remove NAME's account; its sessions end at once. The audit log keeps its actions."""
    from dispatcher.ledger.models import utcnow

    if not _service().ledger.operators.remove(name, now=utcnow(), actor=_cli_actor()):
        err.print(f"no operator named {name!r}", highlight=False)
        sys.exit(1)
    Console().print(f"operator {name} removed", highlight=False)


@operators.command("list")
@click.option("--json", "as_json", is_flag=True, help="One JSON array instead of a table.")
def operators_list(as_json: bool) -> None:
    """Show the console's accounts: name, role, sections, since when, last password change."""
    import dataclasses
    import json

    from rich.table import Table

    rows = _service().ledger.operators.list()
    if as_json:
        click.echo(json.dumps([dataclasses.asdict(r) for r in rows], default=_iso, indent=2))
        return
    if not rows:
        Console().print("no operators: add one with `dispatcher operators add NAME --role admin`")
        return
    table = Table(title="console operators")
    for col in ("name", "role", "sections", "created", "password changed"):
        table.add_column(col, no_wrap=col == "name")
    for r in rows:
        table.add_row(
            r.name,
            r.role,
            " ".join(r.sections) or "all",
            r.created_at.isoformat(timespec="seconds"),
            r.password_changed_at.isoformat(timespec="seconds"),
        )
    Console().print(table)


# ---------------------------------------------------------------------------- bounces


@main.group()
def suppressions() -> None:
    """Addresses known to bounce: no letter is sent to them by their channel."""


@suppressions.command("list")
@click.option("--channel", default=None, help="Only this channel's (e.g. email).")
@click.option("--json", "as_json", is_flag=True, help="One JSON array instead of a table.")
def suppressions_list(channel: str | None, as_json: bool) -> None:
    """Show suppressed addresses, oldest first, with the bounce that put each there."""
    import dataclasses
    import json

    from rich.table import Table

    rows = _service().ledger.suppressions.all(channel)
    if as_json:
        click.echo(json.dumps([dataclasses.asdict(r) for r in rows], default=_iso, indent=2))
        return
    if not rows:
        Console().print("no suppressed addresses")
        return
    table = Table(title="suppressed addresses")
    for col in ("channel", "address", "since", "reason", "code", "what the far side said", "delivery"):
        # an address cut in two cannot be copied into `suppressions remove`
        table.add_column(col, no_wrap=col in ("address", "delivery"))
    for r in rows:
        table.add_row(
            r.channel,
            r.address,
            r.since.isoformat(timespec="seconds"),
            r.reason,
            r.code or "",
            r.text or "",
            r.delivery or "",
        )
    Console().print(table)


@suppressions.command("remove")
@click.argument("address")
@click.option("--channel", default=None, help="Only on this channel (default: every channel).")
def suppressions_remove(address: str, channel: str | None) -> None:
    """Write to ADDRESS again (after checking it was fixed); letters planned from now on go out."""
    if not _service().ledger.suppressions.remove(address, channel):
        err.print(f"{address} is not suppressed")
        sys.exit(1)
    Console().print(f"{address} removed from the suppression list")


@main.command()
@click.option("--host", default=None, help="Address to listen on [default: DISPATCH_BOUNCES_LISTEN's host].")
@click.option("--port", default=None, type=int, help="Port [default: DISPATCH_BOUNCES_LISTEN's port, 2526].")
@_metrics_options
def bounces(host: str | None, port: int | None, metrics_port: int | None, metrics_host: str) -> None:
    """Receive bounces: an SMTP server for the bounce domains' MX, and a poller for each
    section whose bounces land in an IMAP mailbox ([bounces.imap])."""
    from dispatcher.bounces import BounceReceiver

    service = _service()
    try:
        receiver = BounceReceiver(service, host=host, port=port)
    except ConfigError as exc:
        _refuse_to_start(exc)
    stop = threading.Event()
    _stop_on_signals(stop)
    _serve_metrics(service, metrics_port, metrics_host)
    receiver.start()
    Console().print(receiver.describe())
    stop.wait()
    receiver.stop()


# ---------------------------------------------------------------------------- dead letters


@main.group()
def deadletters() -> None:
    """Queue messages dramatiq gave up on (their actor crashed on every retry)."""


@deadletters.command("list")
@click.option("--limit", default=50, show_default=True, help="Most recent first, this many.")
@click.option("--json", "as_json", is_flag=True, help="One JSON array instead of a table.")
def deadletters_list(limit: int, as_json: bool) -> None:
    """Show dead letters with the reason and their delivery's state now (the delivery itself is
    retried from the ledger; a dead letter is a symptom to look into, not a lost letter)."""
    import dataclasses
    import json

    from rich.table import Table

    rows = _service().ledger.views.dead_letters(limit=limit)
    if as_json:
        click.echo(json.dumps([dataclasses.asdict(r) for r in rows], indent=2, default=_iso))
        return
    if not rows:
        Console().print("no dead letters")
        return
    table = Table(title="dead letters (most recent first)")
    for col in ("failed at", "message", "delivery", "delivery state", "actor", "reason"):
        table.add_column(col)
    for row in rows:
        table.add_row(
            row.failed_at.isoformat(),
            row.message_id,
            row.delivery_id or "",
            row.delivery_state or "",
            row.actor,
            row.reason or "",
        )
    Console().print(table)


# ---------------------------------------------------------------------------- processes


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8080, show_default=True)
@click.option(
    "--workers",
    default=1,
    show_default=True,
    type=click.IntRange(min=1),
    help="API processes sharing the port (quotas and the ledger hold across them).",
)
def api(host: str, port: int, workers: int) -> None:
    """Run the intake API."""
    import uvicorn

    from dispatcher.metrics.exposition import MULTIPROC_ENV, prepare_multiprocess_dir, remove_multiprocess_dir

    # Several processes (or a directory the environment names): each counts into files there and
    # whichever answers /metrics sums them all. Emptied before anything counts (docs/metrics.md).
    made = prepare_multiprocess_dir() if workers > 1 or os.environ.get(MULTIPROC_ENV) else None
    try:
        try:
            app = _service().api()  # also checks the config before any process starts
        except ConfigError as exc:
            _refuse_to_start(exc)
        if workers == 1:
            heap.settle()
            uvicorn.run(app, host=host, port=port, log_level="warning")
        else:
            # uvicorn's own process manager: each process builds the app from the environment
            uvicorn.run(
                "dispatcher.app:api_from_env", factory=True, host=host, port=port, workers=workers, log_level="warning"
            )
    finally:
        remove_multiprocess_dir(made)


@main.command()
@click.option("--threads", default=8, show_default=True, help="Letters sent at once by this process.")
@click.option(
    "--shutdown-timeout",
    default=60.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="Seconds a SIGTERM waits for letters being sent; then they are handed back to the queue.",
)
@_metrics_options
def worker(threads: int, shutdown_timeout: float, metrics_port: int | None, metrics_host: str) -> None:
    """Run a worker that sends letters.

    SIGTERM (or SIGINT): unstarted messages go back to the queue at once, letters being sent get
    --shutdown-timeout seconds to finish and be recorded, and any still running then are handed
    back (claim released, message requeued) for another worker; exit status 0. A second signal
    hands back at once."""
    service = _service()
    handle = service.worker(threads=threads)
    heap.settle()
    _serve_metrics(service, metrics_port, metrics_host)
    stop = threading.Event()
    _stop_on_signals(stop)
    handle.start()
    stop.wait()
    hurry = threading.Event()
    _stop_on_signals(hurry)
    report = handle.stop(timeout_ms=int(shutdown_timeout * 1000), hurry=hurry)
    if report is not None and report.stragglers:
        # A handed-back send still runs on a daemon thread: leave now, before it can record
        # anything more, rather than let interpreter shutdown race it.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


@main.command()
@click.option("--interval", default=1.0, show_default=True, help="Seconds between ticks.")
@_metrics_options
def reconcile(interval: float, metrics_port: int | None, metrics_host: str) -> None:
    """Run the reconciler: releases due letters to the queue, takes back stale claims."""
    stop = threading.Event()
    _stop_on_signals(stop)
    service = _service()
    reconciler = service.reconciler(interval=interval)
    _serve_metrics(service, metrics_port, metrics_host)
    heap.settle()
    reconciler.run(stop)


@main.command()
@click.option("--port", default=8080, show_default=True, help="API port.")
@click.option("--smtp-port", default=2525, show_default=True, help="Sandbox SMTP port (0: any free port).")
@click.option("--bounces-port", default=2526, show_default=True, help="Bounce listener port (0: any free port).")
def dev(port: int, smtp_port: int, bounces_port: int) -> None:
    """Run the whole service locally on embedded defaults (sandbox mode)."""
    from dispatcher.dev import run_dev

    try:
        code = run_dev(api_port=port, smtp_port=smtp_port, bounces_port=bounces_port)
    except ConfigError as exc:
        _refuse_to_start(exc)
    sys.exit(code)


if __name__ == "__main__":  # pragma: no cover
    main()
