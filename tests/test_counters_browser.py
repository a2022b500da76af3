"""A section's page in a real browser: headless Chromium (Debian's, driven by Playwright) loads a
static page served on another origin than the API; the page embeds the counters' badge with one
``<img>`` and reads the counters and an appeal's letters with ``fetch()``. A page on an origin
the section does not allow can still show the badge, but the browser refuses it the appeal."""

from __future__ import annotations

from pathlib import Path

import pytest
from playwright.sync_api import Browser

from dispatcher.app import Service
from dispatcher.config.models import Web
from tests.conftest import appeal_body
from tests.support.console import browser  # noqa: F401 (a fixture)
from tests.support.services import free_port
from tests.support.web import LiveApi, StaticSite, with_web

CAMPAIGN = "UA-002-19-DEMO"
PAGE = """<!doctype html>
<html lang="de"><head><meta charset="utf-8"><title>Urgent Action</title></head>
<body>
<img id="badge" alt="Beteiligung" src="{api}/v1/campaigns/{campaign}/counters.svg?section=ch&amp;lang=de">
<p>Menschen: <span id="appeals">…</span></p>
<p>Status: <span id="status">…</span></p>
<script>
async function show(id, url, pick) {{
  const out = document.getElementById(id);
  try {{
    const r = await fetch(url);
    out.textContent = pick(await r.json());
  }} catch (e) {{
    out.textContent = "refused: " + e.name;
  }}
}}
window.done = Promise.all([
  show("appeals", "{api}/v1/campaigns/{campaign}/counters", b => b.appeals + "/" + b.by_section.ch.appeals),
  show("status", "{api}/v1/appeals/{appeal}", b => b.deliveries.length + " Briefe"),
]);
</script>
</body></html>
"""


@pytest.fixture
def database_url(sqlite_url: str) -> str:
    return sqlite_url


def test_a_page_on_another_origin_shows_the_badge_and_reads_the_counters(
    browser: Browser,  # noqa: F811 (the fixture imported above)
    settings,
    environ,
    tmp_path: Path,
) -> None:
    site_port = free_port()
    # One static server, two origins: http://localhost:P is Switzerland's page, http://127.0.0.1:P
    # (same port, other host) is a page Switzerland never listed.
    allowed = f"http://localhost:{site_port}"
    stranger = f"http://127.0.0.1:{site_port}"
    configured = Service(settings, environ=environ).catalog
    catalog = with_web(configured, {"ch": Web(origins=[allowed], counter_origins=["*"])})
    service = Service(settings, environ=environ, catalog_override=catalog)
    service.ledger.migrate()
    appeal = service.intake.submit(appeal_body(section="ch", language="de")).appeal_id
    service.intake.submit(appeal_body(section="us"))

    with LiveApi(service, free_port()) as api:
        site = tmp_path / "site"
        site.mkdir()
        (site / "index.html").write_text(PAGE.format(api=api.url, campaign=CAMPAIGN, appeal=appeal), encoding="utf-8")
        with StaticSite(site, site_port):
            shown = {}
            for origin in (allowed, stranger):
                page = browser.new_page()
                page.goto(f"{origin}/index.html")
                page.evaluate("window.done")
                page.wait_for_function("document.getElementById('badge').complete")
                shown[origin] = {
                    "badge": page.evaluate("document.getElementById('badge').naturalWidth"),
                    "appeals": page.inner_text("#appeals"),
                    "status": page.inner_text("#status"),
                }
                page.close()
    service.ledger.dispose()

    letters = len(catalog.routes("UA-002-19", "ch"))
    assert shown[allowed]["badge"] > 0
    assert shown[allowed]["appeals"] == "2/1"
    assert shown[allowed]["status"] == f"{letters} Briefe"
    # any page may show the badge and read the counters (counter_origins = ["*"]) ...
    assert shown[stranger]["badge"] > 0
    assert shown[stranger]["appeals"] == "2/1"
    # ... but the browser keeps the appeal's letters from a page Switzerland did not list
    assert shown[stranger]["status"] == "refused: TypeError"
