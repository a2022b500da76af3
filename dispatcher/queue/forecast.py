"""``dispatcher schedule forecast``: per recipient of a campaign's waiting letters, how many wait,
the pace they will go at, when the last one will go, and whether they all make the deadline.

A recipient's line is shared by every campaign and section, so its load counts every letter
waiting for it, not only this campaign's.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import cast

from sqlalchemy import select

from dispatcher.config.catalog import Catalog
from dispatcher.config.models import Channel
from dispatcher.ledger.models import WAITING, Delivery
from dispatcher.ledger.store import Ledger
from dispatcher.policy.gate import SendingGate
from dispatcher.policy.limits import Rate
from dispatcher.policy.pacing import Forecast, RecipientLoad, forecast


def campaign_forecast(
    *, ledger: Ledger, catalog: Catalog, gate: SendingGate, campaign: str, now: datetime
) -> list[Forecast]:
    with ledger.session() as s:
        recipients = s.execute(
            select(Delivery.channel, Delivery.recipient, Delivery.section, Delivery.target)
            .where(Delivery.campaign == campaign, Delivery.state.in_(WAITING))
            .distinct()
        ).all()
    seen: set[tuple[str, str]] = set()
    out = []
    for channel, recipient, section, target_id in recipients:
        if (channel, recipient) in seen:
            continue
        seen.add((channel, recipient))
        target = catalog.target(campaign, section, target_id)
        channel = cast(Channel, channel)
        rates = [Rate.parse(t) for t in gate.rate_texts(target, channel)]
        window = timedelta(seconds=max((r.seconds for r in rates), default=0))
        with ledger.session() as s:
            waiting = s.execute(
                select(Delivery.campaign, Delivery.section).where(
                    Delivery.channel == channel, Delivery.recipient == recipient, Delivery.state.in_(WAITING)
                )
            ).all()
            sent = s.scalars(
                select(Delivery.sent_at)
                .where(Delivery.channel == channel, Delivery.recipient == recipient, Delivery.sent_at >= now - window)
                .order_by(Delivery.sent_at)
            ).all()
        deadlines = sorted(
            catalog.deadline_at(c, sec) for c, sec in waiting if c in catalog.campaigns and sec in catalog.sections
        )
        load = RecipientLoad(
            recipient=f"{channel}:{recipient}",
            deadlines=deadlines,
            rates=rates,
            hours=gate.hours_for(target, channel),
            sent_recently=[t for t in sent if t is not None],
        )
        out.append(forecast(load, now))
    return sorted(out, key=lambda f: (f.fits, f.recipient))
