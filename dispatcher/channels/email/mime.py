"""A letter's wire bytes, written directly: the same bytes :func:`build_message` and
``as_bytes(policy=MESSAGE_POLICY)`` make, without the email package's header objects.

Why: the email package parses every header it is given into a token tree and folds it back out
(``email._header_value_parser``), which made building and serialising a letter the largest part
of a worker's CPU (about 60 % of the worker thread under cProfile, bench/worker_path.py).

How the bytes stay the same:

* A header whose value is plain, short ASCII (an unstructured value of printable ASCII, or a
  display name of atoms and a dot-atom address, the line within 78 characters) folds to
  ``Name: value`` — written so directly. Anything else (non-ASCII names and subjects that need
  RFC 2047 encoded words, quoting, long lines) is folded by the email package itself, with the
  message policy, and the result kept in a cache keyed by the header's value: the subject, the
  target and the section are the same for thousands of letters, and a supporter's name for all
  the letters of an appeal.
* The two body parts are encoded by the same rules as the email package's raw data manager
  (``email.contentmanager``: 7bit when it can, else quoted-printable or base64, whichever is
  shorter on the first lines), with its encoders.
* The multipart frame, the part headers and their order are the ones ``set_content`` and
  ``add_alternative`` make; the boundary is made the same way (random) and checked against the
  parts.

tests/test_email_mime.py compares the bytes with the email package's, byte for byte, over
generated inputs; the validation (header injection, addresses) is :func:`letter_fields`, shared
with :func:`build_message`.
"""

from __future__ import annotations

import binascii
import random
import re
import sys
from datetime import datetime
from email import quoprimime
from email.headerregistry import Address
from email.utils import format_datetime
from functools import lru_cache

from dispatcher.channels.email.message import MESSAGE_POLICY, letter_fields
from dispatcher.config.models import Section

_MAX_LINE = 78  # MESSAGE_POLICY.max_line_length
_CRLF = "\r\n"
#: a display name of atoms separated by single spaces: written as it is, unquoted
_PHRASE = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?: [A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*\Z")
#: printable ASCII, no leading, trailing or doubled space: an unstructured value as it is
_PLAIN_TEXT = re.compile(r"[!-~]+(?: [!-~]+)*\Z")
_NEWLINES = re.compile(r"\r\n|\r|\n")
_BOUNDARY_WIDTH = len(repr(sys.maxsize - 1))  # email.generator's _width


@lru_cache(maxsize=8192)
def _folded_by_policy(name: str, display_name: str | None, value: str) -> str:
    """The header line(s) as the email package folds them (CRLF line ends)."""
    header_value: str | Address = value if display_name is None else Address(display_name=display_name, addr_spec=value)
    _, header = MESSAGE_POLICY.header_store_parse(name, header_value)
    folded: str = header.fold(policy=MESSAGE_POLICY)
    return folded


def _unstructured(name: str, value: str) -> str:
    if len(name) + 2 + len(value) <= _MAX_LINE and "=?" not in value and _PLAIN_TEXT.match(value):
        return f"{name}: {value}{_CRLF}"
    return _folded_by_policy(name, None, value)


def _address(name: str, display_name: str, addr_spec: str) -> str:
    # addr_spec comes from letter_fields: a dot-atom at a host name, or checked by the parser
    if not display_name:
        line = f"{name}: {addr_spec}"
    elif _PHRASE.match(display_name) and "=?" not in display_name:
        line = f"{name}: {display_name} <{addr_spec}>"
    else:
        return _folded_by_policy(name, display_name, addr_spec)
    if len(line) <= _MAX_LINE and _simple_addr_spec(addr_spec):
        return line + _CRLF
    return _folded_by_policy(name, display_name, addr_spec)


_DOT_ATOM_ADDRESS = re.compile(
    r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
    r"@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*\Z"
)


def _simple_addr_spec(addr_spec: str) -> bool:
    return _DOT_ATOM_ADDRESS.match(addr_spec) is not None


def _message_id(value: str) -> str:
    if value.startswith("<") and value.endswith(">") and _DOT_ATOM_ADDRESS.match(value[1:-1]):
        line = f"Message-ID: {value}"
        if len(line) <= _MAX_LINE:
            return line + _CRLF
    return _folded_by_policy("Message-ID", None, value)


#: every character body_encode quotes (CR and LF aside, its line breaks), and its quoted form,
#: asked of body_encode itself (a character before "x" is never trailing white space)
_QP_QUOTED = {
    c: quoted
    for c, quoted in ((chr(i), quoprimime.body_encode(chr(i) + "x")[:-1]) for i in range(256) if i not in (10, 13))
    if quoted != c
}
_QP_SPECIAL = re.compile("[" + "".join(re.escape(c) for c in _QP_QUOTED) + "]")


def _qp_quote(match: re.Match[str]) -> str:
    return _QP_QUOTED[match.group()]


def _qp_lines(body: str) -> list[str]:
    """``quoprimime.body_encode(body, _MAX_LINE)``'s output line by line: one string per line of
    ``body`` (latin-1 text, lines joined by LF, no line end at its end), holding that line
    encoded (a long one split by soft breaks, with LF). The caller joins them, so that the
    first lines' encoding (the email package's sniff, to choose between quoted-printable and
    base64) and the whole part's come from one pass instead of two.

    The same characters as body_encode: its table, applied by a regex that calls back only on
    the characters it quotes (a letter is mostly safe ASCII: about half the time of
    ``str.translate`` with the 256-entry list); then its per-line loop, skipped for the lines
    it would leave alone (short, not ending in white space). After the table a line holds no
    line break but LF: every other character ``splitlines`` breaks at is quoted, and latin-1
    text has nothing above U+00FF."""
    return [
        line if len(line) <= _MAX_LINE and line[-1:] not in (" ", "\t") else _qp_split(line)
        for line in _QP_SPECIAL.sub(_qp_quote, body).split("\n")
    ]


def _qp_split(line: str) -> str:
    # quoprimime.body_encode's loop for one quoted line (maxlinelen=_MAX_LINE, eol=LF), as it is
    pieces: list[str] = []
    start = 0
    laststart = len(line) - 1 - _MAX_LINE
    while start <= laststart:
        stop = start + _MAX_LINE - 1
        # never split an escape sequence
        if line[stop - 2] == "=":
            pieces.append(line[start : stop - 1])
            start = stop - 2
        elif line[stop - 1] == "=":
            pieces.append(line[start:stop])
            start = stop - 1
        else:
            pieces.append(line[start:stop] + "=")
            start = stop
    if line and line[-1] in " \t":
        room = start - laststart
        if room >= 3:
            end = f"={ord(line[-1]):02X}"
        elif room == 2:
            end = line[-1] + "=\n"
        else:
            end = f"=\n={ord(line[-1]):02X}"
        pieces.append(line[start:-1] + end)
    else:
        pieces.append(line[start:])
    return "\n".join(pieces)


def _encode_body(text: str) -> tuple[str, str]:
    """(Content-Transfer-Encoding, payload with LF line ends): the rules and encoders of
    ``email.contentmanager._encode_text`` for a utf-8 text part under a 7bit policy."""
    lines = text.encode("utf-8").splitlines()
    if max((len(x) for x in lines), default=0) <= _MAX_LINE:
        try:
            return "7bit", (b"\n".join(lines) + b"\n").decode("ascii")
        except UnicodeDecodeError:
            pass
    sniff = b"\r\n".join(lines[:10]) + b"\r\n"
    # body_encode(sniff) and body_encode(all lines) encode line by line: both from one pass
    encoded = _qp_lines(b"\n".join(lines).decode("latin-1"))
    sniff_qp = "\n".join(encoded[:10]) + "\n"
    sniff_base64 = binascii.b2a_base64(sniff)
    # (the email package's comparison, which counts qp's line ends and not base64's)
    if len(sniff_qp) > len(sniff_base64):
        data = b"\r\n".join(lines) + b"\r\n"
        step = _MAX_LINE // 4 * 3
        return "base64", "".join(
            binascii.b2a_base64(data[i : i + step]).decode("ascii") for i in range(0, len(data), step)
        )
    if len(lines) <= 10:
        return "quoted-printable", sniff_qp
    return "quoted-printable", "\n".join(encoded) + "\n"


def _crlf(payload: str) -> str:
    # what email.generator's _write_lines does to a payload; _encode_body's have LF line ends
    # only (split from bytes.splitlines), for which a replace is the same and cheaper
    if "\r" not in payload:
        return payload.replace("\n", _CRLF)
    return _CRLF.join(_NEWLINES.split(payload))


def _boundary(parts: str) -> str:
    # email.generator.Generator._make_boundary: random, and not a line of the parts
    token = random.randrange(sys.maxsize)
    base = "=" * 15 + f"{token:0{_BOUNDARY_WIDTH}d}" + "=="
    boundary, counter = base, 0
    while f"--{boundary}" in parts:
        boundary = f"{base}.{counter}"
        counter += 1
    return boundary


def letter_bytes(
    *,
    delivery_id: str,
    section: Section,
    to_name: str,
    to_address: str,
    supporter_name: str,
    supporter_email: str,
    subject: str,
    text: str,
    html: str,
    language: str,
    date: datetime,
    message_id: str | None = None,
) -> bytes:
    """``build_message(...).as_bytes(policy=MESSAGE_POLICY)``, made directly (same arguments,
    same checks and errors, see :func:`dispatcher.channels.email.message.build_message`)."""
    fields = letter_fields(
        delivery_id=delivery_id,
        section=section,
        to_name=to_name,
        to_address=to_address,
        supporter_name=supporter_name,
        supporter_email=supporter_email,
        subject=subject,
        language=language,
        date=date,
        message_id=message_id,
    )
    text_cte, text_payload = _encode_body(text)
    html_cte, html_payload = _encode_body(html)
    plain_part = (
        f'Content-Type: text/plain; charset="utf-8"{_CRLF}'
        f"Content-Transfer-Encoding: {text_cte}{_CRLF}{_CRLF}{_crlf(text_payload)}"
    )
    # (the second part has its own MIME-Version: add_alternative builds it as a message)
    html_part = (
        f'Content-Type: text/html; charset="utf-8"{_CRLF}'
        f"Content-Transfer-Encoding: {html_cte}{_CRLF}MIME-Version: 1.0{_CRLF}{_CRLF}{_crlf(html_payload)}"
    )
    boundary = _boundary(plain_part + _CRLF + html_part)
    head = "".join(
        (
            _address("From", fields.from_name, fields.from_address),
            _address("To", fields.to_name, fields.to_address),
            _address("Reply-To", fields.reply_to_name, fields.reply_to_address),
            _unstructured("Subject", fields.subject),
            f"Date: {format_datetime(date)}{_CRLF}",
            _message_id(fields.message_id),
            _unstructured("X-Dispatch-Delivery", delivery_id),
            f"MIME-Version: 1.0{_CRLF}",
            f'Content-Type: multipart/alternative;{_CRLF} boundary="{boundary}"{_CRLF}',
            _unstructured("Content-Language", language),
        )
    )
    return (
        f"{head}{_CRLF}--{boundary}{_CRLF}{plain_part}{_CRLF}--{boundary}{_CRLF}{html_part}{_CRLF}--{boundary}--{_CRLF}"
    ).encode("ascii")
