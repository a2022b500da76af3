"""A letter as it is (or was) rendered, for the console: rendered on demand from the ledger's data
with the templates the worker uses (:func:`dispatcher.queue.deliver.letter_request`), dated the day
it was sent (or today, for a letter still to go).

An email shows its subject, text and HTML; a fax its pages as PNG, drawn from the fax PDF the way
the fax TIFF is (1728 pixels wide, black and white). The supporter's personal data is in the
letter: only the letter page shows it, to operators who see its section. A letter whose appeal's
personal data was erased or purged has nothing to show, and says so.
"""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from dispatcher.channels.registry import Channels
from dispatcher.config.catalog import Catalog
from dispatcher.ledger.store import Ledger
from dispatcher.ledger.views import DeliveryView
from dispatcher.queue.deliver import NoLetter, letter_request
from dispatcher.render.documents import Documents
from dispatcher.render.letters import RenderedEmail


@dataclass(frozen=True)
class EmailPreview:
    subject: str
    text: str
    html: str
    language: str


@dataclass(frozen=True)
class FaxPreview:
    #: pages including the cover, each served as PNG by :meth:`Previews.fax_page`
    pages: int


@dataclass(frozen=True)
class Unavailable:
    """Why no letter can be shown."""

    why: str


Preview = EmailPreview | FaxPreview | Unavailable

#: fax previews kept rendered (WeasyPrint takes a second or so per letter)
_KEEP = 16


class Previews:
    def __init__(self, *, catalog: Catalog, ledger: Ledger, channels: Channels, documents: Documents):
        self.catalog = catalog
        self.ledger = ledger
        self.channels = channels
        self.documents = documents
        self._pngs: OrderedDict[tuple[str, str], list[bytes]] = OrderedDict()
        self._lock = threading.Lock()

    def of(self, view: DeliveryView, now: datetime) -> Preview:
        document = self._render(view, now)
        if isinstance(document, Unavailable):
            return document
        if isinstance(document, RenderedEmail):
            return EmailPreview(document.subject, document.text, document.html, document.language)
        pages = getattr(document, "pages", None)
        if isinstance(pages, int):
            self._keep(view, now, document)
            return FaxPreview(pages)
        return Unavailable(f"no preview for {type(document).__name__} documents")

    def fax_page(self, view: DeliveryView, page: int, now: datetime) -> bytes | None:
        """Page ``page`` (1-based) of a fax letter as PNG; None if it has no such page."""
        key = self._key(view, now)
        with self._lock:
            pngs = self._pngs.get(key)
        if pngs is None:
            document = self._render(view, now)
            if isinstance(document, Unavailable) or not hasattr(document, "pdf"):
                return None
            pngs = self._keep(view, now, document)
        return pngs[page - 1] if 1 <= page <= len(pngs) else None

    # ------------------------------------------------------------------ internals

    def _render(self, view: DeliveryView, now: datetime) -> Any:
        campaign = self.catalog.campaigns.get(view.campaign)
        section = self.catalog.sections.get(view.section)
        if campaign is None or section is None:
            return Unavailable(f"campaign {view.campaign} / section {view.section} is no longer configured")
        try:
            target = self.catalog.target(view.campaign, view.section, view.target)
            kind = self.channels.kind(view.channel).document
        except LookupError:  # KeyError, UnknownChannel
            return Unavailable(f"target {view.target} or channel {view.channel} is no longer configured")
        built = letter_request(
            self.catalog,
            self.ledger,
            delivery_id=view.id,
            kind=view.kind,
            appeal_id=view.appeal_id,
            supporter=self.ledger.views.supporter(view.appeal_id) if view.appeal_id else None,
            campaign=view.campaign,
            section=section,
            target=target,
            language=view.language,
            now=self._dated(view, now),
        )
        if isinstance(built, NoLetter):
            if view.kind == "digest":
                return Unavailable(built.why)
            return Unavailable("the supporter's personal data was erased or purged: the letter can no longer be shown")
        _sender, request = built
        return self.documents.render(kind, request, self._dated(view, now))

    @staticmethod
    def _dated(view: DeliveryView, now: datetime) -> datetime:
        return view.sent_at or now

    @staticmethod
    def _key(view: DeliveryView, now: datetime) -> tuple[str, str]:
        return view.id, Previews._dated(view, now).date().isoformat()

    def _keep(self, view: DeliveryView, now: datetime, document: Any) -> list[bytes]:
        from dispatcher.render.faxraster import rasterise

        pngs = []
        for image in rasterise(document.pdf):
            out = io.BytesIO()
            image.save(out, format="PNG", optimize=True)
            pngs.append(out.getvalue())
        with self._lock:
            self._pngs[self._key(view, now)] = pngs
            while len(self._pngs) > _KEEP:
                self._pngs.popitem(last=False)
        return pngs
