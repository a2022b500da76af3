"""Intake: one signed (or in-process) appeal in, an appeal and its planned deliveries out.

The HTTP API and the Python function for web apps both end here, so both refuse the same
input with the same errors. The appeal and its deliveries are written in one transaction (the
ledger is the outbox); only after the commit are the deliveries offered to the queue, and a
queue that is down loses nothing: the reconciler sends what is still planned.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, NamedTuple, Protocol
from zoneinfo import ZoneInfo

from anyio.to_thread import run_sync
from sqlalchemy import Connection, Table, bindparam, insert, select
from sqlalchemy.exc import IntegrityError

from dispatcher.channels.builtin import builtin_channels
from dispatcher.channels.registry import Channels
from dispatcher.config.catalog import Catalog, PlannedRoute
from dispatcher.config.models import Campaign, Target
from dispatcher.errors import (
    CampaignClosed,
    DuplicateAppeal,
    FieldProblem,
    IntakeError,
    SignatureReplayed,
    ValidationFailed,
)
from dispatcher.intake import signature as sig
from dispatcher.intake.groupcommit import GroupCommit
from dispatcher.intake.quotas import Charge, Quotas
from dispatcher.intake.schema import AppealIn, parse_body, validate_appeal
from dispatcher.ledger.controls import Closure
from dispatcher.ledger.engine import new_id
from dispatcher.ledger.lifecycle import planned_values, released_values
from dispatcher.ledger.models import Appeal, Delivery, utcnow
from dispatcher.ledger.prepared import Prepared
from dispatcher.ledger.states import initial
from dispatcher.ledger.store import Ledger
from dispatcher.ledger.tables import AP, US, D
from dispatcher.logging import get_logger
from dispatcher.policy.limits import RateLimiter
from dispatcher.pseudonyms import pepper_of, supporter_ref
from dispatcher.settings import Settings

log = get_logger("dispatcher.intake")

Clock = Callable[[], datetime]


class SectionNotConfigured(IntakeError):
    status = 503
    code = "section_not_configured"


@dataclass(frozen=True)
class PlannedDelivery:
    id: str
    target: str
    target_name: str
    channel: str
    language: str
    state: str
    #: the official's address or fax number (not shown in the API's answer)
    recipient: str = ""


@dataclass(frozen=True)
class Accepted:
    appeal_id: str
    campaign: str
    section: str
    deliveries: list[PlannedDelivery]
    #: True when this was a retry of an appeal already accepted (same section and client_ref)
    replayed: bool = False
    #: the letters marked queued in the appeal's own transaction, to offer to the queue now
    queued: tuple[str, ...] = ()

    def body(self) -> dict[str, Any]:
        return {
            "appeal_id": self.appeal_id,
            "campaign": self.campaign,
            "section": self.section,
            "replayed": self.replayed,
            "status_url": f"/v1/appeals/{self.appeal_id}",
            "deliveries": [
                {
                    "id": d.id,
                    "target": d.target,
                    "target_name": d.target_name,
                    "channel": d.channel,
                    "language": d.language,
                    "state": d.state,
                }
                for d in self.deliveries
            ],
        }


class _Admitted(NamedTuple):
    """An appeal that passed the model, the catalog and the quotas, not yet written."""

    appeal: AppealIn
    routes: list[PlannedRoute]
    now: datetime
    #: its quota slots, given back if nothing new is written
    charge: Charge


@dataclass(eq=False)
class _Pending:
    """One appeal on its way into the ledger: its rows, built by its request's thread, and what
    the writer found (set by ``IntakeService._write``)."""

    campaign: str
    section: str
    ref: str
    now: datetime
    signature_row: dict[str, Any] | None
    appeal_row: dict[str, Any]
    delivery_rows: list[dict[str, Any]]
    planned: list[PlannedDelivery]
    #: (channel, recipient) of its letters whose recipient has caps: they join a backlog
    capped: set[tuple[str, str]]
    queued: tuple[str, ...] = ()
    closed: Closure | None = None
    conflict: IntegrityError | None = None
    error: BaseException | None = None

    @property
    def written(self) -> bool:
        """Whether the writer wrote it (not refused by a unique key, a closure, an error)."""
        return self.conflict is None and self.closed is None and self.error is None

    def accepted(self) -> Accepted:
        return Accepted(self.appeal_row["id"], self.campaign, self.section, self.planned, queued=self.queued)


#: the intake's statements, built once (SQLAlchemy's construction and cache-key work would
#: otherwise cost more per appeal than the database does)
_INSERT_SIGNATURE = insert(US)
_SIGNATURE_SEEN = select(US.c.appeal_id).where(US.c.signature == bindparam("p_signature"))
_BY_CLIENT_REF = select(AP.c.id, AP.c.campaign, AP.c.supporter_ref).where(
    AP.c.section == bindparam("p_section"), AP.c.client_ref == bindparam("p_client_ref")
)
_BY_SUPPORTER = select(AP.c.id).where(
    AP.c.campaign == bindparam("p_campaign"),
    AP.c.section == bindparam("p_section"),
    AP.c.supporter_ref == bindparam("p_ref"),
)


class Enqueue(Protocol):
    """What intake needs of the queue: send these delivery ids (raises when the queue is down)."""

    def send(self, delivery_ids: list[str]) -> list[str]: ...


#: (campaign, target, appeal language, other languages the supporter writes) -> letter language
LanguageChooser = Callable[[Campaign, Target, str, Sequence[str]], str]


class IntakeService:
    def __init__(
        self,
        *,
        settings: Settings,
        catalog: Catalog,
        ledger: Ledger,
        enqueuer: Enqueue | None,
        choose_language: LanguageChooser,
        clock: Clock = utcnow,
        environ: Mapping[str, str] | None = None,
        paced: Callable[[Target, str], bool] | None = None,
        channels: Channels | None = None,
        limiter: RateLimiter | None = None,
    ):
        """``channels``: where each target receives each channel (default: the shipped channels);
        ``limiter``: where the quotas are counted (None: no quotas)."""
        self.settings = settings
        self.channels = channels if channels is not None else builtin_channels()
        self.catalog = catalog
        self.ledger = ledger
        self.enqueuer = enqueuer
        self.choose_language = choose_language
        #: whether letters to a target by a channel are paced (it has caps); None: none are
        self.paced = paced
        self.clock = clock
        self.environ = os.environ if environ is None else environ
        self._pepper = pepper_of(settings)
        self.quotas = Quotas(limiter, settings, self._pepper)
        self._writer: GroupCommit[_Pending] = GroupCommit(self._write_batch, name="intake-writer")
        self._inserts: dict[tuple[str, tuple[str, ...]], Prepared] = {}

    # ------------------------------------------------------------------ entry points

    def submit_signed(self, raw: bytes, header: str | None) -> Accepted:
        """The HTTP path: verify ``Dispatch-Signature`` over the raw body, then submit."""
        data, matched = self._verified(raw, header)
        return self.submit(data, signature=matched)

    async def submit_signed_async(self, raw: bytes, header: str | None) -> Accepted:
        """``submit_signed`` for the API's event loop: the checks run on the loop, the quotas'
        Redis call and the write are awaited (redis.asyncio; the group commit's writer thread),
        and only a refusal's or a conflict's look for the original answer goes to a thread."""
        data, matched = self._verified(raw, header)
        try:
            appeal = self._validate(data)
            now, routes = self._checked(appeal)
            # Awaited: a Redis that is slow or away for seconds holds up this request only.
            charge = await self.quotas.charge_async(**self._charge_for(appeal))
            admitted = _Admitted(appeal, routes, now, charge)
        except IntakeError as exc:
            return await self._original_or_async(matched, exc)
        pending = self._prepare(admitted.appeal, admitted.routes, admitted.now, matched)
        try:
            await self._writer.write_async(pending)
        except BaseException:
            admitted.charge.cancel()
            raise
        if pending.written:
            return pending.accepted()
        return await run_sync(self._settle, pending, admitted, matched)

    def _verified(self, raw: bytes, header: str | None) -> tuple[dict[str, Any], str]:
        sig.parse(header)  # a missing or malformed header is a 401 before the body is even read
        # The key depends on the section named in the body, so the body is parsed first; nothing
        # beyond its section is looked at before the signature is verified.
        data = parse_body(raw)
        code = data.get("section")
        if not isinstance(code, str) or code not in self.catalog.sections:
            known = ", ".join(sorted(self.catalog.sections))
            raise ValidationFailed(
                [FieldProblem(("section",), f"unknown section {code!r} (known: {known})", "unknown")]
            )
        return data, sig.verify(self.intake_key(code), raw, header, self.clock().timestamp())

    def submit(self, payload: Mapping[str, Any] | AppealIn, *, signature: str | None = None) -> Accepted:
        """The in-process path (and the end of the HTTP path): validate, record, enqueue.

        ``signature`` is the verified HMAC of a signed request. It covers the timestamp and the
        body, so a signature seen before means the very same request again (a double click, a
        proxy's retry): it gets the answer the first one got, whatever changed since."""
        try:
            admitted = self._admit(payload)
        except IntakeError as exc:
            return self._original_or(signature, exc)
        pending = self._prepare(admitted.appeal, admitted.routes, admitted.now, signature)
        try:
            self._writer.write(pending)
        except BaseException:
            admitted.charge.cancel()
            raise
        return self._settle(pending, admitted, signature)

    def _admit(self, payload: Mapping[str, Any] | AppealIn) -> _Admitted:
        """Validate against the model, the catalog and the quotas; raise the refusal."""
        appeal = payload if isinstance(payload, AppealIn) else self._validate(payload)
        now, routes = self._checked(appeal)
        # Before anything is written; the slot goes back if nothing is (a 409, a replay).
        charge = self.quotas.charge(**self._charge_for(appeal))
        return _Admitted(appeal, routes, now, charge)

    def _checked(self, appeal: AppealIn) -> tuple[datetime, list[PlannedRoute]]:
        now = self.clock()
        return now, self._check_against_catalog(appeal, now)

    def _charge_for(self, appeal: AppealIn) -> dict[str, Any]:
        """The quota charge's arguments for ``appeal``."""
        return {
            "section": self.catalog.section(appeal.section),
            "campaign": appeal.campaign,
            "supporter_ref": self.supporter_ref(appeal.supporter.email),
            "client_ip": None if appeal.client_ip is None else str(appeal.client_ip),
        }

    def _settle(
        self,
        pending: _Pending,
        admitted: _Admitted,
        signature: str | None,
    ) -> Accepted:
        """The answer once the writer is done with ``pending``; its quota slot goes back if
        nothing new was written."""
        appeal, _, now, charge = admitted
        try:
            accepted = self._outcome(pending, appeal, signature, now)
        except CampaignClosed as exc:
            charge.cancel()
            return self._original_or(signature, exc)
        except BaseException:
            charge.cancel()
            raise
        if accepted.replayed:
            charge.cancel()
        return accepted

    async def _original_or_async(self, signature: str | None, refusal: IntakeError) -> Accepted:
        if signature is None:
            raise refusal
        return await run_sync(self._original_or, signature, refusal)

    def _original_or(self, signature: str | None, refusal: IntakeError) -> Accepted:
        """The answer a signed request already got, else ``refusal``. Looked for only when a
        request would be refused (its campaign closed since, the quota is spent): on the way
        in, the signature's unique key finds a replay in the appeal's own transaction, without
        a read of its own for every appeal."""
        if signature is not None:
            original = self._answered(signature)
            if original is not None:
                return original
        raise refusal

    # ------------------------------------------------------------------ steps

    def intake_key(self, section: str) -> bytes:
        env = self.catalog.section(section).intake_key_env
        value = self.environ.get(env, "")
        if not value:
            # Our misconfiguration, not the caller's: a 503 tells the form to retry later.
            log.error("intake.key_missing", section=section, env=env)
            raise SectionNotConfigured(f"section {section!r} has no intake key configured on this server")
        return value.encode()

    def _catalog_problems(self, fields: Mapping[str, Any]) -> list[FieldProblem]:
        """What the catalog and the settings say of an appeal's campaign, section, language and
        message. ``fields`` may be a body that failed validation: a value of the wrong type is
        left to the validator's own problem."""
        problems: list[FieldProblem] = []
        campaign_id, code, language, message = (fields.get(k) for k in ("campaign", "section", "language", "message"))
        campaign = self.catalog.campaigns.get(campaign_id) if isinstance(campaign_id, str) else None
        section = self.catalog.sections.get(code) if isinstance(code, str) else None
        if campaign is None and isinstance(campaign_id, str):
            known = ", ".join(sorted(c for c in self.catalog.campaigns))
            problems.append(FieldProblem(("campaign",), f"unknown campaign {campaign_id!r} (open: {known})", "unknown"))
        if section is None and isinstance(code, str):
            known = ", ".join(sorted(self.catalog.sections))
            problems.append(FieldProblem(("section",), f"unknown section {code!r} (known: {known})", "unknown"))
        if campaign is not None and section is not None and campaign.id not in section.campaigns:
            problems.append(
                FieldProblem(
                    ("campaign",),
                    f"section {section.code!r} does not take part in campaign {campaign.id!r}",
                    "not_offered",
                )
            )
        if section is not None and isinstance(language, str) and language not in section.languages:
            problems.append(
                FieldProblem(
                    ("language",),
                    f"{language!r} is not a language of section {section.code!r}'s form "
                    f"(accepted: {', '.join(section.languages)})",
                    "not_offered",
                )
            )
        # The validator strips the message; a body that failed validation is measured the same way.
        length = len(message.strip()) if isinstance(message, str) else 0
        if length > self.settings.max_message_chars:
            problems.append(
                FieldProblem(
                    ("message",),
                    f"is {length} characters long; at most {self.settings.max_message_chars} are accepted",
                    "too_long",
                )
            )
        return problems

    def _validate(self, payload: Mapping[str, Any]) -> AppealIn:
        """The model's checks and the catalog's, reported together: a form learns every problem
        of a request in one answer, not one round at a time."""
        data = dict(payload)
        try:
            return validate_appeal(data)
        except ValidationFailed as exc:
            flagged = {p.loc for p in exc.problems}
            extra = [p for p in self._catalog_problems(data) if p.loc not in flagged]
            raise ValidationFailed([*exc.problems, *extra]) from None

    def _check_against_catalog(self, appeal: AppealIn, now: datetime) -> list[PlannedRoute]:
        problems = self._catalog_problems(appeal.model_dump(include={"campaign", "section", "language", "message"}))
        campaign = self.catalog.campaigns.get(appeal.campaign)
        section = self.catalog.sections.get(appeal.section)
        if problems:
            raise ValidationFailed(problems)
        assert campaign is not None and section is not None
        if campaign.status == "closed":
            reason = f": {campaign.closed_reason}" if campaign.closed_reason else ""
            raise CampaignClosed(f"campaign {campaign.id!r} is closed{reason}", campaign=campaign.id)
        # (closed early by an operator: asked in the appeal's own transaction, _write)
        deadline = self.catalog.deadline_at(campaign.id, section.code)
        if now >= deadline:
            raise CampaignClosed(
                f"campaign {campaign.id!r} ended for section {section.code!r} on "
                # the last day as the section published it, in its own time zone
                f"{(deadline - timedelta(seconds=1)).astimezone(ZoneInfo(section.timezone)).date().isoformat()}",
                campaign=campaign.id,
                deadline=deadline.isoformat(),
            )
        return self.catalog.routes(campaign.id, section.code)

    def supporter_ref(self, email: str) -> str:
        return supporter_ref(email, self._pepper)

    def _outcome(self, pending: _Pending, appeal: AppealIn, signature: str | None, now: datetime) -> Accepted:
        """What the writer found of ``pending`` (written in a transaction shared with the
        appeals that arrived meanwhile: groupcommit.py): the new appeal, or the original a
        retry gets, or the refusal."""
        if pending.error is not None:
            raise pending.error
        if pending.closed is not None:
            raise CampaignClosed(
                f"campaign {pending.campaign!r} was closed: {pending.closed.reason}", campaign=pending.campaign
            )
        if pending.conflict is not None:
            # The same signed request again, or an earlier appeal with this client_ref or by
            # this supporter (sent before, or by a concurrent request that won the race).
            if signature is not None:
                original = self._answered(signature)
                if original is not None:
                    return original
            with self.ledger.session(read_only=True) as session:
                existing = self._existing(session, appeal, pending.ref)
            if existing is not None:
                if signature is not None:
                    self._remember(signature, pending.section, existing.appeal_id, now)
                return existing
            raise pending.conflict
        return pending.accepted()

    def _prepare(self, appeal: AppealIn, routes: list[PlannedRoute], now: datetime, signature: str | None) -> _Pending:
        """The rows of one appeal, built by its request (on the event loop, or in the caller's
        thread), not by the writer, whose thread the batch's transaction waits on."""
        campaign = self.catalog.campaign(appeal.campaign)
        section = self.catalog.section(appeal.section)
        ref = self.supporter_ref(appeal.supporter.email)
        extra_langs = [lang for lang in appeal.supporter.languages if lang != appeal.language]
        appeal_id = new_id("ap")
        planned = []
        rows = []
        for route in routes:
            delivery_id = new_id("dl")
            language = self.choose_language(campaign, route.target, appeal.language, extra_langs)
            recipient = self.channels.address_of(route.target, route.channel)
            assert recipient is not None  # routes are planned only for channels the target has
            rows.append(
                planned_values(
                    id=delivery_id,
                    appeal_id=appeal_id,
                    kind="letter",
                    digest_id=None,
                    campaign=campaign.id,
                    section=section.code,
                    target=route.target.id,
                    channel=route.channel,
                    recipient=recipient,
                    language=language,
                    next_attempt_at=now,
                    message_id=f"<{delivery_id}@{section.sender.domain}>",
                    created_at=now,
                    updated_at=now,
                )
            )
            planned.append(
                PlannedDelivery(
                    delivery_id, route.target.id, route.target.name, route.channel, language, initial(), recipient
                )
            )
        paced = self.paced
        capped = (
            set()
            if paced is None
            else {(r.channel, d.recipient) for r, d in zip(routes, planned, strict=True) if paced(r.target, r.channel)}
        )
        return _Pending(
            campaign=campaign.id,
            section=section.code,
            ref=ref,
            now=now,
            signature_row=None
            if signature is None
            else {"signature": signature, "section": section.code, "seen_at": now, "appeal_id": appeal_id},
            appeal_row={
                "id": appeal_id,
                "campaign": campaign.id,
                "section": section.code,
                "language": appeal.language,
                "client_ref": appeal.client_ref,
                "supporter_ref": ref,
                "created_at": now,
                "supporter_name": appeal.supporter.name,
                "supporter_email": str(appeal.supporter.email),
                "supporter_city": appeal.supporter.city,
                "supporter_country": appeal.supporter.country,
                "supporter_languages": " ".join(extra_langs) or None,
                "message": appeal.message,
            },
            delivery_rows=rows,
            planned=planned,
            capped=capped,
        )

    def _write_batch(self, batch: list[_Pending]) -> None:
        """One transaction for the batch; if one of its appeals breaks a unique key (a replay, a
        duplicate), each appeal in a transaction of its own, so that the others still go in.
        Then the letters it marked queued go to the queue."""
        try:
            self._write(batch)
        except IntegrityError as exc:
            if len(batch) == 1:
                batch[0].conflict = exc
                return
            for pending in batch:
                try:
                    self._write([pending])
                except IntegrityError as one:
                    pending.conflict = one
                except Exception as other:  # noqa: BLE001 - the others of the batch are written
                    pending.error = other
        written = [p for p in batch if p.written]
        # bound once for the batch: the module's logger resolves its configuration on every call
        out = log.bind()
        for pending in written:
            _log_accepted(out, pending)
        self._offer_to_queue(written, out)

    def _write(self, batch: list[_Pending]) -> None:
        # Core statements built once, one per table for the whole batch, not ORM objects: the
        # unit of work's flushes cost more than the rest of an appeal's path (bench/intake.py).
        # No read for an earlier appeal of a supporter or client_ref: the ledger's unique keys
        # refuse one, and the refusal is looked into by its request (a retry is rare, a read
        # per appeal is not).
        for pending in batch:
            pending.queued, pending.closed = (), None
        with self.ledger.engine.begin() as conn:
            # In the write transaction, not a read of its own. A close that commits while these
            # appeals are being written leaves their letters to the claim, which cancels a
            # closed campaign's letters (Lifecycle.claim).
            closures = self.ledger.controls.closures(sorted({p.campaign for p in batch}), conn=conn)
            live = []
            for pending in batch:
                pending.closed = closures.get(pending.campaign)
                if pending.closed is None:
                    live.append(pending)
            if not live:
                return
            rows, queued = self._release(conn, live)
            signatures = [p.signature_row for p in live if p.signature_row is not None]
            if signatures:
                self._insert_many(conn, US, signatures)
            self._insert_many(conn, AP, [p.appeal_row for p in live])
            if rows:
                self._insert_many(conn, D, rows)
        for pending, ids in zip(live, queued, strict=True):
            pending.queued = ids

    def _release(self, conn: Connection, live: list[_Pending]) -> tuple[list[dict[str, Any]], list[tuple[str, ...]]]:
        """The batch's delivery rows, those that go to the queue now already released (their
        outbox mark: the queue is told after the commit, _offer_to_queue), and each appeal's
        released ids. A letter to a recipient with a backlog in the ledger (held by a cap, a
        retry or the pacer) stays planned behind it. Read before the batch's rows are written:
        the backlog is the other appeals' letters."""
        if self.enqueuer is None:
            return [row for p in live for row in p.delivery_rows], [() for _ in live]
        busy = self.ledger.schedule.has_backlog(sorted({pair for p in live for pair in p.capped}), conn=conn)
        now = max(p.now for p in live)
        rows: list[dict[str, Any]] = []
        queued: list[tuple[str, ...]] = []
        for pending in live:
            ids = []
            for row, planned in zip(pending.delivery_rows, pending.planned, strict=True):
                if (planned.channel, planned.recipient) in busy:
                    rows.append(row)
                else:
                    rows.append(released_values(row, now))
                    ids.append(planned.id)
            queued.append(tuple(ids))
        return rows, queued

    def _insert_many(self, conn: Connection, table: Table, rows: list[dict[str, Any]]) -> None:
        """One INSERT of ``rows`` (all with the same columns), compiled once per table and
        columns (ledger/prepared.py): SQLAlchemy's execution path, run for each row of a batch,
        cost more than SQLite did (bench/intake.py)."""
        keys = tuple(rows[0])
        prepared = self._inserts.get((table.name, keys))
        if prepared is None:
            prepared = self._inserts[(table.name, keys)] = Prepared(insert(table), self.ledger.engine.dialect, keys)
        prepared.run_many(conn, rows)

    def _remember(self, signature: str, section: str, appeal_id: str, now: datetime) -> None:
        """Record that this signature was answered with ``appeal_id`` (an idempotent retry by
        client_ref): the same request again gets the same answer without a lookup."""
        try:
            with self.ledger.session() as session:
                session.execute(
                    _INSERT_SIGNATURE,
                    {"signature": signature, "section": section, "seen_at": now, "appeal_id": appeal_id},
                )
        except IntegrityError:
            pass  # a concurrent copy of the request recorded it first

    def _answered(self, signature: str) -> Accepted | None:
        """The appeal a signed request was already answered with, or None if the signature is new."""
        with self.ledger.session(read_only=True) as session:
            used = session.execute(_SIGNATURE_SEEN, {"p_signature": signature}).first()
            if used is None:
                return None
            prior = None if used.appeal_id is None else session.get(Appeal, used.appeal_id)
            if prior is None:
                # Accepted before its appeal was recorded with it (a row older than migration
                # 0010), or its appeal is gone: the original answer cannot be given, and a
                # captured signature must never create a second appeal.
                raise SignatureReplayed("this signature was already used; sign every request afresh")
            accepted = self._as_accepted(session, prior, replayed=True)
        log.info("appeal.replayed", appeal=accepted.appeal_id, section=accepted.section, by="signature")
        return accepted

    def _existing(self, session: Any, appeal: AppealIn, ref: str) -> Accepted | None:
        """An idempotent retry (same client_ref) returns the original; another appeal by the same
        supporter to the same campaign through the same section is a 409."""
        if appeal.client_ref is not None:
            found = session.execute(
                _BY_CLIENT_REF, {"p_section": appeal.section, "p_client_ref": appeal.client_ref}
            ).first()
            if found is not None:
                if found.campaign != appeal.campaign or found.supporter_ref != ref:
                    raise DuplicateAppeal(
                        found.id, f"client_ref {appeal.client_ref!r} was already used for another appeal"
                    )
                return self._as_accepted(session, session.get(Appeal, found.id), replayed=True)
        prior_id = session.execute(
            _BY_SUPPORTER, {"p_campaign": appeal.campaign, "p_section": appeal.section, "p_ref": ref}
        ).scalar_one_or_none()
        if prior_id is not None:
            raise DuplicateAppeal(prior_id)
        return None

    def _as_accepted(self, session: Any, prior: Appeal, *, replayed: bool) -> Accepted:
        rows = session.scalars(select(Delivery).where(Delivery.appeal_id == prior.id).order_by(Delivery.target)).all()
        deliveries = [
            PlannedDelivery(
                d.id,
                d.target,
                self.catalog.target(d.campaign, d.section, d.target).name,
                d.channel,
                d.language,
                d.state,
                d.recipient,
            )
            for d in rows
        ]
        return Accepted(prior.id, prior.campaign, prior.section, deliveries, replayed=replayed)

    def _offer_to_queue(self, written: list[_Pending], out: Any) -> None:
        """After the commit: the batch's letters marked queued go to the queue in one round
        trip. A queue that refuses them loses nothing: they go back to planned, and the
        reconciler sends them later (and requeues any it finds queued without a message)."""
        ready = [p for p in written if p.queued]
        ids = [i for p in ready for i in p.queued]
        if self.enqueuer is None or not ids:
            return
        try:
            sent = set(self.enqueuer.send(ids))
        except Exception as exc:  # noqa: BLE001 - any broker failure: the outbox keeps the rows
            sent = set(getattr(exc, "sent", []))
            error = type(getattr(exc, "cause", exc)).__name__
            try:
                self.ledger.lifecycle.unmark_queued([i for i in ids if i not in sent], max(p.now for p in ready))
            except Exception as ledger_error:  # noqa: BLE001 - the appeals are in; the reconciler requeues
                out.error("appeal.unmark_failed", error=type(ledger_error).__name__, deliveries=len(ids) - len(sent))
            for pending in ready:
                if not sent.issuperset(pending.queued):
                    out.warning(
                        "appeal.enqueue_deferred",
                        appeal=pending.appeal_row["id"],
                        error=error,
                        note="queue unavailable; the reconciler will send these deliveries later",
                    )
        for pending in ready:
            for delivery_id in pending.queued:
                if delivery_id in sent:
                    out.info("delivery.queued", delivery=delivery_id, appeal=pending.appeal_row["id"])


def _log_accepted(out: Any, pending: _Pending) -> None:
    """An appeal's lines once it is committed (by the thread that wrote its batch: before its
    letters are queued, whoever's request it was)."""
    appeal_id = pending.appeal_row["id"]
    out.info(
        "appeal.accepted",
        appeal=appeal_id,
        campaign=pending.campaign,
        section=pending.section,
        supporter_ref=pending.ref,
        deliveries=len(pending.planned),
    )
    for d in pending.planned:
        out.info(
            "delivery.planned",
            delivery=d.id,
            appeal=appeal_id,
            campaign=pending.campaign,
            section=pending.section,
            target=d.target,
            channel=d.channel,
            language=d.language,
        )
