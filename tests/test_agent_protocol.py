"""The guest agent protocol against Debian's real qemu-ga, run on the host over a UNIX socket.

Commands that would act on the host (shutdown, fsfreeze, set-time, suspend...)
are disabled in the host agent with its own block list; the guest-side tests
exercise them inside the Linux test guest.
"""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import virtkit
from virtkit.agent import AgentError, GuestAgent
from virtkit.testing.linux import fetch_guest_agent

BLOCKED = (
    "guest-shutdown,guest-fsfreeze-freeze,guest-fsfreeze-freeze-list,guest-fsfreeze-thaw,"
    "guest-set-time,guest-suspend-disk,guest-suspend-ram,guest-suspend-hybrid,"
    "guest-set-user-password,guest-set-vcpus,guest-set-memory-blocks,guest-fstrim"
)


@pytest.fixture(scope="module")
def qemu_ga() -> Path:
    """Debian's qemu-ga binary, downloaded once into the test cache."""
    return fetch_guest_agent()


@pytest.fixture
def agent_process(qemu_ga: Path, tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """A host qemu-ga listening on a UNIX socket, with host-changing commands disabled."""
    sock = tmp_path / "qga.sock"
    proc = subprocess.Popen(
        [str(qemu_ga), "-m", "unix-listen", "-p", str(sock), "-t", str(tmp_path),
         "-f", str(tmp_path / "qga.pid"), "-b", BLOCKED],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while True:  # the socket file appears at bind(), before qemu-ga listens on it
        with socket.socket(socket.AF_UNIX) as probe:
            try:
                probe.connect(str(sock))
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
        time.sleep(0.01)
    yield proc, sock
    proc.kill()
    proc.wait()


@pytest.fixture
def agent(agent_process: tuple[subprocess.Popen[bytes], Path]) -> Iterator[GuestAgent]:
    client = GuestAgent.unix(str(agent_process[1]), timeout=20, name="host-qga")
    yield client
    client.close()


class TestCommands:
    """Each command does what qemu-ga documents."""

    def test_ping_and_info(self, agent: GuestAgent) -> None:
        """ping answers; info lists the commands, with the blocked ones disabled."""
        agent.ping()
        info = agent.info()
        assert info["version"].startswith("7.2")
        enabled = {c["name"]: c["enabled"] for c in info["supported_commands"]}
        assert enabled["guest-exec"] and not enabled["guest-shutdown"]

    def test_exec_with_stdin_and_exit_code(self, agent: GuestAgent) -> None:
        """stdin reaches the command; stdout, stderr and a non-zero exit come back."""
        result = agent.exec(
            ["/bin/sh", "-c", "tr a-z A-Z; echo oops >&2; exit 7"], input=b"hello agent\n"
        )
        assert result.exit_code == 7
        assert result.stdout == b"HELLO AGENT\n"
        assert result.stderr == b"oops\n"

    def test_exec_environment_and_signal(self, agent: GuestAgent) -> None:
        """env is passed; a command killed by a signal reports it."""
        result = agent.exec(["/bin/sh", "-c", "echo $VK_X"], env={"VK_X": "42", "PATH": "/bin"})
        assert result.stdout == b"42\n"
        killed = agent.exec(["/bin/sh", "-c", "kill -TERM $$"])
        assert killed.signal == 15

    def test_file_round_trip_50_mib(self, agent: GuestAgent, tmp_path: Path) -> None:
        """A 50 MiB file goes through the 1 MiB chunks bit for bit, both ways."""
        data = os.urandom(50 * 1024**2 + 123)
        target = tmp_path / "big.bin"
        agent.write_file(str(target), data, timeout=120)
        assert target.read_bytes() == data
        assert agent.read_file(str(target), timeout=120) == data

    def test_interfaces_list_loopback(self, agent: GuestAgent) -> None:
        """The host's loopback interface and its 127.0.0.1 address are listed."""
        names = {i.name: i for i in agent.interfaces()}
        assert "lo" in names
        assert any(a.address == "127.0.0.1" and a.prefix == 8 for a in names["lo"].addresses)

    def test_disabled_and_unknown_commands(self, agent: GuestAgent) -> None:
        """An agent error carries its class; the channel stays usable after it."""
        with pytest.raises(AgentError) as err:
            agent.call("guest-no-such-command")
        assert err.value.error_class == "CommandNotFound"
        with pytest.raises(AgentError, match="disabled"):
            agent.fsfreeze()
        with pytest.raises(AgentError, match="No such file"):
            agent.read_file("/nonexistent/virtkit")
        agent.ping()

    def test_timeout_then_resync(self, agent: GuestAgent) -> None:
        """A call abandoned at its deadline does not leak its late answer into the next call."""
        with pytest.raises(virtkit.TimeoutError):
            agent.call("guest-info", timeout=0)
        agent.ping()  # resyncs; the stale guest-info answer is discarded
        assert "version" in agent.info()

    def test_bad_arguments(self, agent: GuestAgent) -> None:
        """Bad arguments are ConfigErrors naming them, before anything is sent."""
        with pytest.raises(virtkit.ConfigError, match="argv"):
            agent.exec("ls")  # type: ignore[arg-type]
        with pytest.raises(virtkit.ConfigError, match="env"):
            agent.exec(["/bin/true"], env={"A=B": "x"})
        with pytest.raises(virtkit.ConfigError, match="env"):
            agent.exec(["/bin/true"], env={"A": 1})  # type: ignore[dict-item]
        with pytest.raises(virtkit.ConfigError, match="input"):
            agent.exec(["/bin/cat"], input="text")  # type: ignore[arg-type]
        with pytest.raises(virtkit.ConfigError, match="path"):
            agent.read_file("")
        with pytest.raises(virtkit.ConfigError, match="data"):
            agent.write_file("/tmp/x", "text")  # type: ignore[arg-type]
        with pytest.raises(virtkit.ConfigError, match="timeout"):
            agent.ping(timeout=-1)
        with pytest.raises(virtkit.ConfigError, match="mode"):
            agent.shutdown("explode")


class TestFaults:
    """A broken, silent or babbling agent gives a clear error within the deadline."""

    def test_agent_killed_mid_transfer(
        self, agent: GuestAgent, agent_process: tuple[subprocess.Popen[bytes], Path], tmp_path: Path
    ) -> None:
        """Killing qemu-ga during a large write ends the call with an AgentError, not a hang."""
        proc, _ = agent_process
        threading.Timer(0.3, proc.kill).start()
        with pytest.raises(AgentError, match="closed|broke|reach"):
            agent.write_file(str(tmp_path / "cut.bin"), os.urandom(200 * 1024**2), timeout=60)

    def test_silent_agent_times_out(self, tmp_path: Path) -> None:
        """A channel that accepts but never answers raises TimeoutError at the deadline."""
        path = str(tmp_path / "silent.sock")
        server = socket.socket(socket.AF_UNIX)
        server.bind(path)
        server.listen(1)
        try:
            client = GuestAgent.unix(path, timeout=0.3)
            with pytest.raises(virtkit.TimeoutError, match="did not answer"):
                client.ping()
            client.close()
        finally:
            server.close()

    def test_garbage_on_the_channel(self, tmp_path: Path) -> None:
        """Garbage lines are an AgentError naming them; a later resync skips them."""
        path = str(tmp_path / "babble.sock")
        server = socket.socket(socket.AF_UNIX)
        server.bind(path)
        server.listen(1)

        def babble() -> None:
            conn, _ = server.accept()
            with conn:
                data = conn.recv(4096)  # the sync request: answer it properly...
                token = data.split(b'"id": ')[1].split(b"}")[0]
                conn.sendall(b'junk\xff{"return": ' + token + b"}\n")
                conn.recv(4096)  # ...then answer the command with garbage
                conn.sendall(b"\x00\x01 not json at all\n")
                time.sleep(0.5)

        thread = threading.Thread(target=babble)
        thread.start()
        try:
            client = GuestAgent.unix(path, timeout=5)
            with pytest.raises(AgentError, match="garbage"):
                client.ping()
            client.close()
        finally:
            thread.join()
            server.close()

    def test_no_agent_channel(self, tmp_path: Path) -> None:
        """No socket at all: an AgentError that says what to check."""
        client = GuestAgent.unix(str(tmp_path / "absent.sock"), timeout=1)
        with pytest.raises(AgentError, match="agent=True"):
            client.ping()

    def test_abort_ends_a_waiting_call(self, tmp_path: Path) -> None:
        """abort() from another thread (the qemu backend's port-closed event) ends a call
        blocked on a silent channel with an AgentError naming the reason; the next call
        connects afresh."""
        path = str(tmp_path / "quiet.sock")
        server = socket.socket(socket.AF_UNIX)
        server.bind(path)
        server.listen(2)
        try:
            client = GuestAgent.unix(path, timeout=60)
            threading.Timer(0.3, client.abort, args=("the port closed",)).start()
            with pytest.raises(AgentError, match="the port closed"):
                client.ping()
            with pytest.raises(virtkit.TimeoutError, match="did not answer"):
                client.ping(timeout=0.2)  # a new connection, silent again: a plain timeout
            client.close()
        finally:
            server.close()
