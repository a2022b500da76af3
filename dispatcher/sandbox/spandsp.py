"""A small ctypes binding to spandsp 0.0.6 (Debian's ``libspandsp2``): just enough of the FAX
terminal API to place a real T.30 call between two software fax machines.

Only the shared library is needed at run time; no headers, no build step. Every value and
struct layout below was copied from the 0.0.6 headers (``libspandsp-dev``:
``spandsp/t30.h``, ``t30_api.h``, ``fax.h``, ``t4_rx.h``, ``logging.h``), because ctypes cannot
read them: a wrong layout would corrupt memory silently, so change nothing here without
checking the header of the version you load (``SPANDSP_RELEASE_DATE`` 20110122 for 0.0.6).

The audio interface is what a telephone line carries: signed 16-bit linear samples at 8 kHz.
A :class:`FaxTerminal` produces samples with :meth:`FaxTerminal.tx` and consumes them with
:meth:`FaxTerminal.rx`; time passes for spandsp only through the samples it is given, so a call
can run far faster than real time.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable
from enum import IntEnum, IntFlag
from pathlib import Path

from dispatcher.errors import DispatchError

__all__ = [
    "SAMPLE_RATE",
    "AudioBlock",
    "Compression",
    "FaxTerminal",
    "ImageSize",
    "LogLevel",
    "Modem",
    "Resolution",
    "SpandspUnavailable",
    "T30Error",
    "T30Stats",
    "completion_text",
    "library",
]

#: samples per second on the (simulated) telephone line
SAMPLE_RATE = 8000


class SpandspUnavailable(DispatchError, RuntimeError):
    """libspandsp2 is not installed (scripts/ensure-system-deps.sh installs it)."""


# --------------------------------------------------------------------------- constants (t30.h)


class T30Error(IntEnum):
    """T.30 completion codes at phase E (``T30_ERR_*``), in the order of the 0.0.6 enum.

    The numbers are only meaningful for 0.0.6: later spandsp releases inserted codes.
    """

    OK = 0
    CEDTONE = 1  # The CED tone exceeded 5s
    T0_EXPIRED = 2  # Timed out waiting for initial communication
    T1_EXPIRED = 3  # Timed out waiting for the first message
    T3_EXPIRED = 4  # Timed out waiting for procedural interrupt
    HDLC_CARRIER = 5  # The HDLC carrier did not stop in a timely manner
    CANNOT_TRAIN = 6  # Failed to train with any of the compatible modems
    OPER_INT_FAIL = 7  # Operator intervention failed
    INCOMPATIBLE = 8  # Far end is not compatible
    RX_INCAPABLE = 9  # Far end is not able to receive
    TX_INCAPABLE = 10  # Far end is not able to transmit
    NORESSUPPORT = 11  # Far end cannot receive at the resolution of the image
    NOSIZESUPPORT = 12  # Far end cannot receive at the size of image
    UNEXPECTED = 13  # Unexpected message received
    # phase E status values returned to a transmitter
    TX_BADDCS = 14  # Received bad response to DCS or training
    TX_BADPG = 15  # Received a DCN from remote after sending a page
    TX_ECMPHD = 16  # Invalid ECM response received from receiver
    TX_GOTDCN = 17  # Received a DCN while waiting for a DIS
    TX_INVALRSP = 18  # Invalid response after sending a page
    TX_NODIS = 19  # Received other than DIS while waiting for DIS
    TX_PHBDEAD = 20  # Received no response to DCS, training or TCF
    TX_PHDDEAD = 21  # No response after sending a page
    TX_T5EXP = 22  # Timed out waiting for receiver ready (ECM mode)
    # phase E status values returned to a receiver
    RX_ECMPHD = 23
    RX_GOTDCS = 24
    RX_INVALCMD = 25
    RX_NOCARRIER = 26
    RX_NOEOL = 27
    RX_NOFAX = 28
    RX_T2EXPDCN = 29
    RX_T2EXPD = 30
    RX_T2EXPFAX = 31
    RX_T2EXPMPS = 32
    RX_T2EXPRR = 33
    RX_T2EXP = 34
    RX_DCNWHY = 35
    RX_DCNDATA = 36
    RX_DCNFAX = 37
    RX_DCNPHD = 38
    RX_DCNRRD = 39
    RX_DCNNORTN = 40
    # TIFF file problems
    FILEERROR = 41  # TIFF/F file cannot be opened
    NOPAGE = 42
    BADTIFF = 43
    BADPAGE = 44
    BADTAG = 45
    BADTIFFHDR = 46
    NOMEM = 47
    # general problems
    RETRYDCN = 48  # Disconnected after permitted retries
    CALLDROPPED = 49  # The call dropped prematurely
    # feature negotiation issues
    NOPOLL = 50
    IDENT_UNACCEPTABLE = 51
    SUB_UNACCEPTABLE = 52
    SEP_UNACCEPTABLE = 53
    PSA_UNACCEPTABLE = 54
    SID_UNACCEPTABLE = 55
    PWD_UNACCEPTABLE = 56
    TSA_UNACCEPTABLE = 57
    IRA_UNACCEPTABLE = 58
    CIA_UNACCEPTABLE = 59
    ISP_UNACCEPTABLE = 60
    CSA_UNACCEPTABLE = 61


class Modem(IntFlag):
    """``T30_SUPPORT_*`` modems for image transfer."""

    V27TER = 0x01  # 2400, 4800 bps
    V29 = 0x02  # 7200, 9600 bps
    V17 = 0x04  # 7200 ... 14400 bps


class Compression(IntFlag):
    """``T30_SUPPORT_*_COMPRESSION`` (t30.h); T.6 is only ever negotiated with ECM."""

    T4_1D = 0x02  # MH, "G3"
    T4_2D = 0x04  # MR
    T6 = 0x08  # MMR, "G4"


class Resolution(IntFlag):
    """``T30_SUPPORT_*_RESOLUTION`` (t30.h)."""

    STANDARD = 0x01  # 98 lines per inch
    FINE = 0x02  # 196 lines per inch
    SUPERFINE = 0x04  # 392 lines per inch
    R8 = 0x20000  # 204 dots per inch across


class ImageSize(IntFlag):
    """``T30_SUPPORT_*`` widths and lengths (t30.h)."""

    WIDTH_215MM = 0x01  # 1728 pixels at R8: A4 and US letter
    WIDTH_255MM = 0x02
    WIDTH_303MM = 0x04
    UNLIMITED_LENGTH = 0x10000
    A4_LENGTH = 0x20000
    B4_LENGTH = 0x40000
    US_LETTER_LENGTH = 0x80000
    US_LEGAL_LENGTH = 0x100000


class T4Encoding(IntEnum):
    """``T4_COMPRESSION_*`` (t4_rx.h): how a received TIFF is written."""

    ITU_T4_1D = 1
    ITU_T4_2D = 2
    ITU_T6 = 3


class LogLevel(IntEnum):
    """``SPAN_LOG_*`` severities (logging.h); combine with the SHOW_* bits below."""

    NONE = 0
    ERROR = 1
    WARNING = 2
    PROTOCOL_ERROR = 3
    PROTOCOL_WARNING = 4
    FLOW = 5


#: logging.h: prefix each line with the protocol name ("T.30", "FAX")
SPAN_LOG_SHOW_PROTOCOL = 0x0800


class T30Stats(ctypes.Structure):
    """``t30_stats_t`` of 0.0.6: fifteen ints (the rtp/rtn counters are ``#if 0``'d out)."""

    _fields_ = [
        ("bit_rate", ctypes.c_int),
        ("error_correcting_mode", ctypes.c_int),
        ("pages_tx", ctypes.c_int),
        ("pages_rx", ctypes.c_int),
        ("pages_in_file", ctypes.c_int),
        ("x_resolution", ctypes.c_int),  # pixels per metre
        ("y_resolution", ctypes.c_int),  # pixels per metre
        ("width", ctypes.c_int),
        ("length", ctypes.c_int),
        ("image_size", ctypes.c_int),
        ("encoding", ctypes.c_int),
        ("bad_rows", ctypes.c_int),
        ("longest_bad_row_run", ctypes.c_int),
        ("error_correcting_mode_retries", ctypes.c_int),
        ("current_status", ctypes.c_int),
    ]


class _StatsBuffer(ctypes.Structure):
    """What we hand to t30_get_transfer_statistics: the struct plus spare room, so that a
    library built with a longer t30_stats_t (a later release) writes into padding rather
    than over the stack. The field offsets are those of :class:`T30Stats`."""

    _fields_ = [("stats", T30Stats), ("_spare", ctypes.c_int * 32)]


#: ``void t30_phase_e_handler_t(t30_state_t *s, void *user_data, int completion_code)``
PhaseEHandler = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int)
#: ``int t30_phase_d_handler_t(t30_state_t *s, void *user_data, int result)``
PhaseDHandler = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int)
#: ``void message_handler_func_t(int level, const char *text)``
MessageHandler = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p)

# --------------------------------------------------------------------------- loading

_P = ctypes.c_void_p
_INT = ctypes.c_int
_STR = ctypes.c_char_p
_SAMPLES = ctypes.POINTER(ctypes.c_int16)

#: name -> (restype, argtypes) for every function this module calls
_SIGNATURES: dict[str, tuple[object, list[object]]] = {
    # fax.h
    "fax_init": (_P, [_P, _INT]),
    "fax_free": (_INT, [_P]),
    "fax_get_t30_state": (_P, [_P]),
    "fax_get_logging_state": (_P, [_P]),
    "fax_tx": (_INT, [_P, _SAMPLES, _INT]),
    "fax_rx": (_INT, [_P, _SAMPLES, _INT]),
    "fax_set_transmit_on_idle": (None, [_P, _INT]),
    # t30.h / t30_api.h
    "t30_set_tx_file": (None, [_P, _STR, _INT, _INT]),
    "t30_set_rx_file": (None, [_P, _STR, _INT]),
    "t30_set_tx_ident": (_INT, [_P, _STR]),
    "t30_get_rx_ident": (_STR, [_P]),
    "t30_set_ecm_capability": (_INT, [_P, _INT]),
    "t30_set_rx_encoding": (_INT, [_P, _INT]),
    "t30_set_supported_modems": (_INT, [_P, _INT]),
    "t30_set_supported_compressions": (_INT, [_P, _INT]),
    "t30_set_supported_resolutions": (_INT, [_P, _INT]),
    "t30_set_supported_image_sizes": (_INT, [_P, _INT]),
    "t30_set_phase_d_handler": (None, [_P, PhaseDHandler, _P]),
    "t30_set_phase_e_handler": (None, [_P, PhaseEHandler, _P]),
    "t30_get_transfer_statistics": (None, [_P, ctypes.POINTER(_StatsBuffer)]),
    "t30_get_logging_state": (_P, [_P]),
    "t30_call_active": (_INT, [_P]),
    "t30_terminate": (None, [_P]),
    # t30_logging.h
    "t30_completion_code_to_str": (_STR, [_INT]),
    # logging.h
    "span_log_set_level": (_INT, [_P, _INT]),
    "span_log_set_message_handler": (None, [_P, MessageHandler]),
}

#: 0.0.6's soname; spandsp 3.x is libspandsp.so.3, with other enums and struct layouts
_SONAME = "libspandsp.so.2"
#: completion texts that pin the 0.0.6 enum: the last code, and the first past it
_FINGERPRINT = {
    int(T30Error.T0_EXPIRED): b"Timed out waiting for initial communication",
    int(T30Error.CSA_UNACCEPTABLE): b"Called subscriber internet address not accepted",
    int(T30Error.CSA_UNACCEPTABLE) + 1: b"???",
}
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None


def library() -> ctypes.CDLL:
    """The loaded libspandsp with every function used here declared. Loaded once per process."""
    global _lib
    with _lock:
        if _lib is None:
            _lib = _load()
        return _lib


def _load() -> ctypes.CDLL:
    try:
        lib = ctypes.CDLL(_SONAME)
    except OSError as exc:
        raise SpandspUnavailable(
            f"cannot load {_SONAME} (install the Debian package libspandsp2, "
            f"e.g. with scripts/ensure-system-deps.sh): {exc}"
        ) from None
    for function, (restype, argtypes) in _SIGNATURES.items():
        fn = getattr(lib, function)
        fn.restype = restype
        fn.argtypes = argtypes
    # Same soname, different build? The enum is checked through the library's own strings,
    # because a wrong guess here would mean reading t30_stats_t with the wrong layout.
    for code, text in _FINGERPRINT.items():
        if lib.t30_completion_code_to_str(code) != text:
            raise SpandspUnavailable(f"{_SONAME} is not spandsp 0.0.6 (T.30 completion code {code} differs)")
    return lib


def completion_text(code: int) -> str:
    """spandsp's own words for a phase E completion code (t30_completion_code_to_str)."""
    raw = library().t30_completion_code_to_str(code)
    return raw.decode("ascii", "replace") if raw else f"T.30 completion code {code}"


# --------------------------------------------------------------------------- audio


class AudioBlock:
    """A reusable buffer of int16 samples, passed to spandsp without copying."""

    def __init__(self, samples: int):
        self.size = samples
        self.buffer = (ctypes.c_int16 * samples)()

    def silence(self, start: int = 0) -> None:
        """Zero the samples from ``start`` on (spandsp may produce fewer than asked)."""
        if start < self.size:
            ctypes.memset(ctypes.byref(self.buffer, start * 2), 0, (self.size - start) * 2)


# --------------------------------------------------------------------------- terminal


class FaxTerminal:
    """One software fax machine with an analogue (audio) front end: ``fax_state_t``.

    Not thread-safe; use one terminal from one thread. Close it (or use it as a context
    manager) to free the C state and the TIFF file spandsp holds open.
    """

    def __init__(self, *, calling: bool, ident: str = ""):
        self._lib = library()
        state = self._lib.fax_init(None, 1 if calling else 0)
        if not state:
            raise MemoryError("fax_init failed")
        self._state: int | None = state
        self._t30: int = self._lib.fax_get_t30_state(state)
        self.calling = calling
        # Callbacks must outlive the call: ctypes frees the C trampoline with the Python object.
        self._callbacks: list[object] = []
        self.completion: int | None = None
        self._on_phase_e: list[Callable[[int], None]] = []
        self._on_phase_d: list[Callable[[int], None]] = []
        # Keep the line busy with silence rather than returning short blocks when idle: the
        # other terminal's receiver then sees continuous audio, as on a real line.
        self._lib.fax_set_transmit_on_idle(state, 1)
        if ident:
            self.set_ident(ident)
        handler = PhaseEHandler(self._phase_e)
        self._callbacks.append(handler)
        self._lib.t30_set_phase_e_handler(self._t30, handler, None)

    # ---------------------------------------------------------------- configuration

    def set_ident(self, ident: str) -> None:
        """Our station id: TSI when sending, CSI when answering (at most 20 ASCII chars)."""
        self._lib.t30_set_tx_ident(self._t30, _ident_bytes(ident))

    def send_file(self, path: Path, start_page: int = -1, stop_page: int = -1) -> None:
        """Transmit this TIFF/F file when the call runs (pages count from 0; -1: no limit)."""
        self._lib.t30_set_tx_file(self._t30, str(path).encode(), start_page, stop_page)

    def receive_file(self, path: Path, stop_page: int = -1, encoding: T4Encoding = T4Encoding.ITU_T6) -> None:
        """Write received pages to this TIFF file, each page as it completes."""
        self._lib.t30_set_rx_encoding(self._t30, int(encoding))
        self._lib.t30_set_rx_file(self._t30, str(path).encode(), stop_page)

    def set_ecm(self, enabled: bool) -> None:
        self._lib.t30_set_ecm_capability(self._t30, 1 if enabled else 0)

    def set_capabilities(
        self,
        *,
        modems: Modem | None = None,
        compressions: Compression | None = None,
        resolutions: Resolution | None = None,
        image_sizes: ImageSize | None = None,
    ) -> None:
        """What this machine advertises (DIS) or may choose (DCS); None keeps spandsp's default."""
        if modems is not None:
            self._lib.t30_set_supported_modems(self._t30, int(modems))
        if compressions is not None:
            self._lib.t30_set_supported_compressions(self._t30, int(compressions))
        if resolutions is not None:
            self._lib.t30_set_supported_resolutions(self._t30, int(resolutions))
        if image_sizes is not None:
            self._lib.t30_set_supported_image_sizes(self._t30, int(image_sizes))

    def on_phase_e(self, callback: Callable[[int], None]) -> None:
        """Call ``callback(completion_code)`` when the call ends (phase E)."""
        self._on_phase_e.append(callback)

    def on_phase_d(self, callback: Callable[[int], None]) -> None:
        """Call ``callback(fcf)`` at each post-page exchange (phase D), i.e. after every page."""
        if not self._on_phase_d:
            handler = PhaseDHandler(self._phase_d)
            self._callbacks.append(handler)
            self._lib.t30_set_phase_d_handler(self._t30, handler, None)
        self._on_phase_d.append(callback)

    def capture_log(
        self,
        lines: list[str],
        prefix: str = "",
        skip: tuple[str, ...] = (),
        clock: Callable[[], float] | None = None,
    ) -> None:
        """Append spandsp's T.30 protocol log (phases, frames, modems, result) to ``lines``,
        each line starting with ``prefix`` (two terminals can share one list) and, given a
        ``clock``, its reading in seconds. Lines holding any of ``skip`` are dropped (ECM
        logs every 256-byte frame)."""

        def handler(level: int, text: bytes | None) -> None:
            if text:
                line = text.decode("ascii", "replace").rstrip("\n")
                if not any(s in line for s in skip):
                    stamp = f"{clock():8.2f}s " if clock is not None else ""
                    lines.append(stamp + prefix + line)

        cb = MessageHandler(handler)
        self._callbacks.append(cb)
        level = int(LogLevel.FLOW) | SPAN_LOG_SHOW_PROTOCOL
        for log in (self._lib.t30_get_logging_state(self._t30), self._lib.fax_get_logging_state(self._state)):
            self._lib.span_log_set_level(log, level)
            self._lib.span_log_set_message_handler(log, cb)

    # ---------------------------------------------------------------- running

    def tx(self, block: AudioBlock) -> None:
        """Fill ``block`` with the next samples this machine puts on the line."""
        made = self._lib.fax_tx(self._state, block.buffer, block.size)
        if made < block.size:
            block.silence(made)

    def rx(self, block: AudioBlock) -> None:
        """Hear ``block`` from the line; this is also what advances the machine's timers."""
        self._lib.fax_rx(self._state, block.buffer, block.size)

    def stats(self) -> T30Stats:
        buf = _StatsBuffer()
        self._lib.t30_get_transfer_statistics(self._t30, ctypes.byref(buf))
        return buf.stats

    @property
    def far_ident(self) -> str:
        raw = self._lib.t30_get_rx_ident(self._t30)
        return raw.decode("ascii", "replace").strip() if raw else ""

    @property
    def active(self) -> bool:
        return bool(self._lib.t30_call_active(self._t30))

    def hang_up(self) -> None:
        """Drop the call on our side (t30_terminate): finish and close any file in progress."""
        self._lib.t30_terminate(self._t30)

    def close(self) -> None:
        if self._state is not None:
            # fax_free releases the T.30 context (closing its TIFF files) and frees the state;
            # calling fax_release first would only repeat that.
            self._lib.fax_free(self._state)
            self._state = None

    def __enter__(self) -> FaxTerminal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------- callbacks

    def _phase_e(self, _t30: int | None, _user: int | None, code: int) -> None:
        self.completion = code
        for callback in self._on_phase_e:
            callback(code)

    def _phase_d(self, _t30: int | None, _user: int | None, result: int) -> int:
        for callback in self._on_phase_d:
            callback(result)
        return int(T30Error.OK)


def _ident_bytes(ident: str) -> bytes:
    # T.30 idents are at most 20 printable ASCII characters (T30_MAX_IDENT_LEN); spandsp
    # refuses longer ones, so trim rather than lose the whole ident.
    cleaned = "".join(ch if " " <= ch <= "~" else "?" for ch in ident)
    return cleaned[:20].encode("ascii")
