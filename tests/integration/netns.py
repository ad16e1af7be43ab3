"""Several hosts on one machine: network namespaces joined by a bridge.

``Topology`` makes a namespace holding a bridge (the "LAN", where the test's phones
and the shared Redis live) and one namespace per host, each joined to the bridge by
a veth pair and given its own address in 10.77.0.0/24.  Nothing is added to the
machine's own namespace: every interface and address lives in a namespace made here,
and ``down`` ends every process left in them and deletes them, also after a failure.

The test's own thread enters the LAN namespace (``enter``) so the sockets it opens
(phones, Redis clients) are on the LAN; the hosts' processes are started with
``ip netns exec`` (tests/integration/harness.py, ``Cluster(netns=...)``).

Needs root and iproute2's ``ip netns``: skipped without them, except in CI (env CI
set), where that fails the run.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import pytest

from conftest import IN_CI

CLONE_NEWNET = 0x40000000
SUBNET = "10.77.0"
LAN_ADDRESS = f"{SUBNET}.1"
NO_NETNS_REASON = ("multi-host tests need root and `ip netns` (iproute2); in CI (env CI set) "
                   "this is an error, not a skip")


def require_netns() -> None:
    problem = None
    if os.geteuid() != 0:
        problem = "not root"
    elif shutil.which("ip") is None:
        problem = "no ip command"
    else:
        probe = f"scprobe{os.getpid()}"
        made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
        if made.returncode != 0:
            problem = made.stderr.strip() or "ip netns add failed"
        else:
            subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    if problem is None:
        return
    if IN_CI:
        pytest.fail(f"{NO_NETNS_REASON}: {problem}", pytrace=False)
    pytest.skip(f"{NO_NETNS_REASON}: {problem}")


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")


_libc = ctypes.CDLL(None, use_errno=True)


def _setns(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"setns {path}: {os.strerror(errno)}")
    finally:
        os.close(fd)


def _forget_stale() -> None:
    """Delete the namespaces of an earlier run that was killed before its clean-up: named
    after a test process that is gone, and with nothing running in them any more."""
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    for line in listing.splitlines():
        name = line.split()[0] if line.split() else ""
        owner = name[4:].split("-", 1)[0] if name.startswith("scmh") else ""
        if not owner.isdigit() or os.path.exists(f"/proc/{owner}"):
            continue
        pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True)
        if not pids.stdout.split():
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


@dataclass
class Topology:
    """A LAN namespace with a bridge and ``hosts`` host namespaces on it."""

    hosts: int = 2
    prefix: str = field(default_factory=lambda: f"scmh{os.getpid()}")
    made: list[str] = field(default_factory=list)

    @property
    def lan(self) -> str:
        return f"{self.prefix}-lan"

    def host_ns(self, index: int) -> str:
        """The namespace of host ``index`` (1-based)."""
        return f"{self.prefix}-h{index}"

    @staticmethod
    def host_address(index: int) -> str:
        return f"{SUBNET}.{10 + index}"

    def up(self) -> Topology:
        _forget_stale()
        try:
            _ip("netns", "add", self.lan)
            self.made.append(self.lan)
            _ip("-n", self.lan, "link", "set", "lo", "up")
            _ip("-n", self.lan, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.lan, "addr", "add", f"{LAN_ADDRESS}/24", "dev", "br0")
            _ip("-n", self.lan, "link", "set", "br0", "up")
            for index in range(1, self.hosts + 1):
                name = self.host_ns(index)
                _ip("netns", "add", name)
                self.made.append(name)
                _ip("-n", name, "link", "set", "lo", "up")
                # Both ends made inside namespaces: the machine's own never sees them.
                _ip("-n", self.lan, "link", "add", f"h{index}", "type", "veth",
                    "peer", "name", "eth0", "netns", name)
                _ip("-n", self.lan, "link", "set", f"h{index}", "master", "br0")
                _ip("-n", self.lan, "link", "set", f"h{index}", "up")
                _ip("-n", name, "addr", "add", f"{self.host_address(index)}/24", "dev", "eth0")
                _ip("-n", name, "link", "set", "eth0", "up")
        except BaseException:
            self.down()
            raise
        return self

    def pids(self, namespace: str) -> list[int]:
        result = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True,
                                text=True)
        return [int(p) for p in result.stdout.split() if p.isdigit() and int(p) != os.getpid()]

    def down(self) -> None:
        """End what runs in the namespaces (TERM, then KILL), then delete them."""
        for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 2.0)):
            pids = [p for ns in self.made for p in self.pids(ns)]
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + wait
            while pids and time.monotonic() < deadline:
                pids = [p for ns in self.made for p in self.pids(ns)]
                time.sleep(0.1)
        for name in reversed(self.made):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
        self.made.clear()

    @contextmanager
    def enter(self, namespace: str):
        """This thread in ``namespace`` (sockets opened meanwhile stay there), then back."""
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        try:
            _setns(f"/run/netns/{namespace}")
            try:
                yield
            finally:
                if _libc.setns(home, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "cannot return to the first namespace")
        finally:
            os.close(home)
