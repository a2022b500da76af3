"""Bounces that land in a mailbox: read them over IMAP and hand each one, raw, to a handler.

Some sections cannot point their bounce domain's MX at our SMTP listener; their bounces (DSNs,
out-of-office replies, whatever comes back to the letters' return path) land in a mailbox
instead. Set that up as follows:

* A **dedicated** mailbox (its own user on the section's IMAP server) that receives the bounce
  domain's mail and nothing else: every message in the watched folder is treated as a bounce
  and deleted once handled, so a person's mail must never arrive there.
* Give us host, port, TLS mode ("implicit" for port 993, "starttls" for 143; "none" only on a
  trusted network, since the password then travels in clear), user, password and folder
  (INBOX by default). ``ca_file`` adds CAs beside the system bundle for a private CA.

What happens to a message, on each :meth:`BounceMailbox.poll`:

* It is found by ``UID SEARCH UNDELETED`` (and ``UNKEYWORD $DispatchFailed`` where the server
  allows keywords), oldest first, at most ``limit`` a poll.
* It is fetched by UID with ``BODY.PEEK[]<0.max_bytes>`` and ``RFC822.SIZE``: never more than
  ``max_bytes`` of it is read (a 10 MB bounce costs us 1 MiB, not 10), and the handler is told
  whether it was cut. PEEK leaves the message's flags alone, so a failure changes nothing.
* Handler returned: the message is flagged ``\\Deleted`` and expunged at the end of the poll
  (``UID EXPUNGE`` where the server has UIDPLUS; else a plain ``EXPUNGE``). Every message
  flagged ``\\Deleted`` in the folder is expunged then: if we died between flag and expunge,
  the next poll skips the flagged message and removes it. (The folder is dedicated to bounces:
  nothing flagged there is anyone's to keep. No "Processed" folder: what a handled bounce said
  is in the ledger, and copies in the mailbox would only grow until someone emptied it.)
* Handler raised: the message stays where it is and is offered again on the next poll, after
  every message that has not failed, so it never holds up the others; the error is logged by
  uid, size and exception type only (a bounce quotes our letter, and so a supporter's personal
  data). A failure counts against the message only in a poll where the handler took some other
  message (when it takes none, the handler itself is likely down, say the ledger's database,
  and no bounce is to blame). After ``max_failures`` such failures in this process the message
  is set aside: keyword ``$DispatchFailed``, left in the mailbox for an operator, no longer
  offered. Nothing is ever deleted unhandled.

Delivery to the handler is at least once: a crash between the handler's return and the
``\\Deleted`` flag, or two pollers on one mailbox, can hand a message over twice. The handler
must therefore be idempotent (recording the same bounce twice is the same fact), which is
cheaper and more robust than claiming messages through IMAP, where a crashed claimer's claim
would never expire.

imaplib blocks: run :meth:`poll` in a thread (``asyncio.to_thread``) or :meth:`run_forever` in a
thread of its own. Folder names are taken as ASCII (no modified UTF-7).
"""

from __future__ import annotations

import contextlib
import imaplib
import re
import ssl
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from dispatcher.config.models import BounceMailbox as MailboxConfig
from dispatcher.errors import MailboxError, MailboxFolderMissing, MailboxLoginRefused
from dispatcher.logging import get_logger

log = get_logger(__name__)

TlsMode = Literal["implicit", "starttls", "none"]

#: receives the message's first ``max_bytes`` and whether it was cut there
BounceHandler = Callable[[bytes, bool], None]

FAILED_KEYWORD = "$DispatchFailed"

_UID_RE = re.compile(rb"\bUID (\d+)")
_SIZE_RE = re.compile(rb"\bRFC822\.SIZE (\d+)")
_UIDVALIDITY_RE = re.compile(rb"\d+")
# A long EXPUNGE or STORE line is refused by some servers past ~8 kB: send UIDs in slices.
_UID_SLICE = 500


@dataclass
class PollResult:
    """What one poll did; counts of messages."""

    #: messages found waiting (before the per-poll limit)
    found: int = 0
    #: handed over and deleted
    handled: int = 0
    #: the handler raised: left in the mailbox for the next poll
    failed: int = 0
    #: failed ``max_failures`` times (counted as the module says): flagged, no longer offered
    set_aside: int = 0
    #: handed over cut at ``max_bytes``
    truncated: int = 0
    #: the limit was reached with messages still waiting: poll again now
    more: bool = False


class BounceMailbox:
    """One folder of one IMAP account whose messages are bounces."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        username: str,
        password: str,
        tls: TlsMode = "implicit",
        folder: str = "INBOX",
        ca_file: str | None = None,
        timeout: float = 30.0,
        max_bytes: int = 1024 * 1024,
        limit: int = 200,
        max_failures: int = 5,
    ) -> None:
        if tls not in ("implicit", "starttls", "none"):
            raise ValueError(f"tls must be 'implicit', 'starttls' or 'none', not {tls!r}")
        if max_bytes < 1 or limit < 1 or max_failures < 1:
            raise ValueError("max_bytes, limit and max_failures must be at least 1")
        self.host = host
        self.port = port
        self.username = username
        self.tls: TlsMode = tls
        self.folder = folder
        self.ca_file = ca_file
        self.timeout = timeout
        self.max_bytes = max_bytes
        self.limit = limit
        self.max_failures = max_failures
        self._password = password
        #: (uidvalidity, uid) -> handler failures in this process
        self._failures: dict[tuple[int, int], int] = {}

    @classmethod
    def from_config(
        cls, config: MailboxConfig, *, username: str, password: str, config_dir: Path, timeout: float = 30.0
    ) -> BounceMailbox:
        """The mailbox a section's ``[bounces.imap]`` table names (``ca_file`` relative to the
        config directory unless absolute); the credentials come from the variables it names."""
        ca_file = config.ca_file
        if ca_file is not None and not Path(ca_file).is_absolute():
            ca_file = str(config_dir / ca_file)
        return cls(
            config.host,
            config.port,
            username=username,
            password=password,
            tls=config.tls,
            folder=config.folder,
            ca_file=ca_file,
            timeout=timeout,
        )

    def __repr__(self) -> str:
        return f"<BounceMailbox {self.username}@{self.host}:{self.port}/{self.folder} tls={self.tls}>"

    # ------------------------------------------------------------------ checking

    def check(self) -> int:
        """Log in, open the folder read-only (EXAMINE) and log out: the number of messages in
        it. Touches no message and no flag, so ``dispatcher preflight`` may run it while a
        poller works the same folder. Raises :class:`MailboxError` as :meth:`poll` does."""
        with self._session() as imap:
            typ, data = imap.select(_quote(self.folder), readonly=True)
            if typ != "OK":
                raise self._folder_missing(data)
            count = data[0] if data else None
            return int(count) if isinstance(count, bytes) and count.isdigit() else 0

    # ------------------------------------------------------------------ polling

    def poll(self, handle: BounceHandler) -> PollResult:
        """Hand every waiting message (up to ``limit``) to ``handle``; delete those it took.

        Raises :class:`MailboxError` when the server cannot be reached or used; what was
        handled before that stays handled (flagged, expunged on the next poll).
        """
        result = PollResult()
        with self._session() as imap:
            uidvalidity = self._select(imap)
            keywords = self._keywords_allowed(imap)
            uids = self._waiting(imap, uidvalidity, keywords)
            result.found = len(uids)
            result.more = len(uids) > self.limit
            done: list[int] = []
            failed: list[int] = []
            for uid in uids[: self.limit]:
                outcome = self._one(imap, uidvalidity, uid, handle, result)
                if outcome is True:
                    done.append(uid)
                elif outcome is False:
                    failed.append(uid)
            if result.handled:
                self._count_failures(imap, uidvalidity, failed, keywords, result)
            self._expunge(imap, done)
        # a pulse line only when there was something: an idle mailbox polled every minute
        # would otherwise fill the log with nothing
        (log.info if result.found else log.debug)(
            "imap.polled",
            host=self.host,
            folder=self.folder,
            found=result.found,
            handled=result.handled,
            failed=result.failed,
            set_aside=result.set_aside,
            truncated=result.truncated,
        )
        return result

    def run_forever(
        self,
        handle: BounceHandler,
        interval: float,
        stop_event: threading.Event,
        *,
        max_backoff: float = 300.0,
    ) -> None:
        """Poll every ``interval`` seconds until ``stop_event`` is set.

        An unusable server (down, login refused, TLS broken) is logged and tried again after a
        doubling wait, capped at ``max_backoff``. A full poll (``more``) that handled something
        is followed at once by the next. Errors of the handler never reach here: :meth:`poll`
        keeps those messages.
        """
        outages = 0
        while not stop_event.is_set():
            try:
                result = self.poll(handle)
            except MailboxError as exc:
                outages += 1
                wait = min(max(interval, 1.0) * 2 ** min(outages - 1, 16), max(max_backoff, interval))
                log.error(
                    "imap.poll_failed",
                    host=self.host,
                    port=self.port,
                    user=self.username,
                    error=str(exc),
                    error_type=type(exc).__name__,
                    outages=outages,
                    retry_in=wait,
                )
                stop_event.wait(wait)
                continue
            if outages:
                log.info("imap.recovered", host=self.host, port=self.port, outages=outages)
                outages = 0
            # straight on only while the backlog moves: a handler that takes nothing (its
            # database down) must not turn this into a tight loop against the server
            if not (result.more and result.handled):
                stop_event.wait(interval)

    # ------------------------------------------------------------------ one message

    def _one(
        self, imap: imaplib.IMAP4, uidvalidity: int, uid: int, handle: BounceHandler, result: PollResult
    ) -> bool | None:
        """Fetch and hand over one message: True when handled (flagged for deletion), False
        when the handler raised, None when the message was gone before we could read it."""
        fetched = self._fetch(imap, uid)
        if fetched is None:  # another poller, or a person, took it meanwhile
            return None
        raw, size = fetched
        truncated = len(raw) < size
        if truncated:
            result.truncated += 1
            log.warning("imap.bounce_truncated", uid=uid, size=size, read=len(raw))
        try:
            handle(raw, truncated)
        except Exception as exc:  # noqa: BLE001 - the handler's bug or bad input: keep the message, go on
            # present, even at 0, puts it behind the messages that never failed
            self._failures.setdefault((uidvalidity, uid), 0)
            result.failed += 1
            # The exception's text may quote the bounce (and so a supporter): its type only.
            log.error("imap.bounce_failed", uid=uid, size=size, error_type=type(exc).__name__)
            return False
        self._failures.pop((uidvalidity, uid), None)
        self._command(imap, "UID STORE", "STORE", str(uid), "+FLAGS.SILENT", r"(\Deleted)")
        result.handled += 1
        log.info("imap.bounce_handled", uid=uid, size=size, truncated=truncated)
        return True

    def _count_failures(
        self, imap: imaplib.IMAP4, uidvalidity: int, uids: list[int], keywords: bool, result: PollResult
    ) -> None:
        """Called only after a poll in which the handler took something: these failures are the
        messages' own."""
        for uid in uids:
            key = (uidvalidity, uid)
            failures = self._failures.get(key, 0) + 1
            self._failures[key] = failures
            if failures < self.max_failures:
                continue
            if keywords:
                self._command(imap, "UID STORE", "STORE", str(uid), "+FLAGS.SILENT", f"({FAILED_KEYWORD})")
            result.set_aside += 1
            log.error("imap.bounce_set_aside", uid=uid, failures=failures, keyword=FAILED_KEYWORD if keywords else None)

    def _fetch(self, imap: imaplib.IMAP4, uid: int) -> tuple[bytes, int] | None:
        data = self._command(imap, "UID FETCH", "FETCH", str(uid), f"(UID RFC822.SIZE BODY.PEEK[]<0.{self.max_bytes}>)")
        # The answer may carry unsolicited FETCH lines for other messages (flag changes made by
        # another session): take the one whose UID is ours. Its non-literal parts (UID, size)
        # may come before or after the literal, so both sides are read.
        for index, item in enumerate(data):
            if not isinstance(item, tuple):
                continue
            head, literal = item
            tail = data[index + 1] if index + 1 < len(data) else b""
            meta = head + (tail if isinstance(tail, bytes) else b"")
            found_uid = _UID_RE.search(meta)
            found_size = _SIZE_RE.search(meta)
            if found_uid is None or int(found_uid.group(1)) != uid:
                continue
            raw = bytes(literal)
            size = int(found_size.group(1)) if found_size else len(raw)
            return raw, size
        return None

    # ------------------------------------------------------------------ mailbox

    def _select(self, imap: imaplib.IMAP4) -> int:
        typ, data = imap.select(_quote(self.folder))
        if typ != "OK":
            raise self._folder_missing(data)
        _, validity = imap.response("UIDVALIDITY")
        found = _UIDVALIDITY_RE.search(validity[0]) if validity and isinstance(validity[0], bytes) else None
        return int(found.group(0)) if found else 0

    @staticmethod
    def _keywords_allowed(imap: imaplib.IMAP4) -> bool:
        _, flags = imap.response("PERMANENTFLAGS")
        return bool(flags) and isinstance(flags[0], bytes) and b"\\*" in flags[0]

    def _waiting(self, imap: imaplib.IMAP4, uidvalidity: int, keywords: bool) -> list[int]:
        criteria = ["UNDELETED"]
        if keywords:
            criteria += ["UNKEYWORD", FAILED_KEYWORD]
        data = self._command(imap, "UID SEARCH", "SEARCH", *criteria)
        uids = [int(u) for chunk in data if isinstance(chunk, bytes) for u in chunk.split()]
        if not keywords:  # set aside in memory only: the server cannot keep the mark
            uids = [u for u in uids if self._failures.get((uidvalidity, u), 0) < self.max_failures]
        # oldest first, but those that failed before after all the others
        return sorted(uids, key=lambda u: ((uidvalidity, u) in self._failures, u))

    def _expunge(self, imap: imaplib.IMAP4, uids: list[int]) -> None:
        """Remove what we flagged this poll, and every other message flagged \\Deleted in the
        folder: what a poll that died before its expunge left behind (the folder is dedicated to
        bounces, so nothing flagged there is anyone else's to keep)."""
        leftover = self._command(imap, "UID SEARCH", "SEARCH", "DELETED")
        gone = sorted({*uids, *(int(u) for chunk in leftover if isinstance(chunk, bytes) for u in chunk.split())})
        if not gone:
            return
        if "UIDPLUS" in imap.capabilities:
            for start in range(0, len(gone), _UID_SLICE):
                uid_set = ",".join(str(u) for u in gone[start : start + _UID_SLICE])
                self._command(imap, "UID EXPUNGE", "EXPUNGE", uid_set)
        else:
            typ, data = imap.expunge()
            if typ != "OK":
                raise self._error(f"EXPUNGE refused: {_text(data)}")

    def _command(self, imap: imaplib.IMAP4, what: str, command: str, *args: str) -> list[bytes | tuple[bytes, bytes]]:
        """A UID command; a refusal is an error of the server, named by ``what``."""
        typ, data = imap.uid(command, *args)
        if typ != "OK":
            raise self._error(f"{what} refused: {_text(data)}")
        return list(data)

    # ------------------------------------------------------------------ connection

    @contextlib.contextmanager
    def _session(self) -> Iterator[imaplib.IMAP4]:
        imap = self._connect()
        clean = False
        try:
            self._login(imap)
            yield imap
            clean = True
        except imaplib.IMAP4.abort as exc:  # the server hung up or answered nonsense
            raise self._error(f"connection lost: {self._scrub(exc)}") from None
        except ssl.SSLError as exc:
            raise self._error(f"TLS failed: {self._scrub(exc)}") from None
        except (OSError, imaplib.IMAP4.error) as exc:
            raise self._error(f"{type(exc).__name__}: {self._scrub(exc)}") from None
        finally:
            if clean:
                with contextlib.suppress(OSError, imaplib.IMAP4.error):
                    imap.logout()
            else:  # a LOGOUT on a broken or stalled connection would only wait out the timeout
                self._drop(imap)

    def _connect(self) -> imaplib.IMAP4:
        where = f"{self.host}:{self.port}"
        try:
            if self.tls == "implicit":
                return imaplib.IMAP4_SSL(self.host, self.port, ssl_context=self._tls_context(), timeout=self.timeout)
            imap = imaplib.IMAP4(self.host, self.port, timeout=self.timeout)
        except ssl.SSLCertVerificationError as exc:
            raise self._error(f"TLS certificate of {where} not trusted: {exc.verify_message}") from None
        except ssl.SSLError as exc:
            raise self._error(f"TLS with {where} failed: {exc}") from None
        except TimeoutError:
            raise self._error(f"{where} did not answer within {self.timeout:g} s") from None
        except OSError as exc:
            raise self._error(f"cannot reach {where}: {exc.strerror or exc}") from None
        except imaplib.IMAP4.error as exc:
            raise self._error(f"{where} did not greet as an IMAP server: {exc}") from None
        if self.tls == "starttls":
            try:
                imap.starttls(ssl_context=self._tls_context())
            except ssl.SSLCertVerificationError as exc:
                self._drop(imap)
                raise self._error(f"TLS certificate of {where} not trusted: {exc.verify_message}") from None
            except (ssl.SSLError, OSError, imaplib.IMAP4.error) as exc:
                self._drop(imap)
                raise self._error(f"STARTTLS with {where} failed: {exc}") from None
        return imap

    def _login(self, imap: imaplib.IMAP4) -> None:
        try:
            imap.login(self.username, self._password)
        except imaplib.IMAP4.abort:
            raise
        except imaplib.IMAP4.error as exc:
            raise MailboxLoginRefused(
                f"login refused: {self._scrub(exc)}", host=self.host, port=self.port, username=self.username
            ) from None
        # What the server offers after login (UIDPLUS among it) may differ from its greeting.
        with contextlib.suppress(imaplib.IMAP4.error):
            typ, data = imap.capability()
            if typ == "OK" and data and isinstance(data[-1], bytes):
                imap.capabilities = tuple(data[-1].decode("ascii", "replace").upper().split())

    def _tls_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context()
        if self.ca_file:
            try:
                context.load_verify_locations(cafile=self.ca_file)
            except (OSError, ssl.SSLError) as exc:
                raise self._error(f"ca_file {self.ca_file!r} cannot be read: {exc}") from None
        return context

    @staticmethod
    def _drop(imap: imaplib.IMAP4) -> None:
        with contextlib.suppress(OSError):
            imap.shutdown()

    def _scrub(self, exc: BaseException) -> str:
        """The exception's text, never with our password in it (whatever a server echoes)."""
        text = str(exc)
        return text.replace(self._password, "***") if self._password else text

    def _error(self, message: str) -> MailboxError:
        return MailboxError(message, host=self.host, port=self.port, username=self.username)

    def _folder_missing(self, data: object) -> MailboxFolderMissing:
        return MailboxFolderMissing(
            f"folder {self.folder!r} cannot be opened: {_text(data)}",
            host=self.host,
            port=self.port,
            username=self.username,
        )


def _quote(folder: str) -> str:
    return '"' + folder.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _text(data: list[bytes] | list[None] | object) -> str:
    if isinstance(data, list) and data and isinstance(data[0], bytes):
        return data[0].decode("utf-8", "replace")
    return str(data)
