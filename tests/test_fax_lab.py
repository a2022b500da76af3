"""The local fax lab: real T.30 calls between two spandsp terminals, the lab's numbers, and its
records on disk. Each call is ~0.1 s of CPU for ~60-90 s of simulated line time."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Iterator
from pathlib import Path

import phonenumbers
import pytest
from PIL import Image, ImageChops, ImageDraw, ImageFont, ImageSequence

from dispatcher.channels.fax.base import FailureKind, FaxGateway, FaxJob, FaxStatus, NoFaxToneError
from dispatcher.errors import OperationalError, PermanentError, TransientError
from dispatcher.sandbox.faxlab import (
    LAB_NUMBERS,
    Behaviour,
    DocumentProblem,
    FaxLab,
    LabFaxNotFound,
    prepare_document,
)
from dispatcher.sandbox.spandsp import SpandspUnavailable, T30Error, T30Stats, completion_text

NORMAL = "+44 20 7946 0100"
BUSY = "+44 20 7946 0101"
NO_ANSWER = "+44 20 7946 0102"
SILENT = "+44 20 7946 0103"
HANG_UP = "+44 20 7946 0104"
UNALLOCATED = "+44 20 7946 0105"
#: a number outside the lab's own range (fictional: US 555-01xx), written as people write it
OTHER_NUMBER_AS_WRITTEN = "+1 202 555 0143"
OTHER_NUMBER = "+12025550143"
#: largest fraction of pixels a received page may differ by: ECM is lossless, so in practice 0;
#: two of our letter's pages differ by ~0.1 % (one digit per line)
MATCH = 0.0001


def letter_pages(count: int = 3, y_dpi: int = 196) -> list[Image.Image]:
    height = 2200 if y_dpi == 196 else 1100
    font = ImageFont.load_default(size=34 if y_dpi == 196 else 17)
    pages = []
    for number in range(1, count + 1):
        page = Image.new("1", (1728, height), 255)
        draw = ImageDraw.Draw(page)
        step = 60 if y_dpi == 196 else 30
        for line in range(28):
            draw.text(
                (120, 120 * height // 2200 + line * step), f"Page {number}, line {line}: Mr President,", font=font
            )
        draw.rectangle((1400, 40, 1660, 40 + step), fill=0)  # a black block: catches inverted pages
        pages.append(page)
    return pages


def tiff_of(pages: list[Image.Image], *, y_dpi: int = 196, compression: str = "group4") -> bytes:
    out = io.BytesIO()
    pages[0].save(out, format="TIFF", save_all=True, append_images=pages[1:], compression=compression, dpi=(204, y_dpi))
    return out.getvalue()


@pytest.fixture(scope="module")
def pages() -> list[Image.Image]:
    return letter_pages(3)


@pytest.fixture(scope="module")
def letter(pages: list[Image.Image]) -> bytes:
    return tiff_of(pages)


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[FaxLab]:
    yield FaxLab(tmp_path / "fax")


def job(tiff: bytes, to: str, tag: str = "delivery-1", pages: int = 3) -> FaxJob:
    return FaxJob(tag=tag, to_number=to, pdf=b"", tiff=tiff, pages=pages, station_id="AI Switzerland")


def differing_fraction(a: Image.Image, b: Image.Image) -> float:
    diff = ImageChops.logical_xor(a.convert("1"), b.convert("1")).convert("L")
    return sum(diff.histogram()[1:]) / (a.width * a.height)


# --------------------------------------------------------------------------- the numbers


def test_lab_numbers_are_valid_fictional_numbers() -> None:
    for number in (NORMAL, BUSY, NO_ANSWER, SILENT, HANG_UP, UNALLOCATED):
        parsed = phonenumbers.parse(number, None)
        assert phonenumbers.is_valid_number(parsed)
        assert phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164) in LAB_NUMBERS


def test_page_comparison_tells_pages_apart(pages: list[Image.Image]) -> None:
    assert differing_fraction(pages[0], pages[0]) == 0
    assert differing_fraction(pages[0], pages[1]) > MATCH
    assert differing_fraction(pages[0], Image.new("1", pages[0].size, 255)) > 0.01


def test_binding_matches_spandsp_0_0_6() -> None:
    assert completion_text(T30Error.OK) == "OK"
    assert completion_text(T30Error.T0_EXPIRED) == "Timed out waiting for initial communication"
    assert completion_text(T30Error.TX_PHDDEAD) == "No response after sending a page"
    assert completion_text(T30Error.CSA_UNACCEPTABLE) == "Called subscriber internet address not accepted"
    assert len(T30Stats._fields_) == 15


# --------------------------------------------------------------------------- calls


async def test_normal_machine_receives_every_page(
    lab: FaxLab, letter: bytes, pages: list[Image.Image], tmp_path: Path
) -> None:
    assert isinstance(lab, FaxGateway)
    report = await lab.send(job(letter, NORMAL))

    assert report.status is FaxStatus.DELIVERED and report.final
    assert report.failure is None
    assert report.gateway == "lab" and report.tag == "delivery-1"
    assert report.pages == 3
    assert report.duration_s is not None and 30 < report.duration_s < 200  # simulated line time
    assert report.extra["to"] == "+442079460100"
    assert report.extra["remote_station"] == "+442079460100"  # the answering machine's CSI

    folder = lab.path_of(report.remote_id)
    with Image.open(folder / "received.tiff") as received:
        got = [frame.copy() for frame in ImageSequence.Iterator(received)]
        assert received.info["dpi"] == pytest.approx((204, 196), abs=1)
    assert len(got) == 3
    for sent, page in zip(pages, got, strict=True):
        assert page.size == (1728, sent.height)
        assert differing_fraction(sent, page) < MATCH
    for number in (1, 2, 3):
        with Image.open(folder / f"page-{number}.png") as preview:
            assert preview.format == "PNG" and preview.width == 1728
    assert not (folder / "page-4.png").exists()
    assert "Success - delivered 3 pages" in (folder / "t30.log").read_text()


async def test_any_other_number_is_a_normal_machine(lab: FaxLab, letter: bytes) -> None:
    report = await lab.send(job(letter, OTHER_NUMBER_AS_WRITTEN))
    assert report.status is FaxStatus.DELIVERED and report.pages == 3
    assert report.extra["to"] == OTHER_NUMBER


async def test_standard_resolution_g3_document(lab: FaxLab) -> None:
    pages = letter_pages(2, y_dpi=98)
    report = await lab.send(job(tiff_of(pages, y_dpi=98, compression="group3"), NORMAL, pages=2))
    assert report.status is FaxStatus.DELIVERED and report.pages == 2
    with Image.open(lab.path_of(report.remote_id) / "received.tiff") as received:
        assert received.info["dpi"] == pytest.approx((204, 98), abs=1)
        for sent, page in zip(pages, ImageSequence.Iterator(received), strict=True):
            assert differing_fraction(sent, page) < MATCH
    with Image.open(lab.path_of(report.remote_id) / "page-1.png") as preview:
        assert preview.height == pytest.approx(1100 * 204 / 98, abs=1)  # square pixels


async def test_busy_line(lab: FaxLab, letter: bytes) -> None:
    report = await lab.send(job(letter, BUSY))
    assert report.status is FaxStatus.FAILED
    assert report.failure is not None and report.failure.kind is FailureKind.BUSY
    assert report.pages == 0
    assert isinstance(report.failure.error(), TransientError)
    assert not (lab.path_of(report.remote_id) / "received.tiff").exists()


async def test_line_that_never_answers(lab: FaxLab, letter: bytes) -> None:
    report = await lab.send(job(letter, NO_ANSWER))
    assert report.status is FaxStatus.FAILED
    assert report.failure is not None and report.failure.kind is FailureKind.NO_ANSWER
    assert report.extra["ring_s"] == "60"


async def test_silent_line_times_out_waiting_for_a_fax_machine(lab: FaxLab, letter: bytes) -> None:
    report = await lab.send(job(letter, SILENT))
    assert report.status is FaxStatus.FAILED
    failure = report.failure
    assert failure is not None and failure.kind is FailureKind.NO_FAX_TONE
    assert failure.code == str(int(T30Error.T0_EXPIRED))
    assert failure.text == "Timed out waiting for initial communication"
    assert isinstance(failure.error(), NoFaxToneError)
    assert report.duration_s == pytest.approx(60, abs=1)  # spandsp's T0
    assert report.pages == 0


async def test_machine_hanging_up_mid_document(lab: FaxLab, letter: bytes, pages: list[Image.Image]) -> None:
    report = await lab.send(job(letter, HANG_UP))
    assert report.status is FaxStatus.FAILED
    failure = report.failure
    assert failure is not None and failure.kind is FailureKind.INTERRUPTED
    assert failure.code == str(int(T30Error.TX_PHDDEAD))
    assert failure.text == "No response after sending a page"
    assert report.pages is not None and report.pages < 3
    assert report.pages == 1  # the first page was confirmed before the line dropped
    folder = lab.path_of(report.remote_id)
    with Image.open(folder / "received.tiff") as received:
        got = [frame.copy() for frame in ImageSequence.Iterator(received)]
    assert len(got) == 1
    assert differing_fraction(pages[0], got[0]) < MATCH
    assert (folder / "page-1.png").exists() and not (folder / "page-2.png").exists()


async def test_unallocated_number(lab: FaxLab, letter: bytes) -> None:
    report = await lab.send(job(letter, UNALLOCATED))
    assert report.failure is not None and report.failure.kind is FailureKind.INVALID_NUMBER
    assert isinstance(report.failure.error(), PermanentError)


# --------------------------------------------------------------------------- overrides, lines


async def test_busy_once_then_answered(lab: FaxLab, letter: bytes) -> None:
    lab.set_behaviour(OTHER_NUMBER_AS_WRITTEN, Behaviour.BUSY, times=1)
    assert lab.behaviour_for(OTHER_NUMBER_AS_WRITTEN) is Behaviour.BUSY

    first = await lab.send(job(letter, OTHER_NUMBER_AS_WRITTEN))
    second = await lab.send(job(letter, OTHER_NUMBER_AS_WRITTEN))

    assert first.failure is not None and first.failure.kind is FailureKind.BUSY
    assert second.status is FaxStatus.DELIVERED
    assert lab.behaviour_for(OTHER_NUMBER_AS_WRITTEN) is Behaviour.NORMAL


async def test_override_persists_until_cleared_and_is_shared(lab: FaxLab, letter: bytes) -> None:
    lab.set_behaviour(NORMAL, Behaviour.NO_ANSWER)
    other = FaxLab(lab.directory)  # another process would see the same file
    assert other.behaviour_for(NORMAL) is Behaviour.NO_ANSWER
    for _ in range(2):
        report = await other.send(job(letter, NORMAL))
        assert report.failure is not None and report.failure.kind is FailureKind.NO_ANSWER
    lab.set_behaviour(NORMAL, None)
    assert other.behaviour_for(NORMAL) is Behaviour.NORMAL
    lab.set_behaviour(BUSY, Behaviour.NORMAL)  # the table's numbers can be overridden too
    lab.clear_behaviours()
    assert lab.behaviour_for(BUSY) is Behaviour.BUSY
    with pytest.raises(ValueError):
        lab.set_behaviour(NORMAL, Behaviour.BUSY, times=0)


async def test_a_line_in_use_answers_busy(lab: FaxLab, letter: bytes) -> None:
    with lab.hold_line(NORMAL):
        report = await lab.send(job(letter, NORMAL))
    assert report.failure is not None and report.failure.kind is FailureKind.BUSY
    assert report.extra["line_in_use"] == "yes"
    assert (await lab.send(job(letter, NORMAL, tag="delivery-2"))).status is FaxStatus.DELIVERED


async def test_concurrent_sends_to_one_number_never_overlap(lab: FaxLab, letter: bytes) -> None:
    reports = await asyncio.gather(*(lab.send(job(letter, NORMAL, tag=f"d{i}")) for i in range(3)))
    # Whichever got the line delivered; any that found it in use got BUSY, none both at once.
    assert {r.status for r in reports} <= {FaxStatus.DELIVERED, FaxStatus.FAILED}
    assert any(r.status is FaxStatus.DELIVERED for r in reports)
    for r in reports:
        assert r.status is FaxStatus.DELIVERED or (r.failure is not None and r.failure.kind is FailureKind.BUSY)


# --------------------------------------------------------------------------- records


async def test_find_by_tag_and_get_across_instances(lab: FaxLab, letter: bytes) -> None:
    assert await lab.find_by_tag("delivery-9") is None
    busy = await lab.send(job(letter, BUSY, tag="delivery-9"))
    delivered = await lab.send(job(letter, NORMAL, tag="delivery-9"))
    await lab.send(job(letter, NORMAL, tag="someone-else"))

    again = FaxLab(lab.directory)
    found = await again.find_by_tag("delivery-9")
    assert found == delivered  # the most advanced of the two
    assert await again.get(busy.remote_id) == busy
    assert await again.get(delivered.remote_id) == delivered
    with pytest.raises(LabFaxNotFound):
        await again.get("20000101T000000Z-00000000")
    with pytest.raises(LabFaxNotFound):
        await again.get("../../etc/passwd")

    record = json.loads((again.path_of(delivered.remote_id) / "record.json").read_text())
    assert record["status"] == "delivered" and record["tag"] == "delivery-9"


async def test_a_call_abandoned_by_a_dead_process_reads_as_interrupted(lab: FaxLab, letter: bytes) -> None:
    report = await lab.send(job(letter, BUSY, tag="delivery-7"))
    path = lab.path_of(report.remote_id) / "record.json"
    record = json.loads(path.read_text())
    record.update(status="sending", failure=None, pid=2**22 + 12345)  # above Linux's pid_max
    path.write_text(json.dumps(record))

    found = await FaxLab(lab.directory).find_by_tag("delivery-7")
    assert found is not None and found.status is FaxStatus.FAILED
    assert found.failure is not None and found.failure.kind is FailureKind.INTERRUPTED


async def test_unusual_tags_are_stored_safely(lab: FaxLab, letter: bytes) -> None:
    tag = "../a tag/with ünicode"
    report = await lab.send(job(letter, BUSY, tag=tag))
    assert await lab.find_by_tag(tag) == report
    assert all(p.parent == lab.directory / "tags" for p in (lab.directory / "tags").iterdir())


# --------------------------------------------------------------------------- documents


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: b"%PDF-1.7 not a tiff", "not a readable TIFF"),
        (lambda: tiff_of([Image.new("1", (2480, 3508), 255)]), "2480 px wide"),
        (lambda: tiff_of([Image.new("L", (1728, 2200), 255)], compression="tiff_lzw"), "not bilevel"),
        (lambda: tiff_of([Image.new("1", (1728, 2200), 255)], y_dpi=300), "300 dpi down"),
    ],
)
async def test_documents_that_are_not_fax_ready_are_rejected(lab: FaxLab, make, message: str) -> None:
    with pytest.raises(DocumentProblem, match=message):
        prepare_document(make())
    with pytest.raises(PermanentError, match=message):
        await lab.send(job(make(), NORMAL, pages=1))
    assert await lab.find_by_tag("delivery-1") is None  # never created


async def test_invalid_number_is_refused_before_any_call(lab: FaxLab, letter: bytes) -> None:
    with pytest.raises(PermanentError, match="not a valid number"):
        await lab.send(job(letter, "+44 20 7946"))
    assert await lab.find_by_tag("delivery-1") is None


def test_uncompressed_input_is_re_encoded(pages: list[Image.Image]) -> None:
    # spandsp 0.0.6 cannot open Pillow's uncompressed 1-bit TIFF; the lab re-encodes as G4.
    document = prepare_document(tiff_of(pages[:1], compression="raw"))
    with Image.open(io.BytesIO(document.tiff)) as image:
        assert image.info["compression"] == "group4"
        assert differing_fraction(pages[0], image) == 0
    assert document.pages == 1 and document.y_dpi == (196,)


async def test_the_converters_white_is_zero_tiff_arrives_intact(lab: FaxLab, pages: list[Image.Image]) -> None:
    # The PDF converter writes PhotometricInterpretation WhiteIsZero, as fax TIFFs usually are;
    # our own test TIFFs are BlackIsZero. Both must arrive pixel for pixel.
    from dispatcher.render import faxraster

    report = await lab.send(job(faxraster.write_fax_tiff(pages), NORMAL))
    assert report.status is FaxStatus.DELIVERED and report.pages == 3
    with Image.open(lab.path_of(report.remote_id) / "received.tiff") as received:
        for sent, page in zip(pages, ImageSequence.Iterator(received), strict=True):
            assert differing_fraction(sent, page) < MATCH


async def test_missing_libspandsp_pauses_the_channel(
    lab: FaxLab, letter: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unavailable() -> None:
        raise SpandspUnavailable("cannot load libspandsp.so.2")

    monkeypatch.setattr("dispatcher.sandbox.faxlab.library", unavailable)
    with pytest.raises(OperationalError, match="libspandsp"):
        await lab.send(job(letter, NORMAL))
    assert await lab.find_by_tag("delivery-1") is None
