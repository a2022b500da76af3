"""One letter in flight per recipient, for channels that declare it, across every worker on
every machine.

A fax machine takes one call at a time, and one embassy line serves every Urgent Action of every
section. Before such a letter is handed to its channel the worker takes the recipient's line in
Redis; it is given back when the letter is settled — at once when the channel answers at once
(the fax lab), on its final report otherwise (a webhook, or the poll of a late one). The lock
expires by itself so that a worker dying mid-call cannot block a line for good; the expiry is
longer than any fax call.
"""

from __future__ import annotations

import redis

from dispatcher.heldkeys import HeldKeys

#: a fax of a few pages takes minutes; a gateway may queue it for a while before dialling
DEFAULT_HOLD_SECONDS = 30 * 60


class Lines:
    def __init__(self, client: redis.Redis, namespace: str):
        self.client = client
        self.namespace = namespace
        self._keys = HeldKeys(client)

    def _key(self, recipient: str) -> str:
        # (named for the fax lines it was made for: keys held before the rename still count)
        return f"{self.namespace}:fax-line:{recipient}"

    def take(self, recipient: str, holder: str, hold_seconds: float = DEFAULT_HOLD_SECONDS) -> bool:
        """Take the line for ``holder`` (a delivery id); False if another letter holds it. The same
        delivery taking its line again (a retry after a worker died) is allowed."""
        return self._keys.take(self._key(recipient), holder, hold_seconds)

    def give_back(self, recipient: str, holder: str) -> bool:
        """Release the line if ``holder`` still has it."""
        return self._keys.release(self._key(recipient), holder)

    def holder(self, recipient: str) -> str | None:
        return self._keys.owner(self._key(recipient))
