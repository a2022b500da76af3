"""A letter's life, declared once: every state, every event, and every allowed move.

This module is data. :data:`TRANSITIONS` maps each event to the states it may start from and
the state it leads to; :func:`dispatcher.ledger.lifecycle.move` is the one function that writes
a delivery's state, and it builds its compare-and-set from this table, so a move the table
does not list cannot be written anywhere. Nobody spells a state or a grouping of states
elsewhere: they import them from here.

The diagram in docs/architecture.md is generated from this table (:func:`mermaid`); a test
fails when the two differ. Regenerate it with ``dispatcher ledger states --mermaid``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType

from dispatcher.errors import DispatchError


class State(StrEnum):
    PLANNED = "planned"  # in the ledger, waiting to be released to the queue
    QUEUED = "queued"  # a message for it is on the queue
    SENDING = "sending"  # claimed by a worker
    SENT = "sent"  # accepted by the relay / gateway; final only where the channel learns nothing later
    DELIVERED = "delivered"  # confirmed by the far end (a fax gateway's report)
    BOUNCED = "bounced"  # refused for good by the far end: an email bounce, at once or later
    REROUTED = "rerouted"  # not sent: its address is known to bounce, another channel carries it
    FAILED = "failed"
    EXPIRED = "expired"  # the campaign deadline passed first
    CANCELLED = "cancelled"  # the campaign was closed, or the supporter's data erased
    BUNDLED = "bundled"  # goes as part of a digest letter (``digest_id``), and ends as it ends


class Event(StrEnum):
    PLANNED = "planned"  # intake (or the pacer, for a digest) writes a new delivery
    RELEASED = "released"  # a message goes on the queue (again, for a lost one)
    WITHDRAWN = "withdrawn"  # its message never reached a worker: refused by the queue, dead-lettered
    CLAIMED = "claimed"  # a worker takes it for sending
    SENT = "sent"  # the relay or gateway accepted it
    DELIVERED = "delivered"  # the far end confirmed it
    BOUNCED = "bounced"  # the far end refused it for good, at once (5xx) or later (a bounce)
    REROUTED = "rerouted"  # its address is suppressed: a letter on the route's fallback replaces it
    RETRY = "retry"  # a transient failure: try again after a backoff
    DEFERRED = "deferred"  # not now, by our own policy or because our side is broken; no try counted
    FAILED = "failed"  # a permanent failure, or retries exhausted
    EXPIRED = "expired"  # the deadline passed before it could go
    CANCELLED = "cancelled"  # the campaign was closed, or the supporter's data erased
    BUNDLED = "bundled"  # joins a digest
    HANDED_BACK = "handed_back"  # a worker gives it back unfinished (shutdown, or found dead)
    CLAIM_RELEASED = "claim_released"  # the reconciler takes back a claim that went stale
    # A digest's letters follow the digest (the reconciler never moves them on their own).
    DIGEST_SENT = "digest_sent"
    DIGEST_DELIVERED = "digest_delivered"
    DIGEST_FAILED = "digest_failed"
    DIGEST_WAITING = "digest_waiting"  # the digest waits for another try: its letters are bundled again
    # An operator's hand, from the console (audited, one letter at a time: dispatcher/ledger/actions.py).
    OPERATOR_RETRY = "operator_retry"  # send it again now: a failed or bounced letter, or one in backoff
    OPERATOR_CANCEL = "operator_cancel"  # not to be sent: a waiting letter, with the operator's reason
    OPERATOR_HAND_BACK = "operator_hand_back"  # a letter stuck in a worker's hands goes back to the queue


@dataclass(frozen=True)
class Rule:
    event: Event
    #: the states the event may start from (empty for the event that creates a delivery)
    sources: frozenset[State]
    target: State
    #: why the move exists, for the docs
    why: str


def _rule(event: Event, sources: tuple[State, ...], target: State, why: str) -> Rule:
    return Rule(event, frozenset(sources), target, why)


S = State
E = Event

#: Every allowed move. One rule per event: an event leads to one state from any of its sources.
RULES: tuple[Rule, ...] = (
    _rule(E.PLANNED, (), S.PLANNED, "intake accepts an appeal; the pacer creates a digest"),
    _rule(E.RELEASED, (S.PLANNED, S.QUEUED), S.QUEUED, "due now: a message goes on the queue (again if lost)"),
    _rule(E.WITHDRAWN, (S.QUEUED,), S.PLANNED, "the queue refused the message, or dead-lettered it"),
    _rule(E.CLAIMED, (S.PLANNED, S.QUEUED), S.SENDING, "a worker wins the claim"),
    _rule(E.SENT, (S.SENDING,), S.SENT, "the relay or gateway accepted the letter"),
    _rule(E.DELIVERED, (S.SENDING, S.SENT), S.DELIVERED, "confirmed at once (fax lab) or by a later report"),
    _rule(E.BOUNCED, (S.SENDING, S.SENT), S.BOUNCED, "refused for good: a 5xx to the address, or a bounce later"),
    _rule(
        E.REROUTED,
        (S.SENDING,),
        S.REROUTED,
        "its address is known to bounce: planned again on the route's fallback channel",
    ),
    _rule(E.RETRY, (S.SENDING, S.SENT), S.PLANNED, "a transient failure, during the send or reported later"),
    _rule(
        E.DEFERRED,
        (S.SENDING, S.SENT),
        S.PLANNED,
        "not now and no try counted: caps, office hours, a busy line, our side broken (also reported late)",
    ),
    _rule(E.FAILED, (S.SENDING, S.SENT), S.FAILED, "a permanent failure, or the retries ran out"),
    _rule(E.EXPIRED, (S.PLANNED, S.QUEUED, S.BUNDLED, S.SENDING), S.EXPIRED, "the deadline passed first"),
    _rule(
        E.CANCELLED,
        (S.PLANNED, S.QUEUED, S.BUNDLED, S.SENDING, S.SENT),
        S.CANCELLED,
        "the campaign was closed, or the supporter's data erased (a letter sent earlier is cancelled "
        "only instead of a retry)",
    ),
    _rule(E.BUNDLED, (S.PLANNED,), S.BUNDLED, "the line is short: the letter joins a digest"),
    _rule(E.HANDED_BACK, (S.SENDING,), S.QUEUED, "a stopping worker gives back what it could not finish"),
    _rule(
        E.CLAIM_RELEASED,
        (S.SENDING,),
        S.PLANNED,
        "its worker died (its liveness lapsed), or the claim outlived the actor's time limit",
    ),
    _rule(E.DIGEST_SENT, (S.BUNDLED,), S.SENT, "its digest was sent"),
    _rule(E.DIGEST_DELIVERED, (S.BUNDLED, S.SENT), S.DELIVERED, "its digest was delivered"),
    _rule(E.DIGEST_FAILED, (S.BUNDLED, S.SENT), S.FAILED, "its digest failed"),
    _rule(E.DIGEST_WAITING, (S.BUNDLED, S.SENT), S.BUNDLED, "its digest waits for another try"),
    _rule(
        E.OPERATOR_RETRY,
        (S.PLANNED, S.FAILED, S.BOUNCED),
        S.QUEUED,
        "an operator sends it again now: a failed or bounced letter (the only way out of those two), "
        "or one waiting in backoff",
    ),
    _rule(E.OPERATOR_CANCEL, (S.PLANNED, S.QUEUED), S.CANCELLED, "an operator cancels a waiting letter, with a reason"),
    _rule(
        E.OPERATOR_HAND_BACK,
        (S.SENDING,),
        S.QUEUED,
        "an operator takes a letter stuck in a worker's hands back to the queue",
    ),
)

TRANSITIONS: Mapping[Event, Rule] = MappingProxyType({rule.event: rule for rule in RULES})

#: no move leaves these by itself: only an operator's retry, and only out of :data:`REOPENABLE`
TERMINAL: frozenset[State] = frozenset({S.DELIVERED, S.BOUNCED, S.REROUTED, S.FAILED, S.EXPIRED, S.CANCELLED})
#: the moves only an operator makes (the console; each audited in its transaction)
OPERATOR_EVENTS: frozenset[Event] = frozenset({E.OPERATOR_RETRY, E.OPERATOR_CANCEL, E.OPERATOR_HAND_BACK})
#: the terminal states an operator's retry may send a letter on from: the far side refused it or
#: the tries ran out, and the operator has fixed the cause. Never ``delivered`` (it arrived),
#: ``expired`` (its deadline passed), ``cancelled`` (someone meant it) nor ``rerouted`` (another
#: letter carries it).
REOPENABLE: frozenset[State] = frozenset({S.FAILED, S.BOUNCED})
#: waiting for the queue or a worker, in the ledger's hands
WAITING: tuple[State, ...] = (S.PLANNED, S.QUEUED)
#: not yet out nor in a worker's hands: what expiry, a campaign's closing and an erasure cancel
PENDING: tuple[State, ...] = (S.PLANNED, S.QUEUED, S.BUNDLED)
#: not yet out: waiting in the ledger, on the queue, or in a worker's hands
IN_HAND: tuple[State, ...] = (S.PLANNED, S.QUEUED, S.SENDING)
#: the letter reached the official's relay or machine (what the public counters count)
LETTER_OUT: tuple[State, ...] = (S.SENT, S.DELIVERED)
#: a digest's state after a move → the event its letters take (they follow it; a digest waiting
#: for another try holds its letters bundled)
DIGEST_FOLLOWS: Mapping[State, Event] = MappingProxyType(
    {
        S.SENT: E.DIGEST_SENT,
        S.DELIVERED: E.DIGEST_DELIVERED,
        S.FAILED: E.DIGEST_FAILED,
        # (a digest refused for good: its letters fail with it, bundled or sent)
        S.BOUNCED: E.DIGEST_FAILED,
        S.PLANNED: E.DIGEST_WAITING,
        S.QUEUED: E.DIGEST_WAITING,
        S.EXPIRED: E.EXPIRED,
        S.CANCELLED: E.CANCELLED,
    }
)


class IllegalTransition(DispatchError, ValueError):
    """A move the state table does not allow was asked for."""

    def __init__(self, event: Event, state: State | str | None, delivery: str | None = None):
        self.event = event
        self.state = state
        self.delivery = delivery
        rule = TRANSITIONS[event]
        allowed = ", ".join(sorted(rule.sources)) or "nothing (it creates a delivery)"
        who = f"delivery {delivery}" if delivery else "a delivery"
        super().__init__(f"{who} in state {state!r} cannot take event {event.value!r} (it starts from: {allowed})")


def initial() -> State:
    """The state a new delivery is written in."""
    return TRANSITIONS[E.PLANNED].target


def moves_from(state: State) -> dict[Event, State]:
    return {r.event: r.target for r in RULES if state in r.sources}


def check_table() -> None:
    """The table's own invariants (also asserted by the tests): terminal states have no way out
    but an operator's move out of :data:`REOPENABLE`, every state can be reached, every state but
    the terminal ones has a way on."""
    for r in RULES:
        leaving = r.sources & TERMINAL
        if r.event in OPERATOR_EVENTS:
            leaving -= REOPENABLE
        if leaving:
            raise AssertionError(f"{r.event} leaves terminal state(s) {sorted(leaving)}")
    reached = {r.target for r in RULES}
    if reached != set(State):
        raise AssertionError(f"unreachable: {sorted(set(State) - reached)}")
    for state in set(State) - TERMINAL:
        if not moves_from(state):
            raise AssertionError(f"{state} is not terminal but has no move")


def mermaid() -> str:
    """The table as a Mermaid state diagram (docs/architecture.md holds this exact text)."""
    lines = ["stateDiagram-v2"]
    for r in RULES:
        if not r.sources:
            lines.append(f"    [*] --> {r.target}: {r.event}")
        for source in sorted(r.sources):
            lines.append(f"    {source} --> {r.target}: {r.event}")
    for state in sorted(TERMINAL):
        lines.append(f"    {state} --> [*]")
    return "\n".join(lines) + "\n"


def table_markdown() -> str:
    """The table as a Markdown table, for the docs."""
    out = ["| event | from | to | why |", "| --- | --- | --- | --- |"]
    for r in RULES:
        sources = ", ".join(f"`{s}`" for s in sorted(r.sources)) or "(new)"
        out.append(f"| `{r.event}` | {sources} | `{r.target}` | {r.why} |")
    return "\n".join(out) + "\n"
