"""Keys in Redis held by one owner at a time: a fax number's line by a delivery, the reconciler's
lease by one process.

Taken with ``SET NX PX``, so a holder that dies cannot keep the key for good; renewed and
released only by their owner (a compare-and-set in Lua), so a holder that stalled past the
expiry never extends or deletes its successor's hold.
"""

from __future__ import annotations

import redis

_RENEW = """
if redis.call('get', KEYS[1]) == ARGV[1] then
    return redis.call('pexpire', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then
    return redis.call('del', KEYS[1])
end
return 0
"""


class HeldKeys:
    def __init__(self, client: redis.Redis):
        self.client = client
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)

    def take(self, key: str, owner: str, ttl_seconds: float) -> bool:
        """Take ``key`` for ``owner`` for ``ttl_seconds``; True also when ``owner`` holds it
        already (its expiry then stays as it was)."""
        if self.client.set(key, owner, nx=True, px=int(ttl_seconds * 1000)):
            return True
        return self.owner(key) == owner

    def renew(self, key: str, owner: str, ttl_seconds: float) -> bool:
        """Extend ``owner``'s hold; False if it no longer holds the key."""
        return bool(self._renew(keys=[key], args=[owner, int(ttl_seconds * 1000)]))

    def release(self, key: str, owner: str) -> bool:
        """Give ``key`` up if ``owner`` still holds it."""
        return bool(self._release(keys=[key], args=[owner]))

    def owner(self, key: str) -> str | None:
        value = self.client.get(key)
        if value is None:
            return None
        return value.decode() if isinstance(value, bytes) else str(value)
