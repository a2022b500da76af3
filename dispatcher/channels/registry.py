"""The channels a service knows, by name.

A registry holds channel *kinds* (classes: their facts are read by config validation and the
ledger without building anything) and builds each channel the first time a worker, the API or
the reconciler asks for it, with the factory it was registered with.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

from dispatcher.channels.base import Channel
from dispatcher.config.models import Target
from dispatcher.errors import UnknownChannel

#: builds a channel; the wiring passes settings, environment and shared clients
Factory = Callable[[], Channel]


class Channels:
    def __init__(self) -> None:
        self._kinds: dict[str, type[Any]] = {}
        self._factories: dict[str, Factory] = {}
        self._built: dict[str, Channel] = {}
        self._lock = threading.Lock()

    def register(self, kind: type[Any], factory: Factory | None = None) -> Channels:
        """Add ``kind`` (a class implementing :class:`~dispatcher.channels.base.Channel`), built
        by ``factory`` when first used. Returns the registry, for chaining."""
        name = kind.name
        if name in self._kinds:
            raise ValueError(f"a channel named {name!r} is registered already")
        self._kinds[name] = kind
        if factory is not None:
            self._factories[name] = factory
        return self

    def provide(self, name: str, factory: Factory) -> Channels:
        """Say how to build the registered channel ``name``."""
        self.kind(name)
        self._factories[name] = factory
        self._built.pop(name, None)
        return self

    def names(self) -> list[str]:
        return sorted(self._kinds)

    def __contains__(self, name: object) -> bool:
        return name in self._kinds

    def __iter__(self) -> Iterator[type[Any]]:
        return iter(self._kinds[n] for n in self.names())

    def kind(self, name: str) -> type[Any]:
        try:
            return self._kinds[name]
        except KeyError:
            raise UnknownChannel(name, self.names()) from None

    def get(self, name: str) -> Channel:
        """The channel ``name``, built on first use."""
        built = self._built.get(name)
        if built is not None:
            return built
        kind = self.kind(name)
        factory = self._factories.get(name)
        if factory is None:
            raise UnknownChannel(f"{name} (registered without a way to build it)", self.names())
        with self._lock:
            made = self._built.get(name)
            if made is None:
                made = factory()
                if not isinstance(made, kind):
                    raise TypeError(
                        f"the factory of channel {name!r} built a {type(made).__name__}, not a {kind.__name__}"
                    )
                self._built[name] = made
        return made

    def built(self) -> list[Channel]:
        """The channels built so far (to close them)."""
        return list(self._built.values())

    # ------------------------------------------------------------------ facts, without building

    def address_of(self, target: Target, name: str) -> str | None:
        found: str | None = self.kind(name).address_of(target)
        return found

    def reachable_by(self, target: Target) -> list[str]:
        return [n for n in self.names() if self._kinds[n].address_of(target) is not None]

    def sent_final_after(self) -> dict[str, timedelta | None]:
        return {name: kind.sent_final_after for name, kind in self._kinds.items()}
