"""The garbage collector, told that what a serving process builds at start lives as long as it.

A process builds its modules, configuration, prebuilt SQL statements, templates and schemas
once. CPython's collector would walk all of them again at every full collection: a pause of
tens of milliseconds in the middle of requests and letters, and CPU for nothing (measured in
docs/benchmarks.md, "The heap"). ``gc.freeze()`` moves every object alive at that moment out of
the collector's view; what the process allocates afterwards is collected as before.
"""

from __future__ import annotations

import gc


def settle() -> None:
    """Call once start-up is over, just before serving."""
    gc.collect()  # the start-up's own garbage is freed, not frozen
    gc.freeze()
