"""The one Jinja2 environment letters are rendered with.

Built once per process and shared by every worker thread: a Jinja ``Environment`` is safe to
render from many threads once it is configured, and its compiled templates are what make a
letter cost microseconds rather than a parse per letter.
"""

from __future__ import annotations

from pathlib import Path

from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape
from markupsafe import Markup, escape

#: only these are HTML; letter bodies (``letter.j2``) and ``*.txt.j2`` are plain text and must
#: reach the text part byte for byte, so they are never escaped at the source.
HTML_EXTENSIONS = ("html", "htm", "html.j2", "htm.j2")


def nl2br(value: object) -> Markup:
    """Escape ``value`` and turn its line breaks into ``<br>``: for supporter text in HTML."""
    text = str(value).replace("\r\n", "\n").replace("\r", "\n")
    return Markup("<br>\n").join(escape(line) for line in text.split("\n"))


def make_environment(templates_dir: Path) -> Environment:
    env = Environment(
        loader=FileSystemLoader(str(templates_dir), encoding="utf-8"),
        # A misspelt variable must stop the letter, not send "Dear ," to a head of state.
        undefined=StrictUndefined,
        autoescape=select_autoescape(
            enabled_extensions=HTML_EXTENSIONS,
            disabled_extensions=(),
            default_for_string=False,
            default=False,
        ),
        # Templates change with a deploy, not while workers run: no stat() per render.
        auto_reload=False,
        # Names come only from files on disk, so the set is bounded; never evicting means a
        # busy worker never recompiles. -1 is also Jinja's lock-free plain-dict cache.
        cache_size=-1,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["nl2br"] = nl2br
    return env
