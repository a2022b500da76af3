"""The supporter's address at intake (dispatcher/intake/emails.py): the shortcut for plain
addresses gives exactly what email-validator (pydantic's EmailStr) gives, and leaves everything
else, errors included, to it."""

from __future__ import annotations

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError
from pydantic.networks import validate_email
from pydantic_core import PydanticCustomError

from dispatcher.intake.emails import EmailAddress, checked_email, plain_address

# Mostly the characters of plain addresses, with some that make them not plain (or invalid),
# upper case, and lengths that cross email-validator's limits.
_LOCAL = st.text(alphabet="abcXYZ019._+-!#'%=~\"", min_size=1, max_size=70)
_LABEL = st.text(alphabet="abcXYZ09-_", min_size=1, max_size=70)
_TLD = st.sampled_from(["org", "NET", "de", "c", "test", "local", "localhost", "invalid", "onion", "arpa", "x1", "co"])
_ADDRESSES = st.builds(
    lambda local, labels, tld: f"{local}@{'.'.join([*labels, tld])}",
    _LOCAL,
    st.lists(_LABEL, min_size=0, max_size=4),
    _TLD,
)


def email_validator_says(value: str) -> str | None:
    try:
        return validate_email(value)[1]
    except PydanticCustomError:
        return None


@settings(max_examples=3000, deadline=None)
@given(_ADDRESSES)
@example("Jane.Doe@Example.ORG")
@example("a--b@my-domain.example.org")
@example("x@ab--cd.org")
@example("x@xn--bcher-kva.example")
@example("jane@sub.localhost")
@example("jane@example.test")
@example("a" * 64 + "@example.org")
@example("a" * 65 + "@example.org")
@example("jane@" + "a" * 63 + ".org")
@example("jane@" + "a" * 64 + ".org")
@example("jane@" + ".".join(["a" * 60] * 4) + ".org")
def test_a_plain_address_is_what_email_validator_makes_of_it(value: str) -> None:
    plain = plain_address(value)
    if plain is not None:
        assert email_validator_says(value) == plain
    # and the check as a whole answers as email-validator does, whichever way it went
    expected = email_validator_says(value)
    try:
        assert checked_email(value) == expected
    except PydanticCustomError:
        assert expected is None


def test_what_the_shortcut_takes_and_what_it_leaves() -> None:
    assert plain_address("Jane.Doe+ua@Example.ORG") == "Jane.Doe+ua@example.org"
    for value in (
        "Jane Doe <jane@example.org>",  # a display name
        "jane..doe@example.org",
        "jane@bücher.example",
        "jane@xn--bcher-kva.example",
        "jane@example.test",  # special use: email-validator refuses it
        "jane@ab--cd.example.org",
        '"jane doe"@example.org',
    ):
        assert plain_address(value) is None, value


def test_a_bad_address_fails_with_email_validators_reason_and_the_same_schema() -> None:
    class Model(BaseModel):
        email: EmailAddress

    with pytest.raises(ValidationError) as caught:
        Model(email="jane@example.test")
    error = caught.value.errors()[0]
    assert error["type"] == "value_error"
    assert "special-use or reserved name" in error["msg"]
    assert Model.model_json_schema()["properties"]["email"] == {"type": "string", "format": "email", "title": "Email"}
