"""When to try a letter again after a transient failure.

Quick blips (a reset connection) are retried in-process by the channel within seconds.
Everything longer lives in the ledger as the delivery's next due time, so no worker holds
a message in memory while an office's line is busy.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime, timedelta


@dataclass(frozen=True)
class RetryPolicy:
    #: delay before the second try; doubles each try
    base_seconds: float = 60.0
    factor: float = 2.0
    max_delay_seconds: float = 3600.0
    #: tries in all (the first one included) before a transient failure becomes final
    max_attempts: int = 10
    #: ± share of the delay, so letters retried together spread out
    jitter: float = 0.2
    #: how long a channel waits after an operational error (bad credentials) before trying again
    operational_pause_seconds: float = 300.0
    #: the longest a letter is retried, counted from its appeal; the campaign deadline ends it
    #: sooner when it comes first. A letter still failing after a week of tries is better
    #: reported to an operator than kept knocking until a six-week deadline.
    max_lifetime_seconds: float = 7 * 86400.0

    def retry_until(self, created_at: datetime | None, deadline: datetime) -> datetime:
        """When tries stop: the campaign deadline, or the lifetime cap if that comes first."""
        if created_at is None:
            return deadline
        return min(deadline, created_at + timedelta(seconds=self.max_lifetime_seconds))

    def next_try(
        self,
        attempt: int,
        now: datetime,
        deadline: datetime,
        retry_after: float | None = None,
        rng: random.Random | None = None,
    ) -> datetime | None:
        """When try ``attempt + 1`` is due, or None if the letter should give up now."""
        if attempt >= self.max_attempts:
            return None
        delay = min(self.base_seconds * self.factor ** (attempt - 1), self.max_delay_seconds)
        delay *= 1 + (rng or random).uniform(-self.jitter, self.jitter)
        if retry_after is not None:
            delay = max(delay, retry_after)
        due = now + timedelta(seconds=delay)
        return due if due < deadline else None
