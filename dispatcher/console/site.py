"""The console as an ASGI app of its own, mounted by the API under ``/console``.

An app of its own so that its refusals are pages, not the API's JSON errors: a
:class:`~dispatcher.errors.ConsoleError` becomes a page saying what happened with its status
(404 looks the same for "does not exist" and "not yours"), a missing session becomes a redirect to
the sign-in page. Every answer carries headers that keep it out of frames and caches, and a
Content-Security-Policy that allows only this origin's own files (no script is needed).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.responses import RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from dispatcher.console import audit, auth, campaigns, channels, letters, overview, supporters
from dispatcher.console.context import PREFIX, ConsoleContext
from dispatcher.console.pages import render
from dispatcher.console.scope import NOT_FOUND, SignInRequired
from dispatcher.errors import ConsoleError

#: the largest form body the console reads
MAX_FORM_BYTES = 64 * 1024

_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}


def create_console(ctx: ConsoleContext) -> FastAPI:
    app = FastAPI(title="Operators' console", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.console = ctx

    @app.middleware("http")
    async def _headers(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > MAX_FORM_BYTES:
            # a console form is a few fields; refused before it is read (the sign-in form is
            # open to anyone)
            response: Response = render(
                request, "error.html", status=413, title="Form too large", message="This form is too large."
            )
        else:
            response = await call_next(request)
        for name, value in _HEADERS.items():
            response.headers.setdefault(name, value)
        if not request.url.path.startswith(PREFIX + "/static/"):
            # pages show the ledger as it is now, and to whoever is signed in
            response.headers.setdefault("Cache-Control", "no-store")
        return response

    @app.exception_handler(SignInRequired)
    async def _sign_in(request: Request, _exc: SignInRequired) -> Response:
        back = request.url.path if request.method == "GET" else PREFIX + "/"
        if request.url.query and request.method == "GET":
            back += "?" + request.url.query
        return RedirectResponse(f"{PREFIX}/login?next={quote(back, safe='/')}", status_code=303)

    @app.exception_handler(ConsoleError)
    async def _refused(request: Request, exc: ConsoleError) -> Response:
        headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after else None
        response = render(request, "error.html", status=exc.status, title=exc.title, message=exc.message)
        if headers:
            response.headers.update(headers)
        return response

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> Response:
        if exc.status_code == 404:
            return render(request, "error.html", status=404, title="Not found", message=NOT_FOUND)
        return render(request, "error.html", status=exc.status_code, title="Not possible", message=str(exc.detail))

    app.mount("/static", StaticFiles(directory=str(Path(__file__).parent / "static")), name="static")
    app.include_router(auth.router)
    app.include_router(overview.router)
    app.include_router(channels.router)
    app.include_router(audit.router)
    app.include_router(campaigns.router)
    app.include_router(letters.router)
    app.include_router(supporters.router)
    return app
