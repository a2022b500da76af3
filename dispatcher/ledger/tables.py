"""Core handles on the mapped tables, for statements that skip the ORM (the hot paths)."""

from __future__ import annotations

from typing import cast

from sqlalchemy import Table

from dispatcher.ledger.models import (
    Appeal,
    Attempt,
    AuditEntry,
    BounceFact,
    CampaignClosure,
    DeadLetter,
    Delivery,
    EarlyReport,
    FlaggedNumber,
    Operator,
    OperatorSession,
    PausedChannel,
    Suppression,
    UsedSignature,
)

D = cast(Table, Delivery.__table__)
A = cast(Table, Attempt.__table__)
AP = cast(Table, Appeal.__table__)
FN = cast(Table, FlaggedNumber.__table__)
PC = cast(Table, PausedChannel.__table__)
CC = cast(Table, CampaignClosure.__table__)
DL = cast(Table, DeadLetter.__table__)
US = cast(Table, UsedSignature.__table__)
ER = cast(Table, EarlyReport.__table__)
SU = cast(Table, Suppression.__table__)
BF = cast(Table, BounceFact.__table__)
OP = cast(Table, Operator.__table__)
OS = cast(Table, OperatorSession.__table__)
AU = cast(Table, AuditEntry.__table__)
