"""Pages on other origins: a catalog whose sections allow some origins, and a static site."""

from __future__ import annotations

import dataclasses
import functools
import http.server
import threading
from pathlib import Path

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
