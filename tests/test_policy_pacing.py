"""Pacing towards the deadline: pure planning on a simulated clock (no sleeps, no Redis).

The rates and office hours here are small stand-ins with the same shape as
dispatcher.policy.limits.Rate and dispatcher.policy.hours.OfficeHours (half-open windows and
intervals), so these tests pin the planner alone.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dispatcher.policy.pacing import (
    HoursLike,
    PacingPolicy,
    RateLike,
    RecipientLoad,
    due_now,
    forecast,
    next_release,
    release_times,
)

MONDAY = datetime(2024, 3, 4, 9, 0, tzinfo=UTC)  # a Monday, 09:00 UTC
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
FAX = "fax:+442071234567"


@dataclass(frozen=True)
class Rate:
    count: int
    seconds: float


PER_HOUR_2 = Rate(2, 3600)
PER_DAY_10 = Rate(10, 86400)


@dataclass(frozen=True)
class Weekdays:
    """Open [opens, closes) local time on the given weekdays (0 = Monday)."""

    opens: time = time(9)
    closes: time = time(17)
    days: frozenset[int] = frozenset(range(5))
    zone: ZoneInfo = field(default_factory=lambda: ZoneInfo("UTC"))

    def _stretches(self, at: datetime) -> Iterator[tuple[datetime, datetime]]:
        day: date = at.astimezone(self.zone).date() - timedelta(days=1)
        while True:
            if day.weekday() in self.days:
                yield (
                    datetime.combine(day, self.opens, tzinfo=self.zone).astimezone(UTC),
                    datetime.combine(day, self.closes, tzinfo=self.zone).astimezone(UTC),
                )
            day += timedelta(days=1)

    def is_open(self, at: datetime) -> bool:
        for opens, closes in self._stretches(at):
            if at < closes:
                return opens <= at
        raise AssertionError  # pragma: no cover

    def next_open(self, at: datetime) -> datetime:
        for opens, closes in self._stretches(at):
            if at < closes:
                return max(opens, at)
        raise AssertionError  # pragma: no cover

    def open_seconds(self, start: datetime, end: datetime) -> float:
        total = 0.0
        for opens, closes in self._stretches(start):
            if opens >= end:
                return total
            total += max(0.0, (min(closes, end) - max(opens, start)).total_seconds())
        raise AssertionError  # pragma: no cover


OFFICE = Weekdays()


def fax_load(waiting: int, deadline: datetime, **kw: object) -> RecipientLoad:
    kw.setdefault("rates", [PER_HOUR_2])
    return RecipientLoad.uniform(FAX, waiting, deadline, **kw)  # type: ignore[arg-type]


def most_in_any_window(points: Sequence[datetime], seconds: float) -> int:
    """The most points in any half-open window [w, w + seconds): a window holding the most can
    always slide forward to start at one of its points, so checking those starts is exhaustive."""
    pts = sorted(points)
    width = timedelta(seconds=seconds)
    return max((bisect.bisect_left(pts, p + width) - i for i, p in enumerate(pts)), default=0)


def assert_caps_hold(load: RecipientLoad, times: Sequence[datetime]) -> None:
    """Each release is one the rate limiter admits: fewer than ``count`` releases, counting the
    recent ones, in the window ``(t - seconds, t]`` before it. (``sent_recently`` may itself
    break a cap, e.g. after the caps were lowered; the plan can only keep to them from now on.)"""
    new = sorted(times)
    for rate in load.rates:
        width = timedelta(seconds=rate.seconds)
        for j, t in enumerate(new):
            before = [*load.sent_recently, *new[:j]]
            assert sum(t - width < s <= t for s in before) < rate.count, (rate, t)
        if not load.sent_recently:
            assert most_in_any_window(new, rate.seconds) <= rate.count, rate


def assert_consistent(load: RecipientLoad, now: datetime, times: Sequence[datetime]) -> None:
    """What every plan must satisfy, whatever the load."""
    assert len(times) == load.waiting
    assert all(t >= now for t in times)
    assert_caps_hold(load, times)
    if isinstance(load.hours, Weekdays):
        assert all(load.hours.is_open(t) for t in times)
    f = forecast(load, now)
    fits = [t < d for t, d in zip(times, load.deadlines, strict=True)]
    assert f.waiting == load.waiting
    assert f.fits_count == sum(fits)
    assert f.shortfall == load.waiting - f.fits_count
    assert f.fits == (f.shortfall == 0)
    assert f.first_at == min(times, default=None)
    assert f.last_at == max(times, default=None)
    # Letters that miss their deadline never hold back one that makes it.
    made = [t for t, ok in zip(times, fits, strict=True) if ok]
    missed = [t for t, ok in zip(times, fits, strict=True) if not ok]
    if made and missed:
        assert max(made) <= min(missed)
    # Among letters that make it, earlier deadlines go first.
    pairs = sorted((d, t) for d, t, ok in zip(load.deadlines, times, fits, strict=True) if ok)
    assert all(t1 <= t2 for (_, t1), (_, t2) in itertools.pairwise(pairs))
    due = sorted((t, i) for i, t in enumerate(times) if t <= now and t < load.deadlines[i])
    assert due_now(load, now) == [i for _, i in due]
    assert release_times(load, now) == list(times)  # deterministic


def simulate(load: RecipientLoad, now: datetime, tick: timedelta | None = None) -> dict[int, datetime]:
    """Play the reconciler on a simulated clock: at each planned time (or the first tick at or
    after it) release what is due, record it as sent, expire what passed its deadline, re-plan the
    rest. Returns when each letter went."""
    pending = list(range(load.waiting))
    sent = list(load.sent_recently)
    released: dict[int, datetime] = {}
    while pending:
        pending = [i for i in pending if load.deadlines[i] > now]  # the ledger expires these
        current = RecipientLoad(load.recipient, [load.deadlines[i] for i in pending], load.rates, load.hours, sent)
        due = due_now(current, now)
        for j in due:
            released[pending[j]] = now
            sent.append(now)
        done = set(due)
        pending = [i for j, i in enumerate(pending) if j not in done]
        rest = RecipientLoad(load.recipient, [load.deadlines[i] for i in pending], load.rates, load.hours, sent)
        upcoming = next_release(rest, now)
        if upcoming is None:
            break  # what is left can only expire
        assert upcoming > now
        now = upcoming
        if tick is not None:
            now = EPOCH + math.ceil((now - EPOCH) / tick) * tick
    return released


# ----------------------------------------------------------------------------- the case


def test_500_faxes_at_2_per_hour_always_open() -> None:
    deadline = MONDAY + timedelta(days=10)
    load = fax_load(500, deadline)
    f = forecast(load, MONDAY)
    assert f.rate_per_hour == 2.0
    # Ten days at 2/hour hold 480 letters; the other 20 would miss the deadline.
    assert (f.fits_count, f.shortfall, f.fits) == (480, 20, False)
    assert f.first_at == MONDAY
    assert f.last_at == MONDAY + 499 * timedelta(minutes=30)
    times = release_times(load, MONDAY)
    assert sorted(times) == [MONDAY + k * timedelta(minutes=30) for k in range(500)]
    assert most_in_any_window(times, 3600) == 2
    assert_consistent(load, MONDAY, times)


def test_500_faxes_at_2_per_hour_in_office_hours_says_capacity_is_short() -> None:
    deadline = MONDAY + timedelta(days=14)  # two working weeks: 10 days × 8 h × 2 = 160 letters
    load = fax_load(500, deadline, hours=OFFICE)
    f = forecast(load, MONDAY)
    assert f.rate_per_hour == 2.0  # per open hour
    assert (f.fits_count, f.shortfall, f.fits) == (160, 340, False)
    # Letter 500 is number 3 (from 0) of working day 31 (from 0): Tuesday of the seventh week.
    assert f.last_at == datetime(2024, 4, 16, 10, 30, tzinfo=UTC)
    times = release_times(load, MONDAY)
    assert all(OFFICE.is_open(t) for t in times)
    assert all(t.weekday() < 5 and time(9) <= t.time() < time(17) for t in times)
    assert sum(t < deadline for t in times) == f.fits_count
    assert_consistent(load, MONDAY, times)


def test_every_60_minute_window_holds_at_most_two_checked_minute_by_minute() -> None:
    load = fax_load(60, MONDAY + timedelta(days=2), hours=OFFICE)
    times = sorted(release_times(load, MONDAY))
    # Brute force as well as the sliding count: every window start, minute by minute, plus every
    # release instant (windows are half-open, like the rate limiter's).
    starts = {times[0] - timedelta(hours=1) + k * timedelta(minutes=1) for k in range(60 * 24 * 8)} | set(times)
    for start in starts:
        assert sum(start <= t < start + timedelta(hours=1) for t in times) <= 2


# ----------------------------------------------------------------------------- spreading


def test_few_letters_far_deadline_are_spread_but_not_held_for_weeks() -> None:
    load = fax_load(3, MONDAY + timedelta(days=30))
    times = release_times(load, MONDAY)
    # No slower than a quarter of the cap (2/hour → one every 2 hours), not one every 10 days.
    assert times == [MONDAY, MONDAY + timedelta(hours=2), MONDAY + timedelta(hours=4)]
    assert forecast(load, MONDAY).rate_per_hour == 0.5


def test_many_letters_are_spread_towards_the_deadline_with_a_margin() -> None:
    deadline = MONDAY + timedelta(days=4)
    load = fax_load(100, deadline)
    times = sorted(release_times(load, MONDAY))
    f = forecast(load, MONDAY)
    # 100 slots over the 3 days before the 1-day margin: slower than the cap, faster than a quarter.
    gap = 3 * 86400 / 100
    assert all(abs((b - a).total_seconds() - gap) < 1e-3 for a, b in itertools.pairwise(times))
    assert f.rate_per_hour == pytest.approx(100 / 72)
    assert 0.5 < f.rate_per_hour < 2.0
    assert f.fits and f.last_at is not None
    # Each letter goes at the start of its slot: the last one a slot before the target.
    target = deadline - timedelta(days=1)
    assert abs(f.last_at - (target - timedelta(seconds=gap))) < timedelta(milliseconds=1)


def test_spreading_counts_open_time_only() -> None:
    # 40 letters, deadline Saturday 00:00: the target is Friday 00:00, i.e. 32 open hours away,
    # so one letter every 48 open minutes, nights not counted.
    deadline = datetime(2024, 3, 9, tzinfo=UTC)
    load = fax_load(40, deadline, hours=OFFICE)
    times = sorted(release_times(load, MONDAY))
    assert forecast(load, MONDAY).rate_per_hour == pytest.approx(1.25)
    assert all(OFFICE.open_seconds(a, b) == pytest.approx(48 * 60, abs=1e-3) for a, b in itertools.pairwise(times))
    assert times[9:11] == [datetime(2024, 3, 4, 16, 12, tzinfo=UTC), datetime(2024, 3, 5, 9, tzinfo=UTC)]
    assert times[-1] == datetime(2024, 3, 7, 16, 12, tzinfo=UTC)  # Thursday, before the margin


def test_no_caps_means_no_pacing() -> None:
    # Without caps the recipient takes whatever comes: nothing is held back, however far the deadline.
    load = RecipientLoad.uniform("email:minister@example.org", 5, MONDAY + timedelta(days=20))
    assert release_times(load, MONDAY) == [MONDAY] * 5
    assert due_now(load, MONDAY) == [0, 1, 2, 3, 4]
    saturday = datetime(2024, 3, 9, 11, tzinfo=UTC)
    closed = RecipientLoad.uniform(FAX, 3, saturday + timedelta(days=20), hours=OFFICE)
    assert release_times(closed, saturday) == [datetime(2024, 3, 11, 9, tzinfo=UTC)] * 3
    urgent = RecipientLoad.uniform("email:minister@example.org", 5, MONDAY + timedelta(hours=12))
    assert release_times(urgent, MONDAY) == [MONDAY] * 5  # no cap and no time to spread: all now
    assert forecast(urgent, MONDAY).rate_per_hour == math.inf


def test_closed_now_starts_at_the_next_opening() -> None:
    saturday = datetime(2024, 3, 9, 11, tzinfo=UTC)
    times = release_times(fax_load(3, saturday + timedelta(days=30), hours=OFFICE), saturday)
    assert min(times) == datetime(2024, 3, 11, 9, tzinfo=UTC)


# ----------------------------------------------------------------------------- caps


def test_sent_recently_counts_against_the_caps() -> None:
    recent = [MONDAY - timedelta(minutes=10), MONDAY - timedelta(minutes=5)]
    load = fax_load(4, MONDAY + timedelta(hours=6), sent_recently=recent)
    times = sorted(release_times(load, MONDAY))
    # Two in the last hour already: the next may go when the older one is an hour old.
    assert times[0] == MONDAY + timedelta(minutes=50)
    assert_caps_hold(load, times)
    assert_consistent(load, MONDAY, times)


def test_the_pace_continues_from_the_latest_release() -> None:
    deadline = MONDAY + timedelta(days=30)
    fresh = release_times(fax_load(3, deadline), MONDAY)
    # One hour ago a letter went: the pace (2 hours) counts from it, not from now.
    later = release_times(fax_load(3, deadline, sent_recently=[MONDAY - timedelta(hours=1)]), MONDAY)
    assert later == [t + timedelta(hours=1) for t in fresh]
    # Long ago: nothing to wait for.
    old = release_times(fax_load(3, deadline, sent_recently=[MONDAY - timedelta(days=3)]), MONDAY)
    assert old == fresh


def test_two_caps_at_once_always_open() -> None:
    load = fax_load(25, MONDAY + timedelta(days=2), rates=[PER_HOUR_2, PER_DAY_10])
    times = sorted(release_times(load, MONDAY))
    assert most_in_any_window(times, 3600) <= 2
    assert most_in_any_window(times, 86400) == 10
    # 10 a day, spread over the day rather than five hours of 2/hour then nothing.
    assert times[:3] == [MONDAY, MONDAY + timedelta(hours=2.4), MONDAY + timedelta(hours=4.8)]
    f = forecast(load, MONDAY)
    assert (f.fits_count, f.shortfall) == (20, 5)
    assert_consistent(load, MONDAY, times)


def test_two_caps_in_office_hours_use_the_whole_daily_allowance() -> None:
    load = fax_load(30, MONDAY + timedelta(days=3), rates=[PER_HOUR_2, PER_DAY_10], hours=OFFICE)
    times = sorted(release_times(load, MONDAY))
    # 10 a day over the 8 open hours: one every 48 minutes, 09:00 to 16:12.
    assert forecast(load, MONDAY).rate_per_hour == 1.25
    for day in range(3):
        today = [t for t in times if t.date() == (MONDAY + timedelta(days=day)).date()]
        assert today == [MONDAY + timedelta(days=day, minutes=48 * k) for k in range(10)]
    assert_consistent(load, MONDAY, times)


# ----------------------------------------------------------------------------- several deadlines


def test_a_shared_line_serves_the_earlier_deadline_first_and_does_not_write_off_the_later() -> None:
    soon, later = MONDAY + timedelta(hours=5), MONDAY + timedelta(days=21)
    # The later campaign's letters come first in the input: order follows deadlines, not input.
    load = RecipientLoad(FAX, [later] * 5 + [soon] * 30, rates=[PER_HOUR_2])
    times = release_times(load, MONDAY)
    f = forecast(load, MONDAY)
    # 5 hours at 2/hour: 10 of the 30 urgent ones make it; the 5 others all do.
    assert (f.fits_count, f.shortfall) == (15, 20)
    urgent = times[5:]
    assert sorted(urgent)[:10] == [MONDAY + k * timedelta(minutes=30) for k in range(10)]
    # The later letters take the next slot; the 20 that cannot make it wait behind them. Once the
    # urgent campaign has closed, the rest is in no hurry: a quarter of the cap's pace.
    last_urgent = MONDAY + timedelta(hours=4, minutes=30)
    assert sorted(times[:5]) == [last_urgent + (k + 1) * timedelta(hours=2) for k in range(5)]
    assert min(t for t in urgent if t >= soon) > max(times[:5])
    assert f.rate_per_hour == 2.0  # the pace now
    assert_consistent(load, MONDAY, times)


def test_equal_deadlines_keep_the_input_order() -> None:
    load = fax_load(4, MONDAY + timedelta(hours=3))
    assert release_times(load, MONDAY) == sorted(release_times(load, MONDAY))


def test_letters_whose_deadline_passed_do_not_hurry_the_others() -> None:
    past, far = MONDAY - timedelta(hours=1), MONDAY + timedelta(days=30)
    load = RecipientLoad(FAX, [past, far, far], rates=[PER_HOUR_2])
    times = release_times(load, MONDAY)
    assert times[1:] == [MONDAY, MONDAY + timedelta(hours=2)]
    assert times[0] > times[2]  # planned last (the ledger expires it)
    assert forecast(load, MONDAY).shortfall == 1


# ----------------------------------------------------------------------------- the scheduler does what it forecast


def test_replanning_after_every_release_follows_the_first_plan_at_the_caps_pace() -> None:
    load = fax_load(200, MONDAY + timedelta(days=7), hours=OFFICE)
    plan = release_times(load, MONDAY)
    went = simulate(load, MONDAY)
    f = forecast(load, MONDAY)
    assert sorted(went) == [i for i, t in enumerate(plan) if t < load.deadlines[i]]
    assert all(went[i] == plan[i] for i in went)
    assert len(went) == f.fits_count


@pytest.mark.parametrize("hours", [None, OFFICE], ids=["always", "office"])
def test_replanning_after_every_release_follows_the_first_plan_when_spreading(hours: HoursLike | None) -> None:
    load = fax_load(60, MONDAY + timedelta(days=10), hours=hours)
    plan = release_times(load, MONDAY)
    went = simulate(load, MONDAY)
    assert len(went) == forecast(load, MONDAY).fits_count == 60
    assert all(abs(went[i] - plan[i]) <= timedelta(milliseconds=1) for i in went)
    assert_caps_hold(load, list(went.values()))


def test_a_release_whose_even_gaps_end_at_closing_time_goes_at_the_next_opening() -> None:
    # 14 letters at 1/hour, open 10-16 on Tuesdays, Wednesdays and weekends: spread evenly, the
    # eighth lands on Wednesday's closing time exactly, which float seconds put a microsecond
    # either side of it. The plan and the re-plan after the seventh release must both say
    # Saturday's opening: a forecast of Wednesday 15:59:59.999999 would be three days wrong.
    hours = Weekdays(time(10), time(16), frozenset({1, 2, 5, 6}))
    load = fax_load(14, MONDAY + timedelta(hours=198), rates=[Rate(1, 3600)], hours=hours)
    plan = release_times(load, MONDAY)
    went = simulate(load, MONDAY)
    saturday = datetime(2024, 3, 9, 10, 0, tzinfo=UTC)
    assert plan[7] == went[7] == saturday
    assert plan[6] < datetime(2024, 3, 6, 16, 0, tzinfo=UTC)
    assert len(went) == forecast(load, MONDAY).fits_count == 14
    assert all(abs(went[i] - plan[i]) < timedelta(milliseconds=1) for i in went)


def test_a_one_second_tick_delays_releases_by_under_a_second_each() -> None:
    # The reconciler releases on its ticks, not on the planned microsecond: at the caps' pace each
    # release counts from the previous actual one, so the delays add up; they stay small.
    start = MONDAY + timedelta(milliseconds=500)
    load = fax_load(100, MONDAY + timedelta(days=7), hours=OFFICE)
    plan = release_times(load, start)
    went = simulate(load, start, tick=timedelta(seconds=1))
    assert len(went) == forecast(load, start).fits_count == 80
    assert all(timedelta(0) <= went[i] - plan[i] <= timedelta(seconds=k + 1) for k, i in enumerate(sorted(went)))
    assert all(OFFICE.is_open(t) for t in went.values())
    assert_caps_hold(load, list(went.values()))


def test_next_release_is_the_first_release_that_can_make_its_deadline() -> None:
    load = fax_load(3, MONDAY + timedelta(days=30), sent_recently=[MONDAY - timedelta(minutes=20)])
    # The pace (a quarter of 2/hour) counts from the release 20 minutes ago.
    assert next_release(load, MONDAY) == min(release_times(load, MONDAY)) == MONDAY + timedelta(minutes=100)
    assert next_release(fax_load(3, MONDAY), MONDAY) is None
    assert next_release(RecipientLoad(FAX, []), MONDAY) is None


def test_due_now_releases_what_is_due_and_nothing_more() -> None:
    load = fax_load(10, MONDAY + timedelta(hours=3), sent_recently=[MONDAY - timedelta(minutes=20)])
    assert due_now(load, MONDAY) == []  # 30 minutes apart at 2/hour
    assert due_now(load, MONDAY + timedelta(minutes=10)) == [0]
    assert due_now(load, MONDAY + timedelta(minutes=45)) == [0]  # late ticks do not burst
    assert due_now(RecipientLoad.uniform(FAX, 0, MONDAY), MONDAY) == []


def test_due_now_with_a_tick_releases_what_the_plan_puts_inside_it_but_never_the_first_early() -> None:
    tick = timedelta(seconds=1)
    # A cap faster than the tick: 36,000/hour is one every 0.1 s; a far deadline slows the pace to
    # a quarter of that, one every 0.4 s: the letters at 0, 0.4 and 0.8 s go on this tick.
    fast = RecipientLoad.uniform(FAX, 50, MONDAY + timedelta(days=30), rates=[Rate(36000, 3600.0)])
    assert due_now(fast, MONDAY, horizon=tick) == [0, 1, 2]
    assert due_now(fast, MONDAY) == [0]
    # A cap slower than the tick keeps its exact times: nothing early, nothing extra.
    slow = fax_load(10, MONDAY + timedelta(hours=3), sent_recently=[MONDAY - timedelta(minutes=20)])
    assert due_now(slow, MONDAY + timedelta(minutes=10) - timedelta(milliseconds=500), horizon=tick) == []
    assert due_now(slow, MONDAY + timedelta(minutes=10), horizon=tick) == [0]


# ----------------------------------------------------------------------------- edges


def test_nothing_waiting() -> None:
    f = forecast(RecipientLoad(FAX, []), MONDAY)
    assert (f.waiting, f.first_at, f.last_at, f.fits, f.fits_count, f.shortfall, f.rate_per_hour) == (
        0,
        None,
        None,
        True,
        0,
        0,
        0.0,
    )


def test_naive_datetimes_and_bad_caps_are_refused() -> None:
    with pytest.raises(ValueError, match="aware"):
        RecipientLoad.uniform(FAX, 1, datetime(2024, 3, 5))
    with pytest.raises(ValueError, match="aware"):
        release_times(fax_load(1, MONDAY + timedelta(days=1)), datetime(2024, 3, 4))
    with pytest.raises(ValueError, match="cap"):
        fax_load(1, MONDAY, rates=[Rate(0, 3600)])
    with pytest.raises(ValueError, match="slowest_share"):
        PacingPolicy(slowest_share=0)


def test_a_stand_in_satisfies_the_protocols() -> None:
    rate: RateLike = PER_HOUR_2
    hours: HoursLike = OFFICE
    assert (rate.count, hours.next_open(MONDAY)) == (2, MONDAY)


# ----------------------------------------------------------------------------- properties

ZONES = [ZoneInfo("UTC"), ZoneInfo("Europe/Zurich"), ZoneInfo("America/New_York")]

rates_st = st.lists(
    st.builds(Rate, st.integers(1, 6), st.sampled_from([300.0, 1800.0, 3600.0, 4 * 3600.0, 86400.0])),
    max_size=3,
)
hours_st = st.none() | st.builds(
    lambda opens, length, days, zone: Weekdays(time(opens), time(opens + length), frozenset(days), zone),
    st.integers(6, 12),
    st.integers(1, 8),
    st.sets(st.integers(0, 6), min_size=1),
    st.sampled_from(ZONES),
)


@st.composite
def loads(draw: st.DrawFn) -> tuple[RecipientLoad, datetime]:
    now = MONDAY + timedelta(minutes=draw(st.integers(0, 7 * 24 * 60)))
    choices = [now + timedelta(hours=h) for h in draw(st.lists(st.integers(-24, 24 * 15), min_size=1, max_size=3))]
    deadlines = draw(st.lists(st.sampled_from(choices), max_size=40))
    recent = [now - timedelta(minutes=m) for m in draw(st.lists(st.integers(0, 48 * 60), max_size=8))]
    load = RecipientLoad(FAX, deadlines, draw(rates_st), draw(hours_st), recent)
    return load, now


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(loads())
def test_any_load_plans_within_caps_and_hours_and_forecasts_what_it_plans(case: tuple[RecipientLoad, datetime]) -> None:
    load, now = case
    assert_consistent(load, now, release_times(load, now))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(loads())
def test_any_load_the_scheduler_does_what_was_forecast(case: tuple[RecipientLoad, datetime]) -> None:
    load, now = case
    plan, f = release_times(load, now), forecast(load, now)
    went = simulate(load, now)
    assert len(went) == f.fits_count
    assert all(abs(went[i] - plan[i]) < timedelta(milliseconds=1) for i in went)
    assert_caps_hold(load, list(went.values()))
