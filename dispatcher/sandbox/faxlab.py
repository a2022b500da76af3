"""The local fax lab: a sandbox fax gateway that places genuine T.30 calls in software.

Every "call" runs two spandsp fax terminals in this process: a calling terminal that sends the
job's TIFF and an answering terminal that receives it, joined by a simulated telephone line
(8 kHz, 16-bit audio exchanged in 20 ms blocks). Time on that line is simulated: a three-page
letter takes about 85 s of line time and about 0.1 s of CPU. What the answering machine
received is kept under ``<directory>/<remote_id>/`` as a multi-page TIFF plus one PNG preview
per page, next to a JSON record of the fax, so that reports survive the process and
``find_by_tag``/``get`` work from any process sharing the directory.

What happens on a call is chosen by the called number (:data:`LAB_NUMBERS`, in the range Ofcom
reserves for drama, +44 20 7946 0xxx) or by an override set with :meth:`FaxLab.set_behaviour`;
any other valid number, including a real target's in sandbox mode, reaches a normal fax
machine. docs/fax-lab.md has the table and the layout on disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import io
import json
import os
import re
import secrets
import shutil
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from hashlib import sha256
from pathlib import Path
from types import MappingProxyType
from typing import Any

import phonenumbers
from PIL import Image, ImageSequence, TiffImagePlugin, UnidentifiedImageError

from dispatcher.channels.fax.base import (
    FailureKind,
    FaxFailure,
    FaxJob,
    FaxReport,
    FaxStatus,
    failure_error,
    newest,
)
from dispatcher.errors import DispatchError, OperationalError, PermanentError
from dispatcher.logging import get_logger
from dispatcher.sandbox.spandsp import (
    SAMPLE_RATE,
    AudioBlock,
    Compression,
    FaxTerminal,
    ImageSize,
    Modem,
    Resolution,
    SpandspUnavailable,
    T30Error,
    completion_text,
    library,
)
from dispatcher.settings import Settings

log = get_logger(__name__)


class Behaviour(StrEnum):
    """What the far end of a lab call does."""

    NORMAL = "normal"  # a fax machine that answers and receives every page
    BUSY = "busy"  # the line is engaged: no call
    NO_ANSWER = "no_answer"  # rings out (RING_OUT_S of simulated ringing)
    SILENT = "silent"  # answers, but nothing on the line speaks fax (a voice line)
    HANG_UP = "hang_up"  # a fax machine that hangs up during the second page
    UNALLOCATED = "unallocated"  # the network says the number is not in service


#: the lab's own numbers, E.164. UK drama numbers: valid for phonenumbers, never a real line.
LAB_NUMBERS: Mapping[str, Behaviour] = MappingProxyType(
    {
        "+442079460100": Behaviour.NORMAL,
        "+442079460101": Behaviour.BUSY,
        "+442079460102": Behaviour.NO_ANSWER,
        "+442079460103": Behaviour.SILENT,
        "+442079460104": Behaviour.HANG_UP,
        "+442079460105": Behaviour.UNALLOCATED,
    }
)

#: simulated ringing before an unanswered call gives up
RING_OUT_S = 60.0
#: a HANG_UP machine stays on the line this long after confirming page 1: into page 2
HANG_UP_AFTER_S = 3.0
#: a lab call longer than this (simulated) is cut off; a 3-page letter takes 40-90 s
MAX_CALL_S = 30 * 60.0
#: a record still "sending" after this long (wall time) belongs to a call that died with its process
STALE_AFTER_S = 600.0

_BLOCK = SAMPLE_RATE // 50  # 20 ms of audio
_FAX_WIDTH = 1728  # pixels across an A4/letter page at 204 dpi (ITU-T T.4)

#: spandsp log lines repeated for every ECM frame or HDLC carrier change: noise in t30.log
_LOG_NOISE = (
    "FCD",
    ":  ff 03 06 ",  # the hex dump of each FCD (ECM image data) frame
    "Storing ECM frame",
    "Stop none",
    "Send complete in",
    "HDLC signal status",
    "Set rx type",
    "Set tx type",
)

#: sender's phase E codes meaning "no fax conversation ever started"
_NO_FAX = {T30Error.CEDTONE, T30Error.T0_EXPIRED, T30Error.T1_EXPIRED}
#: codes meaning our document cannot be taken as it is (the far end or spandsp refused it)
_REJECTED = {T30Error.NORESSUPPORT, T30Error.NOSIZESUPPORT} | {T30Error(c) for c in range(41, 48)}

_REMOTE_ID = re.compile(r"[0-9]{8}T[0-9]{6}Z-[0-9a-f]{8}")
_SAFE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}")


# --------------------------------------------------------------------------- documents


class DocumentProblem(DispatchError, ValueError):
    """The job's TIFF is not a fax-ready document."""


@dataclass(frozen=True)
class Document:
    tiff: bytes  # re-encoded: G4, one image per page, resolution tags in inches
    pages: int
    y_dpi: tuple[int, ...]  # per page: 196 (fine) or 98 (standard)


def prepare_document(data: bytes) -> Document:
    """Check that ``data`` is a fax-ready TIFF and re-encode it the way spandsp reads best.

    Accepted: every page 1728 px wide, bilevel, about 204 dpi across (200 allowed) and about
    196 (fine) or 98 (standard) dpi down (200/100 allowed). Anything else is a bug in our own
    converter, so the lab refuses it rather than papering over it. Re-encoding through
    Pillow/libtiff as G4 in inches means odd but legal inputs (uncompressed strips, fill
    order, centimetre units) reach spandsp in one form it is known to read.
    """
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DocumentProblem(f"not a readable TIFF: {exc}") from None
    if image.format != "TIFF":
        raise DocumentProblem(f"not a TIFF but {image.format}")
    pages = []
    y_dpis: list[int] = []
    for number, frame in enumerate(ImageSequence.Iterator(image), start=1):
        width, _height = frame.size
        if width != _FAX_WIDTH:
            raise DocumentProblem(f"page {number} is {width} px wide, a fax page is {_FAX_WIDTH}")
        if frame.mode != "1":
            raise DocumentProblem(f"page {number} is not bilevel (mode {frame.mode})")
        dpi = frame.info.get("dpi")
        if not dpi:
            raise DocumentProblem(f"page {number} has no resolution")
        x_dpi, y_dpi = float(dpi[0]), float(dpi[1])
        if not 198 <= x_dpi <= 206:
            raise DocumentProblem(f"page {number} is {x_dpi:g} dpi across, a fax page is 204")
        if 190 <= y_dpi <= 206:
            y_dpis.append(196)
        elif 95 <= y_dpi <= 103:
            y_dpis.append(98)
        else:
            raise DocumentProblem(f"page {number} is {y_dpi:g} dpi down, a fax page is 196 (fine) or 98 (standard)")
        pages.append(frame.copy())
    if not pages:
        raise DocumentProblem("the TIFF has no pages")
    out = io.BytesIO()
    # Page by page through AppendingTiffWriter (what Pillow's save_all does inside), because
    # save_all would give every page the first page's resolution.
    with TiffImagePlugin.AppendingTiffWriter(out, new=True) as writer:
        for page, y_dpi in zip(pages, y_dpis, strict=True):
            page.save(writer, format="TIFF", compression="group4", dpi=(204, y_dpi))
            writer.newFrame()
    return Document(tiff=out.getvalue(), pages=len(pages), y_dpi=tuple(y_dpis))


# --------------------------------------------------------------------------- one call


@dataclass
class CallResult:
    """What happened on the line, from the calling terminal's side unless named otherwise."""

    behaviour: Behaviour
    connected: bool = False
    #: the calling terminal's phase E completion code (None: no call was connected)
    completion: int | None = None
    pages_sent: int = 0  # confirmed by the answering machine (MCF)
    pages_received: int = 0  # kept by the answering machine
    pages_in_file: int = 0
    duration_s: float = 0.0  # simulated line time
    ring_s: float = 0.0  # simulated ringing before answer (or giving up)
    bit_rate: int = 0
    ecm: bool = False
    encoding: int = 0
    remote_station: str = ""  # the answering machine's CSI
    wall_s: float = 0.0
    log: list[str] = field(default_factory=list)


def _configure(terminal: FaxTerminal) -> None:
    # A modern A4 office machine: V.17 down to V.27ter, ECM, MH/MR/MMR, fine and superfine.
    # T.6 (MMR) is only negotiated with ECM, which is also what makes a G4 page go out as G4.
    terminal.set_ecm(True)
    terminal.set_capabilities(
        modems=Modem.V27TER | Modem.V29 | Modem.V17,
        compressions=Compression.T4_1D | Compression.T4_2D | Compression.T6,
        resolutions=Resolution.STANDARD | Resolution.FINE | Resolution.SUPERFINE | Resolution.R8,
        image_sizes=ImageSize.WIDTH_215MM
        | ImageSize.UNLIMITED_LENGTH
        | ImageSize.A4_LENGTH
        | ImageSize.B4_LENGTH
        | ImageSize.US_LETTER_LENGTH
        | ImageSize.US_LEGAL_LENGTH,
    )


def place_call(
    document: Path,
    received: Path,
    behaviour: Behaviour,
    *,
    station_id: str = "",
    called_ident: str = "",
    max_call_s: float = MAX_CALL_S,
    trace: bool = True,
) -> CallResult:
    """Place one call sending ``document`` (a TIFF/F file) to a far end behaving as told.

    Blocking CPU work (run it in a thread). For answered calls both terminals are real spandsp
    T.30 engines; ``received`` is where the answering machine writes the pages it accepts.
    ``trace`` collects spandsp's protocol log, stamped with simulated time, in
    ``CallResult.log`` (about 15 % of a call's CPU time).
    """
    result = CallResult(behaviour=behaviour)
    if behaviour is Behaviour.BUSY or behaviour is Behaviour.UNALLOCATED:
        return result  # the network answers at once; nothing is connected
    if behaviour is Behaviour.NO_ANSWER:
        result.ring_s = RING_OUT_S
        return result

    started = time.perf_counter()
    result.connected = True
    tick = 0  # 20 ms blocks exchanged so far: the simulated clock

    def clock() -> float:
        return tick / 50

    with contextlib.ExitStack() as stack:
        sender = stack.enter_context(FaxTerminal(calling=True, ident=station_id))
        _configure(sender)
        if trace:
            sender.capture_log(result.log, "sender   ", _LOG_NOISE, clock)
        sender.send_file(document)

        receiver: FaxTerminal | None = None
        if behaviour is not Behaviour.SILENT:
            receiver = stack.enter_context(FaxTerminal(calling=False, ident=called_ident))
            _configure(receiver)
            if trace:
                receiver.capture_log(result.log, "answerer ", _LOG_NOISE, clock)
            receiver.receive_file(received)

        hang_up_at: int | None = None

        def page_confirmed(_fcf: int) -> None:
            # Phase D on the answering side: a page is in. A HANG_UP machine lets this first
            # confirmation go out, then drops the line part-way into the next page.
            nonlocal hang_up_at
            if behaviour is Behaviour.HANG_UP and hang_up_at is None:
                hang_up_at = tick + round(HANG_UP_AFTER_S * 50)

        if receiver is not None:
            receiver.on_phase_d(page_confirmed)

        up = AudioBlock(_BLOCK)  # sender -> answerer
        down = AudioBlock(_BLOCK)  # answerer -> sender (silence when nobody is there)
        max_ticks = round(max_call_s * 50)
        on_line = receiver
        while tick < max_ticks:
            sender.tx(up)
            if on_line is not None:
                on_line.rx(up)
                on_line.tx(down)
            else:
                down.silence()
            sender.rx(down)
            tick += 1
            if sender.completion is not None and (on_line is None or on_line.completion is not None):
                break
            if on_line is not None and hang_up_at is not None and tick >= hang_up_at:
                on_line.hang_up()  # closes its TIFF with the pages it has
                on_line = None
        else:
            # Past the safety limit: cut the call as a line drop would.
            sender.hang_up()
            if on_line is not None:
                on_line.hang_up()

        stats = sender.stats()
        result.completion = sender.completion if sender.completion is not None else int(T30Error.CALLDROPPED)
        result.pages_sent = stats.pages_tx
        result.pages_in_file = stats.pages_in_file
        result.bit_rate = stats.bit_rate
        result.ecm = bool(stats.error_correcting_mode)
        result.encoding = stats.encoding
        result.remote_station = sender.far_ident
        if receiver is not None:
            result.pages_received = receiver.stats().pages_rx
        result.duration_s = tick / 50
    # The terminals are closed here, so the received TIFF is complete on disk.
    result.wall_s = time.perf_counter() - started
    return result


def _failure(result: CallResult) -> FaxFailure | None:
    """None when every page was confirmed, else why not, in FailureKind terms."""
    b = result.behaviour
    if b is Behaviour.BUSY:
        return FaxFailure(FailureKind.BUSY, code="user_busy", text="User busy (Q.850 cause 17)")
    if b is Behaviour.NO_ANSWER:
        return FaxFailure(
            FailureKind.NO_ANSWER,
            code="no_answer",
            text=f"No answer from user (Q.850 cause 19) after {result.ring_s:g} s of ringing",
        )
    if b is Behaviour.UNALLOCATED:
        return FaxFailure(
            FailureKind.INVALID_NUMBER, code="unallocated_number", text="Unallocated number (Q.850 cause 1)"
        )
    code = result.completion
    if code == T30Error.OK:
        if result.pages_sent >= result.pages_in_file:
            return None
        # spandsp said OK yet confirmed fewer pages than the file holds: never seen, but a
        # letter with missing pages must not count as delivered
        text = f"only {result.pages_sent} of {result.pages_in_file} pages confirmed"
        return FaxFailure(FailureKind.INTERRUPTED, code=str(code), text=text)
    text = completion_text(code if code is not None else T30Error.CALLDROPPED)
    if code in _NO_FAX:
        kind = FailureKind.NO_FAX_TONE
    elif code in _REJECTED:
        kind = FailureKind.DOCUMENT_REJECTED
    else:
        # the hang-up, and every other T.30 failure once the machines had met
        kind = FailureKind.INTERRUPTED
    return FaxFailure(kind, code=str(code), text=text)


def _raw_status(result: CallResult, failure: FaxFailure | None) -> str:
    if failure is None:
        return "completed"
    if not result.connected:
        return result.behaviour.value
    return f"t30_error_{result.completion}"


# --------------------------------------------------------------------------- the gateway


class FaxLab:
    """The lab as a :class:`~dispatcher.channels.fax.base.FaxGateway` (``name = "lab"``).

    ``send`` returns a final report: the call is over when it returns. One call at a time per
    called number: a second send to a number whose line is in use (by this or another process
    on the same directory) gets BUSY, exactly as a real fax line would answer.
    """

    name = "lab"

    def __init__(self, directory: Path | None = None, *, trace: bool = True):
        """``directory`` defaults to ``<var_dir>/sandbox/fax`` of the environment's settings;
        ``trace`` keeps spandsp's protocol log of each call as ``t30.log``."""
        if directory is None:
            directory = Settings.from_env().var_dir / "sandbox" / "fax"
        self.directory = Path(directory)
        self.trace = trace

    @classmethod
    def for_settings(cls, settings: Settings, *, trace: bool = True) -> FaxLab:
        return cls(settings.var_dir / "sandbox" / "fax", trace=trace)

    # ---------------------------------------------------------------- FaxGateway

    async def send(self, job: FaxJob) -> FaxReport:
        return await asyncio.to_thread(self.send_sync, job)

    async def find_by_tag(self, tag: str) -> FaxReport | None:
        return self.find_by_tag_sync(tag)

    async def get(self, remote_id: str) -> FaxReport:
        return self.get_sync(remote_id)

    async def aclose(self) -> None:
        return None

    # ---------------------------------------------------------------- behaviours

    def behaviour_for(self, number: str) -> Behaviour:
        """What a call to ``number`` meets now (without using up an override)."""
        e164 = _e164(number) or number
        with self._overrides() as overrides:
            entry = overrides.get(e164)
        return Behaviour(entry["behaviour"]) if entry else LAB_NUMBERS.get(e164, Behaviour.NORMAL)

    def set_behaviour(self, number: str, behaviour: Behaviour | None, *, times: int | None = None) -> None:
        """Make calls to ``number`` meet ``behaviour``: for the next ``times`` calls, or until
        changed. ``None`` removes the override (the number's table behaviour applies again).
        Kept on disk, so a worker process using the same directory sees it too."""
        if times is not None and times < 1:
            raise ValueError("times must be at least 1 (or None for no limit)")
        e164 = _e164(number) or number
        with self._overrides(write=True) as overrides:
            if behaviour is None:
                overrides.pop(e164, None)
            else:
                overrides[e164] = {"behaviour": Behaviour(behaviour).value, "times": times}

    def clear_behaviours(self) -> None:
        with self._overrides(write=True) as overrides:
            overrides.clear()

    @contextlib.contextmanager
    def hold_line(self, number: str) -> Iterator[None]:
        """Keep ``number``'s line in use (as another call would) while the block runs."""
        with self._line(_e164(number) or number, wait=True):
            yield

    # ---------------------------------------------------------------- synchronous API

    def send_sync(self, job: FaxJob) -> FaxReport:
        """``send`` without the event loop: blocks for the whole call (~0.1 s of CPU)."""
        try:
            library()
        except SpandspUnavailable as exc:
            raise OperationalError(f"fax lab unavailable: {exc}", code="spandsp_missing") from None
        e164 = _e164(job.to_number)
        if e164 is None:
            raise failure_error(
                FaxFailure(
                    FailureKind.INVALID_NUMBER, code="invalid_number", text=f"not a valid number: {job.to_number!r}"
                )
            )
        try:
            document = prepare_document(job.tiff)
        except DocumentProblem as exc:
            raise failure_error(FaxFailure(FailureKind.DOCUMENT_REJECTED, code="bad_tiff", text=str(exc))) from None

        now = datetime.now(UTC)
        remote_id = f"{now:%Y%m%dT%H%M%SZ}-{secrets.token_hex(4)}"
        folder = self.directory / remote_id
        folder.mkdir(parents=True)
        sent = folder / "sent.tiff"
        sent.write_bytes(document.tiff)
        record: dict[str, Any] = {
            "remote_id": remote_id,
            "tag": job.tag,
            "to": e164,
            "status": FaxStatus.SENDING.value,
            "pages_in_document": document.pages,
            "created_at": now.isoformat(),
            "occurred_at": now.isoformat(),
            "pid": os.getpid(),
        }
        self._write_record(folder, record)
        self._index_tag(job.tag, remote_id)

        try:
            with self._line(e164, wait=False) as free:
                if free:
                    behaviour = self._take_behaviour(e164)
                    result = place_call(
                        sent,
                        folder / "received.tiff",
                        behaviour,
                        station_id=job.station_id or job.from_number or "",
                        called_ident=e164,
                        trace=self.trace,
                    )
                else:
                    result = CallResult(behaviour=Behaviour.BUSY)
            record.update(self._outcome(result, folder, line_in_use=not free))
        except BaseException as exc:
            # Never leave a record "sending" behind a call that did not finish.
            record.update(
                status=FaxStatus.FAILED.value,
                failure={"kind": FailureKind.UNKNOWN.value, "code": "lab_error", "text": repr(exc)[:500]},
                raw_status="lab_error",
                occurred_at=datetime.now(UTC).isoformat(),
            )
            self._write_record(folder, record)
            raise
        self._write_record(folder, record)
        report = _report(record)
        log.info(
            "fax_lab.call",
            remote_id=remote_id,
            tag=job.tag,
            to=e164,
            status=report.status.value,
            failure=report.failure.kind.value if report.failure else None,
            pages=report.pages,
            line_s=report.duration_s,
            wall_ms=record["extra"].get("wall_ms"),
        )
        return report

    def find_by_tag_sync(self, tag: str) -> FaxReport | None:
        index = self.directory / "tags" / _tag_file(tag)
        try:
            ids = index.read_text().split()
        except FileNotFoundError:
            return None
        reports = []
        for remote_id in dict.fromkeys(ids):
            with contextlib.suppress(LookupError):
                reports.append(self.get_sync(remote_id))
        return newest([r for r in reports if r.tag == tag])

    def get_sync(self, remote_id: str) -> FaxReport:
        if not _REMOTE_ID.fullmatch(remote_id):
            raise LabFaxNotFound(remote_id)
        try:
            record = json.loads((self.directory / remote_id / "record.json").read_text())
        except FileNotFoundError:
            raise LabFaxNotFound(remote_id) from None
        if record["status"] == FaxStatus.SENDING.value and _abandoned(record):
            record.update(
                status=FaxStatus.FAILED.value,
                failure={
                    "kind": FailureKind.INTERRUPTED.value,
                    "code": "abandoned",
                    "text": "the process placing this lab call ended before the call did",
                },
                raw_status="abandoned",
                occurred_at=datetime.now(UTC).isoformat(),
            )
            self._write_record(self.directory / remote_id, record)
        return _report(record)

    def forget(self, tag: str) -> int:
        """Delete every lab fax of ``tag`` (its folders: sent and received pages, previews, record,
        protocol log) and its entry in the tag index; returns how many files went. For a
        supporter's erasure: the pages carry their name."""
        index = self.directory / "tags" / _tag_file(tag)
        try:
            ids = index.read_text().split()
        except FileNotFoundError:
            return 0
        removed = 0
        for remote_id in dict.fromkeys(ids):
            if not _REMOTE_ID.fullmatch(remote_id):
                continue
            folder = self.directory / remote_id
            if folder.is_dir():
                removed += sum(1 for p in folder.rglob("*") if p.is_file())
                shutil.rmtree(folder, ignore_errors=True)
        index.unlink(missing_ok=True)
        return removed

    def path_of(self, remote_id: str) -> Path:
        """The folder holding a fax's record, sent.tiff, received.tiff, page-N.png and t30.log."""
        if not _REMOTE_ID.fullmatch(remote_id):
            raise LabFaxNotFound(remote_id)
        return self.directory / remote_id

    # ---------------------------------------------------------------- internals

    def _outcome(self, result: CallResult, folder: Path, *, line_in_use: bool) -> dict[str, Any]:
        failure = _failure(result)
        if line_in_use and failure is not None:
            failure = FaxFailure(failure.kind, failure.code, "User busy: another fax is in progress on this line")
        received = folder / "received.tiff"
        previews = _write_previews(received, folder) if received.exists() else 0
        if result.log:
            (folder / "t30.log").write_text("\n".join(result.log) + "\n")
        extra = {
            "behaviour": result.behaviour.value,
            "pages_received": str(previews),
            "wall_ms": f"{result.wall_s * 1000:.1f}",
        }
        if result.encoding:  # a page format was agreed (DCS), so these mean something
            extra.update(
                bit_rate=str(result.bit_rate),
                ecm="yes" if result.ecm else "no",
                compression={1: "T.4 1D", 2: "T.4 2D", 3: "T.6"}.get(result.encoding, str(result.encoding)),
                remote_station=result.remote_station,
            )
        if result.ring_s:
            extra["ring_s"] = f"{result.ring_s:g}"
        if line_in_use:
            extra["line_in_use"] = "yes"
        return {
            "status": (FaxStatus.DELIVERED if failure is None else FaxStatus.FAILED).value,
            "pages": result.pages_sent,
            "duration_s": round(result.duration_s, 2),
            "failure": None
            if failure is None
            else {"kind": failure.kind.value, "code": failure.code, "text": failure.text},
            "raw_status": _raw_status(result, failure),
            "occurred_at": datetime.now(UTC).isoformat(),
            "extra": extra,
        }

    def _write_record(self, folder: Path, record: dict[str, Any]) -> None:
        # Write-then-rename: a reader in another process sees the old record or the new one.
        tmp = folder / f".record.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        tmp.write_text(json.dumps(record, indent=2, sort_keys=True))
        os.replace(tmp, folder / "record.json")

    def _index_tag(self, tag: str, remote_id: str) -> None:
        index = self.directory / "tags"
        index.mkdir(parents=True, exist_ok=True)
        # One short O_APPEND write per fax: appends from several processes do not interleave.
        fd = os.open(index / _tag_file(tag), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, f"{remote_id}\n".encode())
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def _line(self, e164: str, *, wait: bool) -> Iterator[bool]:
        """An flock on ``lines/<number>.lock``: yields False (without waiting) when in use.
        flock conflicts between processes and between separate opens within one process."""
        lines = self.directory / "lines"
        lines.mkdir(parents=True, exist_ok=True)
        fd = os.open(lines / f"{_safe_name(e164)}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            acquired = True
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                acquired = False
            yield acquired
        finally:
            os.close(fd)  # closing releases the lock

    @contextlib.contextmanager
    def _overrides(self, *, write: bool = False) -> Iterator[dict[str, dict[str, Any]]]:
        """behaviours.json under an exclusive flock: read, let the caller change, write back."""
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / "behaviours.json"
        fd = os.open(self.directory / "behaviours.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                overrides: dict[str, dict[str, Any]] = json.loads(path.read_text())
            except FileNotFoundError:
                overrides = {}
            before = json.dumps(overrides, sort_keys=True)
            yield overrides
            if write or json.dumps(overrides, sort_keys=True) != before:
                tmp = path.with_suffix(f".{os.getpid()}.tmp")
                tmp.write_text(json.dumps(overrides, indent=2, sort_keys=True))
                os.replace(tmp, path)
        finally:
            os.close(fd)

    def _take_behaviour(self, e164: str) -> Behaviour:
        """The behaviour for this call, using up one of an override's ``times``."""
        with self._overrides() as overrides:
            entry = overrides.get(e164)
            if entry is None:
                return LAB_NUMBERS.get(e164, Behaviour.NORMAL)
            if entry.get("times") is not None:
                entry["times"] -= 1
                if entry["times"] <= 0:
                    del overrides[e164]
            return Behaviour(entry["behaviour"])


class LabFaxNotFound(PermanentError, LookupError):
    """No lab fax has this remote id (a gateway's 404)."""

    def __init__(self, remote_id: str):
        super().__init__(f"no lab fax {remote_id!r}", code="not_found")


# --------------------------------------------------------------------------- helpers


def _e164(number: str) -> str | None:
    """The number in E.164 when phonenumbers considers it valid, else None."""
    try:
        parsed = phonenumbers.parse(number, None)
    except phonenumbers.NumberParseException:
        return None
    if not phonenumbers.is_valid_number(parsed):
        return None
    return phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)


def _safe_name(value: str) -> str:
    return value if _SAFE_NAME.fullmatch(value) else "sha256-" + sha256(value.encode()).hexdigest()


def _tag_file(tag: str) -> str:
    return _safe_name(tag)


def _abandoned(record: dict[str, Any]) -> bool:
    created = datetime.fromisoformat(record["created_at"])
    if (datetime.now(UTC) - created).total_seconds() > STALE_AFTER_S:
        return True
    pid = record.get("pid")
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)  # signal 0: does the process exist?
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _write_previews(received: Path, folder: Path) -> int:
    """page-N.png for every received page, stretched to square pixels; returns the page count.

    A fine page is 204 × 196 dpi and a standard one 204 × 98, so drawn 1:1 it would look
    squashed; the preview is scaled vertically to 204 dpi.
    """
    try:
        image = Image.open(received)
    except (UnidentifiedImageError, OSError):
        return 0  # a call that dropped before the first page completed leaves an empty file
    count = 0
    with image:
        for number, frame in enumerate(ImageSequence.Iterator(image), start=1):
            page = frame.convert("1")
            dpi = frame.info.get("dpi") or (204, 196)
            height = max(1, round(page.height * float(dpi[0]) / float(dpi[1] or dpi[0])))
            preview = page.resize((page.width, height), Image.Resampling.NEAREST)
            preview.save(folder / f"page-{number}.png")
            count = number
    return count


def _report(record: dict[str, Any]) -> FaxReport:
    failure = record.get("failure")
    return FaxReport(
        gateway=FaxLab.name,
        remote_id=record["remote_id"],
        status=FaxStatus(record["status"]),
        tag=record.get("tag"),
        pages=record.get("pages"),
        duration_s=record.get("duration_s"),
        failure=None
        if not failure
        else FaxFailure(FailureKind(failure["kind"]), code=failure.get("code"), text=failure.get("text", "")),
        occurred_at=datetime.fromisoformat(record["occurred_at"]),
        raw_status=record.get("raw_status", record["status"]),
        extra={"to": record["to"], **record.get("extra", {})},
    )
