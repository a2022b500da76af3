"""Intake: for Python web apps, ``submit_appeal`` does what ``POST /v1/appeals`` does, without HTTP.

    from dispatcher.intake import submit_appeal
    accepted = submit_appeal({"campaign": "UA-002-19", "section": "us", ...})
    accepted.appeal_id

It raises the same errors the API turns into statuses (dispatcher.errors.IntakeError and its
subclasses: ValidationFailed 422, DuplicateAppeal 409, CampaignClosed 410); ``exc.body()`` is
the API's error body. No signature is needed: the caller runs inside the trusted process.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dispatcher.app import Service
    from dispatcher.intake.service import Accepted

_default: Service | None = None
_lock = threading.Lock()


def submit_appeal(payload: Mapping[str, Any], *, service: Service | None = None) -> Accepted:
    """Validate and record one appeal, then offer its letters to the queue."""
    global _default
    if service is None:
        with _lock:
            if _default is None:
                from dispatcher.app import Service
                from dispatcher.settings import Settings

                _default = Service(Settings.from_env())
        service = _default
    return service.intake.submit(payload)
