"""Erasing a supporter on request: the one function the CLI, the signed API and the console call.

    from dispatcher.supporters import erase
    report = erase(service.ledger, service.settings, email="jane@example.org", actor="admin-anna")

The ledger's part is one transaction (dispatcher/ledger/erasure.py: letters not yet sent
cancelled "erased", personal data blanked, texts redacted, the audit entry). Then the copies
the sandbox kept of the supporter's letters and of the digests that listed them (``.eml`` files,
fax lab folders with their pages) are deleted: they are local copies, not the record, and they
carry the name. An email is matched through its keyed hash only (dispatcher/pseudonyms.py).
What is erased, what is kept and why: docs/privacy.md.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from dispatcher.ledger.erasure import AppealToErase, LedgerErasure, Who
from dispatcher.ledger.models import utcnow
from dispatcher.ledger.store import Ledger
from dispatcher.logging import get_logger
from dispatcher.pseudonyms import pepper_of, supporter_ref
from dispatcher.settings import Settings

log = get_logger("dispatcher.supporters")


@dataclass(frozen=True)
class ErasureReport:
    """What an erasure did, in counts (no personal data: safe to show, log and answer)."""

    #: "erased" when this call erased at least one appeal, "already_erased" when all were before
    status: Literal["erased", "already_erased"]
    appeal_ids: tuple[str, ...]
    #: the appeals this call erased (the others had been erased before)
    appeals_erased: int
    letters_cancelled: int
    #: letters a worker was sending at that moment: left to finish, cancelled should they come
    #: back to waiting (their sandbox copies, if any appear later, go with a second erasure)
    letters_in_flight: int
    #: letters that had reached the official (kept: the public counts do not change)
    letters_out: int
    texts_redacted: int
    sandbox_files_removed: int
    #: the keyed hash of the email, when the supporter was named by email
    supporter_ref: str | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "appeal_ids": list(self.appeal_ids),
            "appeals_erased": self.appeals_erased,
            "letters_cancelled": self.letters_cancelled,
            "letters_in_flight": self.letters_in_flight,
            "letters_out": self.letters_out,
            "texts_redacted": self.texts_redacted,
            "sandbox_files_removed": self.sandbox_files_removed,
        }


class Supporters:
    """A service's supporters, as far as operators may touch them: erasure."""

    def __init__(self, ledger: Ledger, settings: Settings, clock: Callable[[], datetime] = utcnow):
        self.ledger = ledger
        self.settings = settings
        self.clock = clock
        self._pepper = pepper_of(settings)

    def who(
        self,
        *,
        appeal_id: str | None = None,
        email: str | None = None,
        section: str | None = None,
        campaign: str | None = None,
    ) -> Who:
        """The supporter named by an appeal id or an email (hashed here; never kept)."""
        if (appeal_id is None) == (email is None):
            raise ValueError("name the supporter by an appeal id or by an email, one of them")
        return Who(
            appeal_id=appeal_id,
            supporter_ref=None if email is None else supporter_ref(email, self._pepper),
            section=section,
            campaign=campaign,
        )

    def preview(self, who: Who) -> tuple[AppealToErase, ...]:
        """What :meth:`erase` would do, per appeal (NotFound if nothing matches)."""
        return self.ledger.erasures.preview(who)

    def erase(self, who: Who, *, actor: str, reason: str | None = None) -> ErasureReport:
        """Erase the supporter's data everywhere this service keeps it (NotFound if nothing
        matches). Idempotent: again, it answers ``already_erased`` and removes any sandbox copy
        that appeared since (a letter that was being sent)."""
        done = self.ledger.erasures.erase(who, actor=actor, now=self.clock(), reason=reason)
        removed = self._remove_sandbox_copies(done)
        report = _report(who, done, removed)
        # Ids, the keyed hash and counts only.
        log.info(
            "supporter.erased",
            actor=actor,
            appeals=list(report.appeal_ids),
            supporter_ref=who.supporter_ref,
            section=who.section,
            status=report.status,
            appeals_erased=report.appeals_erased,
            letters_cancelled=report.letters_cancelled,
            letters_in_flight=report.letters_in_flight,
            texts_redacted=report.texts_redacted,
            sandbox_files_removed=report.sandbox_files_removed,
        )
        return report

    def _remove_sandbox_copies(self, done: LedgerErasure) -> int:
        """The sandbox's copies of every letter of the erased appeals, and of the digests that
        carried one: the emails the sandbox SMTP server kept, the fax lab's calls."""
        from dispatcher.sandbox.smtp import copies_of  # (aiosmtpd: not for every process that erases)

        mail_dir = self.settings.sandbox_mail_dir
        fax_dir = self.settings.var_dir / "sandbox" / "fax"
        removed = 0
        for _delivery_id, message_id in done.letters:
            for path in copies_of(mail_dir, message_id):
                path.unlink(missing_ok=True)
                removed += 1
        if (fax_dir / "tags").is_dir():
            # Imported only when there are lab faxes: the lab loads Pillow and spandsp.
            from dispatcher.sandbox.faxlab import FaxLab

            lab = FaxLab(Path(fax_dir))
            for delivery_id, _message_id in done.letters:
                removed += lab.forget(delivery_id)
        return removed


def _report(who: Who, done: LedgerErasure, removed: int) -> ErasureReport:
    return ErasureReport(
        status="erased" if done.erased else "already_erased",
        appeal_ids=tuple(a.appeal_id for a in done.appeals),
        appeals_erased=len(done.erased),
        letters_cancelled=len(done.cancelled),
        letters_in_flight=len(done.in_flight),
        letters_out=sum(a.out for a in done.appeals),
        texts_redacted=done.texts_redacted,
        sandbox_files_removed=removed,
        supporter_ref=who.supporter_ref,
    )


def erase(
    ledger: Ledger,
    settings: Settings,
    *,
    actor: str,
    appeal_id: str | None = None,
    email: str | None = None,
    section: str | None = None,
    campaign: str | None = None,
    reason: str | None = None,
    clock: Callable[[], datetime] = utcnow,
) -> ErasureReport:
    """Erase one supporter, named by ``appeal_id`` or ``email`` (optionally within ``section``
    and ``campaign``), on behalf of ``actor`` (an operator's name, ``cli:<user>``,
    ``api:<section>``). Raises :class:`dispatcher.errors.NotFound` when nothing matches
    (nothing is written then) and ValueError when neither or both of appeal id and email are
    given."""
    supporters = Supporters(ledger, settings, clock)
    who = supporters.who(appeal_id=appeal_id, email=email, section=section, campaign=campaign)
    return supporters.erase(who, actor=actor, reason=reason)
