"""Only the cluster talks to the cluster (design invariant 14), on one host.

A worker reads envelopes only from its dispatcher's forwarding socket: an envelope sent
to a worker's port from anywhere else, whatever source address it claims inside, is
dropped and counted, never answered (it would otherwise be a way to spoof a source, pass
the throttles, and reflect answers at a third party).  A restarted dispatcher forwards
from a new port, which the workers learn from its welcome; the old port, free for anyone
to bind by then, is refused.  No internal socket listens on a wildcard address.
"""

from __future__ import annotations

import os
import re
import socket
import time

import pytest
from harness import running_cluster, wait_for
from sip_probe import options_request

from cluster import envelope

DB = 12  # this module's Redis database on the session's redis-server
FORGED = 25  # forged envelopes sent in each round


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, redis_server):
    redis_server.client(db=DB).flushdb()
    url = f"redis://127.0.0.1:{redis_server.port}/{DB}"
    with running_cluster(tmp_path_factory.mktemp("internal"), url) as c:
        yield c


def _worker_ports(cluster) -> set[tuple[str, int]]:
    return {(ip, int(port)) for ip, port in
            re.findall(r"joined \(udp ([\d.]+):(\d+)\)", cluster.read_log("dispatcher"))}


def _forwarding_addresses(cluster) -> list[tuple[str, int]]:
    return [(ip, int(port)) for ip, port in
            re.findall(r"forwarding from ([\d.]+):(\d+)", cluster.read_log("dispatcher"))]


def _refused(cluster) -> int:
    return sum(int(p.get("envelopes_refused", 0)) for p in cluster.store.processes("worker")
               if p.get("host") == cluster.config.sip.effective_host_id)


def _forge(sender: socket.socket, victim: socket.socket, targets, count: int) -> None:
    """Envelopes claiming to carry an OPTIONS from ``victim``'s address."""
    claimed = victim.getsockname()
    for n in range(count):
        request = options_request(claimed[1], f"forged-{n}-{os.urandom(4).hex()}").replace(
            b"127.0.0.1:", f"{claimed[0]}:".encode(), 1)
        for target in targets:
            sender.sendto(envelope.wrap(claimed, 0, request), target)


def _answers(sock: socket.socket, within: float) -> int:
    got, deadline = 0, time.monotonic() + within
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            sock.recv(65535)
            got += 1
        except TimeoutError:
            break
    return got


def test_forged_envelopes_are_dropped_counted_and_never_answered(cluster):
    targets = _worker_ports(cluster)
    assert len(targets) == cluster.config.workers.count
    before = _refused(cluster)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as victim, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
        victim.bind(("127.0.0.77", 0))
        sender.bind(("127.0.0.1", 0))
        _forge(sender, victim, targets, FORGED)
        assert _answers(victim, 1.5) == 0
        # The victim's address itself is served when it really sends (the check above
        # could not have failed for want of a route back).
        victim.sendto(options_request(victim.getsockname()[1], "genuine-" + os.urandom(4).hex()),
                      cluster.address)
        assert _answers(victim, 2.0) == 1
    expected = before + FORGED * len(targets)
    assert wait_for(lambda: _refused(cluster) == expected, 5.0), (_refused(cluster), expected)
    assert "not from the dispatcher" in "".join(
        cluster.read_log(f"worker-{i}") for i in range(cluster.config.workers.count))


def test_a_restarted_dispatchers_old_forwarding_port_is_refused(cluster):
    old = _forwarding_addresses(cluster)[-1]
    cluster.kill9("dispatcher")
    assert wait_for(lambda: len(_forwarding_addresses(cluster)) >= 2, 10.0)
    new = _forwarding_addresses(cluster)[-1]
    targets = _worker_ports(cluster)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as victim, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
        victim.bind(("127.0.0.78", 0))
        # Someone takes the old dispatcher's port once it is free (unless, by chance, the
        # new dispatcher drew the same one).
        if new != old:
            sender.bind(old)
        else:
            sender.bind(("127.0.0.1", 0))
        before = _refused(cluster)
        _forge(sender, victim, targets, FORGED)
        assert _answers(victim, 1.5) == 0
        # The new dispatcher's envelopes are taken: SIP is answered.
        assert wait_for(lambda: _options_answered(cluster, victim), 10.0, step=0.2)
    assert wait_for(lambda: _refused(cluster) >= before + FORGED * len(targets), 5.0)


def _options_answered(cluster, sock: socket.socket) -> bool:
    sock.sendto(options_request(sock.getsockname()[1], "after-" + os.urandom(4).hex()),
                cluster.address)
    return _answers(sock, 0.5) > 0


def _listening(pid: int) -> list[tuple[str, str, int]]:
    """(protocol, local address, port) of the UDP sockets and listening TCP sockets of
    ``pid`` (its file descriptors matched to /proc/net by inode)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    found = []
    for proto in ("udp", "udp6", "tcp", "tcp6"):
        with open(f"/proc/{pid}/net/{proto}") as table:
            next(table)
            for line in table:
                fields = line.split()
                local, state, inode = fields[1], fields[3], fields[9]
                if inode not in inodes or (proto.startswith("tcp") and state != "0A"):
                    continue
                address, port = local.rsplit(":", 1)
                found.append((proto, address, int(port, 16)))
    return found


def test_no_internal_socket_listens_on_a_wildcard_address(cluster):
    wildcards = {"00000000", "00000000000000000000000000000000"}
    programs = ["dispatcher", *(f"worker:worker-{i}" for i in range(cluster.config.workers.count))]
    seen = {}
    for program in programs:
        sockets = _listening(cluster.pid_of(program))
        seen[program] = sockets
        # Port 0: a socket never bound nor used yet (it receives nothing).
        assert not [s for s in sockets if s[1] in wildcards and s[2] != 0], (program, sockets)
    assert len(seen["dispatcher"]) >= 3  # SIP, forwarding, metrics at least
