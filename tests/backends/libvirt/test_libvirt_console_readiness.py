"""console.run(), wait_ready and addresses() of a libvirt domain running the real Linux guest."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest

import virtkit
from virtkit.backends.base import Guest
from virtkit.backends.libvirt.guest import SERIAL_RUN_LOG
from virtkit.backends.ports import free_port
from virtkit.model import KernelBoot, Machine, Nic, PortForward
from virtkit.testing.linux import (
    LINUX_CMDLINE,
    PROMPT,
    READY_MARKER,
    build_initramfs,
    fetch_kernel,
)

PREFIX = f"vkt-{os.getpid()}-io-"


@pytest.fixture(scope="module")
def net_boot(tmp_path_factory: pytest.TempPathFactory) -> KernelBoot:
    """The Linux test guest with DHCP on eth0 (no agent: the NIC's forwards are the address)."""
    kernel = fetch_kernel()
    folder = tmp_path_factory.mktemp("lv-io")
    initrd = build_initramfs(kernel, folder / "initrd-net.gz", network=True)
    return KernelBoot(str(kernel.vmlinuz), str(initrd), LINUX_CMDLINE)


def test_run_readiness_and_addresses(libvirtd: str, net_boot: KernelBoot, tmp_path: Path) -> None:
    """run() returns exact output through the console; a forwarded port with nothing
    listening is not ready over TCP though the host side accepts; httpd's reply is;
    addresses() lists the forward.

    In the default run since the local console reads the serial pty directly. Through
    libvirt 9.0's console stream it stalled under load (7 runs in 37 with other guests
    beside it): QEMU's log held the missing bytes, a no-op call on the console's
    connection brought nothing, and the next console write brought the held bytes
    first, so libvirtd had stopped servicing the stream until a write. On a timeout the
    test still reports QEMU's own copy of the serial output and what one more console
    command brings.
    """
    fixed = free_port("tcp", "127.0.0.1", set())
    with virtkit.connect("libvirt", root=tmp_path / "root", name_prefix=PREFIX) as hv:
        machine = Machine(
            name="io",
            memory="256MiB",
            kernel=net_boot,
            # a fixed port: with host_port=0 this backend reports a port it picked while
            # QEMU's hostfwd picks another (the domain XML keeps 0)
            nics=[Nic(forwards=[PortForward(host_port=fixed, guest_port=8080)])],
        )
        guest = hv.define(machine)
        guest.start()
        try:
            _checks(guest)
        except virtkit.TimeoutError as exc:
            # QEMU's own copy of what the serial port emitted: when it holds bytes the
            # console never delivered, they were lost between the pty and virtkit
            log = Path(guest.folder, SERIAL_RUN_LOG)
            tail = log.read_bytes()[-120:] if log.is_file() else b"(no log)"
            got = bytes(guest.console.output[-120:])
            # more output: do the missing bytes come late (held between the pty and
            # virtkit) or never (dropped, QEMU's pty backend believing nobody reads)?
            mark = len(guest.console.output)
            guest.console.write(b"echo late-probe\n")
            time.sleep(5)
            later = bytes(guest.console.output[mark:])
            raise AssertionError(
                f"{exc}\nQEMU's serial log ends {tail!r}\nconsole ends {got!r}\n"
                f"after one more command the console got {later!r}"
            ) from exc
        finally:
            guest.kill()


def _checks(guest: Guest) -> None:
    """What test_run_readiness_and_addresses checks on the running guest."""
    guest.wait_ready(via="console", pattern=READY_MARKER, timeout=120)
    guest.console.expect(PROMPT, timeout=60)
    run = guest.console.run
    assert run("seq 1 500", prompt=PROMPT, timeout=60) == "".join(f"{i}\n" for i in range(1, 501))
    long_arg = "-".join(f"w{i}" for i in range(120))  # wrapped by the line editor
    assert run(f"echo {long_arg}", prompt=PROMPT) == long_arg + "\n"
    raw = run(r"printf 'x\001\377y'; exit_code() { return 4; }; exit_code", prompt=PROMPT)
    assert raw.encode("utf-8", "surrogateescape") == b"x\x01\xffy"
    assert guest.console.exit_status == 4

    port = guest.host_port(8080)
    with socket.create_connection(("127.0.0.1", port), timeout=5):
        pass  # user-mode networking accepts on the host side
    request = b"GET / HTTP/1.0\r\n\r\n"
    with pytest.raises(virtkit.TimeoutError, match="not ready via tcp"):
        guest.wait_ready(via="tcp", port=8080, send=request, timeout=3)
    run("mkdir -p /www && echo lv-page > /www/index.html", prompt=PROMPT)
    run("httpd -p 8080 -h /www", prompt=PROMPT)
    reply = guest.wait_ready(via="tcp", port=8080, send=request, expect=b"lv-page", timeout=60)
    assert reply is not None and reply.startswith(b"HTTP/1.")
    found = [(a.address, a.host_port, a.guest_port) for a in guest.addresses()]
    assert found == [("127.0.0.1", port, 8080)]
