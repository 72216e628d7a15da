"""The library, the CLI and ``Disk`` agree on the format of a path (issue 11).

A new image without an explicit format follows its name as ``Disk`` infers it
(``.raw``/``.img`` are raw, as ``virtkit image create`` and qemu-img make
them); an existing file is probed, and a VM disk whose file is not in its
declared format (a qcow2 cloud image named ``.img``) is refused at define
instead of being shown to the guest as raw bytes.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

import virtkit
from virtkit import images
from virtkit.cli import main as cli_main
from virtkit.images.probe import format_for_name

Run = Callable[..., subprocess.CompletedProcess[str]]
MiB = 1 << 20


def _qemu_format(qemu_img: Run, path: Path) -> str:
    fmt: str = json.loads(qemu_img("info", "--output=json", "-U", path).stdout)["format"]
    return fmt


@pytest.mark.parametrize("name", ["e.raw", "e.img", "E.IMG", "e.iso", "e.bin", "e.qcow2", "e"])
def test_library_cli_and_disk_agree_on_new_names(name: str, tmp_path: Path, qemu_img: Run) -> None:
    """A new image made without a format is what ``Disk(path=name)`` declares, as qemu-img sees it."""
    declared = virtkit.Disk(path=name).format
    assert format_for_name(name) == declared
    lib = tmp_path / "lib" / name
    lib.parent.mkdir()
    images.create(lib, "1M").close()
    assert _qemu_format(qemu_img, lib) == declared
    assert images.probe_format(lib) == declared
    if declared == "raw":  # the CLI creates raw whatever the name, as qemu-img does
        cli = tmp_path / "cli" / name
        cli.parent.mkdir()
        assert cli_main(["image", "create", str(cli), "1M"]) == 0
        assert _qemu_format(qemu_img, cli) == "raw"


@pytest.mark.parametrize(
    ("name", "fmt"),
    [("out.raw", "raw"), ("out.img", "raw"), ("out.vmdk", "vmdk"), ("out.vhdx", "vhdx"),
     ("out.qcow2", "qcow2"), ("out", "qcow2")],
)  # fmt: skip
def test_convert_target_follows_its_name(
    name: str, fmt: str, tmp_path: Path, qemu_img: Run
) -> None:
    """The new-user trial: a 64 MiB VMDK converted to ``out.raw`` is a 64 MiB raw disk, identical."""
    src = tmp_path / "big.vmdk"
    qemu_img("create", "-f", "vmdk", src, "64M")
    subprocess.run(["qemu-io", "-f", "vmdk", "-c", "write -P 0x41 10M 1M", str(src)],
                   check=True, capture_output=True, timeout=120)  # fmt: skip
    out = tmp_path / name
    images.convert(src, out)
    assert _qemu_format(qemu_img, out) == fmt
    info = json.loads(qemu_img("info", "--output=json", out).stdout)
    assert info["virtual-size"] == 64 * MiB
    proc = qemu_img("compare", "-f", "vmdk", "-F", fmt, src, out, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_convert_to_vhd_name_is_a_fixed_vhd(tmp_path: Path, qemu_img: Run) -> None:
    """``.vhd`` means vpc; virtkit writes it fixed, which qemu-img reads identical with -F vpc."""
    src = tmp_path / "src.raw"
    src.write_bytes(b"\x5a" * MiB + bytes(3 * MiB))
    images.convert(src, tmp_path / "out.vhd", force_size=True)
    with images.open(tmp_path / "out.vhd", format="vpc") as img:
        assert img.virtual_size == 4 * MiB
    assert qemu_img("compare", "-F", "vpc", src, tmp_path / "out.vhd").returncode == 0


def test_explicit_format_still_wins(tmp_path: Path, qemu_img: Run) -> None:
    """An explicit format is kept whatever the name says."""
    images.create(tmp_path / "q.img", "1M", format="qcow2").close()
    assert _qemu_format(qemu_img, tmp_path / "q.img") == "qcow2"
    images.convert(tmp_path / "q.img", tmp_path / "r.qcow2", format="raw")
    assert _qemu_format(qemu_img, tmp_path / "r.qcow2") == "raw"


class TestDefineProbesDisks:
    """define() probes each existing disk file and refuses one not in its declared format."""

    def _define(self, folder: Path, disk: virtkit.Disk) -> virtkit.Guest:
        machine = virtkit.Machine(name="d", memory="64MiB", disks=[disk])
        with virtkit.connect("emulator") as hv:
            return hv.define(machine, folder=folder)

    def test_qcow2_cloud_image_named_img(self, tmp_path: Path) -> None:
        """A qcow2 ``.img`` (as cloud images are named) with no format is refused, naming qcow2."""
        (tmp_path / "vm" / "disks").mkdir(parents=True)
        images.create(tmp_path / "vm" / "disks" / "cloud.img", "8M", format="qcow2").close()
        with pytest.raises(virtkit.ConfigError, match="is qcow2.*set format='qcow2'") as err:
            self._define(tmp_path / "vm", virtkit.Disk(path="cloud.img"))
        assert err.value.field == "disks[0].format"
        self._define(tmp_path / "vm", virtkit.Disk(path="cloud.img", format="qcow2"))

    def test_raw_file_named_qcow2(self, tmp_path: Path) -> None:
        """A raw file (``virtkit image create x.qcow2`` makes raw, as qemu-img) is not run as qcow2."""
        (tmp_path / "vm" / "disks").mkdir(parents=True)
        assert cli_main(["image", "create", str(tmp_path / "vm" / "disks" / "x.qcow2"), "1M"]) == 0
        with pytest.raises(virtkit.ConfigError, match="not a qcow2 image|is raw.*format='raw'"):
            self._define(tmp_path / "vm", virtkit.Disk(path="x.qcow2"))
        self._define(tmp_path / "vm", virtkit.Disk(path="x.qcow2", format="raw"))

    @pytest.mark.parametrize("fmt", ["vmdk", "vhdx", "vdi", "vpc", "qed"])
    def test_foreign_format_asks_for_convert(self, fmt: str, tmp_path: Path, qemu_img: Run) -> None:
        """A VMDK, VHDX, VDI, VHD or QED file as a VM disk names its format and the convert call."""
        (tmp_path / "vm" / "disks").mkdir(parents=True)
        path = tmp_path / "vm" / "disks" / "foreign.img"
        qemu_img("create", "-f", fmt, path, "8M")
        with pytest.raises(virtkit.ConfigError, match=f"is {fmt} .*convert it to qcow2"):
            self._define(tmp_path / "vm", virtkit.Disk(path="foreign.img"))
        if fmt == "qed":  # virtkit cannot read QED: qemu-img convert it
            return
        converted = tmp_path / "vm" / "disks" / "converted.qcow2"
        images.convert(path, converted)
        self._define(tmp_path / "vm", virtkit.Disk(path="converted.qcow2"))

    def test_new_and_matching_disks_pass(self, tmp_path: Path, qemu_img: Run) -> None:
        """A disk created by define, and a raw disk the guest LUKS-formatted whole, are fine."""
        self._define(tmp_path / "a", virtkit.Disk(path="new.img", size="4M"))
        assert _qemu_format(qemu_img, tmp_path / "a" / "disks" / "new.img") == "raw"
        (tmp_path / "b" / "disks").mkdir(parents=True)
        luks = tmp_path / "b" / "disks" / "data.img"
        luks.write_bytes(b"LUKS\xba\xbe\x00\x01" + bytes(4 * MiB - 8))  # cryptsetup's header
        assert images.probe_format(luks) == "luks"
        self._define(tmp_path / "b", virtkit.Disk(path="data.img"))
