"""Header safety for supporter input.

Python 3.11.7 (the version on our machines) still has CVE-2024-6923: the email package does
not quote newlines when it folds headers, so a name holding CR/LF can add headers of its own.
Encoded words (``=?utf-8?...?=``) in a display name let a supporter pose as someone else once
a mail client decodes them. Both are refused at intake and again when building a message.
"""

from __future__ import annotations

import re
import unicodedata

from dispatcher.errors import HeaderInjection

#: printable ASCII and tabs: none of it is a line break or a control character
_PLAIN = re.compile(r"[\t -~]*\Z")


def unsafe_header_reason(value: str) -> str | None:
    """Why ``value`` may not go into a mail header, or None when it may."""
    if _PLAIN.match(value):
        # the common case, without looking up each character's category
        return "contains '=?', the start of an encoded word" if "=?" in value else None
    for ch in value:
        if ch in "\r\n":
            return "contains a line break (CR or LF)"
        if unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp") and ch != "\t":
            return f"contains the control character U+{ord(ch):04X}"
    if "=?" in value:
        return "contains '=?', the start of an encoded word"
    return None


def ensure_header_safe(value: str, field: str) -> str:
    reason = unsafe_header_reason(value)
    if reason is not None:
        raise HeaderInjection(f"{field} {reason}")
    return value
