"""Pages on other origins: a catalog whose sections allow some origins, and a static site."""

from __future__ import annotations

import dataclasses
import functools
import http.server
import threading
from pathlib import Path

import uvicorn

from dispatcher.app import Service
from dispatcher.config.catalog import Catalog
from dispatcher.config.models import Web


def with_web(catalog: Catalog, webs: dict[str, Web]) -> Catalog:
    """``catalog`` with the sections' ``[web]`` tables replaced by ``webs`` (the others: none)."""
    sections = {code: s.model_copy(update={"web": webs.get(code, Web())}) for code, s in catalog.sections.items()}
    return dataclasses.replace(catalog, sections=sections)


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


class StaticSite:
    """A directory served over HTTP on a loopback port, as a section's web server would."""

    def __init__(self, root: Path, port: int):
        handler = functools.partial(_Quiet, directory=str(root))
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> StaticSite:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


class LiveApi:
    """Our API as a real HTTP server on a loopback port (uvicorn in a thread), for clients that
    must reach it over HTTP: gateways calling back, browsers, other interpreters."""

    def __init__(self, service: Service, port: int):
        self.server = uvicorn.Server(uvicorn.Config(service.api(), host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = f"http://127.0.0.1:{port}"

    def __enter__(self) -> LiveApi:
        from tests.conftest import wait_for

        self.thread.start()
        wait_for(lambda: self.server.started, timeout=10)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)
