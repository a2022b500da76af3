"""Pacing: when each letter waiting for one official should be released to the queue.

Pure planning, no database and no Redis: the caller (the reconciler, the CLI's forecast) reads a
recipient's waiting letters, its caps, office hours and recent releases, and asks
:func:`release_times` when each letter should go, or :func:`forecast` for the summary. The same
input always gives the same plan, and the forecast is computed from that very plan.

The rule (docs/pacing.md explains the choices):

* letters go in deadline order (ties in the caller's order);
* a recipient without caps is not paced: its letters all go now (or at the next opening);
* the pace is uniform in *open* time: ``gap`` open seconds between releases, just enough for the
  last letter of every deadline to go ``margin`` before it — but never slower than
  ``slowest_share`` of what the caps allow (holding three letters for six weeks helps nobody) and
  never faster than the caps allow;
* hard limits, whatever the pace says: every cap holds exactly in every sliding window (counting
  ``sent_recently``), releases only while the office is open, and consecutive releases at least
  the caps' even spacing apart (no bursts, even when catching up);
* a letter that cannot go before its own deadline does not take a slot from one that can: it
  goes to the end of the plan (the reconciler will expire it);
* the plan replays the reconciler: each release is decided as a re-plan at that instant would
  decide it, so what is forecast is what happens.

Rates and office hours come from :mod:`dispatcher.policy.limits` and
:mod:`dispatcher.policy.hours`; this module only needs the small protocols below.
"""

from __future__ import annotations

import math
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Protocol


class RateLike(Protocol):
    """A cap: at most ``count`` releases in any window of ``seconds`` (``limits.Rate`` fits)."""

    @property
    def count(self) -> int: ...

    @property
    def seconds(self) -> float: ...


class HoursLike(Protocol):
    """Office hours as half-open intervals ``[opens, closes)`` (``hours.OfficeHours`` fits)."""

    def next_open(self, at: datetime) -> datetime:
        """``at`` if open then, else the next opening."""
        ...

    def open_seconds(self, start: datetime, end: datetime) -> float:
        """Open seconds between two instants."""
        ...


class _AlwaysOpen:
    def next_open(self, at: datetime) -> datetime:
        return at

    def open_seconds(self, start: datetime, end: datetime) -> float:
        return max(0.0, (end - start).total_seconds())


_ALWAYS = _AlwaysOpen()


@dataclass(frozen=True)
class PacingPolicy:
    #: the last letter for a deadline should go this long before it: room for retries (busy
    #: fax lines back off for hours) and for the letters still to be signed. A fixed length,
    #: not a share of the time left: re-planned every tick, a share would keep sliding the target
    #: towards the deadline.
    margin: timedelta = timedelta(days=1)
    #: never slower than this share of the caps' pace, however far the deadline
    slowest_share: float = 0.25

    def __post_init__(self) -> None:
        if not 0 < self.slowest_share <= 1:
            raise ValueError(f"slowest_share must be in (0, 1], not {self.slowest_share!r}")
        if self.margin < timedelta(0):
            raise ValueError("margin must not be negative")


DEFAULT_POLICY = PacingPolicy()


@dataclass(frozen=True)
class RecipientLoad:
    """Everything waiting for one recipient (one address serves every campaign and section)."""

    recipient: str
    #: one per waiting letter: the deadline of its campaign and section (aware). Per letter, not
    #: the earliest for all: a fax line shared by a UA closing tomorrow and one closing in six
    #: weeks must not rush (or write off) the second for the first. Equal deadlines keep this
    #: order, so pass letters oldest first.
    deadlines: Sequence[datetime]
    #: caps, e.g. 2/hour and 10/day; empty = no cap
    rates: Sequence[RateLike] = ()
    #: office hours; None = always open (email)
    hours: HoursLike | None = None
    #: releases that count against the caps: every release inside the longest cap window, plus
    #: the latest release even if older (the pace is measured from it)
    sent_recently: Sequence[datetime] = ()

    def __post_init__(self) -> None:
        deadlines = tuple(_utc(d, "deadline") for d in self.deadlines)
        sent = tuple(sorted(_utc(t, "sent_recently") for t in self.sent_recently))
        object.__setattr__(self, "deadlines", deadlines)
        object.__setattr__(self, "sent_recently", sent)
        object.__setattr__(self, "rates", tuple(self.rates))
        for rate in self.rates:
            if rate.count < 1 or not rate.seconds > 0:
                raise ValueError(f"a cap needs a count of at least 1 and a positive window, not {rate!r}")

    @classmethod
    def uniform(
        cls,
        recipient: str,
        waiting: int,
        deadline: datetime,
        *,
        rates: Sequence[RateLike] = (),
        hours: HoursLike | None = None,
        sent_recently: Sequence[datetime] = (),
    ) -> RecipientLoad:
        """``waiting`` letters that share one deadline."""
        return cls(recipient, (deadline,) * waiting, rates, hours, sent_recently)

    @property
    def waiting(self) -> int:
        return len(self.deadlines)

    @property
    def deadline(self) -> datetime | None:
        """The earliest deadline among the waiting letters."""
        return min(self.deadlines, default=None)


@dataclass(frozen=True)
class Forecast:
    recipient: str
    waiting: int
    #: the pace of the next release, in letters per *open* hour (inf: no cap and no time left);
    #: it may slow down later, once the earliest deadline's letters are out
    rate_per_hour: float
    first_at: datetime | None
    last_at: datetime | None
    #: every letter goes before its deadline
    fits: bool
    fits_count: int
    shortfall: int


def release_times(load: RecipientLoad, now: datetime, policy: PacingPolicy = DEFAULT_POLICY) -> list[datetime]:
    """When each waiting letter should be released, aligned with ``load.deadlines`` (UTC).

    Spread evenly over the open time left before the deadlines, never faster than any cap
    allows in any window, only within office hours; if capacity is short, as fast as the caps
    allow, and the letters that cannot make it come last. Release a letter once its time is
    ``<= now``; re-planning with it in ``sent_recently`` gives the same times for the rest.
    """
    times, _gap = _plan(load, _utc(now, "now"), policy)
    return [t for t in times if t is not None]


def due_now(
    load: RecipientLoad, now: datetime, policy: PacingPolicy = DEFAULT_POLICY, horizon: timedelta = timedelta(0)
) -> list[int]:
    """Indexes into ``load.deadlines`` of the letters to release now, in release order.

    The letters whose :func:`release_times` is ``<= now`` and before their deadline (one whose
    deadline has passed is the ledger's to expire, not the queue's), but the plan stops at the
    first letter that is not due: the reconciler's per-tick question costs as many steps as
    there are letters to release, not as many as are waiting.

    ``horizon`` is the caller's tick: once a letter is due, the letters planned to follow it
    before ``now + horizon`` go with it. With caps faster than the tick (1000/hour, a one-second
    tick) one release per tick would be far slower than the plan. The first letter is never
    early, so caps slower than the tick keep their exact times.
    """
    now = _utc(now, "now")
    until = now + horizon
    times, _gap = _plan(load, now, policy, until=until)
    due = sorted((t, i) for i, t in enumerate(times) if t is not None and t < load.deadlines[i] and t <= until)
    if not due or due[0][0] > now:
        return []
    return [i for _t, i in due]


def next_release(load: RecipientLoad, now: datetime, policy: PacingPolicy = DEFAULT_POLICY) -> datetime | None:
    """When the next letter that can still make its deadline should be released (``<= now``:
    at once), or None if none can. Plans only that one: a cheap "when do I look again?"."""
    now = _utc(now, "now")
    times, _gap = _plan(load, now, policy, first_only=True)
    return next((t for i, t in enumerate(times) if t is not None and t < load.deadlines[i]), None)


def forecast(load: RecipientLoad, now: datetime, policy: PacingPolicy = DEFAULT_POLICY) -> Forecast:
    """The summary of :func:`release_times` for the same input (the same plan, not an estimate)."""
    planned, gap = _plan(load, _utc(now, "now"), policy)
    times = [t for t in planned if t is not None]
    # A letter released at its deadline is already expired (the ledger expires at now >= deadline).
    fits_count = sum(1 for t, d in zip(times, load.deadlines, strict=True) if t < d)
    rate = (3600.0 / gap if gap > 0 else math.inf) if times else 0.0
    return Forecast(
        recipient=load.recipient,
        waiting=load.waiting,
        rate_per_hour=rate,
        first_at=min(times, default=None),
        last_at=max(times, default=None),
        fits=fits_count == len(times),
        fits_count=fits_count,
        shortfall=len(times) - fits_count,
    )


# ----------------------------------------------------------------------------- the plan


def _plan(
    load: RecipientLoad,
    now: datetime,
    policy: PacingPolicy,
    until: datetime | None = None,
    first_only: bool = False,
) -> tuple[list[datetime | None], float]:
    """(release time per letter, the pace of the first release as a gap in open seconds).

    The plan plays the reconciler forward: after each release it decides the next one exactly as
    a re-plan at that instant would (same rule, the release now in ``sent_recently``), so the
    forecast is what the scheduler will do, also when the pace changes on the way (the earliest
    deadline's letters are out, a cap held one back). With ``until``, letters released after it
    are left as None and not planned at all; with ``first_only``, only the first release is.
    """
    n = load.waiting
    times: list[datetime | None] = [None] * n
    if n == 0:
        return times, 0.0
    deadlines = load.deadlines
    hours: HoursLike = load.hours if load.hours is not None else _ALWAYS
    sent = list(load.sent_recently)
    cap_gap = _cap_gap(load.rates, hours)
    # A recipient without caps has said it takes whatever comes: spreading its letters would only
    # delay them, so they all go at once (within office hours).
    slowest = cap_gap / policy.slowest_share if load.rates else 0.0

    # Open time from ``now`` to each deadline's target, measured once; at a later instant the
    # room left is that minus the open time passed since ``now`` (``passed``).
    ordered_deadlines = sorted(set(deadlines))
    targets = {d: _open(hours, now, d - policy.margin) for d in ordered_deadlines}
    unplaced = Counter(deadlines)
    pending = deque(sorted(range(n), key=lambda i: (deadlines[i], i)))
    late: deque[int] = deque()
    clock, passed = now, 0.0
    since_last = _open(hours, sent[-1], now) if sent else None
    pace_now: float | None = None

    while pending or late:
        # Letters whose deadline passed are expired by the ledger: they no longer set the pace.
        groups = [
            (max(0.0, targets[d] - passed), unplaced[d]) for d in ordered_deadlines if d > clock and unplaced[d] > 0
        ]
        needed, from_last = _needed_gap(groups, since_last)
        # Not rounded to whole seconds: each re-plan would round on its own and drift from this plan.
        gap = max(cap_gap, min(needed, slowest))
        # On schedule, the next letter is due a gap after the latest release (so re-planning right
        # after a release keeps the pace instead of releasing the next letter at once); behind
        # schedule, it is due now.
        offset = max(0.0, gap - since_last) if from_last and since_last is not None else 0.0
        at = _earliest(_advance(hours, clock, offset), sent, load.rates, cap_gap, hours)
        if until is not None and at > until:
            break  # every later release is later still
        if pending and deadlines[pending[0]] <= at:
            # The earliest deadline passes before the next release: its letters cannot make it
            # and wait for the end (the ledger expires them), and the pace is set again without
            # them from that instant, as the reconciler will.
            expiry = max(clock, deadlines[pending[0]])
            step = _open(hours, clock, expiry)
            passed += step
            since_last = since_last + step if since_last is not None else None
            clock = expiry
            while pending and deadlines[pending[0]] <= clock:
                late.append(pending.popleft())
            continue
        # Earliest deadline first (ties in the caller's order); the late ones last.
        i = pending.popleft() if pending else late.popleft()
        if pace_now is None:
            pace_now = gap
        times[i] = at
        sent.append(at)
        unplaced[deadlines[i]] -= 1
        passed += _open(hours, clock, at)
        clock, since_last = at, 0.0
        if first_only:
            break
    return times, pace_now if pace_now is not None else 0.0


def _needed_gap(groups: Sequence[tuple[float, int]], since_last: float | None) -> tuple[float, bool]:
    """The slowest uniform gap (open seconds) that gets every deadline's letters out in time.

    ``groups``: per deadline, earliest first, the open seconds left until its target and how many
    letters it has; each target must hold all the letters of its deadline and of earlier ones.
    Also says whether the gap counts from the latest release (True) or the first letter is due now.
    """
    if not groups:
        return 0.0, False
    immediate = anchored = math.inf
    k = 0
    for room, count in groups:
        k += count
        # Each letter has a slot of one gap and goes at its start, so the last goes a whole gap
        # before the target: never at the very end of the room, which is often a closing time
        # (the target in a night or a weekend) and would put it on the next opening instead.
        # The first letter goes now...
        immediate = min(immediate, room / k)
        # ... or, continuing from the latest release, a gap after it.
        if since_last is not None:
            anchored = min(anchored, (since_last + room) / (k + 1))
    # Continue from the latest release while the next letter is not yet overdue; a plan made
    # right after a release then keeps the pace of the plan made before it.
    if since_last is not None and since_last <= anchored:
        return anchored, True
    return immediate, False


def _cap_gap(rates: Sequence[RateLike], hours: HoursLike) -> float:
    """The caps' pace as a gap in open seconds: each cap's allowance spread evenly over the most
    open time one of its windows can hold; the strictest cap wins.

    2/hour gives 30 minutes. 10/day with 09–17 office hours gives 48 minutes (ten letters over
    the open day), not 2.4 hours, which would use less than half of what the cap allows.
    """
    gap = 0.0
    for rate in rates:
        gap = max(gap, _window_open_seconds(hours, float(rate.seconds)) / rate.count)
    return gap


#: Where windows are measured: a fixed week, so that every plan and re-plan, whenever it is made,
#: gets the same pace (measured from "now", a clock change or a holiday in the coming week would
#: change it between one release and the next). January 2001: no clock changes anywhere, and no
#: list of closed days reaches that far back.
_REFERENCE_WEEK = datetime(2001, 1, 8, tzinfo=UTC)  # a Monday
_SAMPLE_STEP = timedelta(hours=1)
_SAMPLES = 7 * 24


def _window_open_seconds(hours: HoursLike, seconds: float) -> float:
    """The most open time in any ``seconds``-long window of a week of office hours.

    The most is held by a window that starts at an opening, and an hourly sample of a week
    lands on (or, through ``next_open``, moves to) every opening of a weekly schedule.
    """
    if isinstance(hours, _AlwaysOpen):
        return seconds
    length = timedelta(seconds=seconds)
    best = 0.0
    starts: set[datetime] = set()
    for k in range(_SAMPLES):
        start = hours.next_open(_REFERENCE_WEEK + k * _SAMPLE_STEP)
        if start in starts:
            continue
        starts.add(start)
        best = max(best, hours.open_seconds(start, start + length))
        if best >= seconds:
            return seconds
    return best


def _earliest(
    ideal: datetime, sent: Sequence[datetime], rates: Sequence[RateLike], min_gap: float, hours: HoursLike
) -> datetime:
    """The first open instant at or after ``ideal`` that every cap allows after ``sent``.

    Every bound is a lower bound, so one pass is enough: a cap "count per seconds" admits a new
    release at ``t`` when fewer than ``count`` releases lie in ``(t - seconds, t]`` (the rate
    limiter's own sliding window), i.e. ``t >= sent[-count] + seconds``.
    """
    at = ideal
    if sent:
        at = max(at, sent[-1] + timedelta(seconds=min_gap))
    for rate in rates:
        if len(sent) >= rate.count:
            at = max(at, sent[-rate.count] + timedelta(seconds=float(rate.seconds)))
    return _utc(hours.next_open(at), "next_open")


#: open_seconds answers in float seconds; closer than this counts as reached
_EPSILON = 1e-3
_MAX_STEPS = 10_000


def _advance(hours: HoursLike, start: datetime, seconds: float) -> datetime:
    """The first instant by which the office has been open ``seconds`` since ``start``.

    Each step jumps past closed time to the next opening and adds what is still missing (an
    instant can add at most its own length of open time), so the steps are as many as the
    closings crossed.
    """
    if seconds <= 0:
        return start
    end = start + timedelta(seconds=seconds)
    for _ in range(_MAX_STEPS):
        missing = seconds - hours.open_seconds(start, end)
        if missing <= _EPSILON:
            return _past_closing(hours, end)
        end = _utc(hours.next_open(end), "next_open") + timedelta(seconds=missing)
    raise ValueError(f"office hours never add up to {seconds:.0f} open seconds after {start.isoformat()}")


def _past_closing(hours: HoursLike, at: datetime) -> datetime:
    """``at``, or the closing instant if the office closes less than ``_EPSILON`` after it.

    Even gaps often add up to exactly a closing time, where the office is already closed and
    the letter goes at the next opening. Float seconds land a microsecond either side of it, and
    a plan and a re-plan made at different instants need not land on the same side: one would
    send on Wednesday at 15:59:59.999999, the other on Saturday at 10:00.
    """
    tail = timedelta(seconds=_EPSILON)
    still_open = hours.open_seconds(at, at + tail)
    return at + timedelta(seconds=still_open) if still_open < _EPSILON else at


def _open(hours: HoursLike, start: datetime, end: datetime) -> float:
    return hours.open_seconds(start, end) if end > start else 0.0


def _utc(at: datetime, what: str) -> datetime:
    if at.tzinfo is None or at.utcoffset() is None:
        raise ValueError(f"{what} must be an aware datetime, not {at!r}")
    return at.astimezone(UTC)
