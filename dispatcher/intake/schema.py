"""The appeal a web form posts, and the translation of validation errors into field problems."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, IPvAnyAddress, ValidationError, field_validator
from pydantic_core import PydanticCustomError

from dispatcher.channels.email.headers import unsafe_header_reason
from dispatcher.errors import FieldProblem, ValidationFailed
from dispatcher.intake.emails import EmailAddress

CLIENT_REF_PATTERN = r"^[\x21-\x7e](?:[\x20-\x7e]*[\x21-\x7e])?$"
LanguageCode = Annotated[str, Field(pattern=r"^[a-z]{2,3}$", examples=["en"])]


#: Unicode's control (Cc) and surrogate (Cs) code points and the line and paragraph separators,
#: with and without the tab and line breaks a message may hold (one regex search instead of a
#: category lookup per character: a message is thousands of characters)
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff\u2028\u2029]")
_CONTROL_BUT_LINES = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff\u2028\u2029]")


def _no_control(value: str, *, allow_newlines: bool) -> str:
    found = (_CONTROL_BUT_LINES if allow_newlines else _CONTROL).search(value)
    if found is not None:
        # Its own error type, so that the field problem gets its own machine code.
        raise PydanticCustomError(
            "control_character", "contains the control character {char}", {"char": f"U+{ord(found.group()):04X}"}
        )
    return value


class SupporterIn(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True, frozen=True)

    name: str = Field(
        min_length=1,
        max_length=200,
        description="No line breaks, control characters or '=?': it goes into mail headers.",
        examples=["Jane Doe"],
    )
    email: EmailAddress = Field(examples=["jane@example.org"])
    city: str | None = Field(None, max_length=100, examples=["Boston"])
    country: str | None = Field(None, pattern=r"^[A-Za-z]{2}$", description="ISO 3166 alpha-2.", examples=["US"])
    #: other languages the supporter can write in (the appeal's ``language`` is the first)
    languages: list[LanguageCode] = Field(
        default_factory=list,
        max_length=8,
        description="Other languages the supporter can write in (ISO 639, lower case).",
        examples=[["ru"]],
    )

    @field_validator("name", "email", mode="before")
    @classmethod
    def _header_safe(cls, value: Any) -> Any:
        # Both end up in From / Reply-To headers: refuse what could inject or spoof there.
        if isinstance(value, str):
            reason = unsafe_header_reason(value)
            if reason is not None:
                raise PydanticCustomError(
                    "header_unsafe", "{reason}; it would end up in a mail header", {"reason": reason}
                )
        return value

    @field_validator("city")
    @classmethod
    def _city(cls, value: str | None) -> str | None:
        return None if value is None else _no_control(value, allow_newlines=False)

    @field_validator("country")
    @classmethod
    def _country(cls, value: str | None) -> str | None:
        return None if value is None else value.upper()


EXAMPLE_APPEAL: dict[str, Any] = {
    "campaign": "UA-002-19-DEMO",
    "section": "us",
    "language": "en",
    "supporter": {"name": "Jane Doe", "email": "jane@example.org", "city": "Boston", "country": "US"},
    "message": "Please release him now.",
    "client_ref": "form-2024-000123",
}


class AppealIn(BaseModel):
    """The appeal a web form posts, signed with its section's key (``Dispatch-Signature``)."""

    model_config = ConfigDict(extra="forbid", frozen=True, json_schema_extra={"examples": [EXAMPLE_APPEAL]})

    campaign: str = Field(
        min_length=1, max_length=64, description="A campaign the section takes part in.", examples=["UA-002-19-DEMO"]
    )
    section: str = Field(
        min_length=1, max_length=8, description="The section's code; its key signs the request.", examples=["us"]
    )
    language: LanguageCode = Field(description="The form's language: one of the section's languages.")
    supporter: SupporterIn
    message: str | None = Field(None, description="Optional personal message, kept as text (HTML is not markup).")
    #: printable ASCII; spaces only between other characters ("order 42"), so that two refs
    #: never differ by blanks a form's template added at either end
    client_ref: str | None = Field(
        None,
        min_length=1,
        max_length=128,
        pattern=CLIENT_REF_PATTERN,
        description="The form's own submission id: printable ASCII; spaces only between other characters. "
        "Makes retries safe.",
        examples=["form-2024-000123", "the form's own submission id"],
    )
    #: the supporter's IP address as the form saw it, for the per-client-IP quota; used for that
    #: count only (as a keyed hash), never stored or logged
    client_ip: IPvAnyAddress | None = Field(
        None,
        description="The supporter's IP address as the form saw it: counted (as a keyed hash) for the "
        "per-client-IP quota, never stored.",
    )

    @field_validator("message")
    @classmethod
    def _message(cls, value: str | None) -> str | None:
        if value is None:
            return None
        value = value.strip()
        return _no_control(value, allow_newlines=True) or None


_MESSAGES = {
    "missing": "is required",
    "extra_forbidden": "is not a field of an appeal (check the spelling)",
    "string_type": "must be a string",
    "dict_type": "must be an object",
    "model_type": "must be an object",
    "list_type": "must be a list",
}

#: where the address check (emails.py: pydantic's EmailStr) reports a bad address (as a plain value_error)
_EMAIL_FIELDS = {("supporter", "email")}

#: pydantic's error types -> our field codes (docs/intake.md lists them; forms translate them)
_CODES = {
    "missing": "required",
    "extra_forbidden": "unknown_field",
    "string_type": "wrong_type",
    "dict_type": "wrong_type",
    "model_type": "wrong_type",
    "model_attributes_type": "wrong_type",
    "list_type": "wrong_type",
    "string_too_short": "too_short",
    "string_too_long": "too_long",
    "too_short": "too_short",
    "too_long": "too_long",
    "string_pattern_mismatch": "invalid_format",
    "header_unsafe": "header_unsafe",
    "control_character": "control_character",
    "ip_any_address": "invalid_format",
}


def _pattern_message(loc: tuple[Any, ...]) -> str | None:
    leaf = loc[-1] if loc else None
    parent = loc[-2] if len(loc) >= 2 else None
    if leaf == "language" or parent == "languages":
        return "must be a lower-case ISO 639 language code such as 'en' or 'ru'"
    if leaf == "country":
        return "must be a two-letter ISO 3166 country code such as 'US'"
    if leaf == "client_ref":
        return "must be printable ASCII, with spaces only between other characters"
    return None


def problems_from(exc: ValidationError) -> list[FieldProblem]:
    return field_problems(exc.errors(include_url=False))


def field_problems(errors: Sequence[Any]) -> list[FieldProblem]:
    """pydantic's error dicts (a model's, or FastAPI's for a request's parameters) as ours."""
    problems = []
    for err in errors:
        loc = tuple(err["loc"])
        kind = err["type"]
        if kind in _MESSAGES:
            msg = _MESSAGES[kind]
        elif kind == "value_error":
            msg = str(err["msg"]).removeprefix("Value error, ")
        elif kind == "string_pattern_mismatch":
            msg = _pattern_message(loc) or str(err["msg"])
        else:
            msg = str(err["msg"])
        code = _CODES.get(kind, "invalid")
        if kind == "value_error" and loc in _EMAIL_FIELDS:
            code = "invalid_email"
        problems.append(FieldProblem(loc, msg, code))
    return problems


def parse_body(raw: bytes) -> dict[str, Any]:
    """Decode a request body into a JSON object, refusing anything else with a 422."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ValidationFailed([FieldProblem(("body",), "is not valid UTF-8", "invalid_encoding")]) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValidationFailed(
            [
                FieldProblem(
                    ("body",), f"is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}", "invalid_json"
                )
            ]
        ) from None
    if not isinstance(data, dict):
        raise ValidationFailed([FieldProblem(("body",), "must be a JSON object", "wrong_type")])
    return data


def validate_appeal(data: dict[str, Any]) -> AppealIn:
    try:
        return AppealIn.model_validate(data)
    except ValidationError as exc:
        raise ValidationFailed(problems_from(exc)) from None
