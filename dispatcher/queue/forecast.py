"""``dispatcher schedule forecast``: per recipient of a campaign's waiting letters, how many wait,
the pace they will go at, when the last one will go, and whether they all make the deadline.

A recipient's line is shared by every campaign and section, so its load counts every letter
waiting for it, not only this campaign's. The load is the pacer's own (``Pacer.backlog``): the
forecast is the plan the reconciler follows.

A recipient whose address is suppressed (known to bounce) sends nothing: its letters go by the
route's fallback channel when there is one, or fail; the forecast says which, and how many.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta

from sqlalchemy import func, select

from dispatcher.ledger.models import WAITING, Delivery
from dispatcher.ledger.store import Ledger
from dispatcher.policy.pacing import Forecast, PacingPolicy, RecipientLoad, forecast, release_times
from dispatcher.queue.fallback import Fallback
from dispatcher.queue.pacer import DigestPreview, Pacer


@dataclass(frozen=True)
class FallbackPreview:
    """A suppressed recipient's waiting letters of this campaign: where they will go instead."""

    #: why the address is suppressed ("address known to bounce (since ...: 5.1.1 ...)")
    reason: str
    #: letters that go by each fallback channel instead
    rerouted: dict[str, int] = field(default_factory=dict)
    #: letters whose route has no fallback: they will fail
    failing: int = 0


@dataclass(frozen=True)
class RecipientForecast:
    forecast: Forecast
    #: what digests would change, when the line is short and a route of it allows them
    digest: DigestPreview | None = None
    #: the address is known to bounce: its letters go by fallback (or fail)
    fallback: FallbackPreview | None = None
    #: letters released each day (UTC) from today to the last deadline of the recipient's
    #: waiting letters, on the plan the pacer follows: the console's chart. Days without a
    #: release count 0; letters that miss their deadline are not in it (``forecast.shortfall``).
    per_day: tuple[tuple[date, int], ...] = ()
    #: the latest deadline among the recipient's waiting letters (any campaign: the line is shared)
    deadline: datetime | None = None
    #: the sections and targets of this campaign whose waiting letters go to this recipient (the
    #: console shows a scoped operator only the recipients of its sections)
    sections: frozenset[str] = frozenset()
    targets: frozenset[str] = frozenset()


def campaign_forecast(
    *, ledger: Ledger, pacer: Pacer, campaign: str, now: datetime, fallback: Fallback | None = None
) -> list[RecipientForecast]:
    with ledger.session() as s:
        routes = s.execute(
            select(Delivery.channel, Delivery.recipient, Delivery.section, Delivery.target, func.count())
            .where(Delivery.campaign == campaign, Delivery.state.in_(WAITING))
            .group_by(Delivery.channel, Delivery.recipient, Delivery.section, Delivery.target)
        ).all()
    seen: set[tuple[str, str]] = set()
    out = []
    for channel, recipient, section, target_id, _ in routes:
        target = pacer.target_of(campaign, section, target_id)
        if (channel, recipient) in seen or target is None:
            continue
        seen.add((channel, recipient))
        backlog = pacer.backlog(channel, recipient, target, now)
        preview = None
        if fallback is not None:
            groups = [(sec, tid, n) for ch, rcpt, sec, tid, n in routes if (ch, rcpt) == (channel, recipient)]
            preview = _fallback(ledger, fallback, campaign, channel, recipient, groups)
        mine = [(sec, tid) for ch, rcpt, sec, tid, _n in routes if (ch, rcpt) == (channel, recipient)]
        out.append(
            RecipientForecast(
                forecast(backlog.load, now, pacer.policy),
                pacer.digest_preview(backlog, now),
                fallback=preview,
                per_day=per_day(backlog.load, now, pacer.policy),
                deadline=max(backlog.load.deadlines, default=None),
                sections=frozenset(sec for sec, _t in mine),
                targets=frozenset(tid for _s, tid in mine),
            )
        )
    return sorted(out, key=lambda r: (r.forecast.fits, r.forecast.recipient))


def per_day(load: RecipientLoad, now: datetime, policy: PacingPolicy) -> tuple[tuple[date, int], ...]:
    """The plan's releases counted per UTC day, every day from ``now``'s to the last deadline's."""
    if not load.deadlines:
        return ()
    counts = Counter(max(t, now).date() for t in release_times(load, now, policy))
    first, last = now.date(), max(load.deadlines).date()
    if counts:
        last = max(last, max(counts))
    days = []
    day = first
    while day <= last:
        days.append((day, counts.get(day, 0)))
        day += timedelta(days=1)
    return tuple(days)


def _fallback(
    ledger: Ledger,
    fallback: Fallback,
    campaign: str,
    channel: str,
    recipient: str,
    groups: list[tuple[str, str, int]],
) -> FallbackPreview | None:
    suppressed = ledger.suppressions.find(channel, recipient)
    if suppressed is None:
        return None
    rerouted: Counter[str] = Counter()
    failing = 0
    for section, target_id, count in groups:
        replan = fallback.replan(campaign=campaign, section=section, target=target_id, channel=channel)
        if replan is None:
            failing += count
        else:
            rerouted[replan.channel] += count
    return FallbackPreview(suppressed.describe(), dict(rerouted), failing)
