"""virtkit quickstart: boot a real boot sector on the in-process emulator.

Builds a qcow2 disk holding a 512-byte boot program, defines a machine, boots
it on the embedded ``emulator`` backend, talks to it over the serial console,
takes a snapshot, reverts to it, and leaves the VM as its folder of files.

Run it with ``./scripts/demo`` (or ``python examples/quickstart.py [FOLDER]``).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import virtkit
from virtkit import images

# The guest: examples/quickstart_guest.asm assembled with nasm (tests check
# these bytes still match that source). It prints a greeting, echoes input in
# upper case, and powers off through ACPI when it reads "q".
BOOT_CODE = bytes.fromhex(
    "fa31c08ed88ed0bc007cbe597ce82f00bafd03eca80174fbbaf803ec3c71740f"
    "3c6172063c7a77022c20e81d00ebe1be717ce80a00ba0406b80020eff4ebfdac"
    "84c07405e80300ebf6c350bafd03eca82074fb58baf803eec348656c6c6f2066"
    "726f6d20766972746b6974210d0a3e20000d0a4279652e0d0a00000000000000"
    "0000000000000000000000000000000000000000000000000000000000000000"
    "0000000000000000000000000000000000000000000000000000000000000000"
    "0000000000000000000000000000000000000000000000000000000000000000"
    "0000000000000000000000000000000000000000000000000000000000000000"
    "0000000000000000000000000000000000000000000000000000000000000000"
    "0000000000000000000000000000000000000000000000000000000000000000"
    "0000000000000000000000000000000000000000000000000000000000000000"
    "0000000000000000000000000000000000000000000000000000000000000000"
    "0000000000000000000000000000000000000000000000000000000000000000"
    "0000000000000000000000000000000000000000000000000000000000000000"
    "0000000000000000000000000000000000000000000000000000000000000000"
    "000000000000000000000000000000000000000000000000000000000000"
)
BOOT_SECTOR = BOOT_CODE.ljust(510, b"\0") + b"\x55\xaa"


def show_files(folder: Path) -> None:
    """Print the VM folder as a tree, with sizes."""
    print(f"\nThe VM as its files ({folder}):")
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        size = f"{path.stat().st_size:>9} B" if path.is_file() else "        dir"
        print(f"  {size}  {rel}")


def main(workdir: Path) -> int:
    """Run the demo in ``workdir``; returns the process exit code."""
    folder = workdir / "hello"
    disk = folder / "disks" / "boot.qcow2"
    disk.parent.mkdir(parents=True, exist_ok=True)
    with images.create(disk, size="1MiB", format="qcow2") as img:
        img.write(0, BOOT_SECTOR)
    print(f"Created {disk} ({img.format}, {img.virtual_size} bytes virtual)")

    machine = virtkit.Machine(
        name="hello",
        memory="16MiB",
        disks=[virtkit.Disk(path="boot.qcow2")],
        labels={"demo": "quickstart"},
    )
    try:
        hv = virtkit.connect("emulator", root=workdir)
    except virtkit.BackendUnavailable as exc:
        print(f"The emulator backend is not available here: {exc}")
        virtkit.save(machine, folder)
        assert virtkit.load(folder) == machine
        show_files(folder)
        return 0

    with hv:
        print(f"Hypervisor: {hv.name} ({hv.kind.value}), host: {hv.host.cpus} CPUs")
        guest = hv.define(machine, folder=folder)
        guest.start()
        guest.console.expect("> ", timeout=30)
        print(
            f"Guest {guest.name} is {guest.state.value}; it said: "
            f"{guest.console.output.decode().strip()!r}"
        )

        snap = guest.snapshot("booted")
        print(f"Took snapshot {snap.name!r} ({snap.kind.value}, while {snap.state.value})")
        guest.console.write(b"virtkit")
        guest.console.expect("VIRTKIT", timeout=30)
        print("Typed 'virtkit', guest echoed 'VIRTKIT'")

        guest.revert("booted")
        print(f"Reverted to {snap.name!r}: guest is {guest.state.value} again")
        guest.console.write(b"again")
        guest.console.expect("AGAIN", timeout=30)
        guest.console.write(b"q")
        final = guest.wait(timeout=30)
        print(f"Guest powered itself off: {final.value}")
        print("Console transcript:")
        for line in guest.console.output.decode().splitlines():
            print(f"  | {line}")

    loaded = virtkit.load(folder)
    assert loaded == machine, "the saved folder must load as the same machine"
    show_files(folder)
    print("\nmachine.toml:")
    print((folder / "machine.toml").read_text())
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1:
        target = Path(sys.argv[1])
        target.mkdir(parents=True, exist_ok=True)
        sys.exit(main(target))
    with tempfile.TemporaryDirectory(prefix="virtkit-quickstart-") as tmp:
        sys.exit(main(Path(tmp)))
