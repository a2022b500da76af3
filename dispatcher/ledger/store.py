"""The ledger: one database, split by concern.

* :class:`~dispatcher.ledger.lifecycle.Lifecycle`: a letter's moves (claims, outcomes, late
  reports, hand-backs, releases, expiry, digests), all through the state table's one writer;
* :class:`~dispatcher.ledger.controls.Controls`: operators' pauses, flags and closures;
* :class:`~dispatcher.ledger.schedule.Schedule`: what the pacer and reconciler ask;
* :class:`~dispatcher.ledger.views.Views`: typed read models for the API, CLI and console;
* :class:`~dispatcher.ledger.search.LetterSearch` and :class:`~dispatcher.ledger.campaigns.CampaignReads`:
  the console's letter search (scoped, keyset-paged, CSV) and campaign counters;
* :class:`~dispatcher.ledger.actions.LetterActions`: an operator's retry, cancel, hand-back (audited);
* :class:`~dispatcher.ledger.housekeeping.Housekeeping`: retention, signatures, dead letters;
* :class:`~dispatcher.ledger.reports.EarlyReports`: final reports that overtook their send;
* :class:`~dispatcher.ledger.erasure.Erasures`: a supporter's data erased on request;
* :class:`~dispatcher.ledger.operators.Operators`: operators' accounts and console sessions;
* :class:`~dispatcher.ledger.audit.Audit`: what operators did;
* :class:`~dispatcher.ledger.bounces.Suppressions` and
  :class:`~dispatcher.ledger.bounces.BounceFacts`: addresses known to bounce, and what bounces said.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import timedelta

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from dispatcher.ledger.actions import LetterActions
from dispatcher.ledger.audit import Audit
from dispatcher.ledger.bounces import BounceFacts, Suppressions
from dispatcher.ledger.campaigns import CampaignReads
from dispatcher.ledger.controls import Controls
from dispatcher.ledger.engine import make_engine, plan_generically, reading
from dispatcher.ledger.erasure import Erasures
from dispatcher.ledger.housekeeping import Housekeeping
from dispatcher.ledger.lifecycle import Lifecycle
from dispatcher.ledger.operators import Operators
from dispatcher.ledger.reports import EarlyReports
from dispatcher.ledger.schedule import Schedule
from dispatcher.ledger.search import LetterSearch
from dispatcher.ledger.views import Views


class Ledger:
    def __init__(
        self,
        url: str,
        engine: Engine | None = None,
        *,
        sent_final_after: Mapping[str, timedelta | None] | None = None,
    ):
        """``sent_final_after``: per channel, when a ``sent`` letter is settled (the channel
        registry's answer; a channel not named waits for a terminal state)."""
        self.url = url
        self.engine = engine or make_engine(url)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._read_sessions = sessionmaker(reading(self.engine), expire_on_commit=False)
        self.lifecycle = Lifecycle(self.engine)
        self.controls = Controls(self.engine)
        self.schedule = Schedule(self.engine)
        self.views = Views(self.engine)
        self.housekeeping = Housekeeping(self.engine, sent_final_after or {})
        self.early_reports = EarlyReports(self.engine)
        self.suppressions = Suppressions(self.engine)
        self.bounces = BounceFacts(self.engine)
        self.audit = Audit(self.engine)
        self.erasures = Erasures(self.engine)
        self.operators = Operators(self.engine)
        self.actions = LetterActions(self.engine)
        self.search = LetterSearch(self.engine)
        self.campaigns = CampaignReads(self.engine)

    @contextmanager
    def session(self, *, read_only: bool = False) -> Iterator[Session]:
        """One transaction; ``read_only``: it only reads, and takes no write lock (engine.py)."""
        with (self._read_sessions if read_only else self._sessions).begin() as session:
            yield session

    def migrate(self) -> None:
        # Alembic (and Mako) only for the processes that migrate: a worker or an API never does,
        # and they would carry about 10 MB of it.
        from dispatcher.ledger.migrate import upgrade

        upgrade(self.engine)

    def dispose(self) -> None:
        self.engine.dispose()

    def plan_generically(self) -> None:
        """A worker's ledger: see :func:`dispatcher.ledger.engine.plan_generically`."""
        plan_generically(self.engine)
