"""What a letter is rendered as, by document kind: each channel names the kind it sends
(``Channel.document``), and the worker renders that kind here before handing the letter over.

The shipped kinds are ``email`` (subject, text and HTML: :class:`~dispatcher.render.letters.RenderedEmail`)
and ``fax`` (a printable PDF and a fax-ready TIFF: :class:`~dispatcher.render.fax.FaxDocument`).
A new channel reuses one of them or registers its own (docs/adding-a-channel.md).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import datetime
from typing import Any

from dispatcher.errors import DispatchError
from dispatcher.render.letters import LetterRequest, Renderer

#: renders one letter, dated ``now``
Render = Callable[[LetterRequest, datetime], Any]


class UnknownDocument(DispatchError, LookupError):
    pass


class Documents:
    def __init__(self) -> None:
        self._kinds: dict[str, Render] = {}

    def register(self, kind: str, render: Render) -> Documents:
        self._kinds[kind] = render
        return self

    def __contains__(self, kind: object) -> bool:
        return kind in self._kinds

    def render(self, kind: str, request: LetterRequest, now: datetime) -> Any:
        try:
            render = self._kinds[kind]
        except KeyError:
            raise UnknownDocument(
                f"no renderer for {kind!r} documents (known: {', '.join(sorted(self._kinds))})"
            ) from None
        return render(request, now)


class LazyFaxRenderer:
    """The fax renderer, imported on the first fax: WeasyPrint costs an email-only worker about
    30 MB and a second of start-up for nothing."""

    def __init__(self, renderer: Renderer):
        self._renderer = renderer
        self._fax: Any = None
        self._lock = threading.Lock()

    def render(self, req: LetterRequest, *, sent_at: datetime) -> Any:
        if self._fax is None:
            with self._lock:
                if self._fax is None:
                    from dispatcher.render.fax import FaxRenderer

                    self._fax = FaxRenderer(self._renderer)
        return self._fax.render(req, sent_at=sent_at)


def standard_documents(renderer: Renderer) -> Documents:
    fax = LazyFaxRenderer(renderer)
    return (
        Documents()
        .register("email", lambda request, _now: renderer.render_email(request))
        .register("fax", lambda request, now: fax.render(request, sent_at=now))
    )
