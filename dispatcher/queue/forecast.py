"""``dispatcher schedule forecast``: per recipient of a campaign's waiting letters, how many wait,
the pace they will go at, when the last one will go, and whether they all make the deadline.

A recipient's line is shared by every campaign and section, so its load counts every letter
waiting for it, not only this campaign's. The load is the pacer's own (``Pacer.backlog``): the
forecast is the plan the reconciler follows.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select

from dispatcher.ledger.models import WAITING, Delivery
from dispatcher.ledger.store import Ledger
from dispatcher.policy.pacing import Forecast, forecast
from dispatcher.queue.pacer import DigestPreview, Pacer


@dataclass(frozen=True)
class RecipientForecast:
    forecast: Forecast
    #: what digests would change, when the line is short and a route of it allows them
    digest: DigestPreview | None = None


def campaign_forecast(*, ledger: Ledger, pacer: Pacer, campaign: str, now: datetime) -> list[RecipientForecast]:
    with ledger.session() as s:
        routes = s.execute(
            select(Delivery.channel, Delivery.recipient, Delivery.section, Delivery.target)
            .where(Delivery.campaign == campaign, Delivery.state.in_(WAITING))
            .distinct()
        ).all()
    seen: set[tuple[str, str]] = set()
    out = []
    for channel, recipient, section, target_id in routes:
        target = pacer.target_of(campaign, section, target_id)
        if (channel, recipient) in seen or target is None:
            continue
        seen.add((channel, recipient))
        backlog = pacer.backlog(channel, recipient, target, now)
        out.append(RecipientForecast(forecast(backlog.load, now, pacer.policy), pacer.digest_preview(backlog, now)))
    return sorted(out, key=lambda r: (r.forecast.fits, r.forecast.recipient))
