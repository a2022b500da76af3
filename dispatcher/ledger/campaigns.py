"""Campaigns as operators read them: letters by state, by section and by target.

Every count is limited to the sections the reader may see (``sections`` None: all of them), so an
operator of one section never learns another's numbers. Digests are counted as letters of their
own kind apart: a digest's letters are counted once, as the letters they are (``bundled`` while it
waits, then as it ends).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

from sqlalchemy import Engine, func, select

from dispatcher.ledger.engine import reading
from dispatcher.ledger.states import LETTER_OUT, State
from dispatcher.ledger.tables import AP, D

#: the columns the console shows, in order, and the states each adds up
GROUPS: Mapping[str, tuple[State, ...]] = {
    "waiting": (State.PLANNED, State.QUEUED, State.BUNDLED),
    "sending": (State.SENDING,),
    "out": LETTER_OUT,
    "failed": (State.FAILED, State.BOUNCED),
    "expired": (State.EXPIRED,),
    "cancelled": (State.CANCELLED, State.REROUTED),
}


@dataclass(frozen=True)
class StateCounts:
    by_state: Mapping[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.by_state.values())

    def group(self, name: str) -> int:
        return sum(self.by_state.get(s.value, 0) for s in GROUPS[name])

    @staticmethod
    def of(counter: Counter[str]) -> StateCounts:
        return StateCounts(dict(counter))


@dataclass(frozen=True)
class CampaignTotals:
    campaign: str
    appeals: int
    letters: StateCounts


@dataclass(frozen=True)
class CampaignCounts:
    campaign: str
    appeals: int
    letters: StateCounts
    appeals_by_section: Mapping[str, int]
    by_section: Mapping[str, StateCounts]
    #: (target, channel) → counts
    by_target: Mapping[tuple[str, str], StateCounts]


class CampaignReads:
    def __init__(self, engine: Engine):
        self.reads = reading(engine)

    def totals(self, *, sections: Collection[str] | None) -> dict[str, CampaignTotals]:
        """Every campaign with appeals in ``sections``: its appeals and its letters by state."""
        scope_d = [] if sections is None else [D.c.section.in_(sorted(sections))]
        scope_a = [] if sections is None else [AP.c.section.in_(sorted(sections))]
        with self.reads.connect() as conn:
            appeals: dict[str, int] = {
                c: n
                for c, n in conn.execute(
                    select(AP.c.campaign, func.count()).where(*scope_a).group_by(AP.c.campaign)
                ).all()
            }
            letters: dict[str, Counter[str]] = {}
            for campaign, state, n in conn.execute(
                select(D.c.campaign, D.c.state, func.count())
                .where(D.c.kind == "letter", *scope_d)
                .group_by(D.c.campaign, D.c.state)
            ):
                letters.setdefault(campaign, Counter())[state] += n
        names = set(appeals) | set(letters)
        return {
            c: CampaignTotals(c, appeals.get(c, 0), StateCounts.of(letters.get(c, Counter()))) for c in sorted(names)
        }

    def counts(self, campaign: str, *, sections: Collection[str] | None) -> CampaignCounts:
        scope_d = [] if sections is None else [D.c.section.in_(sorted(sections))]
        scope_a = [] if sections is None else [AP.c.section.in_(sorted(sections))]
        with self.reads.connect() as conn:
            appeals: dict[str, int] = {
                sec: n
                for sec, n in conn.execute(
                    select(AP.c.section, func.count()).where(AP.c.campaign == campaign, *scope_a).group_by(AP.c.section)
                ).all()
            }
            rows = conn.execute(
                select(D.c.section, D.c.target, D.c.channel, D.c.state, func.count())
                .where(D.c.campaign == campaign, D.c.kind == "letter", *scope_d)
                .group_by(D.c.section, D.c.target, D.c.channel, D.c.state)
            ).all()
        everything: Counter[str] = Counter()
        by_section: dict[str, Counter[str]] = {}
        by_target: dict[tuple[str, str], Counter[str]] = {}
        for section, target, channel, state, n in rows:
            everything[state] += n
            by_section.setdefault(section, Counter())[state] += n
            by_target.setdefault((target, channel), Counter())[state] += n
        return CampaignCounts(
            campaign=campaign,
            appeals=sum(appeals.values()),
            letters=StateCounts.of(everything),
            appeals_by_section=appeals,
            by_section={k: StateCounts.of(v) for k, v in sorted(by_section.items())},
            by_target={k: StateCounts.of(v) for k, v in sorted(by_target.items())},
        )
