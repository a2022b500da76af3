"""Group commit: appeals arriving together share a transaction, each request still answers only
once its appeal is committed, and one bad appeal in a batch costs the others nothing."""

from __future__ import annotations

import json
import threading
from collections import Counter
from datetime import UTC, datetime

import pytest
from sqlalchemy import func, select

from dispatcher.errors import DuplicateAppeal
from dispatcher.intake.groupcommit import GroupCommit
from dispatcher.intake.signature import sign
from dispatcher.ledger.models import Appeal, State
from tests.conftest import appeal_body

BOTH = pytest.mark.parametrize(
    "database_url", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True
)


def test_jobs_that_arrive_during_a_write_share_the_next_and_each_waits_for_its_own() -> None:
    batches: list[list[int]] = []
    first_started, release_first = threading.Event(), threading.Event()

    def write(batch: list[int]) -> None:
        batches.append(list(batch))
        if batch == [0]:
            first_started.set()
            assert release_first.wait(10)

    group: GroupCommit[int] = GroupCommit(write)
    returned: list[int] = []
    threads = [threading.Thread(target=lambda i=i: (group.write(i), returned.append(i))) for i in range(6)]
    threads[0].start()
    assert first_started.wait(10)
    for t in threads[1:]:
        t.start()
    # the five others queue behind the first transaction; none has returned
    while sum(len(b) for b in batches) < 1 or len(group._pending) < 5:
        threading.Event().wait(0.01)
    assert returned == []
    release_first.set()
    for t in threads:
        t.join(10)
    assert batches[0] == [0] and sorted(batches[1]) == [1, 2, 3, 4, 5]
    assert sorted(returned) == list(range(6))


def test_a_failed_transaction_fails_every_request_of_its_batch_and_not_the_next() -> None:
    calls: list[list[str]] = []

    def write(batch: list[str]) -> None:
        calls.append(batch)
        if "bad" in batch:
            raise RuntimeError("database is locked")

    group: GroupCommit[str] = GroupCommit(write)
    with pytest.raises(RuntimeError, match="database is locked"):
        group.write("bad")
    group.write("good")
    assert calls == [["bad"], ["good"]]


def signed(environ, catalog, body):
    raw = json.dumps(body).encode()
    return raw, sign(environ[catalog.section(body["section"]).intake_key_env].encode(), raw)


@BOTH
def test_a_burst_with_a_double_submit_and_a_duplicate_supporter_loses_no_other_appeal(
    service, environ, catalog, redis_server
) -> None:
    bodies = [appeal_body() for _ in range(24)]
    duplicate = appeal_body(supporter=bodies[0]["supporter"])  # same supporter, another request: 409
    requests = [signed(environ, catalog, b) for b in bodies]
    requests += [requests[1], signed(environ, catalog, duplicate)]  # the double submit of #1
    answers: list[object] = [None] * len(requests)
    start = threading.Barrier(len(requests), timeout=30)

    def post(i: int) -> None:
        start.wait()
        try:
            answers[i] = service.intake.submit_signed(*requests[i])
        except Exception as exc:  # noqa: BLE001 - recorded for the assertions
            answers[i] = exc

    threads = [threading.Thread(target=post, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)

    # of the two appeals by one supporter, whichever was written first is in, the other is a 409
    first, second = answers[0], answers[25]
    assert sorted(type(a).__name__ for a in (first, second)) == ["Accepted", "DuplicateAppeal"]
    accepted = [a for a in [*answers[:24], second] if not isinstance(a, DuplicateAppeal)]
    assert len(accepted) == 24 and all(not isinstance(a, Exception) for a in accepted)
    # the double submit got the very appeal its first copy got (whichever was written first)
    assert answers[24].appeal_id == answers[1].appeal_id  # type: ignore[union-attr]
    assert answers[24].replayed != answers[1].replayed  # type: ignore[union-attr]
    with service.ledger.session() as s:
        assert s.scalar(select(func.count()).select_from(Appeal)) == 24
    # every letter of every appeal is on the queue, each once
    ids = [d.id for a in accepted for d in a.deliveries]  # type: ignore[union-attr]
    assert Counter(service.ledger.views.state_of(i) for i in ids) == {State.QUEUED: len(ids)}
    queue = service.broker.client.lrange(f"{service.settings.redis_namespace}:deliveries", 0, -1)
    assert len(queue) == len(ids)


@BOTH
def test_a_batch_written_in_one_statement_per_table_reads_back_as_given(service, environ, catalog) -> None:
    """The batch's rows go in through the driver's executemany (ledger/prepared.py): the ORM
    reads back every value as the appeal gave it, times to the microsecond, accents and empty
    fields included, for each appeal of a batch."""
    from dispatcher.ledger.models import Delivery

    service.intake.enqueuer = None
    written_at = datetime.now(UTC).replace(microsecond=123456)
    service.intake.clock = lambda: written_at
    bodies = [
        appeal_body(supporter={"name": "Zoë Ñúñez-Łukasz", "email": f"z{i}@example.org", "country": "CH"})
        for i in range(3)
    ]
    bodies[1]["supporter"]["city"] = "Genève"
    bodies[2].pop("client_ref")
    answers: list[object] = [None] * 3
    start = threading.Barrier(3, timeout=30)

    def post(i: int) -> None:
        start.wait()
        answers[i] = service.intake.submit(bodies[i])

    threads = [threading.Thread(target=post, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    with service.ledger.session() as s:
        for body, accepted in zip(bodies, answers, strict=True):
            appeal = s.get(Appeal, accepted.appeal_id)  # type: ignore[union-attr]
            assert appeal is not None
            assert (appeal.supporter_name, appeal.supporter_email) == (
                body["supporter"]["name"],
                body["supporter"]["email"],
            )
            assert (appeal.supporter_city, appeal.client_ref) == (body["supporter"].get("city"), body.get("client_ref"))
            assert appeal.created_at == written_at
            letters = s.scalars(select(Delivery).where(Delivery.appeal_id == appeal.id)).all()
            assert sorted(d.id for d in letters) == sorted(d.id for d in accepted.deliveries)  # type: ignore[union-attr]
            for letter in letters:
                assert (letter.created_at, letter.next_attempt_at, letter.state) == (written_at, written_at, "planned")


@BOTH
def test_letters_for_the_queue_are_written_as_a_release_of_planned_letters_leaves_them(service) -> None:
    """Intake writes a letter that goes straight to the queue already released
    (``released_values``), not planned and then updated: same state and times as the release
    (``Lifecycle.mark_queued``) leaves on a letter written planned, and on the queue."""
    from dispatcher.ledger.models import Delivery

    written_at = datetime.now(UTC).replace(microsecond=654321)
    service.intake.clock = lambda: written_at
    released = service.intake.submit(appeal_body(supporter={"name": "Ada", "email": "ada@example.org"}))
    enqueuer, service.intake.enqueuer = service.intake.enqueuer, None
    twin = service.intake.submit(appeal_body(supporter={"name": "Bea", "email": "bea@example.org"}))
    service.intake.enqueuer = enqueuer
    assert {service.ledger.views.state_of(d.id) for d in twin.deliveries} == {State.PLANNED}
    service.ledger.lifecycle.mark_queued([d.id for d in twin.deliveries], written_at)

    columns = [c.key for c in Delivery.__table__.columns if c.key not in {"id", "appeal_id", "message_id"}]

    def rows(appeal_id: str) -> list[dict[str, object]]:
        with service.ledger.session() as s:
            letters = s.scalars(select(Delivery).where(Delivery.appeal_id == appeal_id).order_by(Delivery.target))
            return [{c: getattr(d, c) for c in columns} for d in letters]

    ours = rows(released.appeal_id)
    assert ours == rows(twin.appeal_id)
    assert {(r["state"], r["queued_at"], r["updated_at"]) for r in ours} == {(State.QUEUED, written_at, written_at)}
    assert sorted(released.queued) == sorted(d.id for d in released.deliveries)
    queue = service.broker.client.lrange(f"{service.settings.redis_namespace}:deliveries", 0, -1)
    assert len(queue) == len(ours)
