"""console.run() on the real Linux test guest: exact output, exit status, wrapped and odd input."""

from __future__ import annotations

from collections.abc import Iterator

import attrs
import pytest

from virtkit.backends.qemu import KernelBoot, QemuGuest, QemuHypervisor
from virtkit.model import Machine
from virtkit.testing.linux import PROMPT, READY_MARKER


@pytest.fixture
def shell(hv: QemuHypervisor, linux_boot: KernelBoot) -> Iterator[QemuGuest]:
    """A booted Linux guest at its shell prompt."""
    guest = hv.define(attrs.evolve(Machine(name="console-run", memory="256MiB"), kernel=linux_boot))
    assert isinstance(guest, QemuGuest)
    guest.start()
    guest.console.expect(READY_MARKER, timeout=90)
    guest.console.expect(PROMPT, timeout=30)
    yield guest
    guest.kill()


class TestRun:
    """run() returns exactly what the command printed."""

    def test_outputs(self, shell: QemuGuest) -> None:
        """Long, wrapped, quoted, binary-ish and failing commands on one booted guest."""
        console = shell.console
        assert console.run("echo hello", prompt=PROMPT) == "hello\n"
        assert console.exit_status == 0

        numbers = console.run("seq 1 2000", prompt=PROMPT, timeout=60)
        assert numbers == "".join(f"{i}\n" for i in range(1, 2001))

        # a typed line far wider than the terminal: the line editor wraps its echo
        long_arg = "-".join(f"w{i}" for i in range(120))
        assert console.run(f"echo {long_arg}", prompt=PROMPT) == long_arg + "\n"

        quoted = console.run("echo 'a b' \"c'd\" # not a comment to run()", prompt=PROMPT)
        assert quoted == "a b c'd\n"

        raw = console.run(r"printf 'x\001\002\377y'", prompt=PROMPT)
        assert raw.encode("utf-8", "surrogateescape") == b"x\x01\x02\xffy"

        assert (
            console.run("echo to-stderr >&2; exit_code() { return 3; }; exit_code", prompt=PROMPT)
            == "to-stderr\n"
        )
        assert console.exit_status == 3

        assert console.run("true", prompt=PROMPT) == ""
        assert console.exit_status == 0
