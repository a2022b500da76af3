"""The overview page: what is going on, at a glance.

Letters (per channel: sent, delivered, failed, deferred in the last hour and day; letters not yet
final by state) are counted in the operator's sections only. Facts about the whole service are
shown to everyone: paused channels, dead letters, flagged fax numbers, suppressed addresses, the
queue in Redis (depth, the oldest waiting message), the workers alive and the reconciler's lease
and last tick. Definitions of the counts: :class:`dispatcher.ledger.views.Activity`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

from dispatcher.console.pages import render
from dispatcher.console.scope import Context, CurrentOperator
from dispatcher.ledger.controls import Pause
from dispatcher.ledger.states import State
from dispatcher.ledger.views import Activity
from dispatcher.queue.status import QueueStatus, queue_status

router = APIRouter()

#: a reconciler whose last tick is older than this is shown as a problem
TICK_LATE = timedelta(seconds=30)


@dataclass(frozen=True)
class Overview:
    now: datetime
    hour: dict[str, Activity]
    day: dict[str, Activity]
    in_hand: dict[State, int]
    queue: QueueStatus | None
    paused: list[Pause]
    dead_letters: int
    flagged: int
    suppressed: int

    @property
    def channels(self) -> list[str]:
        return sorted(set(self.hour) | set(self.day))

    def age(self, at: datetime | None) -> str:
        """How long ago, for people: "42 s", "7 min", "3 h 5 min", "2 d 4 h"."""
        if at is None:
            return "—"
        seconds = max(0, int((self.now - at).total_seconds()))
        if seconds < 120:
            return f"{seconds} s"
        minutes = seconds // 60
        if minutes < 120:
            return f"{minutes} min"
        hours = minutes // 60
        if hours < 48:
            return f"{hours} h {minutes % 60} min"
        return f"{hours // 24} d {hours % 24} h"

    @property
    def tick_late(self) -> bool:
        tick = self.queue.reconciler_tick if self.queue else None
        return tick is None or self.now - tick > TICK_LATE


@router.get("/", response_class=HTMLResponse)
def overview(request: Request, operator: CurrentOperator, ctx: Context) -> HTMLResponse:
    now = ctx.now()
    views, controls = ctx.ledger.views, ctx.ledger.controls
    facts = Overview(
        now=now,
        hour=views.activity(now - timedelta(hours=1), sections=operator.scope),
        day=views.activity(now - timedelta(days=1), sections=operator.scope),
        in_hand=views.in_hand(sections=operator.scope),
        queue=queue_status(ctx.redis, ctx.settings.redis_namespace) if ctx.redis is not None else None,
        paused=list(controls.paused_channels().values()),
        dead_letters=views.dead_letter_count(),
        flagged=len(controls.flagged_numbers()),
        suppressed=ctx.ledger.suppressions.count(),
    )
    return render(request, "overview.html", nav="Overview", o=facts)
