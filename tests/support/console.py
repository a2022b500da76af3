"""The operators' console in tests: accounts in the test's ledger, signing in with an HTTP client
(TestClient or httpx) and with a real browser.

* :func:`add_operator` — an account of a role and sections, with a known password;
* :func:`sign_in` — the sign-in form filled and sent as a browser does (its double-submit
  token read from the page), returning the answer;
* :func:`csrf_of` — the CSRF token of the forms on a page (to post forms as the page would);
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


def csrf_of(html: str) -> str:
    found = _CSRF.search(html)
    assert found is not None, "no form with a CSRF token on this page"
    return found.group(1)


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
