"""bench/smtp_sink.py, plus one line per accepted message in a Message-ID log.

The chaos runs stop the sink and start a new one on the same port; the counting sink's own
duplicate count covers one process only. This wrapper keeps the sink as it is (same options,
same status file) and also appends every Message-ID to the file named by ``$CHAOS_SINK_IDS``,
so that duplicates can be counted across sink processes.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import smtp_sink  # noqa: E402
from aiosmtpd.smtp import SMTP, Envelope, Session  # noqa: E402


class LoggingHandler(smtp_sink.CountingHandler):
    def __init__(self) -> None:
        super().__init__()
        # line-buffered: a killed sink loses at most the line being written
        self._ids = open(os.environ["CHAOS_SINK_IDS"], "a", buffering=1)  # noqa: SIM115

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        reply = await super().handle_DATA(server, session, envelope)
        message_id = smtp_sink._message_id(envelope.original_content or b"")
        self._ids.write((message_id or b"-").decode(errors="replace") + "\n")
        return reply


if __name__ == "__main__":
    smtp_sink.CountingHandler = LoggingHandler
    raise SystemExit(smtp_sink.main())
