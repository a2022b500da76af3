"""The operators' web console, served by the API process under ``/console``.

Server-rendered pages (Jinja2 templates in ``templates/``, one stylesheet in ``static/``, no
JavaScript needed) over the ledger's read models, the queue's state in Redis and the ledger's
controls. The console sits at the top of the package: it may import the ledger, the queue, the
policy and the config; nothing below imports it (tests/test_package_rules.py).

* :mod:`.scope` — the signed-in operator and what it may see and do (read this first);
* :mod:`.auth`, :mod:`.sessions` — signing in and out, cookies, the sign-in limits;
* :mod:`.pages` — rendering, flash messages, redirects;
* :mod:`.overview`, :mod:`.channels`, :mod:`.audit`, :mod:`.campaigns`, :mod:`.letters`,
  :mod:`.supporters` (erasing a supporter, an admin's) — the pages;
* :mod:`.site` — the app that puts them together (:func:`create_console`).

docs/console.md describes accounts, sign-in and the pages.
"""

from __future__ import annotations

from dispatcher.console.context import PREFIX, ConsoleContext
from dispatcher.console.site import create_console

__all__ = ["PREFIX", "ConsoleContext", "create_console"]
