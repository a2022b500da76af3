"""Fax end to end: a signed appeal → ledger → Redis → worker → PDF and TIFF → the fax lab's real
T.30 call → the ledger. Sandbox mode sends every fax to the lab, whatever the real number."""

from __future__ import annotations

import io
import itertools
import json
from datetime import UTC, datetime

import pypdfium2
import pytest
from PIL import Image, ImageChops

from dispatcher.render.fax import FaxRenderer, pdf_to_fax_tiff
from dispatcher.render.letters import LetterRequest, Supporter
from dispatcher.sandbox.faxlab import Behaviour, FaxLab
from tests.conftest import appeal_body, signed_post, wait_for

pytestmark = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


@pytest.fixture
def settings(settings):
    # Short waits so that retries happen within a test.
    return settings.but(retry_max_attempts=3, fax_no_tone_interval_seconds=0.3, fax_line_wait_seconds=0.2)


@pytest.fixture
def lab(settings) -> FaxLab:
    return FaxLab(settings.var_dir / "sandbox" / "fax")


def ch_appeal(**overrides):
    body = appeal_body(section="ch", language="de", **overrides)
    body["supporter"].update(city="Bern", country="CH")
    return body


def faxes(client, appeal_id: str) -> dict[str, dict]:
    view = client.get(f"/v1/appeals/{appeal_id}").json()
    return {d["target"]: d for d in view["deliveries"] if d["channel"] == "fax"}


def tiff_pages(path) -> list[Image.Image]:
    with Image.open(path) as image:
        pages = []
        for i in range(getattr(image, "n_frames", 1)):
            image.seek(i)
            pages.append(image.convert("1").copy())
    return pages


def differing_share(a: Image.Image, b: Image.Image) -> float:
    assert a.size == b.size, (a.size, b.size)
    diff = ImageChops.difference(a.convert("L"), b.convert("L"))
    total = a.size[0] * a.size[1]
    return (total - diff.histogram()[0]) / total


def test_ch_appeal_faxes_moscow_and_the_berne_embassy_through_real_calls(
    client, environ, catalog, service, lab, running
):
    body = ch_appeal(message="Bitte handeln Sie jetzt.")
    r = signed_post(client, environ, catalog, body)
    assert r.status_code == 202, r.text
    appeal_id = r.json()["appeal_id"]
    expected = {p.target.id for p in catalog.routes("UA-002-19", "ch") if p.channel == "fax"}
    assert expected == {"president", "embassy-ru"}
    wait_for(
        lambda: {t: d["state"] for t, d in faxes(client, appeal_id).items()} == dict.fromkeys(expected, "delivered"),
        timeout=60,
    )

    renderer = FaxRenderer(service.renderer)
    for target_id, delivery in faxes(client, appeal_id).items():
        target = catalog.target("UA-002-19", "ch", target_id)
        assert delivery["gateway"] == "lab" and delivery["line_seconds"] > 0
        received = tiff_pages(lab.path_of(delivery["remote_id"]) / "received.tiff")
        # the same letter rendered again: its PDF has as many pages as the fax received
        request = LetterRequest(
            campaign=service.catalog.campaign("UA-002-19-DEMO"),
            section=catalog.section("ch"),
            target=target,
            language=delivery["language"],
            supporter=Supporter("Jane Doe", body["supporter"]["email"], "Bern", "CH"),
            message=body["message"],
            date=datetime.now(UTC).date(),
        )
        pdf = renderer.render_pdf(request, sent_at=datetime.now(UTC))
        assert len(pypdfium2.PdfDocument(pdf)) == len(received) == delivery["pages"]
        assert all(page.size[0] == 1728 for page in received)
        rendered_first = Image.open(io.BytesIO(pdf_to_fax_tiff(pdf, paper="a4")[0])).convert("1")
        # The cover page carries the sending minute; everything else must match pixel for pixel.
        assert differing_share(received[0], rendered_first) < 0.005


def test_busy_line_is_retried_and_then_delivered(client, environ, catalog, service, lab, running):
    number = catalog.target("UA-002-19", "ch", "president").fax
    lab.set_behaviour(number, Behaviour.BUSY, times=1)
    appeal_id = signed_post(client, environ, catalog, ch_appeal()).json()["appeal_id"]
    wait_for(lambda: faxes(client, appeal_id)["president"]["state"] == "delivered", timeout=60)
    attempts = service.ledger.views.attempts(faxes(client, appeal_id)["president"]["id"])
    assert [a.outcome for a in attempts] == ["transient", "sent"]
    assert "busy" in attempts[0].text


def test_line_that_never_answers_is_retried_then_fails_as_transient_exhausted(
    client, environ, catalog, service, lab, running
):
    number = catalog.target("UA-002-19", "ch", "president").fax
    lab.set_behaviour(number, Behaviour.NO_ANSWER)
    appeal_id = signed_post(client, environ, catalog, ch_appeal()).json()["appeal_id"]
    wait_for(lambda: faxes(client, appeal_id)["president"]["state"] == "failed", timeout=60)
    president = faxes(client, appeal_id)["president"]
    assert president["last_outcome"] == "transient"
    assert "gave up after transient failures" in president["last_text"]
    assert "no_answer" in president["last_text"]
    assert president["attempts"] == service.settings.retry_max_attempts
    assert faxes(client, appeal_id)["embassy-ru"]["state"] == "delivered"  # other lines are unaffected


def test_silent_line_flags_the_number_for_an_operator(client, environ, catalog, service, lab, running):
    number = catalog.target("UA-002-19", "ch", "president").fax
    lab.set_behaviour(number, Behaviour.SILENT)
    appeal_id = signed_post(client, environ, catalog, ch_appeal()).json()["appeal_id"]
    wait_for(lambda: faxes(client, appeal_id)["president"]["state"] == "failed", timeout=60)
    president = faxes(client, appeal_id)["president"]
    assert "flagged" in president["last_text"]
    assert "initial communication" in president["last_text"]
    assert [f.number for f in service.ledger.controls.flagged_numbers()] == [number]
    # The next letter to that number waits for an operator instead of calling a voice line again.
    second = signed_post(client, environ, catalog, ch_appeal()).json()["appeal_id"]
    wait_for(lambda: faxes(client, second)["president"]["last_outcome"] == "operational", timeout=30)
    assert faxes(client, second)["president"]["state"] == "planned"


def test_hang_up_mid_document_is_retried_whole(client, environ, catalog, service, lab, running):
    number = catalog.target("UA-002-19", "ch", "president").fax
    lab.set_behaviour(number, Behaviour.HANG_UP, times=1)
    appeal_id = signed_post(client, environ, catalog, ch_appeal()).json()["appeal_id"]
    wait_for(lambda: faxes(client, appeal_id)["president"]["state"] == "delivered", timeout=60)
    president = faxes(client, appeal_id)["president"]
    first, second = service.ledger.views.attempts(president["id"])
    assert first.outcome == "transient" and first.pages < president["pages"]
    assert second.outcome == "sent" and second.pages == president["pages"]
    assert len(tiff_pages(lab.path_of(president["remote_id"]) / "received.tiff")) == president["pages"]


def test_never_two_faxes_in_flight_to_the_same_number(client, environ, catalog, service, lab, running):
    ids = [signed_post(client, environ, catalog, ch_appeal()).json()["appeal_id"] for _ in range(4)]
    for appeal_id in ids:
        wait_for(lambda a=appeal_id: {d["state"] for d in faxes(client, a).values()} == {"delivered"}, timeout=90)
    calls: dict[str, list[tuple[str, str]]] = {}  # ISO UTC times of each call's start and end
    for record in lab.directory.glob("*/record.json"):
        data = json.loads(record.read_text())
        calls.setdefault(data["to"], []).append((data["created_at"], data["occurred_at"]))
    assert set(calls) == {t.fax for t in (catalog.target("UA-002-19", "ch", t) for t in ("president", "embassy-ru"))}
    for spans in calls.values():
        spans.sort()
        assert all(earlier[1] <= later[0] for earlier, later in itertools.pairwise(spans)), spans
