"""Fax documents: the PDF (cover + letter, page N of M, paper by country, Cyrillic, escaping) and
its fax TIFF (1728 px, 1-bit, G4, 204 × 196 / 98 dpi, A4 centred, Letter scaled).

Targets come from the real catalog (config/), so no office's number is written here; the
campaign is the -DEMO copy of UA 002/19.
"""

from __future__ import annotations

import io
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime
from pathlib import Path

import pytest
from PIL import Image, ImageChops, ImageSequence, TiffImagePlugin
from weasyprint import HTML

from dispatcher.config.catalog import Catalog
from dispatcher.config.loader import load_catalog
from dispatcher.config.models import Target
from dispatcher.render import LetterRequest, Renderer, Supporter
from dispatcher.render.fax import (
    FaxDocument,
    FaxRenderer,
    LocalFileFetcher,
    format_fax_number,
    paper_for,
    pdf_to_fax_tiff,
)
from dispatcher.render.faxraster import (
    FAX_LINE_PX,
    FaxRasterError,
    geometry_for,
    open_pdf,
    pdf_font_names,
    pdf_page_texts,
)

ROOT = Path(__file__).resolve().parent.parent
CAMPAIGN = "UA-002-19-DEMO"
SENT_AT = datetime(2019, 5, 10, 9, 30, tzinfo=UTC)
MESSAGE = 'Please act now.\n\n<script>alert("fax")</script> & <b>not bold</b>'

A4_PT = (595.28, 841.89)
LETTER_PT = (612.0, 792.0)
#: 297 mm at 196 lines per inch, and 11 in
A4_FINE_LINES = 2292
assert abs(A4_FINE_LINES - 297 / 25.4 * 196) < 0.5
LETTER_FINE_LINES = 11 * 196


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return load_catalog(ROOT / "config", ROOT / "templates").with_demo_copies(date.today())


@pytest.fixture(scope="module")
def renderer() -> Renderer:
    return Renderer(ROOT / "templates")


@pytest.fixture(scope="module")
def faxes(renderer: Renderer) -> FaxRenderer:
    return FaxRenderer(renderer)


def request_for(
    catalog: Catalog, section: str, target: str, language: str, message: str | None = MESSAGE
) -> LetterRequest:
    return LetterRequest(
        campaign=catalog.campaign(CAMPAIGN),
        section=catalog.section(section),
        target=catalog.target(CAMPAIGN, section, target),
        language=language,
        supporter=Supporter(name="Jane Doe", email="jane@example.org", city="Boston", country="US"),
        message=message,
        date=date(2019, 5, 9),
    )


@pytest.fixture(scope="module")
def english_us(catalog: Catalog) -> LetterRequest:
    """The ambassador in Washington: a US office, so Letter paper."""
    return request_for(catalog, "us", "ambassador-us", "en")


@pytest.fixture(scope="module")
def russian_ru(catalog: Catalog) -> LetterRequest:
    """The President in Moscow, in Russian: A4."""
    return request_for(catalog, "us", "president", "ru")


@pytest.fixture(scope="module")
def english_doc(faxes: FaxRenderer, english_us: LetterRequest) -> FaxDocument:
    return faxes.render(english_us, sent_at=SENT_AT)


@pytest.fixture(scope="module")
def russian_doc(faxes: FaxRenderer, russian_ru: LetterRequest) -> FaxDocument:
    return faxes.render(russian_ru, sent_at=SENT_AT)


# ---------------------------------------------------------------------------- helpers


def page_sizes(pdf: bytes) -> list[tuple[float, float]]:
    sizes = []
    with open_pdf(pdf) as document:
        for index in range(len(document)):
            page = document[index]
            try:
                sizes.append(page.get_size())
            finally:
                page.close()
    return sizes


@dataclass(frozen=True)
class TiffPage:
    image: Image.Image
    compression: str
    dpi: tuple[float, float]
    photometric: int


def tiff_pages(tiff: bytes) -> list[TiffPage]:
    pages = []
    with Image.open(io.BytesIO(tiff)) as image:
        for frame in ImageSequence.Iterator(image):
            assert isinstance(frame, TiffImagePlugin.TiffImageFile)
            frame.load()
            pages.append(TiffPage(frame.copy(), frame.info["compression"], frame.info["dpi"], frame.tag_v2[262]))
    return pages


def flat(text: str) -> str:
    """Text-layer words with line breaks and runs of spaces made single spaces."""
    return re.sub(r"\s+", " ", text).strip()


def colour_counts(image: Image.Image) -> dict[int, int]:
    colours = image.getcolors()
    assert colours is not None
    counts: dict[int, int] = {}
    for count, value in colours:
        assert isinstance(value, int)  # a mode "1" image has one band
        counts[value] = count
    return counts


def first_sentence(paragraph: str) -> str:
    return paragraph.split(". ")[0]


# ---------------------------------------------------------------------------- paper and numbers


@pytest.mark.parametrize("country", ["US", "CA", "MX", "PH", "us"])
def test_letter_paper_countries(country: str) -> None:
    assert paper_for(country) == "letter"


@pytest.mark.parametrize("country", ["RU", "CH", "GB", "DE", "FR"])
def test_a4_elsewhere(country: str) -> None:
    assert paper_for(country) == "a4"


def test_fax_numbers_are_grouped_for_people(catalog: Catalog) -> None:
    numbers = [t.fax for t in catalog.campaign(CAMPAIGN).targets.values() if t.fax]
    numbers += [t.fax for s in catalog.sections.values() for t in s.targets.values() if t.fax]
    assert numbers
    for e164 in numbers:
        shown = format_fax_number(e164)
        assert shown.startswith("+") and " " in shown
        assert re.sub(r"\D", "", shown) == e164.lstrip("+")


def test_geometry_a4_centred_letter_scaled() -> None:
    a4 = geometry_for(*A4_PT)
    assert (a4.content_px, a4.left_px, a4.lines) == (1687, 20, A4_FINE_LINES)
    letter = geometry_for(*LETTER_PT)
    assert (letter.content_px, letter.left_px, letter.lines) == (FAX_LINE_PX, 0, LETTER_FINE_LINES)


# ---------------------------------------------------------------------------- the PDF


def test_english_pdf_is_letter_with_cover_and_letter_pages(english_doc: FaxDocument) -> None:
    sizes = page_sizes(english_doc.pdf)
    assert len(sizes) == english_doc.pages >= 2
    for width, height in sizes:
        assert width == pytest.approx(LETTER_PT[0], abs=1) and height == pytest.approx(LETTER_PT[1], abs=1)


def test_russian_pdf_is_a4(russian_doc: FaxDocument) -> None:
    sizes = page_sizes(russian_doc.pdf)
    assert len(sizes) == russian_doc.pages >= 2
    for width, height in sizes:
        assert width == pytest.approx(A4_PT[0], abs=1) and height == pytest.approx(A4_PT[1], abs=1)


def test_swiss_office_gets_a4(faxes: FaxRenderer, catalog: Catalog) -> None:
    embassy = catalog.target(CAMPAIGN, "ch", "embassy-ru")
    assert embassy.country == "CH"
    pdf = faxes.render_pdf(request_for(catalog, "ch", "embassy-ru", "de", message=None), sent_at=SENT_AT)
    assert page_sizes(pdf)[0] == pytest.approx(A4_PT, abs=1)


def test_cover_page_names_recipient_number_and_page_count(english_doc: FaxDocument, english_us: LetterRequest) -> None:
    texts = pdf_page_texts(english_doc.pdf)
    cover = flat(texts[0])
    n = english_doc.pages
    target = english_us.target
    assert target.fax is not None
    assert target.name in cover
    assert target.title is not None and target.title in cover
    assert format_fax_number(target.fax) in cover
    assert f"Pages {n} (including this cover page)" in cover
    assert f"page 1 of {n}" in cover
    assert english_us.section.name in cover
    assert str(english_us.section.sender.reply_contact) in cover
    assert "10 May 2019" in cover
    assert "If you received this fax in error, please" in cover


def test_every_page_has_footer_with_number_and_page_n_of_m(english_doc: FaxDocument, english_us: LetterRequest) -> None:
    assert english_us.target.fax is not None
    number = format_fax_number(english_us.target.fax)
    texts = pdf_page_texts(english_doc.pdf)
    for index, text in enumerate(texts, start=1):
        assert f"page {index} of {english_doc.pages}" in flat(text)
        assert number in text


def test_letter_follows_the_cover_in_order(
    english_doc: FaxDocument, english_us: LetterRequest, renderer: Renderer
) -> None:
    letter = renderer.compose(english_us)
    body = flat(" ".join(pdf_page_texts(english_doc.pdf)[1:]))
    parts = [
        letter.salutation,
        first_sentence(letter.paragraphs[0]),
        first_sentence(letter.paragraphs[-1]),
        "Please act now.",
        letter.closing,
        "Jane Doe",
        "Boston, US",
    ]
    positions = [body.find(part) for part in parts]
    assert -1 not in positions, list(zip(parts, positions, strict=True))
    assert positions == sorted(positions)


def test_russian_survives_into_the_text_layer(
    russian_doc: FaxDocument, russian_ru: LetterRequest, renderer: Renderer
) -> None:
    letter = renderer.compose(russian_ru)
    assert letter.salutation == russian_ru.target.salutation["ru"]
    texts = pdf_page_texts(russian_doc.pdf)
    body = flat(" ".join(texts[1:]))
    assert letter.salutation in body
    sentence = first_sentence(letter.paragraphs[0])
    assert re.search("[а-яА-Я]", sentence)
    assert sentence in body
    assert letter.closing in body
    cover = flat(texts[0])
    assert f"стр. 1 из {russian_doc.pages}" in cover
    assert "ФАКС" in cover and "10 мая 2019 г." in cover


def test_text_is_drawn_in_dejavu_sans(russian_doc: FaxDocument, english_doc: FaxDocument) -> None:
    # Found through fontconfig (Debian fonts-dejavu-core): had it fallen back to a font without
    # Cyrillic, the text layer above would still read as Russian but the page would show boxes.
    for document in (russian_doc, english_doc):
        assert pdf_font_names(document.pdf) == {"DejaVu-Sans", "DejaVu-Sans-Bold"}


def test_supporter_markup_is_text_not_html(
    english_doc: FaxDocument, faxes: FaxRenderer, english_us: LetterRequest
) -> None:
    html = faxes.render_html(english_us, sent_at=SENT_AT)
    assert "<script>" not in html and "<b>not bold</b>" not in html
    assert "&lt;script&gt;" in html
    body = flat(" ".join(pdf_page_texts(english_doc.pdf)))
    assert '<script>alert("fax")</script> & <b>not bold</b>' in body


def test_cover_date_is_the_recipients_day(faxes: FaxRenderer, russian_ru: LetterRequest) -> None:
    # 22:30 UTC on 1 May is already 2 May in Moscow
    html = faxes.render_html(russian_ru, sent_at=datetime(2019, 5, 1, 22, 30, tzinfo=UTC))
    assert "2 мая 2019 г." in html


def test_a_target_without_fax_number_cannot_get_a_fax(faxes: FaxRenderer, english_us: LetterRequest) -> None:
    no_fax: Target = english_us.target.model_copy(update={"fax": None})
    with pytest.raises(ValueError, match="no fax number"):
        faxes.render_pdf(replace(english_us, target=no_fax), sent_at=SENT_AT)


# ---------------------------------------------------------------------------- the TIFF


def assert_fax_pages(tiff: bytes, *, pages: int, lines: int, y_dpi: int, compression: str = "group4") -> None:
    found = tiff_pages(tiff)
    assert len(found) == pages
    for page in found:
        image = page.image
        assert image.size == (FAX_LINE_PX, lines)
        assert image.mode == "1"
        assert page.compression == compression
        assert page.dpi == pytest.approx((204, y_dpi))
        assert page.photometric == 0  # WhiteIsZero, as fax TIFF (TIFF-F) wants
        colours = colour_counts(image)
        assert set(colours) <= {0, 255}  # black or white, nothing else
        # paper with writing on it: mostly white, some ink (not a blank or inverted page)
        assert 0.8 < colours.get(255, 0) / (image.width * image.height) < 0.999


def test_letter_tiff_fine(english_doc: FaxDocument) -> None:
    assert_fax_pages(english_doc.tiff, pages=english_doc.pages, lines=LETTER_FINE_LINES, y_dpi=196)


def test_a4_tiff_fine(russian_doc: FaxDocument) -> None:
    # 297 mm at 196 lpi
    assert_fax_pages(russian_doc.tiff, pages=russian_doc.pages, lines=A4_FINE_LINES, y_dpi=196)


def test_standard_resolution(russian_doc: FaxDocument, english_doc: FaxDocument) -> None:
    tiff, pages = pdf_to_fax_tiff(russian_doc.pdf, resolution="standard", paper="a4")
    assert pages == russian_doc.pages
    assert_fax_pages(tiff, pages=pages, lines=A4_FINE_LINES // 2, y_dpi=98)
    tiff, pages = pdf_to_fax_tiff(english_doc.pdf, resolution="standard", paper="letter")
    assert_fax_pages(tiff, pages=pages, lines=LETTER_FINE_LINES // 2, y_dpi=98)


def test_standard_renderer(renderer: Renderer, english_us: LetterRequest) -> None:
    document = FaxRenderer(renderer, resolution="standard").render(english_us, sent_at=SENT_AT)
    assert_fax_pages(document.tiff, pages=document.pages, lines=LETTER_FINE_LINES // 2, y_dpi=98)


def test_group3_on_request(russian_doc: FaxDocument) -> None:
    tiff, pages = pdf_to_fax_tiff(russian_doc.pdf, compression="group3")
    assert_fax_pages(tiff, pages=pages, lines=A4_FINE_LINES, y_dpi=196, compression="group3")


def full_bleed_black(size: str) -> bytes:
    html = f"<style>@page {{ size: {size}; margin: 0; background: #000 }}</style><p></p>"
    return HTML(string=html).write_pdf()


def ink_columns(page: Image.Image) -> tuple[int, int]:
    box = ImageChops.invert(page.convert("L")).getbbox()
    assert box is not None
    return box[0], box[2]


def test_a4_is_drawn_at_204_dpi_and_centred() -> None:
    tiff, _ = pdf_to_fax_tiff(full_bleed_black("A4"), paper="a4")
    (page,) = tiff_pages(tiff)
    left, right = ink_columns(page.image)
    # 210 mm at 204 dpi is 1687 px, with 20 white px left and 21 right
    assert (left, FAX_LINE_PX - right) == (20, 21)
    assert colour_counts(page.image)[0] == 1687 * A4_FINE_LINES


def test_letter_is_scaled_to_the_full_line() -> None:
    tiff, _ = pdf_to_fax_tiff(full_bleed_black("letter"), paper="letter")
    (page,) = tiff_pages(tiff)
    assert ink_columns(page.image) == (0, FAX_LINE_PX)
    assert page.image.size == (FAX_LINE_PX, LETTER_FINE_LINES)


def test_paper_mismatch_is_refused(english_doc: FaxDocument) -> None:
    with pytest.raises(FaxRasterError, match="not a4"):
        pdf_to_fax_tiff(english_doc.pdf, paper="a4")


def test_not_a_pdf_is_refused() -> None:
    with pytest.raises(FaxRasterError):
        pdf_to_fax_tiff(b"%PDF-1.7 nothing else")


# ---------------------------------------------------------------------------- fetching, threads


def test_fetcher_refuses_everything_but_local_layout_files(faxes: FaxRenderer, tmp_path: Path) -> None:
    fetcher = LocalFileFetcher(faxes.layouts_dir)
    css = (faxes.layouts_dir / "fax.css").as_uri()
    assert b"@page" in fetcher.fetch(css).read()
    outside = tmp_path / "secret.txt"
    outside.write_text("no")
    for url in (
        "http://example.org/logo.png",
        "https://example.org/font.ttf",
        "ftp://example.org/x",
        "data:text/plain,hello",
        outside.as_uri(),
        "file:///etc/passwd",
        (faxes.layouts_dir / ".." / ".." / "pyproject.toml").as_uri(),
    ):
        with pytest.raises(ValueError, match="refused"):
            fetcher.fetch(url)


def test_threads_render_the_same_documents(
    faxes: FaxRenderer,
    english_us: LetterRequest,
    russian_ru: LetterRequest,
    english_doc: FaxDocument,
    russian_doc: FaxDocument,
) -> None:
    # A fresh renderer, so that every thread builds its own fonts and stylesheets concurrently.
    fresh = FaxRenderer(faxes.renderer)
    requests = [english_us, russian_ru, english_us, russian_ru]
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda r: fresh.render(r, sent_at=SENT_AT), requests))
    for request, result in zip(requests, results, strict=True):
        expected = english_doc if request is english_us else russian_doc
        assert result == expected
