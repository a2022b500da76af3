"""Office hours in the recipient's timezone, with a calendar of closed days.

A fax rings a real machine in a real office: it goes out only while that office is open, in
its own timezone. Hours are wall-clock times, so every computation goes through the office's
zone (zoneinfo) day by day; an opening at 09:00 is 08:00 UTC in a Zurich winter and 07:00 UTC
in its summer, and the days the clocks change have 23 or 25 hours.

Each local day's ranges become intervals of instants, and ``is_open``, ``next_open`` and
``open_seconds`` all read those intervals, so they always agree. A range starts or ends at the
first instant the office's wall clock shows that time: on the day the clocks skip an hour, an
opening at 02:30 is the moment the clocks jump; on the day an hour repeats, 01:30 is its first
occurrence.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from dispatcher.errors import DispatchError

#: an end of "24:00" (midnight at the end of the day) is stored as this
END_OF_DAY = time.max

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_NINE_TO_FIVE = ((time(9), time(17)),)
DEFAULT_WEEK: Mapping[int, tuple[tuple[time, time], ...]] = {day: _NINE_TO_FIVE for day in range(5)}

_TIME = re.compile(r"^(\d{1,2}):(\d{2})$")
_RANGE_SPLIT = re.compile(r"\s*[-–]\s*")


def _zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, TypeError) as exc:
        raise ValueError(f"unknown timezone {name!r} (use an IANA name such as 'Europe/Zurich')") from exc


def _label(t: time) -> str:
    return "24:00" if t == END_OF_DAY else t.strftime("%H:%M")


def _check_day(day: int, ranges: Sequence[tuple[time, time]]) -> tuple[tuple[time, time], ...]:
    """The day's ranges sorted, or a ValueError saying which one is wrong."""
    if day not in range(7):
        raise ValueError(f"weekday {day!r} is not 0 (Monday) to 6 (Sunday)")
    ordered = sorted((start, end) for start, end in ranges)
    for start, end in ordered:
        if start == END_OF_DAY:
            raise ValueError(f"{DAYS[day]}: a range cannot start at 24:00")
        if end <= start:
            if end < start:
                raise ValueError(
                    f"{DAYS[day]}: {_label(start)}-{_label(end)} crosses midnight; split it into "
                    f"'{_label(start)}-24:00' on one day and '00:00-{_label(end)}' on the next"
                )
            raise ValueError(f"{DAYS[day]}: {_label(start)}-{_label(end)} is empty")
    for (s1, e1), (s2, e2) in itertools.pairwise(ordered):
        if s2 < e1:  # touching ranges (12:00-14:00, 14:00-18:00) are fine
            raise ValueError(f"{DAYS[day]}: {_label(s1)}-{_label(e1)} and {_label(s2)}-{_label(e2)} overlap")
    return tuple(ordered)


@dataclass(frozen=True)
class OfficeHours:
    timezone: str
    #: per weekday (0=Monday) a list of (start, end) local times; default Mon–Fri 09:00–17:00.
    #: An end of ``END_OF_DAY`` (``time.max``) means midnight at the end of the day.
    week: Mapping[int, Sequence[tuple[time, time]]] = field(default_factory=lambda: dict(DEFAULT_WEEK))
    closed: frozenset[date] = frozenset()
    _zone: ZoneInfo = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_zone", _zone(self.timezone))
        week = {day: _check_day(day, ranges) for day, ranges in self.week.items() if ranges}
        if not week:
            raise ValueError("office hours with no open time in the week: a fax could never go out")
        object.__setattr__(self, "week", week)
        object.__setattr__(self, "closed", frozenset(self.closed))

    def __hash__(self) -> int:
        # ``week`` is a dict, so the generated hash would fail; hours are handy as cache keys.
        return hash((self.timezone, tuple(sorted(self.week.items())), self.closed))

    # -- queries

    def is_open(self, at: datetime) -> bool:
        at = _aware(at)
        return any(start <= at < end for start, end in self._around(at))

    def next_open(self, at: datetime) -> datetime:
        """``at`` (in UTC) if the office is open then, else the next opening (UTC)."""
        at = _aware(at).astimezone(UTC)
        # Closed days are finitely many and the week has an open range, so this ends within
        # a week past the last closed day in the way.
        day = self._local_day(at) - timedelta(days=1)
        for _ in range(len(self.closed) + 9):
            for start, end in self._intervals(day):
                if at < end:
                    return max(start, at)
            day += timedelta(days=1)
        raise AssertionError("unreachable: the week has open time")  # pragma: no cover

    def open_seconds(self, start: datetime, end: datetime) -> float:
        """Seconds the office is open between two instants (for spreading letters over time)."""
        start, end = _aware(start).astimezone(UTC), _aware(end).astimezone(UTC)
        total = 0.0
        day = self._local_day(start) - timedelta(days=1)
        last = self._local_day(end) + timedelta(days=1)
        while day <= last:
            for a, b in self._intervals(day):
                overlap = min(b, end) - max(a, start)
                if overlap > timedelta(0):
                    total += overlap.total_seconds()
            day += timedelta(days=1)
        return total

    # -- intervals

    def _local_day(self, at: datetime) -> date:
        return at.astimezone(self._zone).date()

    def _around(self, at: datetime) -> Iterator[tuple[datetime, datetime]]:
        # The day before and after too: a transition at midnight can put an instant's wall date
        # on a neighbouring day's interval.
        day = self._local_day(at)
        for offset in (-1, 0, 1):
            yield from self._intervals(day + timedelta(days=offset))

    def _intervals(self, day: date) -> list[tuple[datetime, datetime]]:
        """The day's open intervals as UTC instants (none on a closed day)."""
        if day in self.closed:
            return []
        out = []
        for start, end in self.week.get(day.weekday(), ()):
            local_end = (
                datetime.combine(day + timedelta(days=1), time(0)) if end == END_OF_DAY else datetime.combine(day, end)
            )
            out.append((self._instant(datetime.combine(day, start)), self._instant(local_end)))
        return out

    def _instant(self, local: datetime) -> datetime:
        """The first instant (UTC) at which the office's wall clock shows ``local`` or later."""
        candidates = []
        for fold in (0, 1):
            instant = local.replace(tzinfo=self._zone, fold=fold).astimezone(UTC)
            if self._wall(instant) == local:
                candidates.append(instant)
        if candidates:
            return min(candidates)  # an hour that happens twice: its first occurrence
        # ``local`` falls in a gap (clocks jumped over it). The two folds read it with the offsets
        # before and after the jump and land on either side of it; find the jump to the second.
        lo_at, hi_at = sorted(local.replace(tzinfo=self._zone, fold=fold).astimezone(UTC) for fold in (0, 1))
        lo, hi = math.floor(lo_at.timestamp()), math.ceil(hi_at.timestamp())
        while hi - lo > 1:  # transitions fall on whole seconds
            mid = (lo + hi) // 2
            if self._wall(datetime.fromtimestamp(mid, UTC)) >= local:
                hi = mid
            else:
                lo = mid
        return datetime.fromtimestamp(hi, UTC)

    def _wall(self, instant: datetime) -> datetime:
        return instant.astimezone(self._zone).replace(tzinfo=None)

    # -- configuration

    @classmethod
    def parse(cls, timezone: str, spec: Mapping[str, Any] | None) -> OfficeHours:
        """Office hours from a config table, e.g.::

            {"mon-fri": "09:00-13:00, 14:00-18:00", "sat": "10:00-12:00",
             "closed": ["2026-12-25", "2027-01-01"]}

        Keys are a day (``mon`` … ``sun``) or a run of days (``mon-fri``, ``sun-thu``); values a
        string of comma-separated ranges, a list of them, or ``"closed"``. Days not named are
        closed; with no day named at all the week is Mon–Fri 09:00–17:00. Raises
        :class:`HoursSpecError` (a ValueError) naming the offending key and value.
        """
        spec = dict(spec or {})
        try:
            _zone(timezone)
        except ValueError as exc:
            raise HoursSpecError("timezone", timezone, str(exc)) from None
        closed = _parse_closed(spec.pop("closed", []))
        if not spec:
            return cls(timezone, dict(DEFAULT_WEEK), closed)
        week: dict[int, list[tuple[time, time]]] = {}
        named_by: dict[int, str] = {}
        for key, value in spec.items():
            ranges = _parse_ranges(key, value)
            for day in _parse_days(key, value):
                if day in named_by:
                    raise HoursSpecError(key, value, f"{DAYS[day]} is already given by {named_by[day]!r}")
                named_by[day] = key
                try:
                    week[day] = list(_check_day(day, ranges))
                except ValueError as exc:
                    raise HoursSpecError(key, value, str(exc)) from None
        if not any(week.values()):
            raise HoursSpecError(
                next(iter(spec)), spec[next(iter(spec))], "every day is closed: a fax could never go out"
            )
        return cls(timezone, week, closed)


class HoursSpecError(DispatchError, ValueError):
    """A problem in an office-hours table; ``key`` and ``value`` say where."""

    def __init__(self, key: str, value: Any, message: str):
        self.key = key
        self.value = value
        super().__init__(f"{key} = {value!r}: {message}")


def _aware(at: datetime) -> datetime:
    if at.tzinfo is None or at.utcoffset() is None:
        raise ValueError(f"{at!r} has no timezone; office hours need an aware datetime")
    return at


def _parse_days(key: str, value: Any) -> list[int]:
    names = _RANGE_SPLIT.split(key.strip().lower()) if isinstance(key, str) else []
    if not 1 <= len(names) <= 2 or any(name not in DAYS for name in names):
        raise HoursSpecError(key, value, "not a day or a run of days (mon, tue, … sun; e.g. 'mon-fri' or 'sun-thu')")
    first, last = DAYS.index(names[0]), DAYS.index(names[-1])
    # A run may wrap past Sunday: 'sun-thu' is a working week in much of the world.
    return [(first + i) % 7 for i in range((last - first) % 7 + 1)]


def _parse_ranges(key: str, value: Any) -> list[tuple[time, time]]:
    if isinstance(value, str):
        if value.strip().lower() in ("closed", ""):
            return []
        parts = value.split(",")
    elif isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
        parts = list(value)
    else:
        raise HoursSpecError(key, value, "expected ranges like '09:00-13:00, 14:00-18:00' or 'closed'")
    ranges = []
    for part in parts:
        bounds = _RANGE_SPLIT.split(part.strip())
        if len(bounds) != 2:
            raise HoursSpecError(key, value, f"{part.strip()!r} is not a range like '09:00-17:00'")
        ranges.append((_parse_time(key, value, bounds[0], end=False), _parse_time(key, value, bounds[1], end=True)))
    return ranges


def _parse_time(key: str, value: Any, text: str, *, end: bool) -> time:
    match = _TIME.match(text)
    if match:
        hour, minute = int(match.group(1)), int(match.group(2))
        if end and (hour, minute) == (24, 0):
            return END_OF_DAY
        if hour < 24 and minute < 60:
            return time(hour, minute)
    raise HoursSpecError(key, value, f"{text!r} is not a time of day like '09:00' (24:00 only as an end)")


def _parse_closed(value: Any) -> frozenset[date]:
    if not isinstance(value, list | tuple):
        raise HoursSpecError("closed", value, "expected a list of dates like ['2026-12-25', '2027-01-01']")
    days = set()
    for item in value:
        # TOML gives real dates; JSON and environment variables give ISO strings.
        if isinstance(item, date) and not isinstance(item, datetime):
            days.add(item)
            continue
        try:
            days.add(date.fromisoformat(item))
        except (TypeError, ValueError):
            raise HoursSpecError("closed", value, f"{item!r} is not a date like '2026-12-25'") from None
    return frozenset(days)
