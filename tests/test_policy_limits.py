"""Rate limits in a real Redis: exact sliding windows under concurrent reservers."""

from __future__ import annotations

import multiprocessing
import random
import threading
import time
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest
import redis

from dispatcher.policy.limits import Rate, RateLimiter

if TYPE_CHECKING:
    from tests.support.services import RedisServer

T0 = 1_800_000_000.0  # a simulated clock: unix seconds in 2027


@pytest.fixture
def client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(redis_server.url)
    yield c
    c.close()


@pytest.fixture
def limiter(client: redis.Redis) -> RateLimiter:
    return RateLimiter(client, f"t-{uuid.uuid4().hex[:12]}")


# --------------------------------------------------------------------------- Rate


@pytest.mark.parametrize(
    ("text", "count", "seconds"),
    [
        ("2/hour", 2, 3600),
        ("10/minute", 10, 60),
        ("100/day", 100, 86400),
        ("5/30s", 5, 30),
        ("3 / 2h", 3, 7200),
        ("1/1.5min", 1, 90),
        ("4/Seconds", 4, 1),
    ],
)
def test_rate_parse(text: str, count: int, seconds: float) -> None:
    assert Rate.parse(text) == Rate(count, seconds)


@pytest.mark.parametrize("text", ["", "2", "2/", "2/30", "two/hour", "2/fortnight", "-1/hour", "2/hour/day"])
def test_rate_parse_refuses(text: str) -> None:
    with pytest.raises(ValueError, match=r"is not 'N/window' with a unit, e.g. '2/hour'"):
        Rate.parse(text)


def test_rate_values_are_checked() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        Rate(0, 60)
    with pytest.raises(ValueError, match="at least 1 ms"):
        Rate(1, 0)
    with pytest.raises(ValueError, match="at least 1"):
        Rate.parse("0/hour")


# --------------------------------------------------------------------------- one reserver, simulated clock


def test_the_wait_is_exact(limiter: RateLimiter) -> None:
    per_minute = [Rate.parse("3/minute")]
    key = "recipient:email:someone@example.org"
    # odd instants, so a wait computed with float error would show
    times = [T0 + 0.1, T0 + 7.3, T0 + 31.07]
    for now in times:
        assert limiter.reserve(key, per_minute, now=now) == 0.0
    now = T0 + 42.42
    wait = limiter.reserve(key, per_minute, now=now)
    assert wait == pytest.approx(60 - 42.32)
    assert limiter.reserve(key, per_minute, now=now + wait - 0.000_001) > 0  # a microsecond early: no
    assert limiter.reserve(key, per_minute, now=now + wait) == 0.0  # exactly then: yes
    assert limiter.usage(key, per_minute, now=now + wait) == [3]


def test_several_rates_at_once(limiter: RateLimiter) -> None:
    rates = [Rate.parse("2/minute"), Rate.parse("3/hour")]
    key = "recipient:fax:+12025550143"
    assert limiter.reserve(key, rates, now=T0) == 0.0
    assert limiter.reserve(key, rates, now=T0 + 50) == 0.0
    # the minute is full until the first letter leaves it at T0 + 60; the hour has room
    assert limiter.reserve(key, rates, now=T0 + 55) == pytest.approx(5)
    assert limiter.usage(key, rates, now=T0 + 55) == [2, 2]
    assert limiter.reserve(key, rates, now=T0 + 60) == 0.0
    # now both are full: the minute frees at T0 + 110, the hour only at T0 + 3600
    wait = limiter.reserve(key, rates, now=T0 + 100)
    assert wait == pytest.approx(3500)
    assert limiter.usage(key, rates, now=T0 + 200) == [0, 3]
    assert limiter.reserve(key, rates, now=T0 + 3599) > 0
    assert limiter.reserve(key, rates, now=T0 + 100 + wait) == 0.0


def test_keys_are_independent_and_namespaced(client: redis.Redis, limiter: RateLimiter) -> None:
    one = [Rate.parse("1/hour")]
    assert limiter.reserve("relay:smtp.example:587", one, now=T0) == 0.0
    assert limiter.reserve("gateway:telnyx", one, now=T0) == 0.0
    assert limiter.reserve("relay:smtp.example:587", one, now=T0 + 1) > 0
    assert RateLimiter(client, f"other-{uuid.uuid4().hex[:8]}").reserve("gateway:telnyx", one, now=T0) == 0.0
    mine: list[bytes] = client.keys(f"{limiter.namespace}:*")  # type: ignore[assignment]
    assert len(mine) == 4  # two keys, each with its log and horizon


def test_cancel_gives_the_slot_back(limiter: RateLimiter) -> None:
    rates = [Rate.parse("1/minute"), Rate.parse("2/hour")]
    assert limiter.reserve("k", rates, now=T0, token="delivery-1:try-1") == 0.0
    assert limiter.reserve("k", rates, now=T0 + 1, token="delivery-2:try-1") > 0
    limiter.cancel("k", "delivery-1:try-1")  # the send did not happen
    assert limiter.usage("k", rates, now=T0 + 1) == [0, 0]
    assert limiter.reserve("k", rates, now=T0 + 1, token="delivery-2:try-1") == 0.0
    limiter.cancel("k", "no-such-token")  # harmless


def test_the_same_token_holds_one_slot(limiter: RateLimiter) -> None:
    rates = [Rate.parse("2/minute")]
    # a redelivered message reserving for the same attempt moves its slot, it does not take two
    assert limiter.reserve("k", rates, now=T0, token="d1:1") == 0.0
    assert limiter.reserve("k", rates, now=T0 + 10, token="d1:1") == 0.0
    assert limiter.usage("k", rates, now=T0 + 10) == [1]
    assert limiter.reserve("k", rates, now=T0 + 20, token="d2:1") == 0.0
    assert limiter.usage("k", rates, now=T0 + 20) == [2]
    # the cap lowered meanwhile: the token cannot move to now, and keeps its slot where it was
    assert limiter.reserve("k", [Rate.parse("1/minute")], now=T0 + 30, token="d1:1") == pytest.approx(50)
    assert limiter.usage("k", rates, now=T0 + 69) == [2]
    assert limiter.usage("k", rates, now=T0 + 70) == [1]


def test_reserve_once_counts_a_token_once_and_leaves_its_slots_where_they_are(limiter: RateLimiter) -> None:
    # an appeal submitted twice (a double click): its quotas are charged once, in one round trip
    section, supporter = [Rate.parse("3/minute")], [Rate.parse("1/minute")]
    caps = [("section", section), ("supporter", supporter)]
    assert limiter.reserve_once(caps, now=T0, token="appeal-1") == (False, None)
    assert limiter.reserve_once(caps, now=T0 + 30, token="appeal-1") == (True, None)
    assert limiter.usage("section", section, now=T0 + 59) == [1]  # not moved to T0 + 30
    assert limiter.usage("section", section, now=T0 + 60) == [0]
    # another appeal of the same supporter: refused, nothing taken
    held, full = limiter.reserve_once(caps, now=T0 + 30, token="appeal-2")
    assert not held and full is not None and full[0] == 1 and full[1] == pytest.approx(30)
    assert limiter.usage("section", section, now=T0 + 30) == [1]
    # a token held under one key only is not "held": it is reserved (moved where it had a slot)
    assert limiter.reserve("section", section, now=T0 + 40, token="appeal-3") == 0.0
    assert limiter.reserve_once(caps, now=T0 + 61, token="appeal-3") == (False, None)
    assert limiter.usage("section", section, now=T0 + 61) == [1]
    assert limiter.usage("supporter", supporter, now=T0 + 61) == [1]


def test_several_keys_in_one_call_take_all_or_nothing(limiter: RateLimiter) -> None:
    recipient, relay = [Rate.parse("3/minute")], [Rate.parse("1/minute")]
    caps = [("recipient", recipient), ("relay", relay)]
    assert limiter.reserve_all(caps, now=T0, token="d1:1") is None
    assert limiter.usage("recipient", recipient, now=T0) == [1]
    assert limiter.usage("relay", relay, now=T0) == [1]
    # the relay is full: the recipient's slot is not taken either, and the wait is the relay's
    full = limiter.reserve_all(caps, now=T0 + 10, token="d2:1")
    assert full is not None and full[0] == 1 and full[1] == pytest.approx(50)
    assert limiter.usage("recipient", recipient, now=T0 + 10) == [1]
    # the first full key is named by its place in the list, keys without rates included
    assert limiter.reserve_all([("none", []), ("relay", relay)], now=T0 + 10, token="d3:1") == (1, pytest.approx(50))
    # a redelivered try whose recipient slot could move, but whose other cap is full, keeps the
    # slot where it was (moved back), and takes nothing under the full one
    hourly = [Rate.parse("1/hour")]
    assert limiter.reserve("gateway", hourly, now=T0 + 5, token="other:1") == 0.0
    assert limiter.reserve_all([("recipient", recipient), ("gateway", hourly)], now=T0 + 20, token="d1:1") is not None
    assert limiter.usage("recipient", recipient, now=T0 + 59) == [1]
    assert limiter.usage("recipient", recipient, now=T0 + 60) == [0]  # still at T0: not moved
    assert limiter.reserve_all(caps, now=T0 + 60, token="d2:1") is None


def test_a_caller_with_fewer_rates_does_not_forget_letters(limiter: RateLimiter) -> None:
    # During a rolling config change one worker may know only "2/minute" and another "3/hour":
    # the minute-only caller must not trim the letters the hour cap still counts.
    hourly, minutely = [Rate.parse("3/hour")], [Rate.parse("2/minute")]
    assert limiter.reserve("k", hourly, now=T0) == 0.0
    assert limiter.reserve("k", minutely, now=T0 + 120) == 0.0
    assert limiter.reserve("k", minutely, now=T0 + 240) == 0.0
    assert limiter.reserve("k", hourly, now=T0 + 300) == pytest.approx(3300)


def test_no_rates_means_no_limit(limiter: RateLimiter) -> None:
    assert limiter.reserve("k", [], now=T0) == 0.0
    assert limiter.usage("k", []) == []


# --------------------------------------------------------------------------- Redis's own clock, expiry


def test_redis_clock_and_expiry(client: redis.Redis, limiter: RateLimiter) -> None:
    rate = [Rate(2, 0.3)]
    assert limiter.reserve("k", rate) == 0.0
    assert limiter.reserve("k", rate) == 0.0
    wait = limiter.reserve("k", rate)
    assert 0 < wait <= 0.3
    log = f"{limiter.namespace}:rate:{{k}}"
    assert 0 < client.pttl(log) <= 301
    assert 0 < client.pttl(f"{log}:horizon") <= 301
    time.sleep(wait)
    assert limiter.reserve("k", rate) == 0.0
    time.sleep(0.35)
    assert client.exists(log, f"{log}:horizon") == 0  # gone by themselves
    assert limiter.usage("k", rate) == [0]


# --------------------------------------------------------------------------- concurrency

# Concurrency runs on Redis's own clock, as production does: a clock computed by each client
# before its call is only as ordered as the threads' scheduling. "N per minute" scaled down to
# "N per 0.4 s" lets the windows slide a few times in a second of racing.
N = 5
WINDOW = 0.4
RUN = 1.0
KEY = "recipient:fax:+12025550143"
#: a cap never reached, whose hour-long horizon keeps every grant in the log for the check
AUDIT = Rate(1_000_000, 3600)


def _race(url: str, namespace: str, start: float, threads: int) -> tuple[list[str], int]:
    """Reserve "N per WINDOW" on one key from ``threads`` threads, each with its own client,
    from ``start`` for RUN seconds. Returns the granted tokens and the number of tries."""
    rates = [Rate(N, WINDOW), AUDIT]
    granted: list[str] = []
    tries = [0]
    lock = threading.Lock()

    def racer() -> None:
        limiter = RateLimiter(redis.Redis.from_url(url), namespace)
        while time.time() < start:
            time.sleep(0.005)
        while time.time() < start + RUN:
            token = uuid.uuid4().hex
            ok = limiter.reserve(KEY, rates, token=token) == 0.0
            with lock:
                tries[0] += 1
                if ok:
                    granted.append(token)
            time.sleep(random.uniform(0.002, 0.01))
        limiter.client.close()

    workers = [threading.Thread(target=racer) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return granted, tries[0]


def _check_log(client: redis.Redis, namespace: str, granted: list[str], tries: int) -> None:
    log: list[tuple[bytes, float]] = client.zrange(f"{namespace}:rate:{{{KEY}}}", 0, -1, withscores=True)  # type: ignore[assignment]
    # The log holds exactly the reservations that were granted: none lost, none phantom.
    assert sorted(member.decode() for member, _ in log) == sorted(granted)
    times = sorted(int(score) for _, score in log)  # µs on Redis's clock
    window = round(WINDOW * 1_000_000)
    # Every grant opens a window [t, t + WINDOW): none holds more than N.
    for i, t in enumerate(times):
        inside = sum(1 for u in times[i:] if u < t + window)
        assert inside <= N, f"{inside} letters in the window from {t}"
    assert tries >= 10 * N
    # ... and letters went through as slots freed, not only the first N
    assert len(times) >= 2 * N


def test_concurrent_threads_never_exceed_the_rate(client: redis.Redis, redis_server: RedisServer) -> None:
    namespace = f"t-{uuid.uuid4().hex[:12]}"
    granted, tries = _race(redis_server.url, namespace, time.time() + 0.05, threads=6)
    _check_log(client, namespace, granted, tries)


def _race_in_process(url: str, namespace: str, threads: int, barrier: Any, results: Any) -> None:
    redis.Redis.from_url(url).ping()  # connected and imported before the start line
    barrier.wait(timeout=60)
    results.put(_race(url, namespace, time.time() + 0.05, threads))


def test_concurrent_processes_never_exceed_the_rate(client: redis.Redis, redis_server: RedisServer) -> None:
    namespace = f"t-{uuid.uuid4().hex[:12]}"
    # spawn, not fork: each process builds its own client and connection pool from nothing
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [
        ctx.Process(target=_race_in_process, args=(redis_server.url, namespace, 3, barrier, results)) for _ in range(2)
    ]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=90) for _ in procs]
    for p in procs:
        p.join(10)
    assert all(tries > 0 for _, tries in outcomes)  # both processes raced
    _check_log(client, namespace, [t for g, _ in outcomes for t in g], sum(n for _, n in outcomes))
