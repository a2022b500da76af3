"""PDF → fax-ready TIFF: 1728 px lines, 204 dpi across, 196 or 98 lines per inch, 1-bit, CCITT.

Why these numbers: a fax machine scans and prints a fixed line of 1728 dots across 215 mm
(ITU-T T.4, "R8" = 8 dots/mm ≈ 204 dpi) at 3.85 ("standard", 98 lpi) or 7.7 ("fine", 196 lpi)
lines per mm. A receiving machine puts dot N of the line at the same place on its paper whatever
we send, so the raster must be exactly 1728 px wide and drawn at those densities:

* A4 (210 mm) at 204 dpi is 1687 px: rendered at 204 dpi and padded with white, 20 px on the
  left and 21 on the right, so that it prints at its true size, centred.
* Letter (8.5 in) at 204 dpi would be 1734 px: scaled to exactly 1728 (0.35 % narrower), which is
  what every fax machine does with Letter originals.
* Each page is as many lines as its height needs at 196 lpi (A4 2292, Letter 2156); "standard"
  halves that (1146, 1078).

Rasterising: PDFium through pypdfium2 (a pip wheel that carries its own PDFium, so no Debian
package), asked with ``FPDF_RenderPageBitmap`` to draw the page into a rectangle of exactly
``content width × lines`` pixels: that is a non-uniform scale, 204 dpi across and 196 lpi down,
in one pass and without resampling. Text is drawn anti-aliased in grey and then *thresholded*
(never dithered: a dither pattern turns letters into noise on a fax and compresses badly).

"Standard" is rendered at fine resolution and then folded two lines into one, a pixel being
black when either of its two lines is dark. Rendering straight at 98 lpi would sample only every
other line and drop thin horizontal strokes (the bar of an "e", the top of a "т").

PDFium is not thread-safe, not even across different documents, so every call into it goes
through :data:`PDFIUM_LOCK`. Only drawing into the bitmap happens under the lock; thresholding
and TIFF encoding (Pillow, C code) run outside it, in parallel with other threads.
"""

from __future__ import annotations

import ctypes
import io
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import pypdfium2 as pdfium
import pypdfium2.raw as pdfium_c
from PIL import Image, ImageChops

from dispatcher.errors import DispatchError

Resolution = Literal["fine", "standard"]
Paper = Literal["a4", "letter"]
Compression = Literal["group4", "group3"]

#: every PDFium call of the process holds this lock (PDFium is not thread-safe at all)
PDFIUM_LOCK = threading.Lock()

#: dots across one fax line (ITU-T T.4)
FAX_LINE_PX = 1728
#: horizontal density of that line, dots per inch (8 dots/mm)
X_DPI = 204
#: vertical density, lines per inch: 7.7 lines/mm ("fine") and 3.85 ("standard")
Y_LPI: dict[Resolution, int] = {"fine": 196, "standard": 98}

_PT_PER_INCH = 72.0
#: page sizes in PDF points, to check a PDF against the paper a caller expects
PAPER_POINTS: dict[Paper, tuple[float, float]] = {
    "a4": (210 / 25.4 * _PT_PER_INCH, 297 / 25.4 * _PT_PER_INCH),
    "letter": (8.5 * _PT_PER_INCH, 11 * _PT_PER_INCH),
}
#: WeasyPrint rounds page boxes to fractions of a point; anything closer than this is that paper
_PAPER_TOLERANCE_PT = 2.0

#: grey level below which a pixel is ink. Above mid-grey (128) on purpose: anti-aliased stems of
#: small text are partly covered pixels, and counting those as ink keeps strokes at least one
#: dot wide instead of breaking them up. Chosen by looking at 11-13 pt DejaVu Sans at 204 dpi.
INK_THRESHOLD = 160
_THRESHOLD_LUT = [0 if level < INK_THRESHOLD else 255 for level in range(256)]

_TAG_PHOTOMETRIC = 262
_PHOTOMETRIC_WHITE_IS_ZERO = 0


class FaxRasterError(DispatchError, ValueError):
    """The PDF cannot be turned into fax pages (unreadable, empty, or not the paper expected)."""


@dataclass(frozen=True)
class PageGeometry:
    """Where one PDF page lands on the 1728-px fax line, at fine resolution."""

    #: pixels the page's content spans across the line
    content_px: int
    #: white pixels left of the content (the rest of the 1728 is white on the right)
    left_px: int
    #: lines of the page at 196 lpi
    lines: int


def geometry_for(width_pt: float, height_pt: float) -> PageGeometry:
    """Fit a page of ``width_pt × height_pt`` onto the fax line, as the module docstring says.

    A page no wider than the line at 204 dpi is drawn at its true size and centred; a wider
    one (Letter, Legal) is scaled down to exactly the line. Height always keeps 196 lpi, so
    a page prints as long as it is.
    """
    true_px = round(width_pt / _PT_PER_INCH * X_DPI)
    content_px = min(true_px, FAX_LINE_PX)
    lines = round(height_pt / _PT_PER_INCH * Y_LPI["fine"])
    return PageGeometry(content_px=content_px, left_px=(FAX_LINE_PX - content_px) // 2, lines=lines)


def paper_of(width_pt: float, height_pt: float) -> Paper | None:
    """Which of our papers a page is, or None."""
    for paper, (w, h) in PAPER_POINTS.items():
        if abs(width_pt - w) <= _PAPER_TOLERANCE_PT and abs(height_pt - h) <= _PAPER_TOLERANCE_PT:
            return paper
    return None


@contextmanager
def open_pdf(pdf: bytes) -> Iterator[pdfium.PdfDocument]:
    """A PDFium document, held under :data:`PDFIUM_LOCK` and closed before the lock is released.

    Closing explicitly matters: a PDFium object left to the garbage collector would be closed
    by a finaliser on whichever thread collects it, outside the lock.
    """
    with PDFIUM_LOCK:
        try:
            document = pdfium.PdfDocument(pdf)
        except pdfium.PdfiumError as exc:
            raise FaxRasterError(f"not a readable PDF: {exc}") from exc
        try:
            yield document
        finally:
            document.close()


def pdf_page_texts(pdf: bytes) -> list[str]:
    """The text layer of each page, as PDFium extracts it (for checks and tests)."""
    texts: list[str] = []
    with open_pdf(pdf) as document:
        for index in range(len(document)):
            page = document[index]
            try:
                textpage = page.get_textpage()
                try:
                    texts.append(textpage.get_text_range())
                finally:
                    textpage.close()
            finally:
                page.close()
    return texts


def pdf_font_names(pdf: bytes) -> set[str]:
    """The fonts the text of the PDF is drawn with, without subset prefixes ("DejaVu-Sans").

    The text layer alone cannot tell a real glyph from a missing-glyph box: a PDF drawn with a
    font that lacks Cyrillic still extracts as Cyrillic. The embedded font's name can.
    """
    names: set[str] = set()
    with open_pdf(pdf) as document:
        for index in range(len(document)):
            page = document[index]
            try:
                for obj in page.get_objects(filter=[pdfium_c.FPDF_PAGEOBJ_TEXT]):
                    font = pdfium_c.FPDFTextObj_GetFont(obj)
                    size = pdfium_c.FPDFFont_GetBaseFontName(font, None, 0)
                    buffer = ctypes.create_string_buffer(size)
                    pdfium_c.FPDFFont_GetBaseFontName(font, buffer, size)
                    names.add(buffer.value.decode("ascii", "replace").split("+", 1)[-1])
            finally:
                page.close()
    return names


@dataclass(frozen=True)
class _GreyPage:
    """One page drawn in grey at fine resolution, copied out of PDFium's memory."""

    pixels: bytes
    lines: int


def _draw_pages(pdf: bytes, paper: Paper | None) -> list[_GreyPage]:
    pages: list[_GreyPage] = []
    with open_pdf(pdf) as document:
        count = len(document)
        if count == 0:
            raise FaxRasterError("the PDF has no pages")
        for index in range(count):
            page = document[index]
            try:
                width_pt, height_pt = page.get_size()
                if paper is not None and paper_of(width_pt, height_pt) != paper:
                    raise FaxRasterError(
                        f"page {index + 1} is {width_pt:.0f}×{height_pt:.0f} pt, not {paper} "
                        f"({PAPER_POINTS[paper][0]:.0f}×{PAPER_POINTS[paper][1]:.0f} pt)"
                    )
                where = geometry_for(width_pt, height_pt)
                # A packed 8-bit grey bitmap owned by Python: one byte per pixel, stride = width.
                bitmap = pdfium.PdfBitmap.new_native(FAX_LINE_PX, where.lines, pdfium_c.FPDFBitmap_Gray)
                try:
                    bitmap.fill_rect((255, 255, 255, 255), 0, 0, FAX_LINE_PX, where.lines)
                    # Drawing into a content_px × lines box is the non-uniform 204 × 196 scale.
                    pdfium_c.FPDF_RenderPageBitmap(
                        bitmap,
                        page,
                        where.left_px,
                        0,
                        where.content_px,
                        where.lines,
                        0,
                        pdfium_c.FPDF_GRAYSCALE | pdfium_c.FPDF_ANNOT,
                    )
                    pages.append(_GreyPage(pixels=bytes(bitmap.buffer), lines=where.lines))
                finally:
                    bitmap.close()
            finally:
                page.close()
    return pages


def _to_bilevel(grey: _GreyPage, resolution: Resolution) -> Image.Image:
    """Threshold one grey page to mode "1" (True/255 = white paper, 0 = ink)."""
    if resolution == "standard":
        lines = grey.lines
        stride = FAX_LINE_PX
        rows = [grey.pixels[y * stride : (y + 1) * stride] for y in range(lines)]
        if lines % 2:
            rows.append(b"\xff" * stride)  # a white line to pair with an odd last one
        even = Image.frombytes("L", (stride, len(rows) // 2), b"".join(rows[0::2]))
        odd = Image.frombytes("L", (stride, len(rows) // 2), b"".join(rows[1::2]))
        # the darker of each pair of lines: a one-line stroke survives the halving
        image = ImageChops.darker(even, odd)
    else:
        image = Image.frombytes("L", (FAX_LINE_PX, grey.lines), grey.pixels)
    return image.point(_THRESHOLD_LUT, "1")


def _mark_white_is_zero(tiff: bytearray) -> None:
    """Set PhotometricInterpretation = WhiteIsZero in every page of a little-endian TIFF.

    Fax TIFF (RFC 3949 "TIFF-F") and T.4/T.6 streams code white as 0 bits. Pillow writes mode "1"
    as BlackIsZero, and its own way to ask for WhiteIsZero inverts the picture pixel by pixel in
    Python (over a second per page). So the caller inverts the bits with one C call and this
    corrects the tag to match: same picture, and a G4 stream whose "white runs" really are white,
    for receivers that pass the CCITT data through without decoding it.
    """
    if tiff[:4] != b"II*\x00":
        raise FaxRasterError("expected a little-endian TIFF from Pillow")
    (offset,) = struct.unpack_from("<I", tiff, 4)
    seen = 0
    while offset:
        (entries,) = struct.unpack_from("<H", tiff, offset)
        for index in range(entries):
            entry = offset + 2 + 12 * index
            tag, _type, _count = struct.unpack_from("<HHI", tiff, entry)
            if tag == _TAG_PHOTOMETRIC:
                # a SHORT value sits left-justified in the entry's 4-byte value field
                struct.pack_into("<H", tiff, entry + 8, _PHOTOMETRIC_WHITE_IS_ZERO)
                seen += 1
        (offset,) = struct.unpack_from("<I", tiff, offset + 2 + 12 * entries)
    if not seen:
        raise FaxRasterError("Pillow wrote a TIFF without a PhotometricInterpretation tag")


def write_fax_tiff(
    pages: list[Image.Image], *, resolution: Resolution = "fine", compression: Compression = "group4"
) -> bytes:
    """Multi-page TIFF of mode "1" pages (white = 1, as Pillow holds them), fax conventions."""
    if not pages:
        raise FaxRasterError("no pages to write")
    inverted = [ImageChops.invert(page) for page in pages]  # bits: white 0, ink 1
    out = io.BytesIO()
    inverted[0].save(
        out,
        format="TIFF",
        save_all=True,
        append_images=inverted[1:],
        compression=compression,
        dpi=(X_DPI, Y_LPI[resolution]),
    )
    data = bytearray(out.getvalue())
    _mark_white_is_zero(data)
    return bytes(data)


def rasterise(pdf: bytes, *, resolution: Resolution = "fine", paper: Paper | None = None) -> list[Image.Image]:
    """The PDF's pages as mode "1" images, 1728 px wide, at 204 × 196 (or 98) dpi."""
    return [_to_bilevel(grey, resolution) for grey in _draw_pages(pdf, paper)]


def pdf_to_fax_tiff(
    pdf: bytes,
    *,
    resolution: Resolution = "fine",
    paper: Paper | None = None,
    compression: Compression = "group4",
) -> tuple[bytes, int]:
    """The PDF as a multi-page fax TIFF, and its number of pages.

    ``paper`` None takes each page as it is (A4 centred, Letter scaled to the line, see the module
    docstring). Given "a4" or "letter", every page must be that paper, else :class:`FaxRasterError`:
    a caller who says Letter and hands over A4 has mixed up two documents.
    """
    images = rasterise(pdf, resolution=resolution, paper=paper)
    return write_fax_tiff(images, resolution=resolution, compression=compression), len(images)
