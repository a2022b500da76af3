"""The pacer: which of a capped recipient's waiting letters the reconciler releases now.

It asks the pacing planner (:mod:`dispatcher.policy.pacing`) about the recipient's whole
backlog — every campaign and section, since one embassy line serves them all — and releases as
many letters as the plan says are due, earliest deadline first. The forecast command plans from
the very same load, so what it prints is what the reconciler then does.

Recipients without caps are not paced (the planner would release them all at once anyway); the
reconciler releases their due letters without asking.

Digests (docs/digests.md): when the plan says some letters would miss their deadline, the
never-tried letters of routes whose section allows digests are bundled, one digest per route and
language, and the digest takes one place in the line instead of theirs.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from dispatcher.config.catalog import Catalog
from dispatcher.config.models import Target
from dispatcher.ledger.lifecycle import DigestRoute
from dispatcher.ledger.schedule import DueRecipient
from dispatcher.ledger.store import Ledger
from dispatcher.logging import get_logger
from dispatcher.policy.gate import SendingGate, parsed_rates
from dispatcher.policy.pacing import (
    DEFAULT_POLICY,
    Forecast,
    PacingPolicy,
    RecipientLoad,
    due_now,
    forecast,
    next_release,
)

log = get_logger("dispatcher.pacer")

#: when none of a recipient's letters can make its deadline any more, look again this often (new
#: letters for a later deadline reset the look anyway)
IDLE_LOOK = timedelta(minutes=5)


@dataclass(frozen=True)
class Backlog:
    """One recipient's load for the planner, with its planned letters in the load's order."""

    channel: str
    recipient: str
    load: RecipientLoad
    letters: list[Any]


@dataclass(frozen=True)
class DigestPreview:
    """What digests would do for a recipient whose line is short."""

    #: letters that would go in digests instead of one by one
    letters: int
    #: new digests (letters may also join a digest still waiting)
    digests: int
    #: the forecast with those digests in the line
    after: Forecast


@dataclass(frozen=True)
class _Look:
    #: the recipient's due letters when it was last planned
    due_count: int
    #: when that plan releases its next letter
    next_at: datetime


class Pacer:
    def __init__(
        self, *, ledger: Ledger, catalog: Catalog, gate: SendingGate, policy: PacingPolicy = DEFAULT_POLICY
    ) -> None:
        self.ledger = ledger
        self.catalog = catalog
        self.gate = gate
        self.policy = policy
        self._looks: dict[tuple[str, str], _Look] = {}

    def target_of(self, campaign: str, section: str, target: str) -> Target | None:
        try:
            return self.catalog.target(campaign, section, target)
        except KeyError:
            return None  # no longer configured: the worker pauses such letters, nothing to pace

    def paces(self, due: DueRecipient) -> bool:
        target = self.target_of(due.campaign, due.section, due.target)
        return target is not None and bool(self.gate.rate_texts(target, due.channel))

    def backlog(self, channel: str, recipient: str, target: Target, now: datetime) -> Backlog:
        rates = parsed_rates(self.gate.rate_texts(target, channel))
        window = timedelta(seconds=max((r.seconds for r in rates), default=0))
        found = self.ledger.schedule.recipient_backlog(channel, recipient, now, window)
        dated = [
            (self.catalog.deadline_at(r.campaign, r.section), r)
            for r in found.planned
            if r.campaign in self.catalog.campaigns and r.section in self.catalog.sections
        ]
        # Earliest deadline first, oldest letter first among equals: the planner's order.
        dated.sort(key=lambda pair: (pair[0], pair[1].created_at, pair[1].id))
        load = RecipientLoad(
            recipient=f"{channel}:{recipient}",
            deadlines=[d for d, _ in dated],
            rates=rates,
            hours=self.gate.hours_for(target, channel),
            sent_recently=found.released,
        )
        return Backlog(channel, recipient, load, [r for _, r in dated])

    # ------------------------------------------------------------------ digests

    def _digest_groups(self, backlog: Backlog) -> dict[tuple[str, str, str, str], list[int]]:
        """Per (campaign, section, target, language) whose section allows digests: the indexes of
        its never-tried letters that a digest would carry."""
        waiting_digests = {
            (r.campaign, r.section, r.target, r.language)
            for r in backlog.letters
            if r.kind == "digest" and r.attempts == 0
        }
        groups: dict[tuple[str, str, str, str], list[int]] = {}
        for i, r in enumerate(backlog.letters):
            if r.kind == "letter" and r.attempts == 0 and self.catalog.digest_allowed(r.campaign, r.section, r.target):
                groups.setdefault((r.campaign, r.section, r.target, r.language), []).append(i)
        # One letter alone is no digest, unless a digest for its route is still waiting to go.
        return {k: v for k, v in groups.items() if len(v) > 1 or k in waiting_digests}

    def _groups_if_short(self, backlog: Backlog, now: datetime) -> dict[tuple[str, str, str, str], list[int]]:
        """The digest groups, when the line cannot carry every letter before its deadline (the
        full plan is only made when some route allows digests)."""
        groups = self._digest_groups(backlog)
        if not groups or forecast(backlog.load, now, self.policy).fits:
            return {}
        return groups

    def digest_preview(self, backlog: Backlog, now: datetime) -> DigestPreview | None:
        """What digests would change, when the line is short and some route allows them."""
        groups = self._groups_if_short(backlog, now)
        if not groups:
            return None
        existing = {(r.campaign, r.section, r.target, r.language) for r in backlog.letters if r.kind == "digest"}
        bundled = {i for indexes in groups.values() for i in indexes}
        deadlines = [d for i, d in enumerate(backlog.load.deadlines) if i not in bundled]
        new = [k for k in groups if k not in existing]
        deadlines += [self.catalog.deadline_at(campaign, section) for campaign, section, _t, _l in new]
        after = forecast(replace(backlog.load, deadlines=sorted(deadlines)), now, self.policy)
        return DigestPreview(letters=len(bundled), digests=len(new), after=after)

    def _bundle_if_short(self, backlog: Backlog, now: datetime) -> bool:
        bundled = False
        for (campaign, section, target, language), indexes in self._groups_if_short(backlog, now).items():
            letters = [backlog.letters[i] for i in indexes]
            route = DigestRoute(
                campaign=campaign,
                section=section,
                target=target,
                channel=backlog.channel,
                recipient=backlog.recipient,
                language=language,
                domain=self.catalog.sections[section].sender.domain,
            )
            done = self.ledger.lifecycle.bundle(
                [r.id for r in letters], route, now, oldest=min(r.created_at for r in letters)
            )
            if done is not None:
                bundled = True
                log.info(
                    "digest.bundled",
                    digest=done[0],
                    letters=done[1],
                    campaign=campaign,
                    section=section,
                    target=target,
                    channel=backlog.channel,
                    language=language,
                )
        return bundled

    def forget(self) -> None:
        """Plan every recipient afresh (another reconciler may have released letters meanwhile)."""
        self._looks.clear()

    def release(
        self, due: DueRecipient, now: datetime, *, fresh_grace: timedelta, tick: timedelta = timedelta(0)
    ) -> list[str]:
        """Ids of the recipient's letters to release now (none between its planned releases);
        ``tick``: the caller's interval, see :func:`~dispatcher.policy.pacing.due_now`."""
        key = (due.channel, due.recipient)
        look = self._looks.get(key)
        if look is not None and look.due_count == due.count and now < look.next_at:
            return []
        target = self.target_of(due.campaign, due.section, due.target)
        if target is None:
            return []
        backlog = self.backlog(due.channel, due.recipient, target, now)
        if self._bundle_if_short(backlog, now):
            backlog = self.backlog(due.channel, due.recipient, target, now)
        how_many = len(due_now(backlog.load, now, self.policy, horizon=tick))
        # The plan says how many may go now; which go are the earliest-deadline letters that are
        # due themselves (a retry in its backoff stays where it is).
        ready = [
            i
            for i, r in enumerate(backlog.letters)
            if r.next_attempt_at <= now and (r.attempts > 0 or r.updated_at <= now - fresh_grace)
        ]
        chosen = set(ready[:how_many])
        rest = replace(
            backlog.load,
            deadlines=[d for i, d in enumerate(backlog.load.deadlines) if i not in chosen],
            sent_recently=[*backlog.load.sent_recently, *([now] * len(chosen))],
        )
        upcoming = next_release(rest, now, self.policy)
        self._looks[key] = _Look(due.count - len(chosen), upcoming if upcoming is not None else now + IDLE_LOOK)
        return [backlog.letters[i].id for i in sorted(chosen)]
