"""The parsing and splitting helpers behind the libvirt guest's addresses and agent writes.

The real Linux guest runs them in test_libvirt_guest_talk.py; these feed them the odd
input a daemon, a host ARP table or a caller may give.
"""

from __future__ import annotations

import base64
import json

import pytest

from virtkit.backends.libvirt.agentops import (
    MAX_REQUEST,
    arp_addresses,
    parse_interfaces,
    split_file_write,
)
from virtkit.backends.readiness import GuestAddress

ARP = """IP address       HW type     Flags       HW address            Mask     Device
172.31.5.2       0x1         0x2         52:54:00:AA:bb:01     *        vkt1t
172.31.5.3       0x1         0x0         52:54:00:aa:bb:02     *        vkt1t
10.0.0.9         0x1         0x2         52:54:00:ff:ff:ff     *        eth0
not-an-ip        0x1         0x2         52:54:00:aa:bb:01     *        vkt1t
172.31.5.4       0x1         zz          52:54:00:aa:bb:01     *        vkt1t
short line
"""


def test_arp_table() -> None:
    """Complete entries of the domain's MACs (any case); incomplete, foreign and
    malformed lines are skipped."""
    found = arp_addresses(["52:54:00:aa:bb:01", "52:54:00:aa:bb:02"], ARP)
    assert found == [GuestAddress("172.31.5.2", "ipv4", interface="vkt1t")]
    assert arp_addresses([], ARP) == []
    assert arp_addresses(["52:54:00:aa:bb:01"], "") == []


def test_parse_interfaces() -> None:
    """libvirt's answer becomes GuestAddresses; loopback and malformed entries are left out."""
    found = parse_interfaces(
        {
            "lo": {"hwaddr": "00:00:00:00:00:00", "addrs": [{"type": 0, "addr": "127.0.0.1"}]},
            "eth0": {
                "hwaddr": "52:54:00:12:34:56",
                "addrs": [
                    {"type": 0, "addr": "10.0.2.15", "prefix": 24},
                    {"type": 1, "addr": "fe80::1", "prefix": 999},
                    {"type": 7, "addr": "x"},
                    {"type": 0, "addr": 5},
                    "junk",
                ],
            },
            "eth1": None,
            "eth2": {"addrs": None},
        }
    )
    assert found == [
        GuestAddress("10.0.2.15", "ipv4", interface="eth0", prefix=24),
        GuestAddress("fe80::1", "ipv6", interface="eth0", prefix=None),
    ]
    assert parse_interfaces(None) == []
    assert parse_interfaces(["eth0"]) == []


def _write(data: bytes, handle: int = 7) -> str:
    return json.dumps(
        {
            "execute": "guest-file-write",
            "arguments": {"handle": handle, "buf-b64": base64.b64encode(data).decode()},
        }
    )


class _Agent:
    """A pretend agent pipe that records each request and writes what it is given."""

    def __init__(self, short_after: int | None = None) -> None:
        self.requests: list[dict[str, object]] = []
        self.written = b""
        self.short_after = short_after

    def __call__(self, request: str, timeout: float) -> str:
        assert len(request) <= MAX_REQUEST and timeout > 0
        parsed = json.loads(request)
        self.requests.append(parsed)
        if parsed["execute"] != "guest-file-write":
            return json.dumps({"return": {}})
        data = base64.b64decode(parsed["arguments"]["buf-b64"])
        if self.short_after is not None and len(self.requests) > self.short_after:
            data = data[:10]
        self.written += data
        return json.dumps({"return": {"count": len(data), "eof": False}})


def test_split_file_write() -> None:
    """A large write goes in parts under the limit, in order, to the same handle; the
    answer sums them; small requests and other commands pass through unchanged."""
    payload = bytes(range(256)) * 2048 + b"tail!"  # 512 KiB + 5
    agent = _Agent()
    reply = json.loads(split_file_write(agent, _write(payload), 30.0))
    assert reply == {"return": {"count": len(payload), "eof": False}}
    assert agent.written == payload
    assert len(agent.requests) == 6
    assert {r["arguments"]["handle"] for r in agent.requests} == {7}  # type: ignore[index]

    small = _Agent()
    split_file_write(small, _write(b"x" * 1000), 30.0)
    assert small.written == b"x" * 1000 and len(small.requests) == 1
    ping = _Agent()
    split_file_write(ping, json.dumps({"execute": "guest-ping"}), 30.0)
    assert ping.requests == [{"execute": "guest-ping"}]


def test_split_file_write_stops_at_a_short_part() -> None:
    """A part the agent wrote short ends the write there; the caller sees the total."""
    agent = _Agent(short_after=1)
    payload = b"\x00" * (400 * 1024)
    reply = json.loads(split_file_write(agent, _write(payload), 30.0))
    assert len(agent.requests) == 2
    assert reply["return"]["count"] == 96 * 1024 + 10 < len(payload)


def test_split_file_write_passes_errors_through() -> None:
    """An agent error in a part is the answer, as the agent gave it."""

    def failing(request: str, timeout: float) -> str:
        return json.dumps({"error": {"class": "GenericError", "desc": "disk full"}})

    reply = json.loads(split_file_write(failing, _write(b"y" * (300 * 1024)), 30.0))
    assert reply["error"]["desc"] == "disk full"


@pytest.mark.parametrize("size", [0, 1, 2, 3, 96 * 1024 * 3 + 2])
def test_split_file_write_sizes(size: int) -> None:
    """Every length, padded or not, arrives whole."""
    agent = _Agent()
    payload = bytes(i % 251 for i in range(size))
    reply = json.loads(split_file_write(agent, _write(payload), 30.0))
    assert agent.written == payload and reply["return"]["count"] == size
