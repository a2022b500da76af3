"""``POST /v1/erasures``: a section's CRM asks for a supporter's data to be erased (GDPR art. 17).

Signed like an appeal (``Dispatch-Signature`` with the section's intake key over
``<t>.<raw body>``, at most 300 s of skew, each signature accepted once), and scoped to the
section whose key signed it: an appeal of another section is answered 404, as one that does
not exist. The erasure itself is dispatcher/supporters.py's, the same the CLI and the console run.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, EmailStr, Field, ValidationError
from sqlalchemy import insert
from sqlalchemy.exc import IntegrityError

from dispatcher.errors import FieldProblem, SignatureReplayed, ValidationFailed
from dispatcher.intake import signature as sig
from dispatcher.intake.schema import parse_body, problems_from
from dispatcher.intake.service import IntakeService
from dispatcher.ledger.tables import US
from dispatcher.supporters import ErasureReport, Supporters

EXAMPLE_ERASURE: dict[str, Any] = {"section": "us", "email": "jane@example.org"}
#: where pydantic reports a bad address (as a plain value error): the supporter's email field
_EMAIL_FIELD: tuple[str, ...] = ("email",)


class InvalidErasure(ValidationFailed):
    code = "invalid_erasure"


class ErasureIn(BaseModel):
    """Whose data to erase: one appeal (its `appeal_id`, as the intake answered it) or every
    appeal of one supporter (their `email`), within your section; exactly one of the two."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True, frozen=True)

    section: str = Field(description="Your section's code: the key that signs the request.", examples=["us"])
    appeal_id: str | None = Field(None, min_length=1, max_length=40, examples=["ap_3f2c..."])
    email: EmailStr | None = Field(
        None,
        max_length=320,
        description="Matched through its keyed hash; the address is not stored.",
        examples=["jane@example.org"],
    )
    campaign: str | None = Field(
        None, min_length=1, max_length=64, description="Only this campaign's appeals.", examples=["UA-002-19"]
    )


def validate_erasure(data: dict[str, Any]) -> ErasureIn:
    try:
        request = ErasureIn.model_validate(data)
    except ValidationError as exc:
        problems = [
            FieldProblem(p.loc, p.message, "invalid_email") if p.loc == _EMAIL_FIELD and p.code == "invalid" else p
            for p in problems_from(exc)
        ]
        raise InvalidErasure(problems) from None
    if request.appeal_id is None and request.email is None:
        raise InvalidErasure([FieldProblem(("appeal_id",), "give appeal_id or email", "required")])
    if request.appeal_id is not None and request.email is not None:
        raise InvalidErasure([FieldProblem(("email",), "give appeal_id or email, not both", "invalid")])
    return request


class SignedErasures:
    def __init__(self, intake: IntakeService, supporters: Supporters):
        self.intake = intake
        self.supporters = supporters

    def submit_signed(self, raw: bytes, header: str | None) -> ErasureReport:
        sig.parse(header)  # a missing or malformed header is a 401 before the body is read
        data = parse_body(raw)
        code = data.get("section")
        sections = self.intake.catalog.sections
        if not isinstance(code, str) or code not in sections:
            known = ", ".join(sorted(sections))
            raise InvalidErasure([FieldProblem(("section",), f"unknown section {code!r} (known: {known})", "unknown")])
        matched = sig.verify(self.intake.intake_key(code), raw, header, self.intake.clock().timestamp())
        request = validate_erasure(data)
        self._use(matched, code)
        who = self.supporters.who(
            appeal_id=request.appeal_id,
            email=None if request.email is None else str(request.email),
            section=code,
            campaign=request.campaign,
        )
        return self.supporters.erase(who, actor=f"api:{code}", reason="requested through the signed API")

    def _use(self, signature: str, section: str) -> None:
        """Each signature once: a captured request cannot be sent again (an erasure repeated
        is harmless, but a repeat by email could reach an appeal signed since)."""
        try:
            with self.intake.ledger.session() as session:
                session.execute(
                    insert(US).values(signature=signature, section=section, seen_at=self.intake.clock(), appeal_id=None)
                )
        except IntegrityError:
            raise SignatureReplayed(
                "this signature was already used; sign every request afresh (an erasure sent again answers "
                '"already_erased")'
            ) from None
