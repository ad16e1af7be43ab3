"""The SIP core (cluster/sip/) and the B2BUA call machine (workers/sip/call/) must stay
sans-IO: no module there may import I/O, clocks or randomness.  Callers pass time,
random bytes and the media relay's answers in, which is what lets them be tested
exhaustively and deterministically."""

from __future__ import annotations

from pathlib import Path

import pytest
from importscan import absolute_imports

ROOT = Path(__file__).resolve().parents[2]
SIP_CORE = ROOT / "cluster" / "sip"
CALL_MACHINE = ROOT / "workers" / "sip" / "call"
FORBIDDEN = frozenset({
    "socket", "select", "selectors", "ssl", "redis", "gevent", "time", "random", "secrets",
    "os", "threading", "asyncio", "subprocess", "datetime",
})


def forbidden_imports(source: str, filename: str = "<source>") -> list[tuple[int, str]]:
    """(line, module) for every import of a forbidden top-level module in ``source``."""
    return [(line, name) for line, name in absolute_imports(source, filename)
            if name.split(".")[0] in FORBIDDEN]


def core_modules() -> list[Path]:
    return sorted(SIP_CORE.rglob("*.py")) + sorted(CALL_MACHINE.rglob("*.py"))


def test_the_core_has_modules_to_check():
    assert SIP_CORE / "__init__.py" in core_modules()
    assert CALL_MACHINE / "machine.py" in core_modules()


@pytest.mark.parametrize("path", core_modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_core_module_is_sans_io(path: Path):
    violations = forbidden_imports(path.read_text(), str(path))
    assert not violations, "\n".join(
        f"{path}:{line}: imports {module}; pass clocks/random bytes in from the caller instead"
        for line, module in violations
    )


@pytest.mark.parametrize("source, expected", [
    ("import time", [(1, "time")]),
    ("import os.path", [(1, "os.path")]),
    ("from datetime import datetime", [(1, "datetime")]),
    ("import json, socket as s", [(1, "socket")]),
    ("def f():\n    import secrets\n", [(2, "secrets")]),
    ("if True:\n    from gevent import sleep\n", [(2, "gevent")]),
    ("from . import time", []),  # a sibling module of the core, not the stdlib's
    ("from .errors import SipError", []),
    ("import hashlib, base64, re", []),
    ("import timeit", []),  # a prefix of a forbidden name is not that name
])
def test_checker_finds_forbidden_imports(source: str, expected: list[tuple[int, str]]):
    assert forbidden_imports(source) == expected


def foreign_imports(source: str, filename: str = "<source>") -> list[tuple[int, str]]:
    """(line, module) of every import of project code outside the SIP core: the call
    machine may use cluster.sip and its own package (relative imports), nothing that
    reaches Redis, relays or sockets (cluster.store, workers.sip.media...)."""
    return [(line, name) for line, name in absolute_imports(source, filename)
            if name.split(".")[0] in ("cluster", "workers") and not name.startswith("cluster.sip")]


@pytest.mark.parametrize("path", sorted(CALL_MACHINE.rglob("*.py")),
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_call_machine_imports_only_the_core(path: Path):
    assert foreign_imports(path.read_text(), str(path)) == []


@pytest.mark.parametrize("source, expected", [
    ("from cluster.store import Store", [(1, "cluster.store")]),
    ("import workers.sip.media", [(1, "workers.sip.media")]),
    ("from cluster.sip.dialog import Dialog", []),
    ("from .media import Answers", []),
])
def test_checker_finds_foreign_imports(source: str, expected: list[tuple[int, str]]):
    assert foreign_imports(source) == expected
