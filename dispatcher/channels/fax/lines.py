"""One fax in flight per number, across every worker on every machine.

A fax machine takes one call at a time, and one embassy line serves every Urgent Action of every
section. Before a fax is handed to a gateway the worker takes the number's line in Redis; it is
given back when the fax is final — at once for the fax lab, on the gateway's final webhook
otherwise. The lock expires by itself so that a worker dying mid-call cannot block a line for
good; the expiry is longer than any fax call.
"""

from __future__ import annotations

import redis

#: a fax of a few pages takes minutes; a gateway may queue it for a while before dialling
DEFAULT_HOLD_SECONDS = 30 * 60

_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then
    return redis.call('del', KEYS[1])
end
return 0
"""


class FaxLines:
    def __init__(self, client: redis.Redis, namespace: str):
        self.client = client
        self.namespace = namespace
        self._release = client.register_script(_RELEASE)

    def _key(self, number: str) -> str:
        return f"{self.namespace}:fax-line:{number}"

    def take(self, number: str, holder: str, hold_seconds: float = DEFAULT_HOLD_SECONDS) -> bool:
        """Take the line for ``holder`` (a delivery id); False if another fax holds it."""
        key = self._key(number)
        if self.client.set(key, holder, nx=True, px=int(hold_seconds * 1000)):
            return True
        # The same delivery taking its line again (a retry after a worker died) is allowed.
        return self.holder(number) == holder

    def give_back(self, number: str, holder: str) -> bool:
        """Release the line if ``holder`` still has it."""
        return bool(self._release(keys=[self._key(number)], args=[holder]))

    def holder(self, number: str) -> str | None:
        value = self.client.get(self._key(number))
        if value is None:
            return None
        return value.decode() if isinstance(value, bytes) else str(value)
