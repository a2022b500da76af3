"""The ledger backoff (when a transiently failed letter is tried again, and when tries stop) and the pacing settings."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest

from dispatcher.app import Service
from dispatcher.errors import ConfigError, TransientError
from dispatcher.ledger.models import State
from dispatcher.queue.outcomes import Outcomes
from dispatcher.retry import RetryPolicy
from dispatcher.settings import Settings

NOW = datetime(2026, 3, 2, 12, tzinfo=UTC)
FAR = NOW + timedelta(days=40)


def delays(policy: RetryPolicy, deadline: datetime = FAR, retry_after: float | None = None) -> list[float]:
    rng = random.Random(7)
    out = []
    for attempt in range(1, policy.max_attempts + 1):
        due = policy.next_try(attempt, NOW, deadline, retry_after, rng=rng)
        if due is None:
            break
        out.append((due - NOW).total_seconds())
    return out


def test_backoff_doubles_within_its_jitter_up_to_the_longest_delay() -> None:
    policy = RetryPolicy(base_seconds=60, max_delay_seconds=3600, max_attempts=10, jitter=0.2)
    got = delays(policy)
    assert len(got) == 9  # the tenth try is the last
    for attempt, delay in enumerate(got, start=1):
        nominal = min(60 * 2 ** (attempt - 1), 3600)
        assert nominal * 0.8 <= delay <= nominal * 1.2


def test_retry_after_is_a_floor() -> None:
    policy = RetryPolicy(base_seconds=1, jitter=0.0)
    assert delays(policy, retry_after=30)[:3] == [30, 30, 30]


def test_no_try_is_planned_at_or_after_the_deadline() -> None:
    policy = RetryPolicy(base_seconds=60, jitter=0.0)
    assert policy.next_try(1, NOW, NOW + timedelta(seconds=59)) is None
    assert policy.next_try(1, NOW, NOW + timedelta(seconds=61)) == NOW + timedelta(seconds=60)


def test_the_lifetime_cap_ends_tries_before_a_far_deadline() -> None:
    policy = RetryPolicy(base_seconds=3600, max_delay_seconds=86400, jitter=0.0, max_lifetime_seconds=2 * 86400)
    outcomes = Outcomes(policy)
    busy = TransientError("line busy")
    # Created 47 hours ago: a try an hour from now is still within the two days...
    fresh = outcomes.transient(busy, attempt=1, now=NOW, deadline=FAR, created_at=NOW - timedelta(hours=46))
    assert fresh.state == State.PLANNED and fresh.next_attempt_at == NOW + timedelta(hours=1)
    # ... but not one that would fall after them, however far the campaign deadline.
    old = outcomes.transient(busy, attempt=1, now=NOW, deadline=FAR, created_at=NOW - timedelta(hours=47, minutes=30))
    assert old.state == State.FAILED
    assert "48 hours of retrying" in (old.text or "")
    # A deadline before the cap still ends it first, and says so.
    soon = outcomes.transient(busy, attempt=1, now=NOW, deadline=NOW + timedelta(minutes=30), created_at=NOW)
    assert soon.state == State.FAILED and "the campaign deadline" in (soon.text or "")


def test_every_planned_try_of_a_long_retry_stays_within_the_cap() -> None:
    policy = RetryPolicy(base_seconds=600, max_delay_seconds=6 * 3600, max_attempts=50, max_lifetime_seconds=86400)
    outcomes = Outcomes(policy)
    created, now, attempt = NOW, NOW, 1
    while True:
        result = outcomes.of_error(TransientError("busy"), attempt=attempt, now=now, deadline=FAR, created_at=created)
        if result.state == State.FAILED:
            break
        assert result.next_attempt_at is not None
        assert result.next_attempt_at < created + timedelta(days=1)
        now, attempt = result.next_attempt_at, attempt + 1
    assert now - created < timedelta(days=1) and attempt > 3


def test_the_lifetime_cap_is_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISPATCH_RETRY_MAX_LIFETIME_HOURS", "36")
    settings = Settings.from_env()
    assert settings.retry_max_lifetime_hours == 36
    assert Service(settings).outcomes.retry.max_lifetime_seconds == 36 * 3600
    monkeypatch.setenv("DISPATCH_RETRY_MAX_LIFETIME_HOURS", "a week")
    with pytest.raises(ConfigError, match="DISPATCH_RETRY_MAX_LIFETIME_HOURS"):
        Settings.from_env()


def test_pacing_settings_are_read_from_the_environment_and_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISPATCH_PACING_SLOWEST_SHARE", "1")
    monkeypatch.setenv("DISPATCH_PACING_MARGIN_HOURS", "6")
    policy = Service(Settings.from_env()).pacer.policy
    assert (policy.slowest_share, policy.margin) == (1.0, timedelta(hours=6))
    monkeypatch.setenv("DISPATCH_PACING_SLOWEST_SHARE", "0")
    with pytest.raises(ConfigError, match=r"DISPATCH_PACING_SLOWEST_SHARE.*between"):
        Settings.from_env()
