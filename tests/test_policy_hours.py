"""Office hours: wall-clock ranges in the recipient's timezone, closed days, DST days."""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

import pytest

from dispatcher.policy.hours import END_OF_DAY, HoursSpecError, OfficeHours

ZURICH = ZoneInfo("Europe/Zurich")
NEW_YORK = ZoneInfo("America/New_York")
MOSCOW = ZoneInfo("Europe/Moscow")
EVERY_DAY = {"mon-sun": "09:00-17:00"}


def local(zone: ZoneInfo, year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, second, tzinfo=zone)


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC)


# --------------------------------------------------------------------------- the ordinary week


def test_default_week_is_weekdays_nine_to_five() -> None:
    hours = OfficeHours("Europe/Zurich")
    assert hours.is_open(local(ZURICH, 2026, 6, 2, 9, 0))  # Tuesday 09:00 local
    assert not hours.is_open(local(ZURICH, 2026, 6, 2, 8, 59))
    assert not hours.is_open(local(ZURICH, 2026, 6, 2, 17, 0))  # the end is exclusive
    assert not hours.is_open(local(ZURICH, 2026, 6, 6, 12, 0))  # Saturday
    assert OfficeHours.parse("Europe/Zurich", None) == hours
    assert OfficeHours.parse("Europe/Zurich", {"closed": []}) == hours
    assert hash(OfficeHours.parse("Europe/Zurich", {"mon-fri": "09:00-17:00"})) == hash(hours)


def test_tuesday_night_waits_for_wednesday_morning_local() -> None:
    hours = OfficeHours("America/New_York")
    due = local(NEW_YORK, 2026, 6, 2, 22, 0)  # Tuesday 22:00 EDT = Wednesday 02:00 UTC
    opens = hours.next_open(due)
    assert opens == local(NEW_YORK, 2026, 6, 3, 9, 0)
    assert opens.tzinfo is UTC and opens == utc(2026, 6, 3, 13, 0)


def test_open_now_returns_now_in_utc() -> None:
    at = local(ZURICH, 2026, 6, 2, 10, 30)
    assert OfficeHours("Europe/Zurich").next_open(at) == at
    assert OfficeHours("Europe/Zurich").next_open(at).tzinfo is UTC


def test_friday_evening_waits_for_monday() -> None:
    hours = OfficeHours("Europe/Zurich")
    assert hours.next_open(local(ZURICH, 2026, 6, 5, 17, 0)) == local(ZURICH, 2026, 6, 8, 9, 0)


def test_closed_days_are_skipped() -> None:
    # Christmas 2026 is a Friday; with the 28th closed too the next opening is Tuesday the 29th.
    hours = OfficeHours.parse("Europe/Zurich", {"mon-fri": "09:00-17:00", "closed": ["2026-12-25", date(2026, 12, 28)]})
    assert not hours.is_open(local(ZURICH, 2026, 12, 25, 10, 0))
    assert hours.next_open(local(ZURICH, 2026, 12, 24, 18, 0)) == local(ZURICH, 2026, 12, 29, 9, 0)


def test_lunch_gap() -> None:
    hours = OfficeHours.parse("Europe/Zurich", {"mon-fri": "09:00-13:00, 14:00-18:00", "sat": "10:00-12:00"})
    assert hours.is_open(local(ZURICH, 2026, 6, 2, 12, 59))
    assert not hours.is_open(local(ZURICH, 2026, 6, 2, 13, 30))
    assert hours.next_open(local(ZURICH, 2026, 6, 2, 13, 0)) == local(ZURICH, 2026, 6, 2, 14, 0)
    assert hours.next_open(local(ZURICH, 2026, 6, 5, 18, 0)) == local(ZURICH, 2026, 6, 6, 10, 0)  # Saturday
    assert hours.open_seconds(local(ZURICH, 2026, 6, 2), local(ZURICH, 2026, 6, 3)) == 8 * 3600


def test_a_run_of_days_may_wrap_past_sunday() -> None:
    hours = OfficeHours.parse("Asia/Jerusalem", {"sun-thu": "08:00-16:00"})
    assert sorted(hours.week) == [0, 1, 2, 3, 6]


def test_open_seconds_across_a_weekend() -> None:
    hours = OfficeHours("Europe/Zurich")
    friday_noon, monday_noon = local(ZURICH, 2026, 6, 5, 12, 0), local(ZURICH, 2026, 6, 8, 12, 0)
    assert hours.open_seconds(friday_noon, monday_noon) == 8 * 3600  # 5 h Friday + 3 h Monday
    assert hours.open_seconds(monday_noon, friday_noon) == 0
    # a whole week, started from a UTC instant: the answer does not depend on the caller's zone
    assert hours.open_seconds(utc(2026, 6, 1), utc(2026, 6, 8)) == 40 * 3600


def test_until_midnight() -> None:
    hours = OfficeHours.parse("UTC", {"mon": "18:00-24:00", "tue": "00:00-02:00"})
    assert hours.week[0] == ((time(18), END_OF_DAY),)
    assert hours.is_open(utc(2026, 6, 1, 23, 59, 59)) and hours.is_open(utc(2026, 6, 2, 0, 0))
    assert hours.open_seconds(utc(2026, 6, 1), utc(2026, 6, 3)) == 8 * 3600


def test_naive_datetimes_are_refused() -> None:
    with pytest.raises(ValueError, match="no timezone"):
        OfficeHours("Europe/Zurich").is_open(datetime(2026, 6, 2, 10, 0))


# --------------------------------------------------------------------------- days the clocks change


@pytest.mark.parametrize(
    ("zone", "saturday_evening", "sunday_nine_utc"),
    [
        # Europe changes on 29 March 2026 (01:00 UTC): 09:00 is CEST, +02:00
        ("Europe/Zurich", local(ZURICH, 2026, 3, 28, 20, 0), utc(2026, 3, 29, 7, 0)),
        # ... and back on 25 October 2026: 09:00 is CET, +01:00
        ("Europe/Zurich", local(ZURICH, 2026, 10, 24, 20, 0), utc(2026, 10, 25, 8, 0)),
        # the US on 8 March 2026: 09:00 is EDT, -04:00
        ("America/New_York", local(NEW_YORK, 2026, 3, 7, 20, 0), utc(2026, 3, 8, 13, 0)),
        # ... and back on 1 November 2026: 09:00 is EST, -05:00
        ("America/New_York", local(NEW_YORK, 2026, 10, 31, 20, 0), utc(2026, 11, 1, 14, 0)),
        # Moscow has no DST: 09:00 is +03:00 on both European change days
        ("Europe/Moscow", local(MOSCOW, 2026, 3, 28, 20, 0), utc(2026, 3, 29, 6, 0)),
        ("Europe/Moscow", local(MOSCOW, 2026, 10, 24, 20, 0), utc(2026, 10, 25, 6, 0)),
    ],
)
def test_nine_oclock_on_the_day_the_clocks_change(
    zone: str, saturday_evening: datetime, sunday_nine_utc: datetime
) -> None:
    hours = OfficeHours.parse(zone, EVERY_DAY)
    assert hours.next_open(saturday_evening) == sunday_nine_utc
    assert hours.is_open(sunday_nine_utc) and not hours.is_open(sunday_nine_utc - timedelta(seconds=1))
    assert hours.open_seconds(sunday_nine_utc - timedelta(hours=12), sunday_nine_utc + timedelta(hours=12)) == 8 * 3600


def test_friday_evening_to_monday_across_spring_forward() -> None:
    hours = OfficeHours("America/New_York")
    friday = local(NEW_YORK, 2026, 3, 6, 18, 0)  # EST
    assert hours.next_open(friday) == utc(2026, 3, 9, 13, 0)  # Monday 09:00 EDT, not 14:00 UTC


def test_night_hours_on_change_days_last_as_long_as_the_clock_says() -> None:
    hours = OfficeHours.parse("Europe/Zurich", {"mon-sun": "01:00-04:00"})
    # spring: 02:00 → 03:00, the range lasts two hours; autumn: 03:00 → 02:00, four
    assert hours.open_seconds(local(ZURICH, 2026, 3, 29), local(ZURICH, 2026, 3, 30)) == 2 * 3600
    assert hours.open_seconds(local(ZURICH, 2026, 10, 25), local(ZURICH, 2026, 10, 26)) == 4 * 3600
    assert hours.open_seconds(local(ZURICH, 2026, 6, 1), local(ZURICH, 2026, 6, 2)) == 3 * 3600


def test_an_opening_in_the_skipped_hour_is_when_the_clocks_jump() -> None:
    hours = OfficeHours.parse("America/New_York", {"sun": "02:30-04:00"})
    # 8 March 2026: 02:00 EST jumps to 03:00 EDT (07:00 UTC); 02:30 never shows on the wall clock
    opens = hours.next_open(local(NEW_YORK, 2026, 3, 7, 12, 0))
    assert opens == utc(2026, 3, 8, 7, 0)
    assert opens.astimezone(NEW_YORK).time() == time(3, 0)
    assert hours.open_seconds(opens, opens + timedelta(hours=3)) == 3600


def test_an_opening_in_the_repeated_hour_is_its_first_occurrence() -> None:
    hours = OfficeHours.parse("America/New_York", {"sun": "01:30-03:00"})
    # 1 November 2026: 01:30 EDT (05:30 UTC) then 01:30 EST (06:30 UTC); closes 03:00 EST
    opens = hours.next_open(local(NEW_YORK, 2026, 10, 31, 12, 0))
    assert opens == utc(2026, 11, 1, 5, 30)
    assert hours.open_seconds(opens, opens + timedelta(hours=5)) == 2.5 * 3600


# --------------------------------------------------------------------------- configuration errors


@pytest.mark.parametrize(
    ("spec", "key", "message"),
    [
        ({"mon": "22:00-02:00"}, "mon", "crosses midnight"),
        ({"mon-fri": "09:00-13:00, 12:00-18:00"}, "mon-fri", "09:00-13:00 and 12:00-18:00 overlap"),
        ({"mon-fri": "09:00-17:00", "fri": "10:00-12:00"}, "fri", "already given by 'mon-fri'"),
        ({"mon": "09:00-09:00"}, "mon", "empty"),
        ({"mon": "9-17"}, "mon", "not a time of day"),
        ({"mon": "09:00-25:00"}, "mon", "not a time of day"),
        ({"mon": "24:00-24:00"}, "mon", "not a time of day"),
        ({"mon": "09:00"}, "mon", "not a range"),
        ({"mon": 9}, "mon", "expected ranges"),
        ({"monday-friday": "09:00-17:00"}, "monday-friday", "not a day or a run of days"),
        ({"closed": ["2026-02-30"]}, "closed", "not a date"),
        ({"closed": "2026-12-25"}, "closed", "expected a list of dates"),
        ({"sat": "closed"}, "sat", "every day is closed"),
    ],
)
def test_bad_specs_name_the_key_and_value(spec: dict[str, object], key: str, message: str) -> None:
    with pytest.raises(HoursSpecError, match=message) as caught:
        OfficeHours.parse("Europe/Zurich", spec)
    assert caught.value.key == key
    assert caught.value.value == spec[key]
    assert str(caught.value).startswith(f"{key} = {spec[key]!r}: ")


def test_unknown_timezone() -> None:
    with pytest.raises(HoursSpecError, match="unknown timezone 'Europe/Atlantis'") as caught:
        OfficeHours.parse("Europe/Atlantis", None)
    assert caught.value.key == "timezone"


def test_direct_construction_is_checked_too() -> None:
    with pytest.raises(ValueError, match="crosses midnight"):
        OfficeHours("UTC", {0: [(time(22), time(2))]})
    with pytest.raises(ValueError, match="overlap"):
        OfficeHours("UTC", {0: [(time(9), time(12)), (time(11), time(13))]})
    with pytest.raises(ValueError, match="no open time"):
        OfficeHours("UTC", {})
