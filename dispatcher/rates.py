"""Rates as config and settings write them ("2/hour", "10/minute", "5/30s"): a value type with
no dependencies, so that settings, config models and the policy that enforces rates can all
read them (:mod:`dispatcher.policy.limits` holds them in Redis)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

#: Redis keeps times and windows in integer microseconds
MICROS = 1_000_000

_UNITS = {
    "s": 1, "sec": 1, "second": 1, "seconds": 1,
    "m": 60, "min": 60, "minute": 60, "minutes": 60,
    "h": 3600, "hour": 3600, "hours": 3600,
    "d": 86400, "day": 86400, "days": 86400,
}  # fmt: skip
_RATE = re.compile(r"^\s*(\d+)\s*/\s*(\d+(?:\.\d+)?)?\s*([A-Za-z]+)\s*$")


@dataclass(frozen=True)
class Rate:
    """At most ``count`` letters in any ``seconds``-long window."""

    count: int
    seconds: float

    def __post_init__(self) -> None:
        if isinstance(self.count, bool) or not isinstance(self.count, int) or self.count < 1:
            raise ValueError(f"a rate's count must be a whole number of at least 1, not {self.count!r}")
        # A window under a millisecond would expire its keys before it ends (PEXPIRE is in ms).
        if not self.seconds >= 0.001 or math.isinf(self.seconds):
            raise ValueError(f"a rate's window must be at least 1 ms, not {self.seconds!r} s")

    @classmethod
    def parse(cls, text: str) -> Rate:
        """``"2/hour"``, ``"10/minute"``, ``"100/day"``, ``"5/30s"``, ``"3/2h"``."""
        match = _RATE.match(text) if isinstance(text, str) else None
        unit = _UNITS.get(match.group(3).lower()) if match else None
        if match is None or unit is None:
            raise ValueError(
                f"rate {text!r} is not 'N/window' with a unit, e.g. '2/hour', '10/minute', '100/day' or '5/30s'"
            )
        multiple = float(match.group(2)) if match.group(2) else 1.0
        return cls(int(match.group(1)), multiple * unit)

    @property
    def micros(self) -> int:
        return round(self.seconds * MICROS)

    def __str__(self) -> str:
        return f"{self.count}/{self.seconds:g}s"
