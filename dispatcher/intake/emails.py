"""The supporter's email address: email-validator's verdict (pydantic's ``EmailStr``), with a
shortcut for the plainest addresses.

Why: at intake, checking the address was the largest single part of validating an appeal (a
tenth of the API's samples under load, bench/intake.py ``--profile``; 25 us an address in
process): email-validator runs every address through its Unicode and IDNA machinery, although
most are plain ASCII. An address of letters and digits joined by single ``.``, ``_``, ``+`` or ``-`` at a
domain of such labels (hyphens single and inside) under an alphabetic top-level domain, within
the lengths email-validator allows and not at a special-use domain, is one email-validator
accepts as it is, with the domain in lower case: that is returned here directly. Everything
else — quoting, other characters, Unicode, punycode, a display name, any doubt — goes to
email-validator, with its errors. tests/test_intake_emails.py checks the shortcut against
email-validator itself over generated addresses.
"""

from __future__ import annotations

import re
from typing import Annotated

from email_validator import SPECIAL_USE_DOMAIN_NAMES
from pydantic import AfterValidator, WithJsonSchema
from pydantic.networks import validate_email

_PLAIN = re.compile(
    r"(?P<local>[A-Za-z0-9]+(?:[._+-][A-Za-z0-9]+)*)"
    r"@(?P<domain>(?:[A-Za-z0-9]+(?:-[A-Za-z0-9]+)*\.)+[A-Za-z]{2,63})\Z"
)
#: email-validator's limits (RFC 5321): the local part, a domain label, the domain, the address
_LOCAL_MAX, _LABEL_MAX, _DOMAIN_MAX, _ADDRESS_MAX = 64, 63, 253, 254
_SPECIAL = tuple(SPECIAL_USE_DOMAIN_NAMES)


def plain_address(value: str) -> str | None:
    """``value`` as email-validator would normalise it, if it is one of the plainest addresses;
    None otherwise (then only email-validator can tell)."""
    found = _PLAIN.match(value)
    if found is None or len(value) > _ADDRESS_MAX:
        return None
    local, domain = found.group("local", "domain")
    domain = domain.lower()
    if len(local) > _LOCAL_MAX or len(domain) > _DOMAIN_MAX:
        return None
    if any(len(label) > _LABEL_MAX for label in domain.split(".")):
        return None
    if any(domain == special or domain.endswith("." + special) for special in _SPECIAL):
        return None
    return f"{local}@{domain}"


def checked_email(value: str) -> str:
    """The address as pydantic's ``EmailStr`` gives it, or its error."""
    plain = plain_address(value)
    if plain is not None:
        return plain
    return validate_email(value)[1]


#: ``EmailStr``, the same schema and errors, checked by :func:`checked_email`
EmailAddress = Annotated[str, AfterValidator(checked_email), WithJsonSchema({"type": "string", "format": "email"})]
