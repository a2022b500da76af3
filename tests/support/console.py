"""The operators' console in tests: accounts in the test's ledger, signing in with an HTTP client
(TestClient or httpx) and with a real browser.

* :func:`add_operator` — an account of a role and sections, with a known password;
* :func:`sign_in` — the sign-in form filled and sent as a browser does (its double-submit
  token read from the page), returning the answer;
* :func:`csrf_of` — the CSRF token of the forms on a page (to post forms as the page would);
* :func:`tables` — a page's tables as rows of cell texts, to check what a page shows;
* fixtures ``browser`` (headless Debian chromium through Playwright), ``console_api`` (the API
  on a loopback port, as a LiveApi) and ``console_page`` (a factory: a browser page signed in as
  a new operator of the given role and sections). Import the fixtures into a test module::

      from tests.support.console import browser, console_api, console_page  # noqa: F401
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from html.parser import HTMLParser
from typing import Any

import pytest

from dispatcher.app import Service

CHROMIUM = "/usr/bin/chromium"
# No internet here: without the background-networking switches Chromium calls Google's hosts.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

_CSRF = re.compile(r'name="csrf" value="([^"]+)"')


@dataclass(frozen=True)
class Account:
    name: str
    password: str
    role: str
    sections: tuple[str, ...]


def add_operator(service: Service, role: str, sections: tuple[str, ...] = (), name: str | None = None) -> Account:
    name = name or f"{role}-{'-'.join(sections) or 'all'}-{secrets.token_hex(3)}"
    password = secrets.token_urlsafe(16)
    service.ledger.operators.add(
        name, password, role=role, sections=sections, now=datetime.now(UTC), actor="test", known_sections=None
    )
    return Account(name, password, role, sections)


def signed_in(client: Any, service: Service, role: str, sections: tuple[str, ...] = ()) -> Account:
    """``client`` signed in as a new operator of ``role`` (and ``sections``): its account."""
    client.cookies.clear()
    account = add_operator(service, role, sections)
    assert sign_in(client, account).status_code == 303
    return account


def submit_appeal(service: Service, section: str = "us", **supporter: str) -> Any:
    """An appeal through ``section``'s form (ch's in German, from Switzerland), in process."""
    from tests.conftest import appeal_body

    body = appeal_body(section=section, language="de" if section == "ch" else "en")
    if section == "ch":
        body["supporter"]["country"] = "CH"
    body["supporter"].update(supporter)
    return service.intake.submit(body)


def csrf_of(html: str) -> str:
    found = _CSRF.search(html)
    assert found is not None, "no form with a CSRF token on this page"
    return found.group(1)


class _Tables(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: Any) -> None:
        if tag == "table":
            self.tables.append([])
        elif tag == "tr" and self.tables:
            self.tables[-1].append([])
        elif tag in ("td", "th") and self.tables:
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None and self.tables and self.tables[-1]:
            self.tables[-1][-1].append(" ".join("".join(self._cell).split()))
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def tables(html: str) -> list[list[list[str]]]:
    """Every table of ``html``: a list of rows, each a list of its cells' text (spaces folded)."""
    parser = _Tables()
    parser.feed(html)
    return parser.tables


def row(html: str, first_cell: str) -> list[str] | None:
    """The first table row whose first cell reads ``first_cell``."""
    for table in tables(html):
        for cells in table:
            if cells and cells[0] == first_cell:
                return cells
    return None


def sign_in(client: Any, account: Account | None = None, *, name: str = "", password: str = "") -> Any:
    """Open the sign-in page and send its form; the client keeps the cookies. Redirects are not
    followed: a success answers 303 to the overview."""
    page = client.get("/console/login")
    form = {
        "name": account.name if account else name,
        "password": account.password if account else password,
        "csrf": csrf_of(page.text),
        "next": "/console/",
    }
    return client.post("/console/login", data=form, follow_redirects=False)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def console_api(service: Service) -> Iterator[Any]:
    """The service's API (with the console) on a loopback port."""
    from tests.support.services import free_port
    from tests.support.web import LiveApi

    with LiveApi(service, free_port()) as api:
        yield api


@pytest.fixture
def console_page(browser: Any, console_api: Any, service: Service) -> Iterator[Callable[..., Any]]:
    """``console_page(role, sections=())``: a new browser page signed in to the console as a new
    operator of ``role`` and ``sections`` (made in the test's ledger), on the overview. The page
    has ``page.account`` (the :class:`Account`) and ``page.console`` (the console's URL)."""
    contexts = []

    def open_page(role: str = "admin", sections: tuple[str, ...] = ()) -> Any:
        account = add_operator(service, role, sections)
        context = browser.new_context()
        contexts.append(context)
        page = context.new_page()
        page.goto(f"{console_api.url}/console/")
        page.fill("input[name=name]", account.name)
        page.fill("input[name=password]", account.password)
        page.click("button[type=submit]")
        page.wait_for_url(f"{console_api.url}/console/")
        page.account = account
        page.console = f"{console_api.url}/console"
        return page

    yield open_page
    for context in contexts:
        context.close()
