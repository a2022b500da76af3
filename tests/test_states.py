"""The state table: its own invariants, the one writer refusing a move the table does not list,
and the docs generated from it."""

from __future__ import annotations

import re
from datetime import UTC, datetime

import pytest
from click.testing import CliRunner

from dispatcher.cli import main
from dispatcher.ledger import lifecycle, states
from dispatcher.ledger.states import (
    OPERATOR_EVENTS,
    REOPENABLE,
    TERMINAL,
    TRANSITIONS,
    Event,
    IllegalTransition,
    State,
)
from tests.conftest import ROOT, appeal_body

DOC = ROOT / "docs" / "architecture.md"


def generated(name: str) -> str:
    text = DOC.read_text()
    found = re.search(rf"<!-- states:{name}:begin -->\n(.*?)<!-- states:{name}:end -->", text, re.S)
    assert found, f"docs/architecture.md has no states:{name} block"
    return found.group(1)


def test_the_diagram_in_the_docs_is_the_table():
    assert generated("mermaid") == f"```mermaid\n{states.mermaid()}```\n"
    assert generated("table") == states.table_markdown()


def test_the_cli_prints_what_the_docs_hold():
    runner = CliRunner()
    assert runner.invoke(main, ["ledger", "states"]).output == states.mermaid()
    assert runner.invoke(main, ["ledger", "states", "--table"]).output == states.table_markdown()


def test_terminal_states_have_no_way_out_and_every_state_is_reachable():
    states.check_table()
    for rule in TRANSITIONS.values():
        if rule.event in OPERATOR_EVENTS:
            continue
        assert not rule.sources & TERMINAL, rule
    # an operator's retry is the one way out, and only of a failed or bounced letter
    leaving = {(r.event, s) for r in TRANSITIONS.values() for s in r.sources & TERMINAL}
    assert leaving == {(Event.OPERATOR_RETRY, State.FAILED), (Event.OPERATOR_RETRY, State.BOUNCED)}
    assert {State.FAILED, State.BOUNCED} == REOPENABLE
    assert State.SENT not in TERMINAL  # a report or a bounce may still come


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_the_writer_refuses_a_move_the_table_does_not_list_before_writing(service):
    service.intake.enqueuer = None
    accepted = service.intake.submit(appeal_body())
    delivery = accepted.deliveries[0].id
    with service.ledger.engine.begin() as conn:
        with pytest.raises(IllegalTransition, match=r"cannot take event 'claimed'.*starts from: planned, queued"):
            lifecycle.move(conn, Event.CLAIMED, lifecycle.one(delivery), sources=[State.DELIVERED])
        with pytest.raises(IllegalTransition):
            lifecycle.move(conn, Event.PLANNED, lifecycle.one(delivery))  # creation is not a move
    assert service.ledger.views.state_of(delivery) == State.PLANNED
    claim = service.ledger.lifecycle.claim(delivery, "w1", datetime.now(UTC))
    assert claim is not None
    # an outcome that cannot end a send (a letter is not 'withdrawn' from a worker's hands)
    with pytest.raises(IllegalTransition):
        service.ledger.lifecycle.finish(
            claim,
            lifecycle.Result(Event.WITHDRAWN, "x"),
            worker="w1",
            started_at=claim.queued_at or datetime.now(UTC),
            now=datetime.now(UTC),
        )
    assert service.ledger.views.state_of(delivery) == State.SENDING
    assert service.ledger.views.attempts(delivery) == []  # nothing was written
