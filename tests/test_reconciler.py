"""The reconciler against a real ledger and Redis: what it releases, and the ordering that keeps
a letter from being stranded as "queued" with no message behind it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from dispatcher.ledger.lifecycle import Result
from dispatcher.ledger.models import State
from dispatcher.ledger.states import Event
from dispatcher.queue.actors import EnqueueFailed
from tests.conftest import appeal_body

pytestmark = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


class InstantWorker:
    """An enqueuer whose 'worker' processes each message before send() even returns: the
    fastest a real worker can be. Every letter it sees is deferred by policy."""

    def __init__(self, service):
        self.service = service
        self.seen: list[str] = []

    def send(self, ids):
        for delivery_id in ids:
            self.seen.append(delivery_id)
            claim = self.service.ledger.lifecycle.claim(delivery_id, "instant", datetime.now(UTC))
            assert claim is not None, "the letter must be claimable while its message is in flight"
            now = datetime.now(UTC)
            self.service.ledger.lifecycle.finish(
                claim,
                Result(Event.DEFERRED, "deferred", next_attempt_at=now + timedelta(minutes=5), counts_as_try=False),
                worker="instant",
                started_at=now,
                now=now,
            )
        return list(ids)


def test_letter_deferred_by_a_fast_worker_is_not_stranded_as_queued(service):
    service.intake.enqueuer = None  # nothing queued at intake: the reconciler releases everything
    accepted = service.intake.submit(appeal_body())
    worker = InstantWorker(service)
    reconciler = service.reconciler(fresh_grace=timedelta(0))
    reconciler.enqueuer = worker
    assert reconciler.tick() == len(accepted.deliveries)
    assert sorted(worker.seen) == sorted(d.id for d in accepted.deliveries)
    for d in accepted.deliveries:
        # planned with its new due time, so the reconciler will release it again then
        assert service.ledger.views.state_of(d.id) == State.PLANNED
    assert reconciler.tick() == 0  # not due again yet


class BrokenQueue:
    def __init__(self, ok: int):
        self.ok = ok

    def send(self, ids):
        raise EnqueueFailed(list(ids)[: self.ok], ConnectionError("redis went away"))


def test_letters_the_queue_refused_go_back_to_planned(service):
    service.intake.enqueuer = None
    accepted = service.intake.submit(appeal_body())
    reconciler = service.reconciler(fresh_grace=timedelta(0))
    reconciler.enqueuer = BrokenQueue(ok=1)
    with pytest.raises(EnqueueFailed):
        reconciler.tick()
    states = sorted(service.ledger.views.state_of(d.id) for d in accepted.deliveries)
    assert states == sorted([State.QUEUED] + [State.PLANNED] * (len(accepted.deliveries) - 1))
