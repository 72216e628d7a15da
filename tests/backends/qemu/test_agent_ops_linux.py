"""Guest agent operations in the real Linux test guest: quiesced snapshots, set_time and
shutdown, and an agent that is killed, silent or babbling on its port."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from agent_guest import agent_boot, guest

import virtkit
import virtkit.images
from virtkit.backends.qemu import QemuGuest, QemuHypervisor
from virtkit.model import Disk, KernelBoot, Machine, State
from virtkit.testing.linux import PROMPT, READY_MARKER

#: the shared agent-guest fixtures, found by pytest under these names
FIXTURES = (agent_boot, guest)


class TestAgentOperations:
    """Snapshots, the clock, power and faults through qemu-ga in the guest."""

    def test_disk_snapshot_is_quiesced(
        self, hv: QemuHypervisor, agent_boot: KernelBoot, tmp_path: Path
    ) -> None:
        """A file written but not synced in the guest is in the disk snapshot's frozen layer:
        the agent froze (flushed) the file system around the snapshot, and thawed it after;
        a full snapshot is taken frozen too, and reverting to it thaws the guest."""
        data = tmp_path / "data.qcow2"
        virtkit.images.create(data, size="32MiB").close()
        machine = Machine(
            name="quiesce", memory="256MiB", agent=True, kernel=agent_boot, disks=[Disk(str(data))]
        )
        guest = hv.define(machine)
        guest.start()
        guest.wait_ready(via="console", pattern=READY_MARKER, timeout=120)
        guest.console.expect(PROMPT, timeout=30)
        guest.wait_ready(via="agent", timeout=30)
        run = guest.console.run
        run("mke2fs -q /dev/vda && mkdir -p /mnt/d && mount /dev/vda /mnt/d", prompt=PROMPT)
        assert guest.console.exit_status == 0
        marker = "vk-quiesce-" + os.urandom(6).hex()
        run(f"echo {marker} > /mnt/d/note", prompt=PROMPT)  # in the page cache, not on disk yet
        snap = guest.snapshot("quiet", memory=False)
        frozen = Path(guest.folder, "disks", snap.layers["vda"])
        with virtkit.images.open(frozen) as image:
            assert image.check().ok
            assert marker.encode() in image.read(0, image.virtual_size)
        assert guest.agent.fsfreeze_status() == "thawed"
        run("echo after >> /mnt/d/note && cat /mnt/d/note", prompt=PROMPT)

        # a full snapshot is frozen too; the revert thaws the restored guest
        run("echo in-full > /mnt/d/full", prompt=PROMPT)
        full = guest.snapshot("full-quiet")
        assert Path(guest.snapshot_dir(full.name), "quiesced").read_text() == "1\n"
        assert guest.agent.fsfreeze_status() == "thawed"
        run("echo later > /mnt/d/later", prompt=PROMPT)
        guest.revert(full.name)
        assert guest.agent.fsfreeze_status(timeout=30) == "thawed"
        assert (
            run("cat /mnt/d/full; ls -1 /mnt/d", prompt=PROMPT)
            == "in-full\nfull\nlost+found\nnote\n"
        )
        run("echo writable > /mnt/d/again && sync", prompt=PROMPT, timeout=30)
        assert guest.console.exit_status == 0
        guest.kill()

    def test_silent_and_babbling_agent_in_the_guest(self, guest: QemuGuest) -> None:
        """qemu-ga killed in the guest: calls end in TimeoutError at their deadline; a guest
        process writing garbage on the agent's port: a TimeoutError quoting it; qemu-ga
        started again: the same client works."""
        run = guest.console.run
        port = "/dev/virtio-ports/org.qemu.guest_agent.0"
        run("kill -9 $(cat /tmp/qga.pid); sleep 1", prompt=PROMPT)
        with pytest.raises(virtkit.TimeoutError, match="did not answer"):
            guest.agent.ping(timeout=2)
        with pytest.raises(virtkit.TimeoutError, match="not ready via agent"):
            guest.wait_ready(via="agent", timeout=3)
        with pytest.raises(virtkit.TimeoutError):
            guest.agent.exec(["/bin/true"], timeout=2)

        babble = r"while :; do printf 'not json \377 {broken\n'; sleep 0.05; done"
        run(f"({babble}) > {port} & echo $! > /tmp/babble.pid", prompt=PROMPT)
        with pytest.raises(virtkit.TimeoutError, match="garbage.*broken"):
            guest.agent.ping(timeout=3)
        run("kill $(cat /tmp/babble.pid)", prompt=PROMPT)

        run(f"qemu-ga -m virtio-serial -p {port} -t /tmp & echo $! > /tmp/qga.pid", prompt=PROMPT)
        guest.wait_ready(via="agent", timeout=60)
        assert guest.agent.exec(["/bin/echo", "back"]).stdout == b"back\n"

    def test_set_time_and_shutdown_through_the_agent(self, guest: QemuGuest) -> None:
        """guest-set-time sets the clock (and the RTC: set_time() reads it back from there);
        guest-shutdown powers the guest off."""
        guest.agent.set_time(2_000_000_000 * 10**9)
        now = int(guest.agent.exec(["/bin/date", "+%s"]).stdout)
        assert 2_000_000_000 <= now < 2_000_000_000 + 600
        guest.console.run("date -s @1000000000", prompt=PROMPT)  # the system clock only
        guest.agent.set_time()  # from the RTC, which the first call wrote
        now = int(guest.agent.exec(["/bin/date", "+%s"]).stdout)
        assert 2_000_000_000 <= now < 2_000_000_000 + 600
        with pytest.raises(virtkit.ConfigError, match="ns"):
            guest.agent.set_time(-1)
        guest.agent.shutdown()
        assert guest.wait(timeout=60) is State.SHUTOFF
