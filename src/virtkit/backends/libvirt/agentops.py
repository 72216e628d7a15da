"""Addresses from libvirt's sources, and the thaw after a revert, for :class:`LibvirtGuest`.

``virDomainInterfaceAddresses`` knows three sources:

* ``"agent"``: the guest agent's ``guest-network-get-interfaces`` (any network);
* ``"lease"``: the DHCP leases of a libvirt *network*'s dnsmasq. virtkit's
  model has no libvirt networks (a NIC is ``user``, ``tap`` or ``none``), so
  this source finds nothing for a machine virtkit defined; it is asked for a
  domain whose interfaces were changed outside virtkit;
* ``"arp"``: the host's ARP table (``/proc/net/arp``) matched against the
  domain's MAC addresses: a guest on a ``tap`` NIC is found once it has
  exchanged packets with the host. User-mode NICs never reach the host's ARP
  table.

:func:`interface_addresses` asks one of them, or for ``"auto"`` the agent
when the machine has one and it answers, else the leases, then ARP.
"""

from __future__ import annotations

import ipaddress
import json
import math
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from virtkit.agent import AgentError
from virtkit.backends.libvirt.connection import is_remote
from virtkit.backends.readiness import GuestAddress, forward_addresses
from virtkit.errors import BackendError, StateError, TimeoutError, VirtkitError
from virtkit.images.args import check_choice
from virtkit.model import State

if TYPE_CHECKING:
    from virtkit.backends.libvirt.guest import LibvirtGuest

__all__ = [
    "SOURCES",
    "AddressSource",
    "addresses",
    "arp_addresses",
    "interface_addresses",
    "split_file_write",
    "thaw_restored",
]

#: what :meth:`LibvirtGuest.addresses` accepts as ``source``
AddressSource = Literal["auto", "agent", "lease", "arp"]
SOURCES: tuple[str, ...] = ("auto", "agent", "lease", "arp")
#: seconds a revert to a quiesced full snapshot waits for the agent to thaw
THAW_TIMEOUT = 30.0
#: the longest agent request sent as one (below a unix socket's 208 KiB send buffer)
MAX_REQUEST = 160 * 1024
#: base64 characters per part of a split file write (96 KiB of data)
_B64_PART = 96 * 1024 * 4 // 3
#: the host's IPv4 neighbour table, as libvirt's ARP source reads it
ARP_TABLE = Path("/proc/net/arp")
_ATF_COM = 0x2  # a complete entry
_FAMILY = {0: "ipv4", 1: "ipv6"}  # VIR_IP_ADDR_TYPE_IPV4 / _IPV6


def addresses(guest: LibvirtGuest, source: str, timeout: float | None) -> list[GuestAddress]:
    """:meth:`LibvirtGuest.addresses`: the guest's own addresses, then its forwards.

    A guest that is not running has no addresses of its own (``"auto"``), or
    raises StateError (a named source).
    """
    wait = 10.0**6 if timeout is None else timeout
    if source not in SOURCES:
        interface_addresses(guest, source, wait)  # raises the ConfigError
    own: list[GuestAddress] = []
    if guest.state in (State.RUNNING, State.PAUSED):
        own = interface_addresses(guest, source, wait)
    elif source != "auto":
        raise StateError(
            f"guest {guest.name!r} is not running: no {source} addresses",
            action="list the addresses of",
        )
    return own + forward_addresses(guest.forwards)


def interface_addresses(guest: LibvirtGuest, source: str, timeout: float) -> list[GuestAddress]:
    """The guest's own addresses (loopback left out) from libvirt's ``source``.

    Raises:
        ConfigError: an unknown ``source``, or ``"agent"`` for a machine without one.
        BackendError: libvirt failed (the message names the URI and source).
        TimeoutError: ``source="agent"`` and the agent did not answer in time.
    """
    check_choice(source, SOURCES, "source")
    if source == "agent":
        return _agent(guest, timeout)
    if source in ("lease", "arp"):
        return _ask(guest, source)
    if guest.machine.agent:
        try:
            return _agent(guest, timeout)
        except (AgentError, TimeoutError, BackendError):
            pass  # no answer from the agent: what the host knows
    for fallback in ("lease", "arp"):
        try:
            found = _ask(guest, fallback)
        except BackendError:
            continue  # "auto" reports what it can find (a remote daemon's ARP may fail)
        if found:
            return found
    return []


def _agent(guest: LibvirtGuest, timeout: float) -> list[GuestAddress]:
    """``SRC_AGENT``, bounded: a ping through virtkit's own timeout first, and the
    domain's agent response timeout set (libvirt's default is to block)."""
    agent = guest.agent  # ConfigError without Machine(agent=True)
    agent.ping(timeout=min(timeout, 2.0))
    conn = guest.hypervisor.connection
    seconds = max(1, math.ceil(timeout))
    conn.call(
        f"set the agent timeout of {guest.domain_name!r}",
        guest.domain.agentSetResponseTimeout,
        seconds,
        0,
    )
    return _ask(guest, "agent", timeout)


def _ask(guest: LibvirtGuest, source: str, timeout: float | None = None) -> list[GuestAddress]:
    conn = guest.hypervisor.connection
    lv = conn.lv
    flag = {
        "agent": lv.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_AGENT,
        "lease": lv.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_LEASE,
        "arp": lv.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_ARP,
    }[source]
    try:
        found: Any = guest.domain.interfaceAddresses(flag, 0)
    except lv.libvirtError as exc:
        if source == "arp" and not is_remote(guest.hypervisor.uri):
            # libvirt 9.0 checks each netlink message's length before it looks for the
            # dump's end (NLMSG_DONE, 20 bytes), which newer kernels (6.18 seen) put in the
            # same read as the entries: every call fails "wrong nlmsg len". The daemon runs
            # on this host, so its ARP table is this one
            return arp_addresses(_domain_macs(guest), ARP_TABLE.read_text())
        text = (
            f"guest {guest.name!r} on {guest.hypervisor.uri}: libvirt could not list its "
            f"addresses from the {source} source: {exc.get_error_message()}"
        )
        if source == "agent" and exc.get_error_code() == getattr(
            lv, "VIR_ERR_AGENT_UNRESPONSIVE", 86
        ):
            raise TimeoutError(text, timeout=timeout) from exc
        raise BackendError(text) from exc
    return parse_interfaces(found)


def parse_interfaces(found: Any) -> list[GuestAddress]:
    """``virDomainInterfaceAddresses``' Python answer as :class:`GuestAddress` es.

    Entries that are not what libvirt documents (a dict of interface name to
    ``{"hwaddr", "addrs": [{"type", "addr", "prefix"}]}``) are skipped, and so
    are loopback addresses.
    """
    out: list[GuestAddress] = []
    if not isinstance(found, dict):
        return out
    for name, info in sorted(found.items()):
        if name == "lo" or not isinstance(info, dict):
            continue
        for entry in info.get("addrs") or ():
            if not isinstance(entry, dict):
                continue
            address, family = entry.get("addr"), _FAMILY.get(entry.get("type", -1))
            if not isinstance(address, str) or family is None:
                continue
            if address.startswith("127.") or address == "::1":
                continue
            prefix = entry.get("prefix")
            out.append(
                GuestAddress(
                    address,
                    family,
                    interface=str(name),
                    prefix=prefix if isinstance(prefix, int) and 0 <= prefix <= 128 else None,
                )
            )
    return out


def arp_addresses(macs: Iterable[str], table: str) -> list[GuestAddress]:
    """The IPv4 addresses ``/proc/net/arp``'s text ``table`` holds for the MACs ``macs``.

    Only complete entries (flag ``ATF_COM``) count; lines that do not parse are skipped.
    The interface is the host interface the entry was learnt on (as libvirt reports it).
    """
    wanted = {m.lower() for m in macs}
    out: list[GuestAddress] = []
    for line in table.splitlines()[1:]:
        fields = line.split()
        if len(fields) != 6:
            continue
        address, _, flags, mac, _, device = fields
        try:
            complete = int(flags, 16) & _ATF_COM
            ipaddress.IPv4Address(address)
        except ValueError:
            continue
        if complete and mac.lower() in wanted:
            out.append(GuestAddress(address, "ipv4", interface=device))
    return out


def _domain_macs(guest: LibvirtGuest) -> list[str]:
    """The MAC addresses of the domain's interfaces (its live XML)."""
    try:
        root = ET.fromstring(guest.xml())
    except ET.ParseError:
        return []
    return [
        str(mac.get("address"))
        for mac in root.findall("./devices/interface/mac")
        if mac.get("address")
    ]


def split_file_write(send: Callable[[str, float], str], request: str, timeout: float) -> str:
    """Send ``request`` through ``send``; a ``guest-file-write`` larger than
    :data:`MAX_REQUEST` goes as several writes of the same handle.

    libvirt 9.0 writes an agent command to the channel's socket with ``safewrite``,
    which forgets what it wrote when the socket fills (``EAGAIN``) part way: the rest
    is sent again from the old offset, the guest agent gets a corrupted line and never
    answers (a 192 KiB chunk hung, 128 KiB ones did not). Each request is kept below a
    unix socket's default send buffer; the answer sums the counts written.

    Raises:
        TimeoutError, AgentError: as ``send`` does; a part that was not written
            whole ends the write there (its count is in the answer).
    """
    if len(request) <= MAX_REQUEST:
        return send(request, timeout)
    parsed = json.loads(request)
    args = parsed.get("arguments") if isinstance(parsed, dict) else None
    if parsed.get("execute") != "guest-file-write" or not isinstance(args, dict):
        return send(request, timeout)
    data = args.get("buf-b64")
    if not isinstance(data, str) or args.get("count") is not None:
        return send(request, timeout)
    deadline = time.monotonic() + timeout
    step = _B64_PART
    total, eof = 0, False
    for start in range(0, len(data), step):
        part = data[start : start + step]
        one = json.dumps({"execute": "guest-file-write", "arguments": {**args, "buf-b64": part}})
        left = max(deadline - time.monotonic(), 0.001)
        reply = json.loads(send(one, left))
        done = reply.get("return") if isinstance(reply, dict) else None
        if not isinstance(done, dict) or not isinstance(done.get("count"), int):
            return json.dumps(reply)  # an error, or not what the agent documents: as is
        total += done["count"]
        eof = bool(done.get("eof"))
        if done["count"] != len(part) // 4 * 3 - part.count("=", -2):
            break  # a short write: the caller sees the total and reports it
    return json.dumps({"return": {"count": total, "eof": eof}})


def thaw_restored(guest: LibvirtGuest) -> None:
    """Thaw a guest restored from a full snapshot taken with its file systems frozen.

    Raises:
        BackendError: its agent did not thaw them in time (the revert itself
            is done; ``guest.agent.fsthaw()`` may still succeed).
    """
    agent = guest.agent
    deadline = time.monotonic() + THAW_TIMEOUT
    while True:
        try:
            agent.fsthaw(timeout=max(min(deadline - time.monotonic(), 5.0), 1.0))
            return
        except VirtkitError as exc:
            if time.monotonic() >= deadline:
                raise BackendError(
                    f"guest {guest.name!r} on {guest.hypervisor.uri} was restored with its "
                    f"file systems frozen and its agent did not thaw them within "
                    f"{THAW_TIMEOUT:g} s: {exc}"
                ) from exc
            time.sleep(0.5)
