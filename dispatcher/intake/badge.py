"""The counters as an SVG badge a section's page embeds with one ``<img>``.

A small message catalogue rather than gettext: five languages, two messages, and the plural
rules and digit grouping of each (CLDR's), so "1 person" and "785 people", "21 человек" and
"22 человека" come out right without a locale database on the server.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import StrEnum
from html import escape
from typing import Literal

Plural = Literal["one", "few", "many", "other"]


class Count(StrEnum):
    """What the badge counts."""

    #: supporters' appeals: "785 people have taken action"
    APPEALS = "appeals"
    #: letters that reached an official's relay or fax: "8 Briefe verschickt"
    LETTERS = "letters"


def _one_other(n: int) -> Plural:
    return "one" if n == 1 else "other"


def _french(n: int) -> Plural:
    # French counts 0 with 1: "0 personne a agi"
    return "one" if n in (0, 1) else "other"


def _russian(n: int) -> Plural:
    if n % 10 == 1 and n % 100 != 11:
        return "one"
    if 2 <= n % 10 <= 4 and not 12 <= n % 100 <= 14:
        return "few"
    return "many"


def _grouped(separator: str, min_digits: int = 4) -> Callable[[int], str]:
    """Digit grouping by threes; Spanish groups only from five digits on (CLDR's
    minimumGroupingDigits = 2): "1234" but "12.345"."""

    def fmt(n: int) -> str:
        digits = str(n)
        if len(digits) < min_digits:
            return digits
        head = len(digits) % 3 or 3
        return separator.join([digits[:head], *(digits[i : i + 3] for i in range(head, len(digits), 3))])

    return fmt


@dataclass(frozen=True)
class Language:
    plural: Callable[[int], Plural]
    number: Callable[[int], str]
    #: per count, per plural form: the text with ``{n}`` for the formatted number
    messages: dict[Count, dict[Plural, str]]


LANGUAGES: dict[str, Language] = {
    "en": Language(
        _one_other,
        _grouped(","),
        {
            Count.APPEALS: {"one": "{n} person has taken action", "other": "{n} people have taken action"},
            Count.LETTERS: {"one": "{n} letter sent", "other": "{n} letters sent"},
        },
    ),
    "de": Language(
        _one_other,
        _grouped("."),
        {
            Count.APPEALS: {"one": "{n} Mensch hat sich beteiligt", "other": "{n} Menschen haben sich beteiligt"},
            Count.LETTERS: {"one": "{n} Brief verschickt", "other": "{n} Briefe verschickt"},
        },
    ),
    "fr": Language(
        _french,
        _grouped("\u202f"),  # narrow no-break space, as CLDR writes "12 345" in French
        {
            Count.APPEALS: {"one": "{n} personne a agi", "other": "{n} personnes ont agi"},
            Count.LETTERS: {"one": "{n} lettre envoyée", "other": "{n} lettres envoyées"},
        },
    ),
    "es": Language(
        _one_other,
        _grouped(".", min_digits=5),
        {
            Count.APPEALS: {"one": "{n} persona ha actuado", "other": "{n} personas han actuado"},
            Count.LETTERS: {"one": "{n} carta enviada", "other": "{n} cartas enviadas"},
        },
    ),
    "ru": Language(
        _russian,
        _grouped("\u00a0"),
        {
            Count.APPEALS: {
                "one": "{n} человек принял участие",
                "few": "{n} человека приняли участие",
                "many": "{n} человек приняли участие",
            },
            Count.LETTERS: {
                "one": "{n} письмо отправлено",
                "few": "{n} письма отправлено",
                "many": "{n} писем отправлено",
            },
        },
    ),
}

#: the language of last resort, when neither the asked one nor the campaign's default has a text
FALLBACK = "en"


def choose_language(asked: str | None, offered: Iterable[str], default: str) -> str:
    """``asked`` (a language or a browser's tag) when the campaign offers it and the catalogue
    has it, else ``default`` (the campaign's), else English. Never an error: an ``<img>``
    cannot show one."""
    if asked is not None:
        # a browser's tag ("de-CH", navigator.language) asks for its language
        asked = asked.strip().lower().replace("_", "-").split("-")[0]
        if asked in offered and asked in LANGUAGES:
            return asked
    return default if default in LANGUAGES else FALLBACK


def message(count: Count, n: int, lang: str) -> str:
    language = LANGUAGES[lang]
    return language.messages[count][language.plural(n)].format(n=language.number(n))


# The width is estimated, and textLength makes the text fit it whatever font the viewer has.
_CHAR_WIDTH = 7.2
#: Cyrillic letters run wider in the fonts named below
_CYRILLIC_WIDTH = 8.4
_PAD = 10
_HEIGHT = 28


def render(count: Count, n: int, lang: str) -> bytes:
    """The badge as SVG bytes; every text is escaped (nothing in it comes from a request, but
    the catalogue and the numbers should not have to be trusted by an XML parser)."""
    text = message(count, n, lang)
    text_width = round(sum(_CYRILLIC_WIDTH if "\u0400" <= c <= "\u04ff" else _CHAR_WIDTH for c in text))
    width = text_width + 2 * _PAD
    shown = escape(text, quote=True)
    svg = (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{_HEIGHT}" '
        f'viewBox="0 0 {width} {_HEIGHT}" role="img" aria-label="{shown}" xml:lang="{escape(lang, quote=True)}">'
        f"<title>{shown}</title>"
        f'<rect width="{width}" height="{_HEIGHT}" rx="4" fill="#ffff00"/>'
        f'<text x="{_PAD}" y="18.5" fill="#000000" font-family="DejaVu Sans,Verdana,Geneva,sans-serif" '
        f'font-size="13" font-weight="bold" textLength="{text_width}" lengthAdjust="spacingAndGlyphs">'
        f"{shown}</text></svg>"
    )
    return svg.encode("utf-8")
