"""One reconciler at a time: a lease in Redis, renewed every tick by its holder.

The reconciler paces each recipient from a view of all its letters; two reconcilers on two
machines would each release "the next letter" and double every pace. Row locks would keep them
from releasing the same letter, not from that. So one holds the lease and releases; the others
stand by, and take over once a lease is not renewed (its holder died) within ``ttl``.

Redis also carries the queue: without it nothing could be released anyway.
"""

from __future__ import annotations

import contextlib

import redis

from dispatcher.heldkeys import HeldKeys
from dispatcher.logging import get_logger

log = get_logger("dispatcher.reconciler")


class Lease:
    def __init__(self, client: redis.Redis, key: str, identity: str, ttl_seconds: float):
        self.keys = HeldKeys(client)
        self.key = key
        self.identity = identity
        self.ttl_seconds = ttl_seconds
        self.held = False

    def hold(self) -> bool:
        """Take or renew the lease; True while it is ours. False when Redis does not answer."""
        try:
            if self.held and self.keys.renew(self.key, self.identity, self.ttl_seconds):
                return True
            won = self.keys.take(self.key, self.identity, self.ttl_seconds)
        except redis.RedisError as exc:
            if self.held:
                log.warning("reconciler.lease_unknown", error=type(exc).__name__)
            self.held = False
            return False
        if won != self.held:
            log.info("reconciler.lease_taken" if won else "reconciler.lease_lost", holder=self.identity)
        self.held = won
        return won

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        with contextlib.suppress(redis.RedisError):  # it expires on its own
            self.keys.release(self.key, self.identity)
