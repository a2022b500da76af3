"""Structured JSON logs: one event per state change, never a supporter's personal data.

The delivery log names supporters only by ``supporter_ref`` (a keyed hash of their email).
As a safety net, a processor replaces any field whose name suggests personal data, so a
careless ``log.info(..., email=...)`` cannot leak it.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

#: field names that hold, or may hold, personal data
PERSONAL_FIELDS = frozenset(
    {
        "name",
        "email",
        "supporter",
        "supporter_name",
        "supporter_email",
        "reply_to",
        "message",
        "personal_message",
        "address",
        "city",
        "body",
        "payload",
    }
)


def redact_personal_data(_logger: Any, _method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key in PERSONAL_FIELDS.intersection(event):
        event[key] = "[redacted]"
    return event


_configured = False


#: chatty libraries: their INFO lines are per connection, per migration step, per step of
#: every fax rendered (WeasyPrint's "Step 4 - Creating layout", fontTools' subsetting) or
#: (flufl.bounce) per detector tried on each bounce
QUIET_LOGGERS = ("mail.log", "alembic", "aiosmtpd", "uvicorn.access", "weasyprint", "fontTools", "flufl.bounce")


def configure(level: str = "INFO", stream: Any = None) -> None:
    """JSON lines on stdout (or ``stream``) for our events and for stdlib loggers; idempotent."""
    global _configured
    if _configured:
        return
    _configured = True
    out = stream or sys.stdout
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        redact_personal_data,
    ]
    # Records from dramatiq, uvicorn and friends come out as the same JSON lines as ours.
    handler = logging.StreamHandler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                structlog.processors.JSONRenderer(),
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, structlog.processors.JSONRenderer()],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level)),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        # Not cached: a cached logger keeps its first configuration for good, which would make
        # reconfiguring (tests capturing events) silently miss loggers already used.
        cache_logger_on_first_use=False,
    )


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)
