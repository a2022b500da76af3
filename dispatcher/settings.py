"""Runtime settings, read from the environment once per process.

Everything has an embedded default so that ``dispatcher dev`` runs on a bare checkout:
SQLite under ``var/``, Redis at 127.0.0.1:6379, sandbox mode. Secrets (intake keys, SMTP
passwords) are never here: config/ names the environment variables that hold them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from dispatcher.errors import ConfigError, ConfigProblem
from dispatcher.rates import Rate

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

Mode = Literal["sandbox", "live"]


def project_root() -> Path:
    """The checkout holding config/ and templates/: the package's parent, else the cwd."""
    here = Path(__file__).resolve().parent.parent
    if (here / "config").is_dir() and (here / "templates").is_dir():
        return here
    return Path.cwd()


def _env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    value = raw.strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off"}:
        return False
    raise ConfigError([ConfigProblem("environment", name, f"expected a boolean, got {raw!r}")])


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError([ConfigProblem("environment", name, f"expected an integer, got {raw!r}")]) from None


def _env_float(name: str, default: float, *, low: float, high: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError([ConfigProblem("environment", name, f"expected a number, got {raw!r}")]) from None
    if not low <= value <= high:
        raise ConfigError([ConfigProblem("environment", name, f"must be between {low:g} and {high:g}, got {raw!r}")])
    return value


def _env_list(name: str, default: tuple[str, ...]) -> tuple[str, ...]:
    raw = os.environ.get(name)
    if raw is None:
        return default
    items = tuple(part.strip() for part in raw.split(",") if part.strip())
    for item in items:
        try:
            Rate.parse(item)
        except ValueError as exc:
            raise ConfigError([ConfigProblem("environment", name, str(exc))]) from None
    return items


@dataclass(frozen=True)
class Settings:
    config_dir: Path
    templates_dir: Path
    var_dir: Path
    database_url: str
    redis_url: str
    #: prefix of every Redis key (dramatiq's namespace); tests use their own
    redis_namespace: str = "dispatcher"
    mode: Mode = "sandbox"
    #: where sandbox mode delivers every email, whatever the target's address
    sandbox_smtp_host: str = "127.0.0.1"
    sandbox_smtp_port: int = 2525
    #: add <id>-DEMO copies of every campaign, issued today (see Catalog.with_demo_copies)
    demo_campaigns: bool = False
    #: days supporters' personal data is kept after their appeal's last letter is final
    pii_retention_days: int = 30
    #: longest personal message accepted, in characters
    max_message_chars: int = 2000
    #: largest request body the intake API reads
    max_body_bytes: int = 64 * 1024
    #: delay before a letter's second try after a transient failure (doubles each try)
    retry_base_seconds: float = 60.0
    #: tries in all before a transient failure becomes final
    retry_max_attempts: int = 10
    #: hours a letter is retried at most, counted from its appeal (the campaign deadline may end
    #: it sooner)
    retry_max_lifetime_hours: int = 7 * 24
    #: default caps per recipient (an email address, a fax number) across all campaigns, for
    #: targets whose config names none; "" for none
    email_limits: tuple[str, ...] = ("30/hour", "200/day")
    fax_limits: tuple[str, ...] = ("4/hour", "40/day")
    #: hold faxes (and opted-in emails) to the recipient's office hours
    office_hours: bool = True
    #: intake quotas (docs/intake.md, "Quotas") for sections whose ``[intake]`` table sets none:
    #: appeals per section key; per supporter email across all sections; per client IP (when the
    #: form passes ``client_ip``); "" for none
    section_quota: tuple[str, ...] = ("600/minute",)
    supporter_quota: tuple[str, ...] = ("10/hour", "30/day")
    client_ip_quota: tuple[str, ...] = ("60/hour",)
    #: pacing (docs/pacing.md): never slower than this share of a recipient's caps (1: always at
    #: the caps' pace), and the last letter for a deadline this many hours before it
    pacing_slowest_share: float = 0.25
    pacing_margin_hours: float = 24.0
    #: how long a fax waits when another fax to the same number is in flight
    fax_line_wait_seconds: float = 60.0
    #: a worker's liveness key in Redis lives this long and is set again every sixth of it; the
    #: reconciler takes a worker's claims back once its key has been gone for a sixth more
    #: (docs/architecture.md, "A worker that dies mid-send")
    worker_liveness_seconds: float = 30.0
    #: wait between tries on a fax line that answers without a fax tone
    fax_no_tone_interval_seconds: float = 3600.0
    #: a fax accepted by its gateway whose final webhook has not come after this long is asked
    #: about (the webhook may be lost); operators see "awaiting the gateway's report" meanwhile
    fax_report_wait_seconds: float = 1800.0
    #: this API's address as gateways reach it (their webhooks), e.g. https://dispatch.example.org
    public_url: str = ""
    #: Telnyx's webhook public key (base64 Ed25519), for /v1/webhooks/fax/telnyx
    telnyx_public_key: str = ""
    #: the secret Sinch callbacks carry in their URL, for /v1/webhooks/fax/sinch
    sinch_callback_token: str = field(default="", repr=False)
    #: key for the one-way supporter reference used in logs and for duplicate detection
    pepper: str = field(default="", repr=False)
    #: key of the MAC in each letter's VERP envelope sender (docs/email.md, "Bounces"); live
    #: mode needs it, sandbox mode uses a fixed key of its own when it is unset
    verp_key: str = field(default="", repr=False)
    #: where ``dispatcher bounces`` listens for the bounce domain's mail (its MX points here)
    bounces_host: str = "127.0.0.1"
    bounces_port: int = 2526
    #: soft bounces (a full mailbox) for one address within the window that count as a hard one
    soft_bounce_limit: int = 3
    soft_bounce_window_days: int = 7
    #: hours a console sign-in lasts (docs/console.md, "Accounts and sign-in")
    console_session_hours: float = 8.0
    #: the console's cookies carry ``Secure`` (sent over HTTPS only); None: in live mode only, since
    #: sandbox and dev mode serve plain HTTP on loopback, where a browser would drop such a cookie
    console_secure_cookie: bool | None = None
    #: sign-in attempts that failed, per operator name and per client address ("" for none)
    console_login_limits: tuple[str, ...] = ("5/minute", "20/hour")
    console_login_ip_limits: tuple[str, ...] = ("20/minute", "100/hour")

    @classmethod
    def from_env(cls) -> Settings:
        """The settings of this process; ConfigError naming the variable for any unusable value,
        so that a process refuses to start rather than fail on its first request."""
        root = project_root()
        var_dir = Path(os.environ.get("DISPATCH_VAR_DIR", root / "var"))
        mode = os.environ.get("DISPATCH_MODE", "sandbox").strip().lower()
        if mode not in ("sandbox", "live"):
            raise ConfigError(
                [ConfigProblem("environment", "DISPATCH_MODE", f"must be 'sandbox' or 'live', got {mode!r}")]
            )
        sandbox = os.environ.get("DISPATCH_SANDBOX_SMTP", "127.0.0.1:2525")
        host, _, port = sandbox.rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError(
                [ConfigProblem("environment", "DISPATCH_SANDBOX_SMTP", f"expected host:port, got {sandbox!r}")]
            )
        listen = os.environ.get("DISPATCH_BOUNCES_LISTEN", "127.0.0.1:2526")
        bounce_host, _, bounce_port = listen.rpartition(":")
        if not bounce_host or not bounce_port.isdigit():
            raise ConfigError(
                [ConfigProblem("environment", "DISPATCH_BOUNCES_LISTEN", f"expected host:port, got {listen!r}")]
            )
        settings = cls(
            config_dir=Path(os.environ.get("DISPATCH_CONFIG_DIR", root / "config")),
            templates_dir=Path(os.environ.get("DISPATCH_TEMPLATES_DIR", root / "templates")),
            var_dir=var_dir,
            database_url=os.environ.get("DATABASE_URL", f"sqlite:///{var_dir / 'ledger.sqlite3'}"),
            redis_url=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"),
            redis_namespace=os.environ.get("DISPATCH_REDIS_NAMESPACE", "dispatcher"),
            mode=mode,  # type: ignore[arg-type]
            sandbox_smtp_host=host,
            sandbox_smtp_port=int(port),
            demo_campaigns=_env_bool("DISPATCH_DEMO_CAMPAIGNS", False),
            pii_retention_days=_env_int("DISPATCH_PII_RETENTION_DAYS", 30),
            max_message_chars=_env_int("DISPATCH_MAX_MESSAGE_CHARS", 2000),
            retry_base_seconds=float(_env_int("DISPATCH_RETRY_BASE_SECONDS", 60)),
            retry_max_attempts=_env_int("DISPATCH_RETRY_MAX_ATTEMPTS", 10),
            retry_max_lifetime_hours=_env_int("DISPATCH_RETRY_MAX_LIFETIME_HOURS", 7 * 24),
            email_limits=_env_list("DISPATCH_EMAIL_LIMITS", ("30/hour", "200/day")),
            fax_limits=_env_list("DISPATCH_FAX_LIMITS", ("4/hour", "40/day")),
            office_hours=_env_bool("DISPATCH_OFFICE_HOURS", True),
            section_quota=_env_list("DISPATCH_SECTION_QUOTA", ("600/minute",)),
            supporter_quota=_env_list("DISPATCH_SUPPORTER_QUOTA", ("10/hour", "30/day")),
            client_ip_quota=_env_list("DISPATCH_CLIENT_IP_QUOTA", ("60/hour",)),
            pacing_slowest_share=_env_float("DISPATCH_PACING_SLOWEST_SHARE", 0.25, low=0.01, high=1.0),
            pacing_margin_hours=_env_float("DISPATCH_PACING_MARGIN_HOURS", 24.0, low=0.0, high=24.0 * 60),
            fax_line_wait_seconds=float(_env_int("DISPATCH_FAX_LINE_WAIT_SECONDS", 60)),
            worker_liveness_seconds=_env_float("DISPATCH_WORKER_LIVENESS_SECONDS", 30.0, low=1.0, high=600.0),
            fax_no_tone_interval_seconds=float(_env_int("DISPATCH_FAX_NO_TONE_INTERVAL_SECONDS", 3600)),
            fax_report_wait_seconds=float(_env_int("DISPATCH_FAX_REPORT_WAIT_SECONDS", 1800)),
            public_url=os.environ.get("DISPATCH_PUBLIC_URL", "").rstrip("/"),
            telnyx_public_key=os.environ.get("DISPATCH_TELNYX_PUBLIC_KEY", ""),
            sinch_callback_token=os.environ.get("DISPATCH_SINCH_CALLBACK_TOKEN", ""),
            pepper=os.environ.get("DISPATCH_PEPPER", ""),
            verp_key=os.environ.get("DISPATCH_VERP_KEY", ""),
            bounces_host=bounce_host.strip("[]"),
            bounces_port=int(bounce_port),
            soft_bounce_limit=_env_int("DISPATCH_SOFT_BOUNCE_LIMIT", 3),
            soft_bounce_window_days=_env_int("DISPATCH_SOFT_BOUNCE_WINDOW_DAYS", 7),
            console_session_hours=_env_float("DISPATCH_CONSOLE_SESSION_HOURS", 8.0, low=0.01, high=24.0 * 31),
            console_secure_cookie=(
                _env_bool("DISPATCH_CONSOLE_SECURE_COOKIE", False)
                if os.environ.get("DISPATCH_CONSOLE_SECURE_COOKIE")
                else None
            ),
            console_login_limits=_env_list("DISPATCH_CONSOLE_LOGIN_LIMITS", ("5/minute", "20/hour")),
            console_login_ip_limits=_env_list("DISPATCH_CONSOLE_LOGIN_IP_LIMITS", ("20/minute", "100/hour")),
        )
        settings.telnyx_webhook_key()
        return settings

    def telnyx_webhook_key(self) -> Ed25519PublicKey | None:
        """The key Telnyx webhooks are verified with; None when none is set. A key that cannot
        be read is a ConfigError naming DISPATCH_TELNYX_PUBLIC_KEY: otherwise the API would start,
        look healthy, and answer every webhook with a 500."""
        if not self.telnyx_public_key.strip():
            return None
        try:
            # (cryptography's OpenSSL bindings only where a key is set)
            from dispatcher.keys import load_public_key

            return load_public_key(self.telnyx_public_key)
        except ValueError as exc:
            raise ConfigError([ConfigProblem("environment", "DISPATCH_TELNYX_PUBLIC_KEY", str(exc))]) from None

    def verp_secret(self) -> bytes:
        """The VERP MAC key. Unset in live mode: ConfigError naming DISPATCH_VERP_KEY (bounces
        could not be told from forgeries); in sandbox mode a fixed key, since nothing real
        bounces there."""
        key = self.verp_key.strip()
        if key:
            if len(key) < 16:
                raise ConfigError(
                    [
                        ConfigProblem(
                            "environment", "DISPATCH_VERP_KEY", "is shorter than 16 characters; use a random key"
                        )
                    ]
                )
            return key.encode()
        if self.live:
            raise ConfigError(
                [
                    ConfigProblem(
                        "environment",
                        "DISPATCH_VERP_KEY",
                        "is not set: live mode signs every letter's bounce address with it "
                        "(e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)",
                    )
                ]
            )
        return b"sandbox-verp-key-not-secret"

    def but(self, **changes: object) -> Settings:
        return replace(self, **changes)  # type: ignore[arg-type]

    @property
    def sandbox_mail_dir(self) -> Path:
        return self.var_dir / "sandbox" / "mail"

    @property
    def live(self) -> bool:
        return self.mode == "live"

    @property
    def console_cookie_secure(self) -> bool:
        return self.live if self.console_secure_cookie is None else self.console_secure_cookie
