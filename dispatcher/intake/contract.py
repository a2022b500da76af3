"""The intake API's contract as OpenAPI: what each endpoint answers, with which body.

The API builds its JSON answers itself (the signature covers the raw request body, and every
refusal is an IntakeError's body), so FastAPI cannot infer any of this: the models here only
describe those answers, and ``openapi_document`` puts the appeal's own model, its configured
limits and the ``Dispatch-Signature`` scheme into the document FastAPI generates.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from dispatcher.errors import ValidationFailed
from dispatcher.intake.erasures import EXAMPLE_ERASURE, ErasureIn
from dispatcher.intake.schema import EXAMPLE_APPEAL, AppealIn
from dispatcher.intake.signature import HEADER, TOLERANCE_SECONDS

SECURITY_SCHEME = "DispatchSignature"

#: every field code a 422 can carry, for the docs and the schema's description
FIELD_CODES = {
    "required": "the field is missing",
    "unknown_field": "not a field of an appeal (a misspelt name)",
    "wrong_type": "a string, object or list was expected",
    "too_short": "shorter than the field's minimum (an empty name)",
    "too_long": "longer than the field's maximum (message, name, client_ref, languages)",
    "invalid_format": "does not match the field's pattern (language, country, client_ref)",
    "invalid_email": "not a valid email address",
    "header_unsafe": "line breaks, control characters or '=?' in a name or email (they go into mail headers)",
    "control_character": "a control character in the city or message",
    "unknown": "no such campaign or section on this server",
    "not_offered": "the section does not offer this language, or does not take part in this campaign",
    "invalid_json": "the body is not JSON",
    "invalid_encoding": "the body is not UTF-8",
    "invalid": "any other problem (the message says which)",
}


class InvalidRequest(ValidationFailed):
    """A request FastAPI's own parameter parsing refused (a query or path parameter)."""

    code = "invalid_request"


class FieldError(BaseModel):
    field: str = Field(description="The field's path, dotted: `supporter.email`, `languages.1`, `body`.")
    code: str = Field(
        description="Machine-readable, stable; translate this one. "
        + "; ".join(f"`{code}`: {what}" for code, what in FIELD_CODES.items()),
        examples=["too_long"],
    )
    message: str = Field(description="English, for the developer.", examples=["is required"])


class ErrorDetail(BaseModel):
    # Some refusals carry more (appeal_id, campaign, deadline...): documented, and allowed.
    model_config = ConfigDict(extra="allow")

    code: str = Field(description="Machine-readable: the table in docs/intake.md.", examples=["invalid_appeal"])
    message: str = Field(description="English, for the developer.")
    fields: list[FieldError] | None = Field(None, description="422: every field's problem at once.")
    appeal_id: str | None = Field(None, description="409: the appeal that already exists.")
    campaign: str | None = Field(None, description="410: the closed campaign.")
    deadline: str | None = Field(None, description="410: when the campaign ended for the section (ISO 8601).")


class ErrorBody(BaseModel):
    """Every refusal, whatever its status."""

    error: ErrorDetail


class PlannedDeliveryOut(BaseModel):
    id: str
    target: str
    target_name: str
    channel: str
    language: str
    state: str


class AcceptedOut(BaseModel):
    appeal_id: str = Field(examples=["ap_3kq7..."])
    campaign: str
    section: str
    replayed: bool = Field(description="True when this answers a retry of an appeal already accepted.")
    status_url: str
    deliveries: list[PlannedDeliveryOut]


class TryOut(BaseModel):
    number: int
    at: str
    outcome: str
    code: str | None


class DeliveryOut(BaseModel):
    model_config = ConfigDict(extra="allow")

    id: str
    target: str
    channel: str
    language: str
    state: str
    attempts: int
    next_attempt_at: str | None
    sent_at: str | None
    last_outcome: str | None
    last_code: str | None
    last_text: str | None
    digest: str | None = None
    replaces: str | None = None
    gateway: str | None
    remote_id: str | None
    pages: int | None
    line_seconds: float | None
    tries: list[TryOut]


class AppealOut(BaseModel):
    """An appeal's letters and their progress; no personal data."""

    appeal_id: str
    campaign: str
    section: str
    language: str
    client_ref: str | None
    created_at: str
    deliveries: list[DeliveryOut]


class SectionCountOut(BaseModel):
    appeals: int
    letters_delivered: int


class CountersOut(BaseModel):
    campaign: str
    appeals: int
    letters_delivered: int
    by_section: dict[str, SectionCountOut]


class ErasureOut(BaseModel):
    """What an erasure did, in counts; no personal data."""

    status: Literal["erased", "already_erased"] = Field(
        description="`erased`, or `already_erased` when every appeal named was erased before."
    )
    appeal_ids: list[str] = Field(description="The appeals of your section it concerned.")
    appeals_erased: int = Field(description="Appeals erased by this request.")
    letters_cancelled: int = Field(description="Letters not yet sent, cancelled (state `cancelled`, text `erased`).")
    letters_in_flight: int = Field(
        description="Letters being sent at that moment: left to finish (cancelled should they not go out)."
    )
    letters_out: int = Field(description="Letters that had reached the official: kept, and still counted.")
    texts_redacted: int = Field(description="Texts about its letters from which the name or address was taken out.")
    sandbox_files_removed: int = Field(description="Local sandbox copies of its letters deleted.")


class WebhookOut(BaseModel):
    result: str


class HealthOut(BaseModel):
    model_config = ConfigDict(extra="allow")

    status: str = Field(description="`ok`, or `degraded` (with 503) when the ledger cannot be reached.")


#: what each refusal status means, by its codes (the response's description in the document)
REFUSALS: dict[int, str] = {
    401: "`invalid_signature` (header missing or malformed, HMAC does not match), `stale_signature` "
    f"(more than {TOLERANCE_SECONDS} s of clock skew), `replayed_signature`.",
    404: "`not_found`: no such appeal, campaign or webhook (an erasure: no such appeal, or no appeal by that "
    "email, in your section).",
    409: "`duplicate_appeal` (this supporter already signed this campaign through this section, or "
    "the client_ref was used for another appeal; `appeal_id` names it), `sandbox_mode` (webhooks).",
    410: "`campaign_closed`: closed, or past the section's deadline (`campaign`, `deadline`).",
    413: "`body_too_large`.",
    422: "`invalid_appeal` / `invalid_erasure` / `invalid_webhook` / `invalid_request`, with every field's "
    "problem in `fields`.",
    429: "`quota_exceeded`: a quota of the section key, the supporter or the client IP is used up "
    "(`quota`, `limits`, `retry_after`); try again after `Retry-After` seconds.",
    503: "`section_not_configured`: the server has no key for the section (our problem: retry later).",
}


def refusals(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """FastAPI's ``responses=`` for these refusal statuses, each with our error body."""
    out: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        response: dict[str, Any] = {"model": ErrorBody, "description": REFUSALS[status]}
        if status == 429:
            response["headers"] = {
                "Retry-After": {"description": "Seconds to wait before trying again.", "schema": {"type": "integer"}}
            }
        out[status] = response
    return out


def _hoist(schema: dict[str, Any], components: dict[str, Any]) -> dict[str, Any]:
    """A pydantic JSON schema with its ``$defs`` moved into the document's components."""
    for name, definition in schema.pop("$defs", {}).items():
        components.setdefault(name, definition)
    return schema


def openapi_document(
    generate: Callable[[], dict[str, Any]], *, max_message_chars: int, sections: Iterable[str], campaigns: Iterable[str]
) -> dict[str, Any]:
    """FastAPI's document, completed: the appeal body with this server's limits and values, the
    signature scheme, and no trace of FastAPI's own ``{"detail": ...}`` error shape."""
    doc = generate()
    components = doc.setdefault("components", {})
    schemas = components.setdefault("schemas", {})

    appeal = _hoist(AppealIn.model_json_schema(ref_template="#/components/schemas/{model}"), schemas)
    # This server's limit and catalog: a generated client (and schemathesis) sees what is accepted.
    appeal["properties"]["message"]["anyOf"][0]["maxLength"] = max_message_chars
    appeal["properties"]["section"]["enum"] = sorted(sections)
    appeal["properties"]["campaign"]["enum"] = sorted(campaigns)
    schemas["AppealIn"] = appeal

    components.setdefault("securitySchemes", {})[SECURITY_SCHEME] = {
        "type": "apiKey",
        "in": "header",
        "name": HEADER,
        "description": (
            "`t=<unix seconds>,v1=<hex>`: HMAC-SHA256 with the section's intake key (used as text, "
            "not hex-decoded) over `<t>.` followed by the exact raw body. Several `v1=` may be sent "
            f"during a key rotation; more than {TOLERANCE_SECONDS} s of skew is refused."
        ),
    }

    post = doc["paths"]["/v1/appeals"]["post"]
    post["requestBody"] = {
        "required": True,
        "content": {
            "application/json": {
                "schema": {"$ref": "#/components/schemas/AppealIn"},
                "example": EXAMPLE_APPEAL,
            }
        },
    }
    post["security"] = [{SECURITY_SCHEME: []}]

    erasure = _hoist(ErasureIn.model_json_schema(ref_template="#/components/schemas/{model}"), schemas)
    erasure["properties"]["section"]["enum"] = sorted(sections)
    schemas["ErasureIn"] = erasure
    erase = doc["paths"]["/v1/erasures"]["post"]
    erase["requestBody"] = {
        "required": True,
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/ErasureIn"}, "example": EXAMPLE_ERASURE}
        },
    }
    erase["security"] = [{SECURITY_SCHEME: []}]

    # FastAPI documents a 422 of its own shape for any route with parameters; ours answers it
    # (the handler in api.py), so the document says so.
    for path in doc["paths"].values():
        for operation in path.values():
            response = operation.get("responses", {}).get("422")
            if response and "HTTPValidationError" in str(response):
                operation["responses"]["422"] = {
                    "description": REFUSALS[422],
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}},
                }
    schemas.pop("HTTPValidationError", None)
    schemas.pop("ValidationError", None)
    return doc
