"""Fax documents: the letter as a printable PDF (cover page + letter) and as a fax-ready TIFF.

The words are :meth:`Renderer.compose`'s, the same as the email's; this module only lays them
out for paper: ``templates/_layouts/fax.html.j2`` + ``fax.css`` → WeasyPrint → PDF, then
:func:`dispatcher.render.faxraster.pdf_to_fax_tiff` → TIFF. See docs/fax-documents.md.

Threads: one :class:`FaxRenderer` per process, shared by the worker threads like the
:class:`Renderer`. WeasyPrint's font configuration (a Pango font map) and the URL fetcher hold
mutable state, so each thread keeps its own, together with the parsed stylesheets
(:class:`_ThreadResources`): parsed once per thread, never per fax, and never shared.
"""

from __future__ import annotations

import datetime as dt
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit
from zoneinfo import ZoneInfo

import phonenumbers
from weasyprint import CSS, HTML
from weasyprint.text.fonts import FontConfiguration
from weasyprint.urls import URLFetcher, URLFetcherResponse

from dispatcher.config.models import Target
from dispatcher.render.faxraster import Paper, Resolution, pdf_to_fax_tiff
from dispatcher.render.letters import LAYOUTS, LetterRequest, Renderer

__all__ = [
    "FaxDocument",
    "FaxRenderer",
    "LocalFileFetcher",
    "format_fax_number",
    "paper_for",
    "pdf_to_fax_tiff",
]

FAX_LAYOUT = "fax.html.j2"
FAX_STYLESHEET = "fax.css"

#: Countries whose offices use US Letter: CLDR's "US-Letter" territories (supplemental
#: measurement data). Everywhere else uses A4. Getting it wrong is not fatal (the receiving
#: machine prints on its own paper), but a page of the right length prints without a cut.
LETTER_COUNTRIES = frozenset({"US", "CA", "MX", "PH", "BZ", "CL", "CO", "CR", "GT", "NI", "PA", "PR", "SV", "VE"})

_PAGE_SIZE: dict[Paper, str] = {"a4": "A4", "letter": "letter"}


def paper_for(country: str) -> Paper:
    """The paper an office in ``country`` (ISO 3166 alpha-2) prints on."""
    return "letter" if country.strip().upper() in LETTER_COUNTRIES else "a4"


def format_fax_number(e164: str) -> str:
    """'+442079460100' → '+44 20 7946 0100': the international format, grouped for people."""
    number = phonenumbers.parse(e164, None)
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.INTERNATIONAL)


@dataclass(frozen=True)
class FaxDocument:
    pdf: bytes
    #: multi-page TIFF, 1728 px wide, 1-bit, CCITT G4, 204 × 196 (fine) or 204 × 98 dpi
    tiff: bytes
    #: pages including the cover; the same in the PDF and the TIFF
    pages: int


# --------------------------------------------------------------------------- cover words


@dataclass(frozen=True)
class CoverWords:
    """The cover page's labels in one language; the letter's own words come from templates/."""

    fax: str
    to: str
    fax_number: str
    sender: str
    reply_to: str
    date: str
    subject: str
    pages: str
    #: after the page count: "3 (including this cover page)"
    pages_note: str
    #: the footer's "page 2 of 3"
    page: str
    of: str
    #: ``{contact}`` is the section's reply contact
    notice: str
    #: between a label and its value in running text: French puts a (no-break) space before ":"
    colon: str
    #: the twelve month names, space-separated; genitive where the language declines them ("17 мая")
    months: str
    #: ``{day}``, ``{month}``, ``{year}``
    date_format: str


#: Labels for the letter languages of current campaigns. A letter in any other language gets an
#: English cover: officials' offices read English covers, and the letter itself is still theirs.
COVER_WORDS: dict[str, CoverWords] = {
    "en": CoverWords(
        fax="FAX",
        to="To",
        fax_number="Fax",
        sender="From",
        reply_to="Reply to",
        date="Date",
        subject="Subject",
        pages="Pages",
        pages_note="(including this cover page)",
        page="page",
        of="of",
        notice="If you received this fax in error, please notify the sender ({contact}) and destroy all pages.",
        colon=": ",
        months="January February March April May June July August September October November December",
        date_format="{day} {month} {year}",
    ),
    "ru": CoverWords(
        fax="ФАКС",
        to="Кому",
        fax_number="Факс",
        sender="От",
        reply_to="Для ответа",
        date="Дата",
        subject="Тема",
        pages="Страниц",
        pages_note="(включая эту страницу)",
        page="стр.",
        of="из",
        notice=(
            "Если вы получили этот факс по ошибке, пожалуйста, сообщите об этом отправителю "
            "({contact}) и уничтожьте все страницы."
        ),
        colon=": ",
        months="января февраля марта апреля мая июня июля августа сентября октября ноября декабря",
        date_format="{day} {month} {year} г.",
    ),
    "de": CoverWords(
        fax="FAX",
        to="An",
        fax_number="Fax",
        sender="Von",
        reply_to="Antwort an",
        date="Datum",
        subject="Betreff",
        pages="Seiten",
        pages_note="(einschließlich dieses Deckblatts)",
        page="Seite",
        of="von",
        notice=(
            "Falls Sie dieses Fax irrtümlich erhalten haben, benachrichtigen Sie bitte den Absender "
            "({contact}) und vernichten Sie alle Seiten."
        ),
        colon=": ",
        months="Januar Februar März April Mai Juni Juli August September Oktober November Dezember",
        date_format="{day}. {month} {year}",
    ),
    "fr": CoverWords(
        fax="TÉLÉCOPIE",
        to="Destinataire",
        fax_number="Télécopie",
        sender="Expéditeur",
        reply_to="Répondre à",
        date="Date",
        subject="Objet",
        pages="Pages",
        pages_note="(page de garde comprise)",
        page="page",
        of="sur",
        notice=(
            "Si vous avez reçu cette télécopie par erreur, veuillez en informer l’expéditeur "
            "({contact}) et en détruire toutes les pages."
        ),
        colon="\u00a0: ",
        months="janvier février mars avril mai juin juillet août septembre octobre novembre décembre",
        date_format="{day} {month} {year}",
    ),
}


def cover_words(language: str) -> CoverWords:
    return COVER_WORDS.get(language, COVER_WORDS["en"])


def format_date(day: dt.date, language: str) -> str:
    """A date as a letter writes it: '17 May 2019', '17 мая 2019 г.', '1er mai 2019'."""
    words = cover_words(language)
    number = "1er" if language == "fr" and day.day == 1 else str(day.day)
    return words.date_format.format(day=number, month=words.months.split()[day.month - 1], year=day.year)


def local_date(moment: dt.datetime, target: Target) -> dt.date:
    """The calendar day at the recipient's office when we send (a naive time is taken as UTC)."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return moment.astimezone(ZoneInfo(target.timezone)).date()


# --------------------------------------------------------------------------- WeasyPrint plumbing


class LocalFileFetcher(URLFetcher):
    """A WeasyPrint URL fetcher that reads only files under one directory and nothing else.

    A fax is rendered on a worker with network access and from text that supporters typed.
    The layout links to nothing and autoescaping keeps supporter markup out, so no fetch should
    ever happen; this makes sure that a template mistake cannot reach the network (or read
    /etc/passwd into a fax) either. A refused URL raises, which WeasyPrint logs and skips.
    """

    def __init__(self, root: Path) -> None:
        super().__init__(allowed_protocols=("file",), allow_redirects=False)
        self.root = root.resolve()

    def fetch(self, url: str, headers: Any = None) -> URLFetcherResponse:
        parts = urlsplit(url)
        if parts.scheme.lower() != "file" or parts.netloc not in ("", "localhost"):
            raise ValueError(f"fax documents fetch no URLs: refused {url!r}")
        path = Path(unquote(parts.path)).resolve()
        if not path.is_relative_to(self.root) or not path.is_file():
            raise ValueError(f"fax documents read only files under {self.root}: refused {url!r}")
        return URLFetcherResponse(path.as_uri(), body=path.read_bytes())


@dataclass
class _ThreadResources:
    """What one thread reuses for every fax it renders: built on its first fax."""

    fetcher: LocalFileFetcher
    fonts: FontConfiguration
    stylesheet: CSS
    paper: dict[Paper, CSS]


# --------------------------------------------------------------------------- the renderer


class FaxRenderer:
    """Renders fax documents with a :class:`Renderer`'s templates. One per process, shared."""

    def __init__(self, renderer: Renderer, *, resolution: Resolution = "fine") -> None:
        if resolution not in ("fine", "standard"):
            raise ValueError(f"resolution must be 'fine' or 'standard', not {resolution!r}")
        self.renderer = renderer
        self.resolution: Resolution = resolution
        self.layouts_dir = (renderer.templates_dir / LAYOUTS).resolve()
        # Read now, not per fax: templates change with a deploy, like the letters (docs/letters.md).
        self._css_text = (self.layouts_dir / FAX_STYLESHEET).read_text(encoding="utf-8")
        self._base_url = self.layouts_dir.as_uri() + "/"
        self._local = threading.local()

    # ------------------------------------------------------------------ public

    def render(self, req: LetterRequest, *, sent_at: dt.datetime) -> FaxDocument:
        """The PDF and the TIFF of one letter; ``sent_at`` dates the cover page."""
        pdf, pages, paper = self._render_pdf(req, sent_at=sent_at)
        tiff, tiff_pages = pdf_to_fax_tiff(pdf, resolution=self.resolution, paper=paper)
        if tiff_pages != pages:  # cannot happen unless PDFium and WeasyPrint disagree on the PDF
            raise RuntimeError(f"the PDF has {pages} pages but its TIFF {tiff_pages}")
        return FaxDocument(pdf=pdf, tiff=tiff, pages=pages)

    def render_pdf(self, req: LetterRequest, *, sent_at: dt.datetime) -> bytes:
        return self._render_pdf(req, sent_at=sent_at)[0]

    def render_html(self, req: LetterRequest, *, sent_at: dt.datetime) -> str:
        """The HTML that becomes the PDF (for looking at a layout in a browser, and for tests)."""
        return self._html(req, sent_at=sent_at)

    # ------------------------------------------------------------------ internals

    def _render_pdf(self, req: LetterRequest, *, sent_at: dt.datetime) -> tuple[bytes, int, Paper]:
        paper = paper_for(req.target.country)
        markup = self._html(req, sent_at=sent_at)
        res = self._resources()
        document = HTML(string=markup, base_url=self._base_url, url_fetcher=res.fetcher).render(
            font_config=res.fonts, stylesheets=[res.stylesheet, res.paper[paper]]
        )
        return document.write_pdf(), len(document.pages), paper

    def _html(self, req: LetterRequest, *, sent_at: dt.datetime) -> str:
        target = req.target
        if not target.fax:
            raise ValueError(f"target {target.id!r} has no fax number: it cannot be sent a fax")
        letter = self.renderer.compose(req)
        words = cover_words(letter.language)
        fax_number = format_fax_number(target.fax)
        reply_contact = req.section.sender.reply_contact or str(req.section.sender.address)
        context: dict[str, Any] = {
            "letter": letter,
            "language": letter.language,
            "campaign": req.campaign,
            "section": req.section,
            "target": target,
            "supporter": req.supporter,
            "words": words,
            "fax_number": fax_number,
            "reply_contact": reply_contact,
            # split around the contact, which the layout keeps on one line
            "notice": tuple(words.notice.split("{contact}", 1)),
            "footer": f"{words.to}{words.colon}{target.name} — {words.fax_number} {fax_number}",
            "sent_on": format_date(local_date(sent_at, target), letter.language),
            "letter_date": format_date(req.date, letter.language),
        }
        template = self.renderer.environment.get_template(f"{LAYOUTS}/{FAX_LAYOUT}")
        return template.render(context)

    def _resources(self) -> _ThreadResources:
        res: _ThreadResources | None = getattr(self._local, "resources", None)
        if res is None:
            fetcher = LocalFileFetcher(self.layouts_dir)
            fonts = FontConfiguration()

            def css(text: str) -> CSS:
                return CSS(string=text, base_url=self._base_url, url_fetcher=fetcher, font_config=fonts)

            res = _ThreadResources(
                fetcher=fetcher,
                fonts=fonts,
                stylesheet=css(self._css_text),
                paper={paper: css(f"@page {{ size: {size}; }}") for paper, size in _PAGE_SIZE.items()},
            )
            self._local.resources = res
        return res
