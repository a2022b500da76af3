"""What follows when a channel refuses an address for good: the address is suppressed, and the
letter is planned again on the route's fallback channel (``fallback = ["fax"]``), or fails with
"address known to bounce" when the route has none.

Shared by the worker (a 5xx at RCPT, or a letter whose address is already suppressed) and the
bounce intake (a bounce that came back days later), so both follow one rule. The new letter is
written in the same transaction as the refused letter's move (:class:`Replan`), and the
ledger links the two (``replaces``); caps, office hours and pacing apply to it as to any letter
of its channel, because it is one.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime

from dispatcher.channels.registry import Channels
from dispatcher.config.catalog import Catalog
from dispatcher.errors import Outcome
from dispatcher.ledger.bounces import Suppressed
from dispatcher.ledger.lifecycle import Replan
from dispatcher.ledger.states import Event
from dispatcher.ledger.store import Ledger
from dispatcher.logging import get_logger
from dispatcher.queue.outcomes import Result

log = get_logger("dispatcher.delivery")

#: the code a letter to a suppressed address fails with
SUPPRESSED = "suppressed"


class Fallback:
    def __init__(self, *, catalog: Catalog, channels: Channels, ledger: Ledger):
        self.catalog = catalog
        self.channels = channels
        self.ledger = ledger

    def replan(self, *, campaign: str, section: str, target: str, channel: str) -> Replan | None:
        """The letter that stands in for one refused on ``channel``: on the first fallback channel
        of the route that this worker knows and the target can receive; None when there is none."""
        try:
            official = self.catalog.target(campaign, section, target)
        except KeyError:
            return None
        for other in self.catalog.fallback(campaign, section, target, channel):
            if other not in self.channels:
                continue
            address = self.channels.address_of(official, other)
            if address is not None:
                return Replan(other, address)
        return None

    def with_replan(self, result: Result, *, campaign: str, section: str, target: str, channel: str) -> Result:
        """``result`` with the letter that replaces a bounced one, when the route has a fallback."""
        if result.event is not Event.BOUNCED or result.replan is not None:
            return result
        found = self.replan(campaign=campaign, section=section, target=target, channel=channel)
        if found is None:
            return result
        text = f"{result.text or 'bounced'}; sent by {found.channel} instead (delivery {found.id})"
        return replace(result, replan=found, text=text)

    def instead_of(
        self, suppressed: Suppressed, *, campaign: str, section: str, target: str, channel: str, letter: bool = True
    ) -> Result:
        """What becomes of a letter whose address is suppressed: rerouted to the fallback, or
        failed with the reason and the way out. A digest (``letter`` False) is never rerouted:
        its letters belong to the line it was made for."""
        found = self.replan(campaign=campaign, section=section, target=target, channel=channel) if letter else None
        reason = suppressed.describe()
        if found is not None:
            return Result(
                Event.REROUTED,
                "rerouted",
                code=SUPPRESSED,
                text=f"{reason}; sent by {found.channel} instead (delivery {found.id})",
                replan=found,
                counts_as_try=False,
            )
        return Result(
            Event.FAILED,
            Outcome.PERMANENT,
            code=SUPPRESSED,
            text=f"{reason}; the route has no fallback channel. Once the address is fixed: "
            f"`dispatcher suppressions remove {suppressed.address}`",
        )

    def record(self, result: Result, *, delivery: str, channel: str, recipient: str, now: datetime) -> None:
        """After the move: suppress the address when the refusal was about it."""
        if result.suppress and self.ledger.suppressions.add(
            channel, recipient, reason="bounced", code=result.code, text=result.text, delivery=delivery, now=now
        ):
            # an official's address, not a supporter's: fine to log
            log.warning(f"{channel}.address_suppressed", delivery=delivery, address=recipient, code=result.code)
