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
