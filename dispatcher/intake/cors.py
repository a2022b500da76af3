"""CORS for the public read endpoints, one policy per resource.

Starlette's CORSMiddleware holds one list of origins for the whole app; ours depend on the
resource (an appeal's section, the sections of a campaign), so each endpoint asks for its own
:class:`Origins` and these helpers write the headers. Only reads are ever allowed: appeals are
posted by a section's server with its key, never by a browser, and no credentials are allowed.
"""

from __future__ import annotations

from collections.abc import Iterable, MutableMapping
from dataclasses import dataclass

from dispatcher.config.models import ANY_ORIGIN

#: what a page may do with a public read endpoint
METHODS = "GET, OPTIONS"
#: request headers a page may send: If-None-Match is how a script revalidates by ETag
ALLOWED_HEADERS = frozenset({"if-none-match", "cache-control"})
#: how long a browser may keep a preflight's answer (Chromium caps it at two hours)
PREFLIGHT_MAX_AGE = 600


@dataclass(frozen=True)
class Origins:
    """The origins whose pages may read one resource; ``any`` stands for ``*``."""

    allowed: frozenset[str] = frozenset()
    any: bool = False

    @classmethod
    def of(cls, lists: Iterable[list[str]]) -> Origins:
        """The union of several sections' lists (a campaign's counters are every section's)."""
        merged: set[str] = set()
        for origins in lists:
            merged.update(origins)
        if ANY_ORIGIN in merged:
            return cls(any=True)
        return cls(frozenset(merged))

    def allow(self, origin: str | None) -> str | None:
        """The ``Access-Control-Allow-Origin`` value for a request from ``origin``, or None."""
        if self.any:
            return "*"
        if origin is not None and origin in self.allowed:
            return origin
        return None


def add_headers(headers: MutableMapping[str, str], origins: Origins, origin: str | None) -> None:
    """The headers of an actual (not preflight) response to a request from ``origin``."""
    if not origins.any:
        # the answer differs by Origin: a shared cache must not give one page's answer to another
        headers["Vary"] = "Origin"
    allowed = origins.allow(origin)
    if allowed is not None:
        headers["Access-Control-Allow-Origin"] = allowed
        headers["Access-Control-Expose-Headers"] = "ETag"


def preflight_headers(
    origins: Origins, origin: str | None, method: str | None, requested_headers: str | None
) -> dict[str, str]:
    """The headers of the answer to ``OPTIONS``: ``Allow`` always; the CORS ones only when the
    page's origin, method and headers are all allowed (the browser then refuses the request)."""
    headers = {"Allow": METHODS}
    if not origins.any:
        headers["Vary"] = "Origin, Access-Control-Request-Method, Access-Control-Request-Headers"
    allowed = origins.allow(origin)
    if allowed is None or method is None or method.upper() != "GET":
        return headers
    asked = [h.strip().lower() for h in (requested_headers or "").split(",") if h.strip()]
    if any(h not in ALLOWED_HEADERS for h in asked):
        return headers
    headers["Access-Control-Allow-Origin"] = allowed
    headers["Access-Control-Allow-Methods"] = METHODS
    if asked:
        headers["Access-Control-Allow-Headers"] = ", ".join(asked)
    headers["Access-Control-Max-Age"] = str(PREFLIGHT_MAX_AGE)
    return headers
