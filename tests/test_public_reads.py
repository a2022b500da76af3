"""The public read endpoints as a section's web page sees them: CORS for the pages each section
allows, ETag and Cache-Control, OPTIONS answered, and the counters' SVG badge in the campaign's
languages."""

from __future__ import annotations

import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from dispatcher.app import Service
from dispatcher.config.loader import load_catalog
from dispatcher.config.models import Web
from dispatcher.errors import ConfigError
from dispatcher.intake import badge
from tests.conftest import ROOT, appeal_body
from tests.support.web import with_web

CAMPAIGN = "UA-002-19-DEMO"
CH_PAGE = "https://www.amnesty.ch"
US_PAGE = "https://www.amnestyusa.org"
ELSEWHERE = "https://evil.example"
SVG = "{http://www.w3.org/2000/svg}"


@pytest.fixture
def database_url(sqlite_url: str) -> str:
    return sqlite_url


@pytest.fixture
def web_service(settings, environ):  # type: ignore[no-untyped-def]
    configured = Service(settings, environ=environ).catalog
    webs = {
        # Switzerland lets any page show the counters; the US only its own pages
        "ch": Web(origins=[CH_PAGE], counter_origins=["*"]),
        "us": Web(origins=[US_PAGE]),
    }
    svc = Service(settings, environ=environ, catalog_override=with_web(configured, webs))
    svc.ledger.migrate()
    yield svc
    svc.ledger.dispose()


@pytest.fixture
def page(web_service):  # type: ignore[no-untyped-def]
    with TestClient(web_service.api(), raise_server_exceptions=False) as c:
        yield c


def sign_up(service: Service, section: str, n: int = 1, language: str = "en") -> list[str]:
    return [service.intake.submit(appeal_body(section=section, language=language)).appeal_id for _ in range(n)]


def parse(svg: bytes) -> ET.Element:
    # well-formed XML, or this raises; the bytes are our own badge's
    return ET.fromstring(svg)  # noqa: S314


def badge_text(response) -> str:  # type: ignore[no-untyped-def]
    svg = parse(response.content)
    assert svg.tag == f"{SVG}svg"
    text = svg.find(f"{SVG}text")
    assert text is not None and text.text is not None
    assert svg.findtext(f"{SVG}title") == text.text == svg.get("aria-label")
    return text.text


# --------------------------------------------------------------------------- counters


def test_any_page_may_read_counters_and_they_are_cached_by_etag(page, web_service):
    sign_up(web_service, "us", 2)
    r = page.get(f"/v1/campaigns/{CAMPAIGN}/counters", headers={"Origin": ELSEWHERE})
    assert r.status_code == 200
    assert r.json()["appeals"] == 2
    assert r.headers["access-control-allow-origin"] == "*"
    assert r.headers["cache-control"] == "public, max-age=60"
    assert "etag" in r.headers["access-control-expose-headers"].lower()
    etag = r.headers["etag"]

    again = page.get(f"/v1/campaigns/{CAMPAIGN}/counters", headers={"Origin": ELSEWHERE, "If-None-Match": etag})
    assert again.status_code == 304
    assert again.content == b""
    assert again.headers["etag"] == etag
    assert again.headers["access-control-allow-origin"] == "*"

    sign_up(web_service, "ch")
    changed = page.get(f"/v1/campaigns/{CAMPAIGN}/counters", headers={"If-None-Match": etag})
    assert changed.status_code == 200
    assert changed.json()["appeals"] == 3
    assert changed.headers["etag"] != etag
    # a weak tag and a list of tags match too (RFC 9110)
    current = changed.headers["etag"]
    listed = page.get(f"/v1/campaigns/{CAMPAIGN}/counters", headers={"If-None-Match": f'"other", W/{current}'})
    assert listed.status_code == 304


def test_preflight_is_answered_not_405(page):
    r = page.options(
        f"/v1/campaigns/{CAMPAIGN}/counters",
        headers={
            "Origin": ELSEWHERE,
            "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "if-none-match",
        },
    )
    assert r.status_code == 204
    assert r.headers["access-control-allow-origin"] == "*"
    assert "GET" in r.headers["access-control-allow-methods"]
    assert r.headers["access-control-allow-headers"] == "if-none-match"
    assert int(r.headers["access-control-max-age"]) > 0
    plain = page.options(f"/v1/campaigns/{CAMPAIGN}/counters")
    assert plain.status_code == 204
    assert plain.headers["allow"] == "GET, OPTIONS"


def test_a_page_may_never_post_appeals_from_a_browser(page):
    r = page.options(
        f"/v1/campaigns/{CAMPAIGN}/counters", headers={"Origin": ELSEWHERE, "Access-Control-Request-Method": "POST"}
    )
    assert "access-control-allow-origin" not in r.headers
    r = page.options("/v1/appeals", headers={"Origin": US_PAGE, "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in r.headers


def test_unknown_campaign_is_our_404_readable_by_the_page(page):
    r = page.get("/v1/campaigns/NOPE/counters", headers={"Origin": ELSEWHERE})
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "not_found"
    assert r.headers["access-control-allow-origin"] == "*"


# --------------------------------------------------------------------------- an appeal's letters


def test_an_appeal_is_readable_by_its_own_sections_pages_only(page, web_service):
    (appeal,) = sign_up(web_service, "us")
    own = page.get(f"/v1/appeals/{appeal}", headers={"Origin": US_PAGE})
    assert own.status_code == 200
    assert own.headers["access-control-allow-origin"] == US_PAGE
    assert "Origin" in own.headers["vary"]
    assert own.headers["cache-control"] == "private, no-cache"

    for other in (CH_PAGE, ELSEWHERE):
        refused = page.get(f"/v1/appeals/{appeal}", headers={"Origin": other})
        assert "access-control-allow-origin" not in refused.headers
        preflight = page.options(
            f"/v1/appeals/{appeal}", headers={"Origin": other, "Access-Control-Request-Method": "GET"}
        )
        assert "access-control-allow-origin" not in preflight.headers

    preflight = page.options(
        f"/v1/appeals/{appeal}",
        headers={"Origin": US_PAGE, "Access-Control-Request-Method": "GET", "Access-Control-Request-Headers": "X-Evil"},
    )
    assert "access-control-allow-origin" not in preflight.headers  # a header we do not take

    revalidated = page.get(f"/v1/appeals/{appeal}", headers={"Origin": US_PAGE, "If-None-Match": own.headers["etag"]})
    assert revalidated.status_code == 304
    assert revalidated.headers["access-control-allow-origin"] == US_PAGE


def test_counters_of_a_campaign_without_star_are_for_its_sections_pages(page, web_service):
    r = page.get(f"/v1/campaigns/{CAMPAIGN}/counters.svg?section=us", headers={"Origin": US_PAGE})
    assert r.headers["access-control-allow-origin"] == US_PAGE
    r = page.get(f"/v1/campaigns/{CAMPAIGN}/counters.svg?section=us", headers={"Origin": ELSEWHERE})
    assert "access-control-allow-origin" not in r.headers
    assert r.status_code == 200  # an <img> needs no CORS: the badge shows on any page


# --------------------------------------------------------------------------- the badge


def test_badge_counts_the_campaign_or_one_section_in_the_language_asked(page, web_service):
    sign_up(web_service, "us", 2)
    sign_up(web_service, "ch", 1, language="de")
    r = page.get(f"/v1/campaigns/{CAMPAIGN}/counters.svg?lang=de")
    assert r.status_code == 200
    assert r.headers["content-type"] == "image/svg+xml"
    assert r.headers["cache-control"] == "public, max-age=60"
    assert r.headers["content-language"] == "de"
    assert badge_text(r) == "3 Menschen haben sich beteiligt"
    assert badge_text(page.get(f"/v1/campaigns/{CAMPAIGN}/counters.svg?section=ch&lang=de")) == (
        "1 Mensch hat sich beteiligt"
    )
    assert badge_text(page.get(f"/v1/campaigns/{CAMPAIGN}/counters.svg?section=us")) == "2 people have taken action"
    assert badge_text(page.get(f"/v1/campaigns/{CAMPAIGN}/counters.svg?lang=ru")) == "3 человека приняли участие"
    assert badge_text(page.get(f"/v1/campaigns/{CAMPAIGN}/counters.svg?section=ch&lang=fr")) == ("1 personne a agi")
    # no letter has gone yet: nobody runs a worker here
    assert badge_text(page.get(f"/v1/campaigns/{CAMPAIGN}/counters.svg?section=ch&lang=de&count=letters")) == (
        "0 Briefe verschickt"
    )
    # a section that has not had an appeal yet counts nothing, in its own language too
    assert badge_text(page.get(f"/v1/campaigns/{CAMPAIGN}/counters.svg?section=ca&lang=fr")) == "0 personne a agi"


@pytest.mark.parametrize("lang", ["xx", "es", "", "<script>alert(1)</script>", "zh-DE"])
def test_a_language_the_campaign_does_not_offer_falls_back_to_its_default(page, web_service, lang):
    sign_up(web_service, "us")
    r = page.get(f"/v1/campaigns/{CAMPAIGN}/counters.svg", params={"lang": lang})
    assert r.status_code == 200
    assert badge_text(r) == "1 person has taken action"  # the campaign's default language is English
    assert b"script" not in r.content


def test_a_browser_language_tag_is_read_by_its_language(page, web_service):
    sign_up(web_service, "ch")
    r = page.get(f"/v1/campaigns/{CAMPAIGN}/counters.svg", params={"lang": "de-CH"})
    assert badge_text(r) == "1 Mensch hat sich beteiligt"


def test_badge_is_revalidated_by_etag_and_embeddable_anywhere(page, web_service):
    sign_up(web_service, "ch")
    url = f"/v1/campaigns/{CAMPAIGN}/counters.svg?section=ch&lang=de"
    first = page.get(url)
    assert first.headers["cross-origin-resource-policy"] == "cross-origin"
    assert first.headers["x-content-type-options"] == "nosniff"
    assert page.get(url, headers={"If-None-Match": first.headers["etag"]}).status_code == 304
    sign_up(web_service, "ch")
    second = page.get(url, headers={"If-None-Match": first.headers["etag"]})
    assert second.status_code == 200
    assert badge_text(second) == "2 Menschen haben sich beteiligt"


def test_badge_refusals_are_our_error_body(page):
    r = page.get(f"/v1/campaigns/{CAMPAIGN}/counters.svg?section=zz")
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "not_found"
    r = page.get(f"/v1/campaigns/{CAMPAIGN}/counters.svg?count=votes")
    assert r.status_code == 422
    assert r.json()["error"]["fields"][0]["field"] == "count"
    assert page.get("/v1/campaigns/NOPE/counters.svg").status_code == 404


@pytest.mark.parametrize(
    ("lang", "n", "text"),
    [
        ("en", 1, "1 person has taken action"),
        ("en", 1234, "1,234 people have taken action"),
        ("de", 785, "785 Menschen haben sich beteiligt"),
        ("de", 12345, "12.345 Menschen haben sich beteiligt"),
        ("fr", 0, "0 personne a agi"),
        ("fr", 2, "2 personnes ont agi"),
        ("fr", 1234, "1\u202f234 personnes ont agi"),
        ("es", 1, "1 persona ha actuado"),
        ("es", 1234, "1234 personas han actuado"),
        ("es", 12345, "12.345 personas han actuado"),
        ("ru", 1, "1 человек принял участие"),
        ("ru", 3, "3 человека приняли участие"),
        ("ru", 11, "11 человек приняли участие"),
        ("ru", 21, "21 человек принял участие"),
        ("ru", 112, "112 человек приняли участие"),
        ("ru", 1_000_022, "1\u00a0000\u00a0022 человека приняли участие"),
    ],
)
def test_plural_forms_and_digit_grouping(lang, n, text):
    assert badge.message(badge.Count.APPEALS, n, lang) == text
    assert parse(badge.render(badge.Count.APPEALS, n, lang)).findtext(f"{SVG}text") == text


# --------------------------------------------------------------------------- the configuration


def test_origins_are_written_as_browsers_send_them():
    web = Web(origins=["HTTPS://WWW.Amnesty.CH:443/", "http://localhost:8080", "https://bücher.example"])
    assert web.origins == ["https://www.amnesty.ch", "http://localhost:8080", "https://xn--bcher-kva.example"]
    assert web.counters == web.origins


@pytest.mark.parametrize(
    ("table", "words"),
    [
        ('origins = ["*"]', "only in counter_origins"),
        ('origins = ["https://www.amnesty.ch/ua"]', "path"),
        ('origins = ["www.amnesty.ch"]', "scheme"),
        ('origins = ["https://a.example", "https://A.example/"]', "twice"),
        ('counter_origins = ["*", "https://a.example"]', "alone"),
    ],
)
def test_a_bad_web_table_names_its_file_and_key(tmp_path: Path, table: str, words: str):
    config = tmp_path / "config"
    shutil.copytree(ROOT / "config", config)
    with (config / "sections" / "ch.toml").open("a") as f:
        f.write(f"\n[web]\n{table}\n")
    with pytest.raises(ConfigError) as caught:
        load_catalog(config)
    (problem,) = caught.value.problems
    assert problem.file.endswith("ch.toml")
    assert problem.key.startswith("web.")
    assert words in problem.message


def test_a_good_web_table_loads(tmp_path: Path):
    config = tmp_path / "config"
    shutil.copytree(ROOT / "config", config)
    with (config / "sections" / "ch.toml").open("a") as f:
        f.write('\n[web]\norigins = ["https://www.amnesty.ch"]\ncounter_origins = ["*"]\n')
    web = load_catalog(config).sections["ch"].web
    assert web.origins == ["https://www.amnesty.ch"]
    assert web.counters == ["*"]
