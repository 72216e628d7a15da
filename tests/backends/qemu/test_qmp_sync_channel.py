"""The thin QMP path: guest.qmp() over a second monitor with a blocking socket.

Real QEMU for the behaviour a guest sees; a scripted UNIX-socket server for
the faults QEMU never produces on demand (silence, garbage, huge messages,
hang-ups mid-call).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import virtkit
from virtkit.backends.qemu import QemuHypervisor
from virtkit.backends.qemu.qmp import SyncChannel
from virtkit.model import Disk, Machine, State


def _machine(name: str, disk: Path) -> Machine:
    return Machine(name=name, memory="16MiB", disks=[Disk(path=str(disk), bus="ide")])


class TestWithQemu:
    def test_qmp_goes_over_the_sync_monitor_and_events_still_arrive(
        self, hv: QemuHypervisor, boot_disk: Callable[..., Path]
    ) -> None:
        """guest.qmp() answers through the sync channel; STOP/RESUME reach the state machine."""
        guest = hv.define(_machine("sync", boot_disk("counter")))
        guest.start()
        proc = guest._proc
        assert proc is not None
        sync = proc.qmp.sync
        assert sync is not None
        assert (proc.runtime_dir / "qmp-sync.sock").exists()
        assert guest.qmp("query-status")["running"] is True
        assert sync._sock is not None  # connected on first use
        for _ in range(5):
            guest.qmp("stop")
            guest._lifecycle.wait_for(lambda s: s is State.PAUSED, 10, "pause")
            assert guest.qmp("query-status")["status"] == "paused"
            guest.qmp("cont")
            guest._lifecycle.wait_for(lambda s: s is State.RUNNING, 10, "resume")
        # the events broadcast on the sync monitor were discarded, not kept
        assert b"STOP" not in sync._buf
        assert len(sync._buf) < 4096
        with pytest.raises(virtkit.BackendError, match="no-such-command"):
            guest.qmp("no-such-command")
        assert guest.qmp("query-status")["running"] is True  # still usable after an error
        guest.kill()
        with pytest.raises(virtkit.StateError, match="not running"):
            guest.qmp("query-status")

    def test_many_threads_at_once_all_get_their_own_answers(
        self, hv: QemuHypervisor, boot_disk: Callable[..., Path]
    ) -> None:
        """Concurrent callers: one takes the sync channel, the others fall back to the loop."""
        guest = hv.define(_machine("threads", boot_disk("counter")))
        guest.start()
        errors: list[BaseException] = []
        names: list[str] = []
        lock = threading.Lock()

        def work() -> None:
            try:
                for _ in range(30):
                    status = guest.qmp("query-status")["status"]
                    name = guest.qmp("query-name")
                    with lock:
                        names.append(str(name.get("name", "")))
                    assert status == "running"
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=work) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors
        assert len(names) == 120
        guest.kill()

    def test_quit_over_the_sync_monitor_shuts_the_guest_off(
        self, hv: QemuHypervisor, boot_disk: Callable[..., Path]
    ) -> None:
        """A raw 'quit' returns, QEMU exits, the guest becomes SHUTOFF; later calls refuse."""
        guest = hv.define(_machine("quit", boot_disk("counter")))
        guest.start()
        assert guest.qmp("quit") == {}
        guest._lifecycle.wait_for(lambda s: s is State.SHUTOFF, 30, "quit")
        with pytest.raises(virtkit.StateError):
            guest.qmp("query-status")

    def test_refused_inside_a_running_event_loop(
        self, hv: QemuHypervisor, boot_disk: Callable[..., Path]
    ) -> None:
        """Blocking on the sync socket inside an event loop would freeze it: StateError."""
        guest = hv.define(_machine("inloop", boot_disk("counter")))
        guest.start()

        async def call() -> None:
            guest.qmp("query-status")

        with pytest.raises(virtkit.StateError, match="event loop"):
            asyncio.run(call())
        guest.kill()

    def test_aio_qmp_drives_the_sync_monitor_from_the_callers_loop(
        self, hv: QemuHypervisor, boot_disk: Callable[..., Path]
    ) -> None:
        """guest.aio.qmp() answers over the sync channel; many at once all answer."""
        guest = hv.define(_machine("aio", boot_disk("counter")))
        guest.start()
        proc = guest._proc
        assert proc is not None
        assert proc.qmp.sync is not None

        async def calls() -> list[Any]:
            first = await guest.aio.qmp("query-status")
            assert proc.qmp.sync is not None
            assert proc.qmp.sync._sock is not None  # connected by the async path
            many = await asyncio.gather(*(guest.aio.qmp("query-name") for _ in range(10)))
            return [first, *many]

        results = asyncio.run(calls())
        assert results[0]["running"] is True
        assert all(r == {"name": "aio"} for r in results[1:])
        assert guest.qmp("query-status")["running"] is True  # the sync path after the async one
        with pytest.raises(virtkit.BackendError, match="no-such-command"):
            asyncio.run(guest.aio.qmp("no-such-command"))
        guest.kill()


# -- a scripted server for faults QEMU does not produce on demand --------------------------------
Script = Callable[[socket.socket], None]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Callable[[Script], SyncChannel]]:
    threads: list[threading.Thread] = []
    listeners: list[socket.socket] = []

    def start(script: Script) -> SyncChannel:
        path = tmp_path / f"s{len(listeners)}.sock"
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(str(path))
        listener.listen(1)
        listeners.append(listener)

        def serve() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.sendall(b'{"QMP": {"version": {}, "capabilities": []}}\r\n')
                conn.recv(4096)
                conn.sendall(b'{"return": {}, "id": 0}\r\n')
                script(conn)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        threads.append(thread)
        return SyncChannel("scripted", path)

    yield start
    for listener in listeners:
        listener.close()
    for thread in threads:
        thread.join(5)


def _command_id(conn: socket.socket) -> int:
    return int(json.loads(conn.recv(4096).split(b"\n")[0])["id"])


class TestFaults:
    def test_events_and_stale_ids_are_skipped(self, server) -> None:  # type: ignore[no-untyped-def]
        """Only the reply carrying the command's id is returned."""

        def script(conn: socket.socket) -> None:
            ident = _command_id(conn)
            conn.sendall(
                b'{"event": "STOP", "timestamp": {"seconds": 1, "microseconds": 2}}\r\n'
                + json.dumps({"return": "old", "id": ident + 100}).encode()
                + b"\r\n"
                + json.dumps({"return": {"ok": 1}, "id": ident}).encode()
                + b"\r\n"
            )

        channel = server(script)
        assert channel.try_execute("query-status") == (True, {"ok": 1})

    def test_silence_times_out_and_drops_the_connection(self, server) -> None:  # type: ignore[no-untyped-def]
        done = threading.Event()

        def script(conn: socket.socket) -> None:
            _command_id(conn)
            done.wait(10)

        channel = server(script)
        with pytest.raises(virtkit.TimeoutError, match="within 0.2 s"):
            channel.try_execute("query-status", timeout=0.2)
        assert channel._sock is None  # a late reply cannot meet the next command
        done.set()

    def test_hang_up_mid_call_is_a_backend_error(self, server) -> None:  # type: ignore[no-untyped-def]
        channel = server(lambda conn: (_command_id(conn), None)[1])
        with pytest.raises(virtkit.BackendError, match="closed while 'query-status'"):
            channel.try_execute("query-status")

    @pytest.mark.parametrize(
        "reply",
        [b"[1, 2]\r\n", b"{not json\r\n", b'"just a string"\r\n'],
        ids=["array", "garbage", "string"],
    )
    def test_malformed_replies_are_backend_errors(self, server, reply: bytes) -> None:  # type: ignore[no-untyped-def]
        def script(conn: socket.socket) -> None:
            _command_id(conn)
            conn.sendall(reply)

        channel = server(script)
        with pytest.raises(virtkit.BackendError, match="query-status"):
            channel.try_execute("query-status")
        assert channel._sock is None

    def test_an_endless_message_is_bounded(self, server, monkeypatch) -> None:  # type: ignore[no-untyped-def]
        monkeypatch.setattr(SyncChannel, "MAX_MESSAGE", 1 << 20)

        def script(conn: socket.socket) -> None:
            _command_id(conn)
            with contextlib.suppress(OSError):  # the client gives up, as it should
                conn.sendall(b'{"return": "' + b"x" * (4 << 20))

        channel = server(script)
        with pytest.raises(virtkit.BackendError, match="longer than"):
            channel.try_execute("query-status")

    def test_error_replies_name_the_command_and_class(self, server) -> None:  # type: ignore[no-untyped-def]
        def script(conn: socket.socket) -> None:
            ident = _command_id(conn)
            error = {"class": "CommandNotFound", "desc": "The command nope has not been found"}
            conn.sendall(json.dumps({"error": error, "id": ident}).encode() + b"\r\n")

        channel = server(script)
        with pytest.raises(virtkit.BackendError, match=r"'nope'.*CommandNotFound"):
            channel.try_execute("nope")

    def test_closed_channel_refuses(self, tmp_path: Path) -> None:
        channel = SyncChannel("gone", tmp_path / "none.sock")
        channel.close()
        with pytest.raises(virtkit.BackendError, match="not running"):
            channel.try_execute("query-status")

    def test_busy_channel_says_so(self, tmp_path: Path) -> None:
        channel = SyncChannel("busy", tmp_path / "none.sock")
        with channel._lock:
            assert channel.try_execute("query-status") == (False, None)

    def test_a_large_command_after_a_drain(self, server) -> None:  # type: ignore[no-untyped-def]
        """drain() leaves the socket non-blocking; the next call must still send all of it."""

        def script(conn: socket.socket) -> None:
            ident = _command_id(conn)
            conn.sendall(json.dumps({"return": {}, "id": ident}).encode() + b"\r\n")
            buf = b""
            while b"\n" not in buf:
                buf += conn.recv(1 << 20)
            second = json.loads(buf.split(b"\n")[0])["id"]
            conn.sendall(json.dumps({"return": len(buf), "id": second}).encode() + b"\r\n")

        channel = server(script)
        assert channel.try_execute("first") == (True, {})
        channel.drain()
        done, size = channel.try_execute("big", {"blob": "x" * (8 << 20)})
        assert done
        assert size > 8 << 20

    def test_async_silence_times_out_and_cancel_drops_the_connection(self, server) -> None:  # type: ignore[no-untyped-def]
        """The coroutine twin: a timeout forgets the connection and frees the channel."""
        done = threading.Event()

        def script(conn: socket.socket) -> None:
            _command_id(conn)
            done.wait(10)

        channel = server(script)
        with pytest.raises(virtkit.TimeoutError, match="within 0.2 s"):
            asyncio.run(channel.try_execute_async("query-status", timeout=0.2))
        assert channel._sock is None
        assert not channel._lock.locked()
        done.set()

    def test_async_cancel_drops_the_connection(self, server) -> None:  # type: ignore[no-untyped-def]
        done = threading.Event()

        def script(conn: socket.socket) -> None:
            _command_id(conn)
            done.wait(10)

        channel = server(script)

        async def cancel() -> None:
            task = asyncio.ensure_future(channel.try_execute_async("query-status"))
            await asyncio.sleep(0.2)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

        asyncio.run(cancel())
        assert channel._sock is None
        assert not channel._lock.locked()
        done.set()
