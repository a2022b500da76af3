"""Erasing a supporter (GDPR art. 17): after it, no trace of their name or email is left in the
ledger (every text column of every table, found by inspection), in Redis or in the sandbox's
copies of their letters; their letters not yet sent are cancelled "erased"; the public counts do
not change; the audit log has the entry, without personal data; other supporters are untouched.
Real letters through a real worker, the sandbox SMTP server writing .eml files and the fax lab's
real calls; SQLite and PostgreSQL, real Redis. Then the three ways in: the function the console
calls, the signed API (wrong key, another section, twice), and the CLI; and a letter being sent
at the moment of the erasure."""

from __future__ import annotations

import json
import threading
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import redis
from click.testing import CliRunner
from sqlalchemy import MetaData, String, Table, inspect, select
from structlog.testing import capture_logs

from dispatcher.cli import main
from dispatcher.errors import NotFound
from dispatcher.intake.signature import sign
from dispatcher.ledger.lifecycle import DigestRoute, Result
from dispatcher.ledger.states import Event, State
from dispatcher.pseudonyms import pepper_of, supporter_ref
from dispatcher.sandbox.faxlab import Behaviour, FaxLab
from dispatcher.sandbox.smtp import SandboxSMTP, copies_of
from dispatcher.supporters import erase
from tests.conftest import Running, appeal_body, make_settings, signed_post, wait_for
from tests.support.smtp import HANG

CAMPAIGN = "UA-002-19-DEMO"
SQLITE = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


# ------------------------------------------------------------------ fixtures and helpers


@pytest.fixture
def sandbox_smtp(tmp_path: Path):
    """The real sandbox SMTP server, keeping every letter as a .eml file under var/sandbox/mail."""
    with SandboxSMTP(tmp_path / "var" / "sandbox" / "mail") as server:
        yield server


@pytest.fixture
def settings(request, tmp_path, database_url, redis_server):  # type: ignore[no-untyped-def]
    # The SMTP test server for the tests that script the relay; the sandbox's own otherwise.
    if "smtp" in request.fixturenames:
        port = request.getfixturevalue("smtp").port
    else:
        port = request.getfixturevalue("sandbox_smtp").port
    return make_settings(
        tmp_path,
        database_url=database_url,
        redis_url=redis_server.url,
        smtp_port=port,
        fax_line_wait_seconds=0.2,
        fax_no_tone_interval_seconds=0.3,
    )


def supporter(name: str, section: str = "us", email: str | None = None) -> dict[str, Any]:
    body = appeal_body(section=section, language="de" if section == "ch" else "en")
    body["supporter"]["name"] = name
    body["supporter"]["city"] = "Lausanne" if section == "ch" else "Boston"
    body["supporter"]["country"] = "CH" if section == "ch" else "US"
    if email is not None:
        body["supporter"]["email"] = email
    return body


def states(service, appeal_id: str) -> dict[str, str]:
    view = service.ledger.views.appeal(appeal_id)
    return {d.id: d.state.value for d in view.deliveries}


def every_text_in_the_ledger(engine) -> list[tuple[str, str, str]]:
    """(table, column, value) of every string value of every table: from the database's own
    description of itself, not a list kept by hand."""
    found = []
    names = inspect(engine).get_table_names()
    meta = MetaData()
    with engine.connect() as conn:
        for name in names:
            table = Table(name, meta, autoload_with=conn)
            columns = [c for c in table.c if isinstance(c.type, String)]
            if not columns:
                continue
            for row in conn.execute(select(*columns)):
                for column, value in zip(columns, row, strict=True):
                    if value is not None:
                        found.append((name, column.name, str(value)))
    return found


def traces(haystack: list[tuple[str, str, str]], *needles: str) -> list[tuple[str, str, str]]:
    lowered = [n.lower() for n in needles]
    return [t for t in haystack if any(n in t[2].lower() for n in lowered)]


def everything_in_redis(url: str, namespace: str) -> str:
    """Every key of the service's namespace and every value in it, as one text."""
    client = redis.Redis.from_url(url)
    out = []
    for key in client.scan_iter(match=f"{namespace}*"):
        kind = client.type(key).decode()
        out.append(key.decode(errors="replace"))
        if kind == "string":
            out.append(repr(client.get(key)))
        elif kind == "list":
            out.extend(repr(v) for v in client.lrange(key, 0, -1))
        elif kind == "hash":
            out.extend(repr(kv) for kv in client.hgetall(key).items())
        elif kind == "set":
            out.extend(repr(v) for v in client.smembers(key))
        elif kind == "zset":
            out.extend(repr(v) for v in client.zrange(key, 0, -1))
    client.close()
    return "\n".join(out)


def sandbox_bytes(root: Path) -> bytes:
    return b"\n".join(p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file())


def message_id_of(service, delivery_id: str) -> str:
    from dispatcher.ledger.tables import D

    with service.ledger.engine.connect() as conn:
        return conn.execute(select(D.c.message_id).where(D.c.id == delivery_id)).scalar_one()


def copies(service, delivery_ids: list[str]) -> list[Path]:
    lab = FaxLab(service.settings.var_dir / "sandbox" / "fax")
    found: list[Path] = []
    for delivery_id in delivery_ids:
        found += copies_of(service.settings.sandbox_mail_dir, message_id_of(service, delivery_id))
        index = lab.directory / "tags" / delivery_id
        if index.exists():
            for remote_id in index.read_text().split():
                found += [p for p in lab.path_of(remote_id).rglob("*") if p.is_file()]
    return found


def signed_erasure(
    client, environ, catalog, body: Any, *, section: str = "us", key: str | None = None, header=None, timestamp=None
):
    raw = json.dumps(body).encode()
    secret = key if key is not None else environ[catalog.section(section).intake_key_env]
    header = header or sign(secret.encode(), raw, timestamp)
    response = client.post(
        "/v1/erasures", content=raw, headers={"Dispatch-Signature": header, "Content-Type": "application/json"}
    )
    return response, header


def personal_data(service, appeal_id: str) -> tuple[str | None, str | None]:
    data = service.ledger.views.supporter(appeal_id)
    return (None, None) if data is None else (data.name, data.email)


# ------------------------------------------------------------------ end to end


def test_an_erased_supporter_leaves_no_trace_and_the_counts_stay(client, environ, catalog, service):
    name, email = f"Ilse Erasmus-{uuid.uuid4().hex[:6]}", f"ilse.{uuid.uuid4().hex[:8]}@example.org"
    other = supporter("Bruno Keepwell")
    lab = FaxLab(service.settings.var_dir / "sandbox" / "fax")
    president = catalog.target("UA-002-19", "ch", "president").fax
    with Running(service):
        # Her first appeal (us) goes out in full: an email to the ambassador (a .eml in the
        # sandbox), a fax to the president (a lab call, its pages kept).
        sent = signed_post(client, environ, catalog, supporter(name, email=email)).json()["appeal_id"]
        kept = signed_post(client, environ, catalog, other).json()["appeal_id"]
        wait_for(lambda: set(states(service, sent).values()) == {"sent", "delivered"}, timeout=60)
        wait_for(lambda: set(states(service, kept).values()) == {"sent", "delivered"}, timeout=60)
        # Her second appeal (ch, same email): the president's line is busy, so that letter is
        # tried (the lab keeps the pages it was about to send) and waits for another try.
        lab.set_behaviour(president, Behaviour.BUSY)
        waiting = signed_post(client, environ, catalog, supporter(name, "ch", email=email)).json()["appeal_id"]
        [busy] = [d.id for d in service.ledger.views.appeal(waiting).deliveries if d.target == "president"]
        wait_for(lambda: [a.outcome for a in service.ledger.views.attempts(busy)][:1] == ["transient"], timeout=60)
    # The worker stopped: her waiting letter is planned or queued, in nobody's hands.
    assert service.ledger.views.state_of(busy) in ("planned", "queued")
    # A letter on the queue right now (its message in Redis): another supporter's.
    service.intake.submit(supporter("Carla Queued"))

    hers = [*states(service, sent), *states(service, waiting)]
    before = copies(service, hers)
    assert any(p.suffix == ".eml" for p in before) and any(p.name == "sent.tiff" for p in before)
    assert email.encode() in sandbox_bytes(service.settings.var_dir / "sandbox")  # her Reply-To
    bruno = copies(service, list(states(service, kept)))
    assert bruno
    assert traces(every_text_in_the_ledger(service.ledger.engine), name, email)
    counters = client.get(f"/v1/campaigns/{CAMPAIGN}/counters").json()
    counted = service.ledger.views.counters(CAMPAIGN).as_json()
    states_before = {**states(service, sent), **states(service, waiting)}

    # Queue messages carry ids only: no supporter's name or address is in Redis, ever.
    in_redis = everything_in_redis(service.settings.redis_url, service.settings.redis_namespace)
    assert "dl_" in in_redis  # (the scan does see the queue)
    for needle in (name, email, "Carla Queued", "Bruno Keepwell"):
        assert needle.lower() not in in_redis.lower()

    with capture_logs() as logs:
        report = erase(service.ledger, service.settings, email=email, actor="admin-anna", reason="request #41")

    assert report.status == "erased"
    assert set(report.appeal_ids) == {sent, waiting} and report.appeals_erased == 2
    # ledger: not one text, in any column of any table, names her
    assert traces(every_text_in_the_ledger(service.ledger.engine), name, email) == []
    assert personal_data(service, sent) == (None, None)
    # her letter not yet sent is cancelled "erased"; those that went out stay as they were
    after = {**states(service, sent), **states(service, waiting)}
    for delivery_id, state in states_before.items():
        if state in ("planned", "queued", "bundled"):
            view = service.ledger.views.delivery(delivery_id)
            assert (view.state, view.last_text) == ("cancelled", "erased")
        else:
            assert after[delivery_id] == state
    assert report.letters_cancelled == sum(1 for s in states_before.values() if s in ("planned", "queued"))
    # sandbox: her letters' copies are gone, sent or not; the other supporter's are there
    assert copies(service, hers) == [] and all(not p.exists() for p in before)
    assert report.sandbox_files_removed == len(before)
    assert email.encode() not in sandbox_bytes(service.settings.var_dir / "sandbox")
    assert all(p.exists() for p in bruno)
    # the counts do not change
    assert client.get(f"/v1/campaigns/{CAMPAIGN}/counters").json() == counters
    assert service.ledger.views.counters(CAMPAIGN).as_json() == counted
    # audited, with the keyed hash and the counts; never the person
    [entry] = service.ledger.audit.entries(target_id=report.supporter_ref)
    ref = supporter_ref(email, pepper_of(service.settings))
    assert (entry.actor, entry.action, entry.target_kind, entry.target_id) == (
        "admin-anna",
        "supporter.erase",
        "supporter",
        ref,
    )
    assert entry.reason == "request #41" and "2 appeal(s) erased" in (entry.detail or "")
    # the other supporter is untouched
    assert personal_data(service, kept) == ("Bruno Keepwell", other["supporter"]["email"])
    assert set(states(service, kept).values()) == {"sent", "delivered"}
    # the log says what was done, without her
    assert [e["event"] for e in logs] == ["supporter.erased"]
    assert name.lower() not in repr(logs).lower() and email.lower() not in repr(logs).lower()
    # ... and Redis still knows nothing of her
    in_redis = everything_in_redis(service.settings.redis_url, service.settings.redis_namespace)
    assert name.lower() not in in_redis.lower() and email.lower() not in in_redis.lower()


@SQLITE
def test_a_digest_waiting_loses_the_erased_supporters_line(service):
    service.intake.enqueuer = None
    ilse = service.intake.submit(supporter("Ilse Digested"))
    bruno = service.intake.submit(supporter("Bruno Digested"))
    letters = [next(d.id for d in a.deliveries if d.target == "president") for a in (ilse, bruno)]
    now = datetime.now(UTC)
    president = service.catalog.target(CAMPAIGN, "us", "president")
    assert president.fax
    route = DigestRoute(CAMPAIGN, "us", "president", "fax", president.fax, "en", "example.org")
    digest, joined = service.ledger.lifecycle.bundle(letters, route, now, oldest=now)
    assert joined == 2
    assert [s.name for s in service.ledger.schedule.digest_signers(digest)] == ["Ilse Digested", "Bruno Digested"]

    report = service.supporters.erase(service.supporters.who(appeal_id=ilse.appeal_id), actor="admin-anna")

    assert report.letters_cancelled == len(ilse.deliveries)
    # rendered when it is sent, from its letters still bundled: she is not on it any more
    assert [s.name for s in service.ledger.schedule.digest_signers(digest)] == ["Bruno Digested"]
    assert service.ledger.views.state_of(letters[0]) == "cancelled"
    assert service.ledger.views.state_of(letters[1]) == "bundled"
    assert service.ledger.views.state_of(digest) == "planned"


# ------------------------------------------------------------------ a letter being sent


@SQLITE
def test_a_letter_being_sent_is_left_to_finish_and_cancelled_if_it_would_wait_again(service, smtp):
    service.intake.enqueuer = None
    accepted = service.intake.submit(supporter("Ilse Onthewire"))
    letter = next(d.id for d in accepted.deliveries if d.channel == "email")
    handle = service.worker(threads=1)
    processor = handle.processor
    # The relay hangs over RCPT (the letter is rendered and on the wire), then the send fails
    # as a transient error: without the erasure it would wait for another try.
    processor.channels.get("email").send_timeout = 2.0
    smtp.script_rcpt([HANG])
    try:
        with capture_logs() as logs:
            sending = threading.Thread(target=processor, args=(letter,))
            sending.start()
            wait_for(lambda: "RCPT" in smtp.commands, timeout=10)
            assert service.ledger.views.state_of(letter) == "sending"
            report = service.supporters.erase(service.supporters.who(appeal_id=accepted.appeal_id), actor="admin-anna")
            # in the worker's hands: not touched, not cancelled under it
            assert report.letters_in_flight == 1
            assert service.ledger.views.state_of(letter) == "sending"
            sending.join(30)
    finally:
        handle.loop.run(processor.channels.get("email").aclose(), timeout=10)
        handle.loop.stop()
    view = service.ledger.views.delivery(letter)
    assert (view.state, view.last_text) == ("cancelled", "erased")
    # the try that was under way is on record (the state table's moves only); none follows
    assert [a.outcome for a in service.ledger.views.attempts(letter)] == ["transient"]
    assert smtp.messages == []
    [ended] = [e for e in logs if e.get("delivery") == letter and e["event"] == "delivery.cancelled"]
    assert ended["reason"] == "the supporter's data was erased meanwhile"


@SQLITE
def test_a_letter_sent_while_its_supporter_was_erased_stays_sent_and_counted(service):
    service.intake.enqueuer = None
    accepted = service.intake.submit(supporter("Ilse Sentanyway"))
    letter = next(d.id for d in accepted.deliveries if d.channel == "email")
    now = datetime.now(UTC)
    claim = service.ledger.lifecycle.claim(letter, "w1", now)
    assert claim is not None
    service.supporters.erase(service.supporters.who(appeal_id=accepted.appeal_id), actor="admin-anna")
    # the relay had accepted it: it is sent, and counts like any letter that went out
    moved = service.ledger.lifecycle.finish(
        claim, Result(Event.SENT, "sent", code=250), worker="w1", started_at=now, now=now
    )
    assert moved is State.SENT
    assert service.ledger.views.counters(CAMPAIGN).by_section["us"].letters_delivered == 1


@SQLITE
def test_a_queue_message_for_an_erased_supporters_letter_sends_nothing(service, smtp):
    service.intake.enqueuer = None
    accepted = service.intake.submit(supporter("Ilse Toolate"))
    letter = next(d.id for d in accepted.deliveries if d.channel == "email")
    service.ledger.lifecycle.mark_queued([letter], datetime.now(UTC))  # its message is on its way
    service.supporters.erase(service.supporters.who(appeal_id=accepted.appeal_id), actor="admin-anna")
    handle = service.worker(threads=1)
    try:
        handle.processor(letter)  # the message arrives: the claim finds the letter cancelled
    finally:
        handle.loop.stop()
    view = service.ledger.views.delivery(letter)
    assert (view.state, view.last_text, view.attempts) == ("cancelled", "erased", 0)
    assert smtp.messages == []


# ------------------------------------------------------------------ the signed API


def test_the_api_erases_its_own_sections_supporters_once_and_refuses_the_rest(client, environ, catalog, service):
    service.intake.enqueuer = None
    ours = service.intake.submit(supporter("Ilse Viaapi"))
    theirs = service.intake.submit(supporter("Hans Andere", "ch"))

    # signed with another key: 401, nothing erased
    r, _ = signed_erasure(client, environ, catalog, {"section": "us", "appeal_id": ours.appeal_id}, key="wrong")
    assert (r.status_code, r.json()["error"]["code"]) == (401, "invalid_signature")
    assert personal_data(service, ours.appeal_id)[0] == "Ilse Viaapi"
    # another section's appeal: 404, as if there were none, and nothing erased
    r, _ = signed_erasure(client, environ, catalog, {"section": "us", "appeal_id": theirs.appeal_id})
    assert (r.status_code, r.json()["error"]["code"]) == (404, "not_found")
    assert personal_data(service, theirs.appeal_id)[0] == "Hans Andere"
    # neither, or both
    r, _ = signed_erasure(client, environ, catalog, {"section": "us"})
    assert (r.status_code, r.json()["error"]["fields"][0]["code"]) == (422, "required")
    r, _ = signed_erasure(client, environ, catalog, {"section": "us", "appeal_id": "ap_x", "email": "a@example.org"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_erasure"

    r, header = signed_erasure(client, environ, catalog, {"section": "us", "appeal_id": ours.appeal_id})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "erased" and body["appeal_ids"] == [ours.appeal_id]
    assert body["letters_cancelled"] == len(ours.deliveries)
    assert personal_data(service, ours.appeal_id) == (None, None)
    # the same signed request again: refused, like any replay
    r, _ = signed_erasure(client, environ, catalog, {"section": "us", "appeal_id": ours.appeal_id}, header=header)
    assert (r.status_code, r.json()["error"]["code"]) == (401, "replayed_signature")
    # signed afresh (another second): idempotent
    later = int(header.split(",")[0].removeprefix("t=")) + 1
    r, _ = signed_erasure(client, environ, catalog, {"section": "us", "appeal_id": ours.appeal_id}, timestamp=later)
    assert r.status_code == 200 and r.json()["status"] == "already_erased"
    assert r.json()["letters_cancelled"] == 0
    entries = service.ledger.audit.entries(target_id=ours.appeal_id)
    assert [(e.actor, e.section, e.target_kind) for e in entries] == [("api:us", "us", "appeal")] * 2
    # the appeal itself still answers, its letters cancelled "erased"
    view = client.get(f"/v1/appeals/{ours.appeal_id}").json()
    assert {(d["state"], d["last_text"]) for d in view["deliveries"]} == {("cancelled", "erased")}


@SQLITE
def test_the_api_erases_by_email_only_within_the_signing_section(client, environ, catalog, service):
    service.intake.enqueuer = None
    email = f"ilse.{uuid.uuid4().hex[:8]}@example.org"
    us = service.intake.submit(supporter("Ilse Twosections", email=email))
    ch = service.intake.submit(supporter("Ilse Twosections", "ch", email=email))
    r, _ = signed_erasure(client, environ, catalog, {"section": "us", "email": email.upper()})
    assert r.status_code == 200 and r.json()["appeal_ids"] == [us.appeal_id]
    assert personal_data(service, us.appeal_id) == (None, None)
    assert personal_data(service, ch.appeal_id) == ("Ilse Twosections", email)
    r, _ = signed_erasure(client, environ, catalog, {"section": "us", "email": "nobody@example.org"})
    assert r.status_code == 404
    r, _ = signed_erasure(client, environ, catalog, {"section": "us", "email": "not an address"})
    assert r.status_code == 422 and r.json()["error"]["fields"][0] == {
        **r.json()["error"]["fields"][0],
        "field": "email",
        "code": "invalid_email",
    }


# ------------------------------------------------------------------ the CLI and the console's function


@SQLITE
def test_the_cli_says_what_it_will_erase_then_what_it_erased(service, monkeypatch):
    service.intake.enqueuer = None
    email = f"ilse.{uuid.uuid4().hex[:8]}@example.org"
    accepted = service.intake.submit(supporter("Ilse Commandline", email=email))
    monkeypatch.setenv("DATABASE_URL", service.settings.database_url)
    monkeypatch.setenv("DISPATCH_VAR_DIR", str(service.settings.var_dir))
    runner = CliRunner()
    # without --yes it asks; "no" erases nothing
    result = runner.invoke(main, ["supporters", "erase", "--email", "-"], input=f"{email}\nn\n")
    assert result.exit_code == 1, result.output
    assert f"{accepted.appeal_id}  us  {CAMPAIGN}  2 letter(s) waiting" in result.output
    assert personal_data(service, accepted.appeal_id)[0] == "Ilse Commandline"

    result = runner.invoke(main, ["supporters", "erase", "--appeal", accepted.appeal_id, "--yes"])
    assert result.exit_code == 0, result.output
    assert "Erased 1 appeal(s): 2 letter(s) cancelled" in result.output
    assert email not in result.output and "Commandline" not in result.output
    assert personal_data(service, accepted.appeal_id) == (None, None)
    [entry] = service.ledger.audit.entries(target_id=accepted.appeal_id)
    assert entry.actor.startswith("cli:")

    result = runner.invoke(main, ["supporters", "erase", "--appeal", accepted.appeal_id, "--yes"])
    assert result.exit_code == 0 and "Already erased" in result.output
    result = runner.invoke(main, ["supporters", "erase", "--appeal", "ap_nothing", "--yes"])
    assert result.exit_code == 1 and "no appeal 'ap_nothing'" in result.output


@SQLITE
def test_the_console_function_narrows_to_a_section_and_names_nothing_it_does_not_find(service):
    service.intake.enqueuer = None
    email = f"ilse.{uuid.uuid4().hex[:8]}@example.org"
    us = service.intake.submit(supporter("Ilse Console", email=email))
    ch = service.intake.submit(supporter("Ilse Console", "ch", email=email))
    with pytest.raises(NotFound):
        erase(service.ledger, service.settings, appeal_id=us.appeal_id, section="ch", actor="ops-ch")
    assert service.ledger.audit.entries() == []  # nothing happened, nothing audited
    report = erase(service.ledger, service.settings, email=email, section="ch", actor="ops-ch")
    assert report.appeal_ids == (ch.appeal_id,)
    assert personal_data(service, us.appeal_id)[0] == "Ilse Console"
    with pytest.raises(ValueError):
        erase(service.ledger, service.settings, actor="ops-ch")


@SQLITE
def test_texts_the_outside_world_wrote_about_her_letters_lose_her_name_and_address(service):
    from sqlalchemy import insert

    from dispatcher.ledger.tables import DL, ER, A

    service.intake.enqueuer = None
    email = f"ilse.{uuid.uuid4().hex[:8]}@example.org"
    accepted = service.intake.submit(supporter("Ilse Quoted", email=email))
    letter = accepted.deliveries[0].id
    now = datetime.now(UTC)
    report = json.dumps({"status": "failed", "reason": f"reply from {email.upper()} for Ilse Quoted"})
    with service.ledger.engine.begin() as conn:
        conn.execute(
            insert(A).values(
                delivery_id=letter,
                number=1,
                started_at=now,
                duration_ms=1.0,
                outcome="transient",
                text=f"452 4.2.2 <{email}>: mailbox full",
            )
        )
        conn.execute(
            insert(DL).values(
                message_id="m1",
                delivery_id=letter,
                queue="q",
                actor="a",
                reason="ilse quoted",
                failed_at=now,
                recorded_at=now,
            )
        )
        conn.execute(
            insert(ER).values(delivery_id=letter, channel="fax", remote_id="r1", report=report, received_at=now)
        )
    done = service.supporters.erase(service.supporters.who(email=email), actor="admin-anna")
    assert done.texts_redacted == 3
    assert traces(every_text_in_the_ledger(service.ledger.engine), "Ilse Quoted", email) == []
    [attempt] = service.ledger.views.attempts(letter)
    assert attempt.text == "452 4.2.2 <[erased]>: mailbox full"
    # a parked report stays readable
    with service.ledger.engine.connect() as conn:
        kept = json.loads(conn.execute(select(ER.c.report)).scalar_one())
    assert kept == {"status": "failed", "reason": "reply from [erased] for [erased]"}


@SQLITE
def test_erasing_again_removes_a_sandbox_copy_that_appeared_since(service):
    from dispatcher.sandbox.smtp import MailDirHandler

    service.intake.enqueuer = None
    accepted = service.intake.submit(supporter("Ilse Latecopy"))
    letter = next(d.id for d in accepted.deliveries if d.channel == "email")
    who = service.supporters.who(appeal_id=accepted.appeal_id)
    assert service.supporters.erase(who, actor="admin-anna").sandbox_files_removed == 0
    # the copy of a letter that was on the wire when she was erased, written by the sandbox after
    late = MailDirHandler(service.settings.sandbox_mail_dir).write(
        "bounces@example.org",
        ["ambassador@example.org"],
        b"Subject: x\r\n\r\nIlse Latecopy\r\n",
        message_id_of(service, letter),
    )
    again = service.supporters.erase(who, actor="admin-anna")
    assert (again.status, again.sandbox_files_removed) == ("already_erased", 1)
    assert not late.exists()
