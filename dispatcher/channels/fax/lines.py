"""One fax in flight per number, across every worker on every machine.

A fax machine takes one call at a time, and one embassy line serves every Urgent Action of every
section. Before a fax is handed to a gateway the worker takes the number's line in Redis; it is
given back when the fax is final — at once for the fax lab, on the gateway's final webhook
otherwise. The lock expires by itself so that a worker dying mid-call cannot block a line for
good; the expiry is longer than any fax call.
"""

from __future__ import annotations

import redis

from dispatcher.heldkeys import HeldKeys

#: a fax of a few pages takes minutes; a gateway may queue it for a while before dialling
DEFAULT_HOLD_SECONDS = 30 * 60


class FaxLines:
    def __init__(self, client: redis.Redis, namespace: str):
        self.client = client
        self.namespace = namespace
        self._keys = HeldKeys(client)

    def _key(self, number: str) -> str:
        return f"{self.namespace}:fax-line:{number}"

    def take(self, number: str, holder: str, hold_seconds: float = DEFAULT_HOLD_SECONDS) -> bool:
        """Take the line for ``holder`` (a delivery id); False if another fax holds it. The same
        delivery taking its line again (a retry after a worker died) is allowed."""
        return self._keys.take(self._key(number), holder, hold_seconds)

    def give_back(self, number: str, holder: str) -> bool:
        """Release the line if ``holder`` still has it."""
        return self._keys.release(self._key(number), holder)

    def holder(self, number: str) -> str | None:
        return self._keys.owner(self._key(number))
