"""VERP addresses: a bounce names its letter, and nobody else can name one for us."""

from __future__ import annotations

import pytest

from dispatcher.channels.email.verp import Verp

KEY = b"k" * 32
DOMAIN = "bounces.ch.dispatch.example"
LETTER = "dl_0123456789abcdef0123456789abcdef"


@pytest.fixture
def verp() -> Verp:
    return Verp(KEY, domains=[DOMAIN])


def token_of(address: str) -> str:
    return address.partition("+")[2].partition("@")[0]


def test_an_address_reads_back_as_its_letter(verp):
    address = verp.address(LETTER, domain=DOMAIN)
    assert address.startswith("bounces+") and address.endswith("@" + DOMAIN)
    assert len(address.partition("@")[0]) <= 64
    assert verp.read(address) == LETTER
    assert verp.read(f"<{address}>") == LETTER


def test_a_digest_id_with_its_own_prefix_reads_back(verp):
    digest = "dg_ffffffffffffffffffffffffffffffff"
    assert verp.read(verp.address(digest, domain=DOMAIN)) == digest


def test_an_address_upper_cased_by_a_mailbox_still_reads(verp):
    address = verp.address(LETTER, domain=DOMAIN)
    assert verp.read(address.upper()) == LETTER


def test_every_changed_character_of_the_token_is_refused(verp):
    address = verp.address(LETTER, domain=DOMAIN)
    token = token_of(address)
    for i, ch in enumerate(token):
        for other in {"a", "z", "2", "7"} - {ch}:
            mangled = address.replace(token, token[:i] + other + token[i + 1 :])
            reading = verp.check(mangled)
            assert reading.delivery_id is None, (i, other)
            assert reading.refused in ("forged", "malformed")


def test_a_token_made_with_another_key_is_forged(verp):
    stranger = Verp(b"x" * 32, domains=[DOMAIN])
    reading = verp.check(stranger.address(LETTER, domain=DOMAIN))
    assert reading.delivery_id is None
    assert reading.refused == "forged"


def test_a_previous_key_still_reads_after_rotation():
    old = Verp(b"o" * 32, domains=[DOMAIN])
    rotated = Verp(KEY, domains=[DOMAIN], previous_keys=[b"o" * 32])
    assert rotated.read(old.address(LETTER, domain=DOMAIN)) == LETTER
    assert Verp(KEY, domains=[DOMAIN]).read(old.address(LETTER, domain=DOMAIN)) is None


def test_a_truncated_token_is_malformed(verp):
    address = verp.address(LETTER, domain=DOMAIN)
    token = token_of(address)
    for cut in (1, 8, len(token) - 1):
        assert verp.check(address.replace(token, token[:cut])).refused == "malformed"
    assert verp.check(address.replace(token, token + "a")).refused == "malformed"


@pytest.mark.parametrize(
    "address",
    [
        "returns+{token}@bounces.ch.dispatch.example",
        "bounces+{token}@bounces.other.example",
        "bounces+{token}@ch.dispatch.example",
        "bounces@bounces.ch.dispatch.example",
        "postmaster@bounces.ch.dispatch.example",
    ],
)
def test_another_local_part_or_domain_is_not_ours(verp, address):
    token = token_of(verp.address(LETTER, domain=DOMAIN))
    assert verp.check(address.format(token=token)).refused == "not_ours"


@pytest.mark.parametrize(
    "garbage",
    ["", "   ", "no at sign", "@", "bounces+@", "<>", "bounces+ü@" + DOMAIN, "bounces+" + "=" * 42 + "@" + DOMAIN],
)
def test_garbage_reads_as_nothing(verp, garbage):
    assert verp.read(garbage) is None


def test_ids_that_would_not_fit_are_refused_when_building(verp):
    for bad in ("dl_XYZ", "dl_" + "0" * 33, "delivery_" + "0" * 32, "DL_" + "0" * 32, ""):
        with pytest.raises(ValueError):
            verp.address(bad, domain=DOMAIN)


def test_a_domain_it_would_not_read_back_is_refused_when_building(verp):
    with pytest.raises(ValueError):
        verp.address(LETTER, domain="bounces.other.example")
    with pytest.raises(ValueError):
        verp.address(LETTER, local_part="returns", domain=DOMAIN)


def test_a_short_key_is_refused():
    with pytest.raises(ValueError):
        Verp(b"short", domains=[DOMAIN])
