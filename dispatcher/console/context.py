"""What the console's pages work with: the service's parts it reads and acts through."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from fastapi import Request

from dispatcher.config.catalog import Catalog
from dispatcher.ledger.models import utcnow
from dispatcher.ledger.store import Ledger
from dispatcher.policy.limits import RateLimiter
from dispatcher.settings import Settings
from dispatcher.supporters import Supporters

#: where the API serves the console
PREFIX = "/console"


@dataclass
class ConsoleContext:
    settings: Settings
    catalog: Catalog
    ledger: Ledger
    #: the queue's Redis client (queue depth, workers, the reconciler's lease); None: not shown
    redis: Any = None
    #: counts sign-in attempts; None: sign-ins are not limited (a test's console without Redis)
    limiter: RateLimiter | None = None
    clock: Callable[[], datetime] = field(default=utcnow)
    # The campaigns and letters pages (dispatcher/console/campaigns.py, letters.py):
    #: puts a retried or handed-back letter's message on the queue; None: the reconciler sends it
    enqueuer: Any = None
    #: a letter as rendered (dispatcher/queue/preview.py); None: the letter page shows no letter
    previews: Any = None
    #: the keyed hash of a supporter's email, as intake computes it: the letter search by email
    supporter_ref: Callable[[str], str] | None = None
    #: ``forecast(campaign, now)``: the pacing forecast per recipient (dispatcher/queue/forecast.py)
    forecast: Callable[[str, datetime], list[Any]] | None = None
    #: erasure of a supporter (dispatcher/console/supporters.py); None: one made of the ledger and settings
    supporters: Supporters | None = None

    def now(self) -> datetime:
        return self.clock()

    def section_codes(self) -> list[str]:
        return sorted(self.catalog.sections)

    def channel_keys(self) -> list[str]:
        """Every "channel:section" a route of the configuration sends through: what may be paused."""
        keys: set[str] = set()
        for code, section in self.catalog.sections.items():
            for campaign in section.campaigns:
                if campaign not in self.catalog.campaigns:
                    continue
                keys.update(f"{route.channel}:{code}" for route in self.catalog.routes(campaign, code))
        return sorted(keys)


def context_of(request: Request) -> ConsoleContext:
    """FastAPI dependency: the console's context (set on the console app's state)."""
    ctx: ConsoleContext = request.app.state.console
    return ctx
