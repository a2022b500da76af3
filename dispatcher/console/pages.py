"""Rendering the console's pages: the templates, flash messages, redirects after a form.

Every page extends ``templates/base.html`` (navigation, who is signed in, flash messages). A page
handler returns ``render(request, "x.html", key=value, ...)``; a form handler acts and returns
``redirect(path, flash="what happened")`` (303, so a reload does not post again), and the next page
shows the message once. Templates get ``prefix`` (``/console``), ``operator`` (None on the sign-in
page) and ``csrf`` (the token every POST form carries: ``{{ csrf_field() }}``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

from fastapi import Request
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.templating import Jinja2Templates
from markupsafe import Markup

from dispatcher.console.context import PREFIX

templates = Jinja2Templates(directory=str(Path(__file__).parent / "templates"))

FLASH_COOKIE = "dispatch_console_flash"


def _csrf_field(token: str) -> Markup:
    return Markup('<input type="hidden" name="csrf" value="{}">').format(token)


def render(request: Request, template: str, *, status: int = 200, **context: Any) -> HTMLResponse:
    """``template`` with the layout's context; a flash message waiting in its cookie is shown and
    cleared."""
    operator = getattr(request.state, "operator", None)
    csrf = context.pop("csrf", None) or (operator.csrf if operator is not None else "")
    flash = _read_flash(request)
    response = templates.TemplateResponse(
        request,
        template,
        {
            "prefix": PREFIX,
            "operator": operator,
            "csrf": csrf,
            "csrf_field": lambda: _csrf_field(csrf),
            "flash": flash,
            **context,
        },
        status_code=status,
    )
    if flash is not None:
        response.delete_cookie(FLASH_COOKIE, path=PREFIX)
    return response


def redirect(path: str, *, flash: str | None = None, error: bool = False) -> RedirectResponse:
    """A 303 to ``path`` (under the console unless it starts with it), with a message for the next
    page."""
    target = path if path.startswith(PREFIX) else PREFIX + path
    response = RedirectResponse(target, status_code=303)
    if flash:
        response.set_cookie(
            FLASH_COOKIE,
            quote(("error|" if error else "ok|") + flash[:500]),
            path=PREFIX,
            httponly=True,
            samesite="strict",
            max_age=60,
        )
    return response


def _read_flash(request: Request) -> dict[str, str] | None:
    raw = request.cookies.get(FLASH_COOKIE)
    if not raw:
        return None
    kind, _, text = unquote(raw).partition("|")
    return {"kind": "error" if kind == "error" else "ok", "text": text}
