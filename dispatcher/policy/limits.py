"""Rate limits that hold across every worker process on every machine.

An official's inbox or fax line is shared by every campaign and section, so a cap such as
"2 letters per hour to this fax number" must count every letter whichever worker sends it. The
count lives in Redis and each reservation is one Lua script, so "check, then take" is atomic
however many workers race for the last slot.

Algorithm: a sliding-window log. Each key has one sorted set whose members are reservation
tokens scored by their time in integer microseconds; a rate "N per W" admits a new letter at
``now`` when fewer than N entries lie in ``(now - W, +inf)``. That is exact for "no more than N
in *any* window of length W" (GCRA and fixed windows only approximate it), and the log is small:
it never holds more entries than the caps let through. Every rate reads the same log, so callers
that pass different rates for one key (a rolling config change) still see every letter sent.
See docs/policy.md.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Sequence
from typing import Any

import redis
import redis.asyncio

from dispatcher.rates import MICROS
from dispatcher.rates import Rate as Rate

# Times travel as integer microseconds: exact in a Lua double (2**53 µs is 285 years), and
# scores that are whole numbers let "strictly after now - W" be written as ">= now - W + 1"
# without string-formatting a number in Lua (its tostring keeps only 14 digits).

#: KEYS: a log and its horizon per key (log1, horizon1, log2, horizon2, ...); ARGV: now_us or
#: "", token, then per key the number of its rates and count and window_us per rate.
#: Returns {0, 0} when a slot was taken under every rate of every key; else nothing is taken and
#: it returns {k, µs until a slot frees under all the rates of key k}, k the first key that is
#: full (from 1). Several keys in one call: a letter's recipient cap and its relay's limit are
#: one round trip, and all or none of them are taken.
_RESERVE = """
local now
if ARGV[1] == '' then
    local t = redis.call('TIME')
    now = tonumber(t[1]) * 1000000 + tonumber(t[2])
else
    now = tonumber(ARGV[1])
end
local token = ARGV[2]

local specs = {}
local arg = 3
for k = 1, #KEYS, 2 do
    local n = tonumber(ARGV[arg])
    local rates = {}
    for r = 1, n do
        rates[r] = {tonumber(ARGV[arg + 2 * r - 1]), tonumber(ARGV[arg + 2 * r])}
    end
    arg = arg + 2 * n + 1
    specs[#specs + 1] = {log = KEYS[k], horizon_key = KEYS[k + 1], rates = rates}
end

-- Check every key first; put back what was moved when one of them is full.
for s, spec in ipairs(specs) do
    -- Keep entries as long as the longest window any caller has used recently, not just ours:
    -- a caller with a shorter list of rates must not trim what a longer one still counts.
    local horizon = tonumber(redis.call('GET', spec.horizon_key) or '0')
    for _, rate in ipairs(spec.rates) do
        horizon = math.max(horizon, rate[2])
    end
    spec.horizon = horizon
    redis.call('ZREMRANGEBYSCORE', spec.log, '-inf', now - horizon)

    -- The same token reserving again (a redelivered message for the same attempt) moves its
    -- slot to now rather than holding two; if it cannot move, the old slot stays as it was.
    spec.previous = redis.call('ZSCORE', spec.log, token)
    if spec.previous then
        redis.call('ZREM', spec.log, token)
    end

    local wait = 0
    for _, rate in ipairs(spec.rates) do
        local count = rate[1]
        local window = rate[2]
        local live = redis.call('ZCOUNT', spec.log, now - window + 1, '+inf')
        if live >= count then
            -- The slot frees when the (live - count + 1)-th oldest live entry leaves the window.
            local entry = redis.call('ZRANGEBYSCORE', spec.log, now - window + 1, '+inf',
                                     'WITHSCORES', 'LIMIT', live - count, 1)
            wait = math.max(wait, tonumber(entry[2]) + window - now)
        end
    end

    if wait > 0 then
        for b = 1, s do
            if specs[b].previous then
                redis.call('ZADD', specs[b].log, specs[b].previous, token)
            end
        end
        return {s, wait}
    end
end

for _, spec in ipairs(specs) do
    redis.call('ZADD', spec.log, now, token)
    -- Both keys vanish once nothing in them can matter (milliseconds, rounded up).
    local ttl = math.ceil(spec.horizon / 1000) + 1
    redis.call('PEXPIRE', spec.log, ttl)
    redis.call('SET', spec.horizon_key, spec.horizon, 'PX', ttl)
end
return {0, 0}
"""

#: _RESERVE, unless ``token`` already holds a slot in every key's log: then nothing is touched
#: and it returns {-1, 0}. For a charge that must count once however often it is asked for (an
#: appeal submitted twice), in the same round trip as the reservation.
_RESERVE_ONCE = (
    """
local held = true
for k = 1, #KEYS, 2 do
    if not redis.call('ZSCORE', KEYS[k], ARGV[2]) then
        held = false
        break
    end
end
if held then
    return {-1, 0}
end
"""
    + _RESERVE
)

#: KEYS[1] log; ARGV: now_us or "", then window_us per rate. Returns the live count per rate.
_USAGE = """
local now
if ARGV[1] == '' then
    local t = redis.call('TIME')
    now = tonumber(t[1]) * 1000000 + tonumber(t[2])
else
    now = tonumber(ARGV[1])
end
local counts = {}
for i = 2, #ARGV do
    counts[#counts + 1] = redis.call('ZCOUNT', KEYS[1], now - tonumber(ARGV[i]) + 1, '+inf')
end
return counts
"""


def _micros(now: float | None) -> str:
    return "" if now is None else str(round(now * MICROS))


def _keys(namespace: str, key: str) -> list[str]:
    # The hash tag keeps a key's log and horizon in one cluster slot, as a script needs.
    base = f"{namespace}:rate:{{{key}}}"
    return [base, f"{base}:horizon"]


class _Request:
    """One call of _RESERVE or _RESERVE_ONCE: its keys and arguments, and what its reply means."""

    def __init__(self, namespace: str, caps: Sequence[tuple[str, Sequence[Rate]]], now: float | None, token: str):
        self.now = now
        self.keys: list[str] = []
        self.args: list[str | int] = [_micros(now), token]
        self.positions: list[int] = []
        for position, (key, rates) in enumerate(caps):
            if not rates:
                continue
            self.positions.append(position)
            self.keys += _keys(namespace, key)
            self.args.append(len(rates))
            for rate in rates:
                self.args += [rate.count, rate.micros]

    def answer(self, reply: Sequence[Any]) -> tuple[bool, tuple[int, float] | None]:
        """(held, full): see RateLimiter.reserve_once."""
        which, wait_us = (int(v) for v in reply)
        if which < 0:
            return True, None
        if which == 0 or wait_us <= 0:
            return False, None
        wait = wait_us / MICROS
        now = self.now
        if now is not None:
            # Promise that reserving at exactly ``now + wait`` succeeds, despite float rounding.
            target = round(now * MICROS) + wait_us
            while round((now + wait) * MICROS) < target:
                wait += math.ulp(now + wait)  # the sum's own step: a smaller one may not move it
        return False, (self.positions[which - 1], wait)


class RateLimiter:
    """Slots under one or more rates per key (a recipient, a relay, a gateway account)."""

    def __init__(self, client: redis.Redis, namespace: str):
        self.client = client
        self.namespace = namespace
        self._reserve = client.register_script(_RESERVE)
        self._reserve_once = client.register_script(_RESERVE_ONCE)
        self._usage = client.register_script(_USAGE)

    def _keys(self, key: str) -> list[str]:
        return _keys(self.namespace, key)

    def reserve(self, key: str, rates: Sequence[Rate], *, now: float | None = None, token: str | None = None) -> float:
        """Take one slot under every rate for ``key`` and return 0.0, or take nothing and return
        the seconds until a slot frees under all of them.

        ``now`` (unix seconds) replaces Redis's clock, for simulated time; leave it out in
        production so every machine reads the same clock. Callers passing ``now`` must share one
        clock: a reservation arriving with a ``now`` older than the longest window, relative to
        what others already used, no longer sees the letters they trimmed.

        ``token`` names this reservation so that :meth:`cancel` can give it back; use one per
        send attempt (e.g. delivery id and try number). Reserving again with a token that holds
        a slot moves that slot to ``now`` instead of taking a second one.
        """
        if not rates:
            return 0.0
        full = self.reserve_all([(key, rates)], now=now, token=token)
        return 0.0 if full is None else full[1]

    def reserve_all(
        self, caps: Sequence[tuple[str, Sequence[Rate]]], *, now: float | None = None, token: str | None = None
    ) -> tuple[int, float] | None:
        """Take one slot under every rate of every key in ``caps`` (key, rates) and return None,
        or take none at all and return (index in ``caps`` of the first key that is full, seconds
        until a slot frees under all of its rates). One round trip, atomic across processes;
        ``now`` and ``token`` as for :meth:`reserve`. Keys without rates are skipped."""
        return self._call(self._reserve, caps, now, token or uuid.uuid4().hex)[1]

    def reserve_once(
        self, caps: Sequence[tuple[str, Sequence[Rate]]], *, token: str, now: float | None = None
    ) -> tuple[bool, tuple[int, float] | None]:
        """(True, None) when ``token`` already holds a slot under every key of ``caps`` (then
        nothing is taken or moved), else (False, what :meth:`reserve_all` returns). One round
        trip."""
        return self._call(self._reserve_once, caps, now, token)

    def _call(
        self, script: Any, caps: Sequence[tuple[str, Sequence[Rate]]], now: float | None, token: str
    ) -> tuple[bool, tuple[int, float] | None]:
        request = _Request(self.namespace, caps, now, token)
        if not request.keys:
            return False, None
        return request.answer(script(keys=request.keys, args=request.args))

    def cancel(self, key: str, token: str) -> None:
        """Give back the slot taken with ``token``: the send it was for did not happen."""
        self.client.zrem(self._keys(key)[0], token)

    def usage(self, key: str, rates: Sequence[Rate], *, now: float | None = None) -> list[int]:
        """How many slots of each rate are taken at ``now``, in the order given."""
        if not rates:
            return []
        args: list[str | int] = [_micros(now), *(rate.micros for rate in rates)]
        return [int(n) for n in self._usage(keys=self._keys(key)[:1], args=args)]


class AsyncRateLimiter:
    """:meth:`RateLimiter.reserve_once` for code on an event loop, through redis.asyncio: the
    API's intake charges its quotas without a thread per appeal. A thread hop per call cost
    about three times the call itself with 32 requests in flight (523 against 145 µs of CPU an
    EVALSHA, measured on this machine); a Redis that hangs still holds up only the requests
    that wait for it. Bound to the event loop it is first used on, as redis.asyncio is."""

    def __init__(self, client: redis.asyncio.Redis, namespace: str):
        self.client = client
        self.namespace = namespace
        self._reserve_once = client.register_script(_RESERVE_ONCE)

    async def reserve_once(
        self, caps: Sequence[tuple[str, Sequence[Rate]]], *, token: str, now: float | None = None
    ) -> tuple[bool, tuple[int, float] | None]:
        request = _Request(self.namespace, caps, now, token)
        if not request.keys:
            return False, None
        return request.answer(await self._reserve_once(keys=request.keys, args=request.args))

    async def aclose(self) -> None:
        await self.client.aclose()
