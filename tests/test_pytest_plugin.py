"""The virtkit pytest plugin, run through pytester: fixtures, markers, failure reports, leaks."""

from __future__ import annotations

import glob
import os
import tempfile
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

_HELLO = """
import virtkit
from virtkit.testing import guests


def machine(tmp_path, guest="hello", name=None):
    disk = tmp_path / f"{guest}.raw"
    guests.write_disk(disk, guest, format="raw")
    return virtkit.Machine(
        name=name or guest, memory="2MiB", disks=[virtkit.Disk(str(disk), format="raw")]
    )
"""


class TestFixtures:
    def test_guest_factory_defines_starts_and_tears_down(self, pytester: pytest.Pytester) -> None:
        """virtkit_guest boots a machine on the default (emulator) backend; it is gone afterwards."""
        pytester.makeconftest(_HELLO)
        pytester.makepyfile(
            """
            import virtkit
            from conftest import machine
            from virtkit.testing import guests

            SEEN = []

            def test_boot(virtkit_guest, virtkit_hypervisor, tmp_path):
                assert virtkit_hypervisor.name == "emulator"
                guest = virtkit_guest(machine(tmp_path))
                assert guest.wait(timeout=30) is virtkit.State.SHUTOFF
                assert guest.console.output == guests.OUTPUT["hello"]
                SEEN.append((virtkit_hypervisor, guest))

            def test_counter_left_running(virtkit_guest, tmp_path):
                guest = virtkit_guest(machine(tmp_path, "counter"))
                guest.console.expect("count 1", timeout=30)
                SEEN.append((None, guest))

            def test_after():
                hv, _ = SEEN[0]
                assert hv.guests == ()  # undefined, connection closed
                _, counter = SEEN[1]
                assert counter.state is not virtkit.State.RUNNING  # killed by the teardown
            """
        )
        result = pytester.runpytest("-p", "no:cacheprovider")
        result.assert_outcomes(passed=3)

    def test_folder_fixture_and_factory_with_a_folder(self, pytester: pytest.Pytester) -> None:
        """virtkit_vm_folder is a fresh path; the factory accepts a saved VM folder."""
        pytester.makeconftest(_HELLO)
        pytester.makepyfile(
            """
            import virtkit
            from virtkit.testing import guests

            def test_folder(virtkit_guest, virtkit_vm_folder, tmp_path):
                assert not virtkit_vm_folder.exists()
                (virtkit_vm_folder / "disks").mkdir(parents=True)
                guests.write_disk(virtkit_vm_folder / "disks" / "boot.raw", "hello", format="raw")
                disk = virtkit.Disk("boot.raw", format="raw")
                virtkit.save(virtkit.Machine(name="f", memory="2MiB", disks=[disk]), virtkit_vm_folder)
                guest = virtkit_guest(virtkit_vm_folder)
                assert guest.folder == virtkit_vm_folder
                assert guest.wait(timeout=30) is virtkit.State.SHUTOFF
            """
        )
        pytester.runpytest("-p", "no:cacheprovider").assert_outcomes(passed=1)

    def test_backend_option_and_marker(self, pytester: pytest.Pytester) -> None:
        """--virtkit-backend picks the backend; a virtkit_backend marker overrides it per test."""
        pytester.makepyfile(
            """
            import pytest

            def test_option(virtkit_hypervisor):
                assert virtkit_hypervisor.name == "qemu"

            @pytest.mark.virtkit_backend("emulator")
            def test_marker(virtkit_hypervisor):
                assert virtkit_hypervisor.name == "emulator"
            """
        )
        result = pytester.runpytest("-p", "no:cacheprovider", "--virtkit-backend=qemu")
        result.assert_outcomes(passed=2)

    def test_unknown_backend_is_an_error_naming_it(self, pytester: pytest.Pytester) -> None:
        """A misspelt backend errors the test with virtkit's message naming the backends."""
        pytester.makepyfile("def test_x(virtkit_hypervisor):\n    pass\n")
        result = pytester.runpytest("-p", "no:cacheprovider", "--virtkit-backend=emulater")
        result.assert_outcomes(errors=1)
        result.stdout.fnmatch_lines(["*unknown backend 'emulater'*"])

    def test_help_lists_the_options(self, pytester: pytest.Pytester) -> None:
        """pytest --help shows the plugin's options and --markers its marker."""
        pytester.runpytest("--help").stdout.fnmatch_lines(["*--virtkit-backend=NAME*"])
        pytester.runpytest("--markers").stdout.fnmatch_lines(["*virtkit_backend(name*"])


class TestFailureReport:
    def test_failure_report_has_console_and_state(self, pytester: pytest.Pytester) -> None:
        """A failing test's report holds each guest's state and console transcript."""
        pytester.makeconftest(_HELLO)
        pytester.makepyfile(
            """
            from conftest import machine

            def test_fails(virtkit_guest, tmp_path):
                guest = virtkit_guest(machine(tmp_path, "counter", name="ticker"))
                guest.console.expect("count 2", timeout=30)
                assert False, "deliberate"
            """
        )
        result = pytester.runpytest("-p", "no:cacheprovider")
        result.assert_outcomes(failed=1)
        result.stdout.fnmatch_lines(
            [
                "*virtkit guest 'ticker': state running*",
                "console transcript (* bytes):",
                "count 0*",
                "count 1*",
                "count 2*",
            ]
        )

    def test_passing_test_adds_nothing(self, pytester: pytest.Pytester) -> None:
        """A passing test's report has no virtkit section (even with -rA)."""
        pytester.makeconftest(_HELLO)
        pytester.makepyfile(
            """
            from conftest import machine

            def test_ok(virtkit_guest, tmp_path):
                virtkit_guest(machine(tmp_path)).wait(timeout=30)
            """
        )
        result = pytester.runpytest("-p", "no:cacheprovider", "-rA")
        result.assert_outcomes(passed=1)
        assert "virtkit guest" not in result.stdout.str()


class TestImageLeak:
    def test_a_disk_image_left_open_fails_the_session(self, pytester: pytest.Pytester) -> None:
        """A guest's disk image still open (and locked) at the end is reported; exit 1."""
        pytester.makeconftest(_HELLO)
        pytester.makepyfile(
            """
            import virtkit
            from conftest import machine

            KEEP = []

            def test_holds_the_disk(virtkit_guest, tmp_path):
                guest = virtkit_guest(machine(tmp_path, name="holder"))
                guest.wait(timeout=30)
                KEEP.append(virtkit.images.open(tmp_path / "hello.raw", writable=True))
            """
        )
        result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
        assert result.ret == 1
        result.stdout.fnmatch_lines(
            [
                "*virtkit: left behind after the session*",
                "disk image still open (locked): *hello.raw",
            ]
        )

    def test_the_leak_check_can_be_turned_off(self, pytester: pytest.Pytester) -> None:
        """--virtkit-no-leak-check lets the same session pass."""
        pytester.makeconftest(_HELLO)
        pytester.makepyfile(
            """
            import virtkit
            from conftest import machine

            KEEP = []

            def test_holds_the_disk(virtkit_guest, tmp_path):
                virtkit_guest(machine(tmp_path)).wait(timeout=30)
                KEEP.append(virtkit.images.open(tmp_path / "hello.raw", writable=True))
            """
        )
        result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--virtkit-no-leak-check")
        assert result.ret == 0, result.stdout.str()


@pytest.mark.qemu
class TestLeakCheck:
    def test_a_leaked_qemu_guest_fails_the_session(self, pytester: pytest.Pytester) -> None:
        """A QEMU guest left running by a test is reported (process and runtime folder); exit 1."""
        pytester.makeconftest(_HELLO)
        pytester.makepyfile(
            """
            import virtkit
            from conftest import machine

            KEEP = []

            def test_leaks(tmp_path):
                hv = virtkit.connect("qemu", accel="tcg", root=tmp_path / "g")
                guest = hv.define(machine(tmp_path, "counter", name="leaky"))
                guest.start()
                guest.console.expect("count 0", timeout=60)
                KEEP.append(hv)  # never closed
            """
        )
        result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
        assert result.ret == 1
        result.stdout.fnmatch_lines(
            [
                "*virtkit: left behind after the session*",
                "QEMU process still running: * *qemu-system-x86_64*",
                "runtime folder left: *vkq-*-leaky-*",
            ]
        )
        # the qemu backend's exit hook still cleaned up once the process ended
        base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
        assert glob.glob(os.path.join(base, "vkq-*-leaky-*")) == []

    def test_clean_session_passes(self, pytester: pytest.Pytester) -> None:
        """A qemu guest made through virtkit_guest is cleaned up; the check passes."""
        pytester.makeconftest(_HELLO)
        pytester.makepyfile(
            """
            import pytest
            from conftest import machine

            @pytest.mark.virtkit_backend("qemu", accel="tcg")
            def test_clean(virtkit_guest, tmp_path):
                guest = virtkit_guest(machine(tmp_path, "counter"))
                guest.console.expect("count 0", timeout=60)
            """
        )
        result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
        assert result.ret == 0, result.stdout.str()
        assert "left behind" not in result.stdout.str()


class TestExample:
    def test_the_plugin_example_passes(self, pytester: pytest.Pytester) -> None:
        """examples/test_vm_definition.py (shown in the docs) passes on the emulator."""
        example = Path(__file__).resolve().parent.parent / "examples" / "test_vm_definition.py"
        pytester.makepyfile(test_vm_definition=example.read_text())
        pytester.runpytest("-p", "no:cacheprovider").assert_outcomes(passed=4)


@pytest.mark.qemu
class TestLinuxFixture:
    def test_a_ready_linux_shell(self, pytester: pytest.Pytester) -> None:
        """virtkit_linux is at the shell prompt; its initramfs is cached for the next run."""
        from virtkit.testing import linux

        pytester.makepyfile(
            """
            import virtkit

            def test_shell(virtkit_linux, virtkit_linux_boot):
                assert virtkit_linux.state is virtkit.State.RUNNING
                virtkit_linux.console.write("echo $((6 * 7))x\\n")
                virtkit_linux.console.expect("42x", timeout=60)
                print("INITRD=" + str(virtkit_linux_boot.initrd) + "=")
            """
        )
        result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-s")
        result.assert_outcomes(passed=1)
        line = next(x for x in result.outlines if "INITRD=" in x)
        initrd = Path(line.split("INITRD=", 1)[1].split("=", 1)[0])
        assert initrd.parent == linux.cache_dir() and initrd.is_file()
        assert "left behind" not in result.stdout.str()
