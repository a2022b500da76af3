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


def configure(level: str = "INFO", stream: Any = None) -> None:
    """JSON lines on stdout (or ``stream``); idempotent."""
    global _configured
    if _configured:
        return
    _configured = True
    logging.basicConfig(level=level, stream=stream or sys.stderr, format="%(message)s")
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            redact_personal_data,
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(sort_keys=False),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level)),
        logger_factory=structlog.PrintLoggerFactory(file=stream or sys.stdout),
        cache_logger_on_first_use=True,
    )


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)
