"""``dispatcher bounces``: the process that receives what comes back.

One SMTP listener for every section's bounce domain (their MX records point at it), and one
IMAP poller thread for each section whose bounces land in a mailbox instead (``[bounces.imap]``).
Both hand each message to :class:`dispatcher.queue.bounces.BounceIntake`.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

from dispatcher.app import Service
from dispatcher.channels.email.imap import BounceMailbox
from dispatcher.channels.email.inbound import BounceListener
from dispatcher.config.models import BounceMailbox as MailboxConfig
from dispatcher.config.models import Section
from dispatcher.errors import ConfigError, ConfigProblem, DispatchError
from dispatcher.logging import get_logger

log = get_logger(__name__)


class BounceLater(DispatchError):
    """The bounce's letter is still being sent: leave the message for the next poll."""


class BounceReceiver:
    def __init__(self, service: Service, *, host: str | None = None, port: int | None = None):
        settings = service.settings
        self.service = service
        self.intake = service.bounce_intake()
        sections = list(service.catalog.sections.values())
        self.domains = sorted({s.bounces.domain.lower() for s in sections if s.bounces is not None})
        self.listener = BounceListener(
            self._from_smtp,
            domains=self.domains,
            host=host or settings.bounces_host,
            port=settings.bounces_port if port is None else port,
        )
        self.mailboxes = [
            (section.code, section.bounces.imap, self._mailbox(section, section.bounces.imap))
            for section in sections
            if section.bounces is not None and section.bounces.imap is not None
        ]
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def _from_smtp(self, raw: bytes, recipients: Sequence[str], truncated: bool) -> str:
        return self.intake.handle(raw, envelope_recipients=recipients, truncated=truncated).outcome

    def _from_mailbox(self, raw: bytes, truncated: bool) -> None:
        if self.intake.handle(raw, truncated=truncated).outcome == "later":
            raise BounceLater("its letter is still being sent")

    def _mailbox(self, section: Section, config: MailboxConfig) -> BounceMailbox:
        environ = self.service.environ
        values = []
        for key, name in (("username_env", config.username_env), ("password_env", config.password_env)):
            value = environ.get(name)
            if not value:
                source = self.service.catalog.sources.get(section.code)
                raise ConfigError(
                    [
                        ConfigProblem(
                            str(source or f"section {section.code}"),
                            f"bounces.imap.{key}",
                            f"environment variable {name} is not set",
                        )
                    ]
                )
            values.append(value)
        return BounceMailbox.from_config(
            config, username=values[0], password=values[1], config_dir=self.service.settings.config_dir
        )

    def start(self) -> None:
        self.listener.start()
        for code, config, mailbox in self.mailboxes:
            thread = threading.Thread(
                target=mailbox.run_forever,
                args=(self._from_mailbox, config.interval, self._stop),
                name=f"bounces-imap-{code}",
                daemon=True,
            )
            thread.start()
            self._threads.append(thread)
        log.info(
            "bounces.listening",
            host=self.listener.host,
            port=self.listener.port,
            domains=self.domains,
            mailboxes=[code for code, _, _ in self.mailboxes],
        )

    def stop(self) -> None:
        self._stop.set()
        self.listener.stop()
        for thread in self._threads:
            thread.join(timeout=35)

    def describe(self) -> str:
        domains = ", ".join(self.domains) or "none (no section has a [bounces] table)"
        lines = [f"bounces: SMTP on {self.listener.host}:{self.listener.port} for {domains}"]
        lines += [f"bounces: polling {mailbox!r} for section {code}" for code, _, mailbox in self.mailboxes]
        return "\n".join(lines)
