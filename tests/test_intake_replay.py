"""Double submits: the same signed request sent again is answered with the original appeal, and a
captured signature still never creates a second appeal nor carries another body."""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import delete, func, select, update

from dispatcher.intake.service import Accepted
from dispatcher.intake.signature import sign
from dispatcher.ledger.models import Appeal, Delivery, UsedSignature
from tests.conftest import appeal_body


def appeals_in_ledger(service) -> int:
    with service.ledger.session() as s:
        return s.scalar(select(func.count()).select_from(Appeal))


def letters_in_ledger(service) -> int:
    with service.ledger.session() as s:
        return s.scalar(select(func.count()).select_from(Delivery))


def signed(environ, catalog, body, **kw):
    raw = json.dumps(body).encode()
    return raw, sign(environ[catalog.section(body["section"]).intake_key_env].encode(), raw, **kw)


def post(client, raw: bytes, header: str):
    return client.post(
        "/v1/appeals", content=raw, headers={"Dispatch-Signature": header, "Content-Type": "application/json"}
    )


@pytest.mark.parametrize(
    "database_url", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True
)
def test_a_double_submit_racing_the_first_gets_the_same_appeal(service, environ, catalog, monkeypatch):
    """Both requests are in flight at once: each has found the signature unused before either
    records it. The signature's key lets one in; the other waits for it and answers with its
    appeal."""
    # No client_ref: only the signature tells the second request from another appeal (a 409).
    raw, header = signed(environ, catalog, appeal_body(client_ref=None))
    intake = service.intake
    both_checked = threading.Barrier(2, timeout=30)
    check = intake._check_against_catalog

    def check_then_wait(*args, **kwargs):
        routes = check(*args, **kwargs)
        both_checked.wait()  # both have passed the look-up of used signatures
        return routes

    monkeypatch.setattr(intake, "_check_against_catalog", check_then_wait)
    answers: list = [None, None]

    def submit(i: int) -> None:
        try:
            answers[i] = intake.submit_signed(raw, header)
        except Exception as exc:  # noqa: BLE001 - shown in the assertion below
            answers[i] = exc

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert all(isinstance(a, Accepted) for a in answers), answers
    assert answers[0].appeal_id == answers[1].appeal_id
    assert sorted(a.replayed for a in answers) == [False, True]
    assert {d.id for d in answers[0].deliveries} == {d.id for d in answers[1].deliveries}
    assert appeals_in_ledger(service) == 1
    assert letters_in_ledger(service) == len(answers[0].deliveries)


pytestmark_sqlite = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


@pytestmark_sqlite
def test_a_captured_header_with_another_body_is_refused(client, environ, catalog, service):
    body = appeal_body()
    raw, header = signed(environ, catalog, body)
    assert post(client, raw, header).status_code == 202
    # Same header, the body of another supporter (or the same one reserialised): no match.
    other = json.dumps(appeal_body()).encode()
    reordered = json.dumps(body, indent=1).encode()
    for tampered in (other, reordered):
        r = post(client, tampered, header)
        assert r.status_code == 401
        assert r.json()["error"]["code"] == "invalid_signature"
    assert appeals_in_ledger(service) == 1


@pytestmark_sqlite
def test_a_replay_after_the_skew_window_is_refused_as_stale(client, environ, catalog, service):
    raw, header = signed(environ, catalog, appeal_body())
    assert post(client, raw, header).status_code == 202
    service.intake.clock = lambda: datetime.now(UTC) + timedelta(seconds=301)
    r = post(client, raw, header)
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "stale_signature"


@pytestmark_sqlite
def test_a_replay_after_the_appeals_personal_data_was_purged_still_gets_it(client, environ, catalog, service):
    raw, header = signed(environ, catalog, appeal_body())
    first = post(client, raw, header).json()
    with service.ledger.session() as s:
        s.execute(update(Delivery).values(state="cancelled"))  # settled: the purge may blank it
    assert service.ledger.housekeeping.purge_personal_data(datetime.now(UTC), timedelta(0)) == 1
    again = post(client, raw, header)
    assert again.status_code == 202
    assert again.json()["appeal_id"] == first["appeal_id"]
    assert again.json()["replayed"] is True
    assert {d["state"] for d in again.json()["deliveries"]} == {"cancelled"}
    assert "jane" not in again.text.lower()


@pytestmark_sqlite
@pytest.mark.parametrize("gone", ["appeal deleted", "signature recorded before 0010"])
def test_a_replay_whose_appeal_cannot_be_found_is_refused_and_creates_nothing(client, environ, catalog, service, gone):
    raw, header = signed(environ, catalog, appeal_body())
    assert post(client, raw, header).status_code == 202
    with service.ledger.session() as s:
        if gone == "appeal deleted":
            s.execute(delete(Appeal))  # its letters go with it (ON DELETE CASCADE)
        else:
            s.execute(update(UsedSignature).values(appeal_id=None))
    before = appeals_in_ledger(service)
    r = post(client, raw, header)
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "replayed_signature"
    assert appeals_in_ledger(service) == before


@pytestmark_sqlite
def test_a_retry_signed_afresh_and_its_double_submit_both_get_the_original(client, environ, catalog, service):
    body = appeal_body()
    raw, header = signed(environ, catalog, body)
    original = post(client, raw, header).json()["appeal_id"]
    # The form timed out and signed the same body again later (same client_ref), then the
    # supporter clicked twice.
    raw, later = signed(environ, catalog, body, timestamp=int(datetime.now(UTC).timestamp()) + 5)
    for _ in range(2):
        r = post(client, raw, later)
        assert r.status_code == 202
        assert (r.json()["appeal_id"], r.json()["replayed"]) == (original, True)
    assert appeals_in_ledger(service) == 1


@pytestmark_sqlite
def test_a_replay_after_the_campaign_was_closed_gets_the_original_answer(client, environ, catalog, service):
    body = appeal_body()
    raw, header = signed(environ, catalog, body)
    first = post(client, raw, header).json()
    service.ledger.controls.close_campaign(body["campaign"], "the detainee was released", datetime.now(UTC))

    again = post(client, raw, header)
    assert again.status_code == 202
    assert (again.json()["appeal_id"], again.json()["replayed"]) == (first["appeal_id"], True)
    # a new appeal to the closed campaign is refused, and leaves nothing behind
    fresh = post(client, *signed(environ, catalog, appeal_body()))
    assert fresh.status_code == 410 and "the detainee was released" in fresh.json()["error"]["message"]
    assert appeals_in_ledger(service) == 1
    with service.ledger.session() as s:
        assert s.scalar(select(func.count()).select_from(UsedSignature)) == 1


@pytestmark_sqlite
def test_a_refused_request_sent_again_is_refused_again(client, environ, catalog, service):
    body = appeal_body()
    assert post(client, *signed(environ, catalog, body)).status_code == 202
    # Another appeal by the same supporter: 409, and nothing is remembered of its signature.
    second = appeal_body(supporter=body["supporter"])
    raw, header = signed(environ, catalog, second)
    for _ in range(2):
        r = post(client, raw, header)
        assert r.status_code == 409
        assert r.json()["error"]["code"] == "duplicate_appeal"


@pytestmark_sqlite
@pytest.mark.parametrize("ref", ["the form's own submission id", "order 42", "x"])
def test_client_ref_may_hold_spaces_between_characters(client, environ, catalog, ref):
    assert post(client, *signed(environ, catalog, appeal_body(client_ref=ref))).status_code == 202


@pytestmark_sqlite
@pytest.mark.parametrize("ref", [" order-42", "order-42 ", "order\t42", "ordre n°42", ""])
def test_client_ref_outside_the_rules_is_422(client, environ, catalog, ref):
    r = post(client, *signed(environ, catalog, appeal_body(client_ref=ref)))
    assert r.status_code == 422
    assert [f["field"] for f in r.json()["error"]["fields"]] == ["client_ref"]
