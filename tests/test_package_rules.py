"""Rules of the package's shape that a reviewer would otherwise have to remember: one error root,
imports that run downhill, and no channel named outside its own package."""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
import re
from pathlib import Path

import pytest

import dispatcher
from dispatcher.errors import DispatchError

PACKAGE = Path(dispatcher.__file__).parent


def modules() -> list[str]:
    return sorted(m.name for m in pkgutil.walk_packages([str(PACKAGE)], "dispatcher.") if ".migrations" not in m.name)


def source_of(module: str) -> Path:
    path = PACKAGE.joinpath(*module.split(".")[1:])
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def imported(module: str) -> set[str]:
    """Every dispatcher module ``module`` imports, at the top or inside a function."""
    tree = ast.parse(source_of(module).read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name.startswith("dispatcher")}


def test_every_exception_the_package_defines_derives_from_dispatch_error():
    outside = []
    for name in modules():
        module = importlib.import_module(name)
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ == name and issubclass(cls, BaseException) and not issubclass(cls, DispatchError):
                outside.append(f"{name}.{cls.__qualname__}")
    assert outside == []


#: what each layer must not import (intake and console → ledger → queue → render → channels, never
#: back; the sandbox stand-ins and the config models sit below the channels)
FORBIDDEN = {
    "dispatcher.channels": (
        "dispatcher.intake",
        "dispatcher.ledger",
        "dispatcher.queue",
        "dispatcher.render",
        "dispatcher.console",
    ),
    "dispatcher.sandbox": (
        "dispatcher.intake",
        "dispatcher.ledger",
        "dispatcher.queue",
        "dispatcher.app",
        "dispatcher.console",
    ),
    "dispatcher.render": (
        "dispatcher.intake",
        "dispatcher.ledger",
        "dispatcher.queue",
        "dispatcher.app",
        "dispatcher.console",
    ),
    "dispatcher.queue": ("dispatcher.intake", "dispatcher.app", "dispatcher.cli", "dispatcher.console"),
    "dispatcher.ledger": (
        "dispatcher.intake",
        "dispatcher.queue",
        "dispatcher.channels",
        "dispatcher.app",
        "dispatcher.console",
    ),
    "dispatcher.policy": ("dispatcher.intake", "dispatcher.queue", "dispatcher.app", "dispatcher.console"),
    "dispatcher.config.models": ("dispatcher.channels", "dispatcher.ledger", "dispatcher.queue", "dispatcher.console"),
    "dispatcher.settings": (
        "dispatcher.policy",
        "dispatcher.channels",
        "dispatcher.ledger",
        "dispatcher.app",
        "dispatcher.console",
    ),
    # the console sits beside the intake at the top: it reads and acts through the layers below,
    # and neither it nor the intake knows the other (the API process mounts both, in app.py)
    "dispatcher.intake": ("dispatcher.console",),
    "dispatcher.console": ("dispatcher.intake", "dispatcher.app", "dispatcher.cli", "dispatcher.dev"),
    # every layer counts through the instruments, so they import no layer; the collectors read
    # the ledger and the queue, and are wired by app.py
    "dispatcher.metrics": ("dispatcher.intake", "dispatcher.app", "dispatcher.cli", "dispatcher.console"),
    "dispatcher.metrics.instruments": ("dispatcher.",),
}


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_imports_run_downhill(layer):
    uphill = []
    for name in modules():
        if name == layer or name.startswith(layer + "."):
            uphill += [f"{name} imports {i}" for i in imported(name) if i.startswith(FORBIDDEN[layer])]
    assert uphill == []


# a channel's name compared, or listed as the choices of an if
_NAMED = re.compile(r"""(==|!=|\bin)\s*\(?\s*["'](email|fax)["']|["'](email|fax)["']\s*(==|!=)""")


def test_no_channel_is_named_outside_its_own_package():
    named = []
    for path in PACKAGE.rglob("*.py"):
        if PACKAGE / "channels" in path.parents:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if _NAMED.search(line):
                named.append(f"{path.relative_to(PACKAGE)}:{number}: {line.strip()}")
    assert named == []


def test_only_the_lifecycle_writes_a_state():
    """Every write of ``deliveries.state`` is built from the state table in ledger/lifecycle.py:
    no ``.values(state=...)`` nor ``Delivery(state=...)`` anywhere else."""
    writers = []
    for path in PACKAGE.rglob("*.py"):
        if path == PACKAGE / "ledger" / "lifecycle.py" or "migrations" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            keys = {k.arg for k in node.keywords}
            keys |= {
                k.value
                for arg in node.args
                if isinstance(arg, ast.Dict)
                for k in arg.keys
                if isinstance(k, ast.Constant)
            }
            if name in ("values", "Delivery") and "state" in keys:
                writers.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert writers == []
