"""The test harness's port picker (tests/conftest.py): ports handed to child processes."""

import socket

from conftest import PICK_RANGE, free_tcp_port, free_udp_port


def ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except OSError:
        return 32768


def test_picked_ports_are_never_ephemeral_never_repeated_and_leave_port_plus_one():
    ports = [free_udp_port() for _ in range(40)] + [free_tcp_port() for _ in range(40)]
    assert len(set(ports)) == len(ports)
    assert all(PICK_RANGE[0] <= p <= PICK_RANGE[1] < ephemeral_low() for p in ports)
    assert not {p + 1 for p in ports} & set(ports)  # port + 1 stays for RTCP, TLS


def test_a_port_in_use_is_passed_over():
    first = free_udp_port()
    nxt = first + 2 if first + 2 <= PICK_RANGE[1] else PICK_RANGE[0]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as holder:
        holder.bind(("127.0.0.1", nxt))
        assert free_udp_port() != nxt
