"""The OpenAPI document is the web forms' contract: a client generated from it must work. So the
document is read as a client generator would, the docs pages must work without internet, every
refusal has our error body with a code per field, and schemathesis drives the real app with
bodies generated from the document (each signed with its section's key) and finds nothing
the document does not say."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance

from dispatcher.intake.contract import FIELD_CODES
from dispatcher.intake.schema import CLIENT_REF_PATTERN
from dispatcher.intake.signature import HEADER, sign
from tests.conftest import appeal_body, signed_post

pytestmark = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)

#: generated requests per operation and mode: the whole run stays well under a minute
EXAMPLES = 50


@pytest.fixture
def document(client) -> dict[str, Any]:
    r = client.get("/openapi.json")
    assert r.status_code == 200
    return r.json()


def resolve(doc: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        node = doc["components"]["schemas"][node["$ref"].rsplit("/", 1)[1]]
    return node


# ------------------------------------------------------------------ the document


def test_appeal_body_schema_has_the_models_fields_limits_and_an_example(document, service):
    body = document["paths"]["/v1/appeals"]["post"]["requestBody"]
    assert body["required"] is True
    media = body["content"]["application/json"]
    appeal = resolve(document, media["schema"])
    assert set(appeal["required"]) == {"campaign", "section", "language", "supporter"}
    assert appeal["additionalProperties"] is False
    props = appeal["properties"]
    assert props["client_ref"]["anyOf"][0]["maxLength"] == 128
    assert props["client_ref"]["anyOf"][0]["pattern"] == CLIENT_REF_PATTERN
    # this server's own limit and catalog
    assert props["message"]["anyOf"][0]["maxLength"] == service.settings.max_message_chars
    assert set(props["section"]["enum"]) == set(service.catalog.sections)
    assert "UA-002-19-DEMO" in props["campaign"]["enum"]
    supporter = resolve(document, props["supporter"])
    assert supporter["properties"]["name"]["maxLength"] == 200
    assert supporter["properties"]["email"]["format"] == "email"
    assert media["example"]["supporter"]["email"] == "jane@example.org"


def test_dispatch_signature_is_a_documented_security_scheme(document):
    scheme = document["components"]["securitySchemes"]["DispatchSignature"]
    assert scheme == {**scheme, "type": "apiKey", "in": "header", "name": HEADER}
    assert "HMAC-SHA256" in scheme["description"]
    assert document["paths"]["/v1/appeals"]["post"]["security"] == [{"DispatchSignature": []}]


def test_every_status_of_posting_an_appeal_has_our_error_body(document):
    responses = document["paths"]["/v1/appeals"]["post"]["responses"]
    assert set(responses) == {"202", "401", "409", "410", "413", "422", "429", "503"}
    accepted = resolve(document, responses["202"]["content"]["application/json"]["schema"])
    assert {"appeal_id", "replayed", "deliveries"} <= set(accepted["required"])
    for status in set(responses) - {"202"}:
        schema = responses[status]["content"]["application/json"]["schema"]
        assert schema == {"$ref": "#/components/schemas/ErrorBody"}, status
    assert "Retry-After" in responses["429"]["headers"]


def test_an_erasure_is_a_signed_request_with_its_own_body_and_our_error_body(document, service):
    post = document["paths"]["/v1/erasures"]["post"]
    assert post["security"] == [{"DispatchSignature": []}]
    media = post["requestBody"]["content"]["application/json"]
    erasure = resolve(document, media["schema"])
    assert erasure["required"] == ["section"] and erasure["additionalProperties"] is False
    assert set(erasure["properties"]) == {"section", "appeal_id", "email", "campaign"}
    assert set(erasure["properties"]["section"]["enum"]) == set(service.catalog.sections)
    assert media["example"] == {"section": "us", "email": "jane@example.org"}
    assert set(post["responses"]) == {"200", "401", "404", "413", "422", "503"}
    erased = resolve(document, post["responses"]["200"]["content"]["application/json"]["schema"])
    assert {"status", "appeal_ids", "letters_cancelled"} <= set(erased["required"])


def test_fastapis_own_error_shape_is_nowhere_in_the_document(document):
    text = json.dumps(document)
    assert "HTTPValidationError" not in text
    assert '"detail"' not in text
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            for status, response in operation["responses"].items():
                if status.startswith(("4", "5")) and path != "/healthz":
                    assert response["content"]["application/json"]["schema"] == {
                        "$ref": "#/components/schemas/ErrorBody"
                    }, (method, path, status)


def test_docs_pages_load_their_assets_from_the_service_itself(client):
    for page in ("/docs", "/redoc"):
        html = client.get(page).text
        assets = re.findall(r'(?:src|href)="([^"]+)"', html)
        assert assets, page
        for asset in assets:
            assert asset.startswith("/"), f"{page} loads {asset} from elsewhere"
            r = client.get(asset)
            assert r.status_code == 200 and len(r.content) > 1000, asset
        assert "https://" not in html and "http://" not in html


# ------------------------------------------------------------------ our error body, everywhere


def test_unknown_path_and_wrong_method_answer_our_error_body(client):
    r = client.get("/v1/nothing-here")
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "not_found"
    r = client.put("/v1/appeals", content=b"{}")
    assert r.status_code == 405
    assert r.json()["error"]["code"] == "method_not_allowed"
    assert r.headers["allow"] == "POST"


def test_every_field_problem_comes_at_once_with_a_code(client, environ, catalog, service):
    body = appeal_body(language="it", message="x" * (service.settings.max_message_chars + 1), client_ref=" my ref")
    body["supporter"]["name"] = "Jane\r\nBcc: all@example.org"
    body["supporter"]["email"] = "not-an-address"
    r = signed_post(client, environ, catalog, body)
    assert r.status_code == 422
    fields = {f["field"]: f["code"] for f in r.json()["error"]["fields"]}
    assert fields == {
        "supporter.name": "header_unsafe",
        "supporter.email": "invalid_email",
        "client_ref": "invalid_format",
        "language": "not_offered",
        "message": "too_long",
    }
    assert set(fields.values()) <= set(FIELD_CODES)


@pytest.mark.parametrize(
    ("change", "field", "code"),
    [
        ({"campaign": "UA-999-99"}, "campaign", "unknown"),
        ({"mesage": "typo"}, "mesage", "unknown_field"),
        ({"language": None}, "language", "required"),
        ({"language": "EN"}, "language", "invalid_format"),
        ({"supporter": "Jane"}, "supporter", "wrong_type"),
        ({"message": "a\x07b"}, "message", "control_character"),
    ],
)
def test_field_codes(client, environ, catalog, change, field, code):
    r = signed_post(client, environ, catalog, appeal_body(**change))
    assert r.status_code == 422
    assert {"field": field, "code": code} in [{k: f[k] for k in ("field", "code")} for f in r.json()["error"]["fields"]]


def test_a_body_that_is_no_json_has_a_code_too(client, environ, catalog):
    r = signed_post(client, environ, catalog, None, section="us", raw=b"{nope")
    assert r.json()["error"]["fields"][0]["code"] == "invalid_json"


# ------------------------------------------------------------------ schemathesis


#: the requests signed with a section's key: an appeal, an erasure
SIGNED = ("/v1/appeals", "/v1/erasures")


class SignEachBody(requests.auth.AuthBase):
    """Replaces the ``Dispatch-Signature`` schemathesis generated with the real signature of the
    exact bytes it sends, keyed with the section the body names (a body naming none, or no JSON
    at all, with the first section's: it is refused either way). A request generated without the
    header (a negative case) goes without one."""

    def __init__(self, keys: dict[str, str]):
        self.keys = keys
        self.statuses: list[int] = []

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        if request.method == "POST" and request.path_url in SIGNED and HEADER in request.headers:
            raw = request.body or b""
            raw = raw.encode() if isinstance(raw, str) else raw
            try:
                section = json.loads(raw).get("section")
            except (ValueError, AttributeError):
                section = None
            key = self.keys.get(section, next(iter(self.keys.values())))
            request.headers[HEADER] = sign(key.encode(), raw)
            request.register_hook("response", self._seen)
        return request

    def _seen(self, response: requests.Response, *args: Any, **kwargs: Any) -> None:
        self.statuses.append(response.status_code)


@pytest.fixture
def signer(environ, catalog) -> SignEachBody:
    return SignEachBody({code: environ[s.intake_key_env] for code, s in catalog.sections.items()})


# schemathesis' own pytest integration (`from_fixture`) does not run under pytest 9 (it sets a
# node's `_nodeid`, which pytest 9 no longer has), so its strategies are driven by hypothesis
# directly: the same generation and checks, for every operation the document lists.
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=str)
def test_schemathesis_finds_nothing_the_document_does_not_say(service, signer, mode):
    api = schemathesis.openapi.from_asgi("/openapi.json", service.api())
    operations = [result.ok() for result in api.get_all_operations()]
    assert {op.label for op in operations} >= {"POST /v1/appeals", "GET /v1/campaigns/{campaign_id}/counters"}
    if mode is GenerationMode.NEGATIVE:
        # Only a body can be made invalid: every string is a valid path segment.
        operations = [op for op in operations if len(op.body)]
        assert sorted(op.label for op in operations) == ["POST /v1/appeals", "POST /v1/erasures"]
    for operation in operations:

        @hsettings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy(generation_mode=mode))
        def each(case: Any) -> None:
            # Every other default check runs. Not this one: a schema-valid appeal can still be
            # refused by the catalog's rules across fields (a language another section offers,
            # a closed campaign), which JSON Schema cannot say; those refusals are documented.
            case.call_and_validate(auth=signer, excluded_checks=[positive_data_acceptance])

        try:
            each()
        except Exception as exc:
            exc.add_note(f"schemathesis: {operation.label} ({mode})")
            raise
    # The signatures were right: generated requests got past them, to be accepted or refused on
    # their merits. Only a verified request can be accepted (202), done (200), find no appeal to
    # erase (404) or meet a duplicate or a closed campaign (409, 410); few generated appeals are
    # acceptable (a random language is rarely one the section offers), so any of these will do.
    past_the_signature = {200, 202, 404, 409, 410}
    assert past_the_signature & set(signer.statuses) or mode is GenerationMode.NEGATIVE, signer.statuses
    assert 422 in signer.statuses, signer.statuses


def test_the_documents_example_appeal_is_accepted(client, document, environ, catalog):
    example = document["paths"]["/v1/appeals"]["post"]["requestBody"]["content"]["application/json"]["example"]
    r = signed_post(client, environ, catalog, example)
    assert r.status_code == 202, r.text
