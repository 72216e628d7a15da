"""The local console source on a real pty pair: this test plays QEMU's part (the master)."""

from __future__ import annotations

import os
import threading
import time

import pytest

from virtkit.backends.libvirt.console import PtyConsole, serial_pty
from virtkit.errors import BackendError, StateError

DOMAIN_XML = """<domain type='qemu'><name>d</name><devices>
  <serial type='pty'><source path='{path}'/><target port='0'/></serial>
  <console type='pty' tty='{path}'><target type='serial' port='0'/></console>
</devices></domain>"""


class _Sink:
    """What the console delivered, and a way to wait for it."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.cond = threading.Condition()

    def feed(self, chunk: bytes) -> None:
        with self.cond:
            self.data += chunk
            self.cond.notify_all()

    def wait_for(self, wanted: bytes) -> None:
        with self.cond:
            assert self.cond.wait_for(lambda: wanted in self.data, timeout=30), bytes(self.data)


def _read_master(master: int, size: int) -> bytes:
    got = b""
    deadline = time.monotonic() + 30
    while len(got) < size and time.monotonic() < deadline:
        got += os.read(master, size - len(got))
    return got


def test_output_input_and_end_of_run() -> None:
    """Bytes both ways unchanged (raw mode: no echo, no CR/LF rewriting); QEMU closing the
    master ends the run; writing afterwards is a StateError."""
    master, slave = os.openpty()
    path = os.ttyname(slave)
    os.close(slave)
    sink = _Sink()
    console = PtyConsole(path, sink.feed)
    try:
        os.write(master, b"boot\r\nline two\n\x00\xff")
        sink.wait_for(b"boot\r\nline two\n\x00\xff")
        console.write(b"echo hi\n\x03")
        assert _read_master(master, 9) == b"echo hi\n\x03"
        big = bytes(range(256)) * 512  # more than a pty buffers: writes wait for room
        reader = threading.Thread(target=lambda: sink.feed(_read_master(master, len(big))))
        reader.start()
        console.write(big)
        reader.join(30)
        assert big in sink.data
        assert console.open
        os.close(master)
        master = -1
        console.drain(timeout=30)
        assert console.eof and not console.open
        with pytest.raises(StateError, match="ended"):
            console.write(b"late")
    finally:
        console.close()
        if master >= 0:
            os.close(master)


def test_close_stops_the_reader_while_the_run_goes_on() -> None:
    master, slave = os.openpty()
    path = os.ttyname(slave)
    os.close(slave)
    try:
        console = PtyConsole(path, _Sink().feed)
        console.close()
        console.close()  # idempotent
        assert not console.open
        with pytest.raises(StateError):
            console.write(b"x")
    finally:
        os.close(master)


def test_bad_paths_and_xml_are_backend_errors(tmp_path: os.PathLike[str]) -> None:
    with pytest.raises(BackendError, match="cannot open the console pty"):
        PtyConsole(os.path.join(tmp_path, "no-such-pty"), _Sink().feed)
    assert serial_pty(DOMAIN_XML.format(path="/dev/pts/7"), "d") == "/dev/pts/7"
    with pytest.raises(BackendError, match="'d' runs without a pty serial port"):
        serial_pty("<domain><devices/></domain>", "d")
    with pytest.raises(BackendError, match="'d' runs without a pty serial port"):
        serial_pty("<domain><devices><serial type='unix'/></devices></domain>", "d")
    with pytest.raises(BackendError, match="unreadable XML"):
        serial_pty("<domain", "d")
