"""A small real Linux guest for tests: Debian's cloud kernel + a busybox initramfs.

The kernel comes from Debian's ``linux-image-cloud-amd64`` package (and the
versioned ``linux-image-<ver>-cloud-amd64`` package it depends on), fetched
with ``apt-get download`` and unpacked with ``dpkg -x`` into a cache folder
the tests own (``$VIRTKIT_TEST_CACHE``, default ``~/.cache/virtkit-test``).
Nothing of it is ever committed.

The initramfs is built here, in Python: a newc ``cpio`` archive, gzipped,
holding the static busybox from Debian's ``busybox-static`` package, the
kernel modules the guest needs (virtio, virtio_pci, virtio_blk, cdrom,
sr_mod, isofs, ata_piix, button, evdev and what they depend on, in
dependency order read from each module's ``.modinfo``), a ``/dev/console``
node (the kernel does not mount devtmpfs by itself before ``/init``), and an
``/init`` script that

* mounts proc, sysfs and devtmpfs, loads the modules,
* starts busybox ``acpid -f`` with a power-button action that syncs and
  powers off, so ``guest.shutdown()`` works through ACPI,
* prints :data:`READY_MARKER` and then runs an interactive shell on the
  console whose prompt is :data:`PROMPT` (respawned if it exits).

Typical use::

    kernel = fetch_kernel()
    initrd = build_initramfs(kernel, tmp_path / "initrd.gz")
    boot = KernelBoot(kernel.vmlinuz, initrd, LINUX_CMDLINE)
    guest = hv.define(attrs.evolve(machine, kernel=boot))  # or Machine(..., kernel=boot)
"""

from __future__ import annotations

import gzip
import os
import re
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import attrs

from virtkit.errors import BackendUnavailable, ConfigError

__all__ = [
    "DEFAULT_MODULES",
    "GENERIC_KERNEL_PACKAGE",
    "GUEST_AGENT_PACKAGE",
    "KERNEL_PACKAGE",
    "LINUX_CMDLINE",
    "PROMPT",
    "READY_MARKER",
    "LinuxKernel",
    "build_initramfs",
    "cache_dir",
    "cpio_newc",
    "fetch_guest_agent",
    "agent_files",
    "fetch_kernel",
    "module_load_order",
]

KERNEL_PACKAGE = "linux-image-cloud-amd64"
GENERIC_KERNEL_PACKAGE = "linux-image-amd64"
GUEST_AGENT_PACKAGE = "qemu-guest-agent"
"""The Debian meta-package whose versioned dependency holds the kernel."""

READY_MARKER = "virtkit-linux: ready"
"""Printed by ``/init`` once modules are loaded and acpid runs."""

PROMPT = "vk# "
"""The guest shell's prompt."""

LINUX_CMDLINE = "console=ttyS0 panic=-1 quiet loglevel=3 tsc=unstable"
"""A kernel command line for the test guest (serial console, no reboot loop)."""

DEFAULT_MODULES: tuple[str, ...] = (
    "virtio",
    "virtio_pci",
    "virtio_mmio",  # the emulator's disks (announced in its ACPI DSDT)
    "virtio_blk",
    "cdrom",
    "sr_mod",
    "isofs",
    "ata_piix",
    "button",
    "evdev",
)
"""The modules ``/init`` loads (their dependencies are added automatically)."""

BUSYBOX = Path("/bin/busybox")


@attrs.frozen
class LinuxKernel:
    """An unpacked Debian kernel package.

    Attributes:
        version: the kernel release, e.g. ``"6.1.0-56-cloud-amd64"``.
        vmlinuz: path of the bootable kernel image.
        modules_dir: ``lib/modules/<version>`` inside the unpacked tree.
    """

    version: str
    vmlinuz: Path
    modules_dir: Path


def cache_dir() -> Path:
    """The folder tests keep downloads in: ``$VIRTKIT_TEST_CACHE`` or ``~/.cache/virtkit-test``."""
    env = os.environ.get("VIRTKIT_TEST_CACHE")
    base = Path(env) if env else Path.home() / ".cache" / "virtkit-test"
    base.mkdir(parents=True, exist_ok=True)
    return base


def _run(argv: Sequence[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            list(argv), cwd=cwd, capture_output=True, text=True, check=False, timeout=600
        )
    except FileNotFoundError as exc:
        raise BackendUnavailable(
            f"{argv[0]} is not installed; the Linux test guest needs Debian's apt tools",
            hint="run the tests on a Debian/Ubuntu host (apt-get, dpkg-deb)",
        ) from exc


def _download(package: str, debs: Path) -> Path:
    """``apt-get download`` one package into ``debs`` (reusing a cached .deb)."""
    cached = sorted(debs.glob(f"{package}_*.deb"))
    if cached:
        return cached[-1]
    proc = _run(["apt-get", "download", package], cwd=debs)
    if proc.returncode != 0 and os.geteuid() == 0:
        _run(["apt-get", "update"])  # a fresh machine has no package lists yet
        proc = _run(["apt-get", "download", package], cwd=debs)
    found = sorted(debs.glob(f"{package}_*.deb"))
    if proc.returncode != 0 or not found:
        raise BackendUnavailable(
            f"cannot download Debian package {package!r} (apt-get exit code {proc.returncode}): "
            + proc.stderr.strip()[-400:],
            hint="run 'apt-get update' (as root) and check that Debian's archive is reachable",
        )
    return found[-1]


def fetch_kernel(cache: Path | None = None, *, package: str = KERNEL_PACKAGE) -> LinuxKernel:
    """Download and unpack the Debian cloud kernel into the cache (once).

    Args:
        cache: the cache folder; default :func:`cache_dir`.
        package: the kernel meta-package: the cloud kernel by default, or
            :data:`GENERIC_KERNEL_PACKAGE` for one with 9p and virtiofs
            (the cloud kernel is built without them).

    Returns:
        The unpacked kernel.

    Raises:
        BackendUnavailable: apt-get/dpkg are missing or the download failed.
    """
    root = cache if cache is not None else cache_dir()
    debs = root / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    meta = _download(package, debs)
    proc = _run(["dpkg-deb", "-f", str(meta), "Depends"])
    match = re.search(r"linux-image-([0-9][^\s,(]*-amd64)", proc.stdout)
    if proc.returncode != 0 or match is None:
        raise BackendUnavailable(
            f"cannot read the kernel version from {meta}: {proc.stdout.strip()!r}",
            hint="delete the cache folder and try again",
        )
    version = match.group(1)
    tree = root / f"kernel-{version}"
    vmlinuz = tree / "boot" / f"vmlinuz-{version}"
    modules = tree / "lib" / "modules" / version
    if not vmlinuz.is_file():
        deb = _download(f"linux-image-{version}", debs)
        tmp = Path(tempfile.mkdtemp(prefix="unpack-", dir=root))
        try:
            proc = _run(["dpkg", "-x", str(deb), str(tmp)])
            if proc.returncode != 0:
                raise BackendUnavailable(
                    f"dpkg -x {deb} failed: {proc.stderr.strip()[-400:]}",
                    hint="delete the cache folder and try again",
                )
            shutil.rmtree(tree, ignore_errors=True)
            tmp.rename(tree)  # atomic: a half-unpacked tree is never used
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return LinuxKernel(version=version, vmlinuz=vmlinuz, modules_dir=modules)


def fetch_guest_agent(cache: Path | None = None) -> Path:
    """Download and unpack Debian's ``qemu-guest-agent`` (once); return its ``qemu-ga``.

    The binary is dynamically linked against libraries the host has (it is
    the host's own distribution), so it also runs on the host, as the agent
    protocol tests do, and goes into the test guest's initramfs with them.

    Raises:
        BackendUnavailable: apt-get/dpkg are missing or the download failed.
    """
    root = cache if cache is not None else cache_dir()
    debs = root / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    deb = _download(GUEST_AGENT_PACKAGE, debs)
    tree = root / f"guest-agent-{deb.stem.replace('%3a', '-')}"
    binary = tree / "usr" / "sbin" / "qemu-ga"
    if not binary.is_file():
        tmp = Path(tempfile.mkdtemp(prefix="unpack-", dir=root))
        try:
            proc = _run(["dpkg", "-x", str(deb), str(tmp)])
            if proc.returncode != 0:
                raise BackendUnavailable(
                    f"dpkg -x {deb} failed: {proc.stderr.strip()[-400:]}",
                    hint="delete the cache folder and try again",
                )
            shutil.rmtree(tree, ignore_errors=True)
            tmp.rename(tree)  # atomic: a half-unpacked tree is never used
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return binary


def _modinfo_depends(ko: Path) -> list[str]:
    """The ``depends=`` list from a module's ``.modinfo`` strings."""
    data = ko.read_bytes()
    match = re.search(rb"(?:^|\x00)depends=([^\x00]*)\x00", data)
    if match is None:
        return []
    return [d.decode() for d in match.group(1).split(b",") if d]


def _module_index(modules_dir: Path) -> dict[str, Path]:
    index: dict[str, Path] = {}
    for ko in (modules_dir / "kernel").rglob("*.ko"):
        index[ko.name[:-3].replace("-", "_")] = ko
    return index


def module_load_order(modules_dir: Path, wanted: Iterable[str]) -> list[tuple[str, Path]]:
    """Resolve ``wanted`` modules and their dependencies into a load order.

    Dependencies come from each module's ``.modinfo`` (``depends=``), the
    same data ``depmod`` writes to ``modules.dep``. Modules built into the
    kernel (listed in ``modules.builtin``) are skipped.

    Raises:
        ConfigError: a module is neither a loadable module nor built in.
    """
    index = _module_index(modules_dir)
    builtin_file = modules_dir / "modules.builtin"
    builtin = set()
    if builtin_file.is_file():
        for line in builtin_file.read_text().splitlines():
            builtin.add(Path(line).name.removesuffix(".ko").replace("-", "_"))
    order: list[tuple[str, Path]] = []
    seen: set[str] = set()

    def visit(name: str, chain: tuple[str, ...]) -> None:
        key = name.replace("-", "_")
        if key in seen:
            return
        if key in chain:
            raise ConfigError(f"module dependency cycle: {' -> '.join((*chain, key))}")
        if key not in index:
            if key in builtin:
                seen.add(key)
                return
            raise ConfigError(
                f"kernel module {name!r} not found under {modules_dir}", field="modules"
            )
        for dep in _modinfo_depends(index[key]):
            visit(dep, (*chain, key))
        seen.add(key)
        order.append((key, index[key]))

    for name in wanted:
        visit(name, ())
    return order


def cpio_newc(entries: Iterable[tuple[str, int, bytes, int]]) -> bytes:
    """Build a newc (``070701``) cpio archive.

    Args:
        entries: ``(name, mode, data, rdev)`` tuples; ``mode`` includes the
            file type bits (``stat.S_IFDIR`` ...), ``rdev`` is
            ``os.makedev(major, minor)`` for device nodes, else 0.

    Returns:
        The archive bytes, ending with the ``TRAILER!!!`` record.
    """
    out = bytearray()

    def pad4() -> None:
        out.extend(b"\0" * (-len(out) % 4))

    def record(ino: int, name: str, mode: int, data: bytes, rdev: int) -> None:
        raw = name.encode() + b"\0"
        nlink = 2 if stat.S_ISDIR(mode) else 1
        fields = (
            ino, mode, 0, 0, nlink, 0, len(data), 0, 0,
            os.major(rdev), os.minor(rdev), len(raw), 0,
        )  # fmt: skip
        out.extend(b"070701" + b"".join(b"%08X" % f for f in fields))
        out.extend(raw)
        pad4()
        out.extend(data)
        pad4()

    ino = 1
    for name, mode, data, rdev in entries:
        record(ino, name.lstrip("/"), mode, data, rdev)
        ino += 1
    record(0, "TRAILER!!!", 0, b"", 0)
    return bytes(out)


_POWER_ACTION = "#!/bin/sh\nsync\npoweroff -f\n"


#: where /init finds the agent's port: there is no udev to make the by-name link
_AGENT_INIT = """for port in /sys/class/virtio-ports/*; do
  if [ "$(cat $port/name 2>/dev/null)" = org.qemu.guest_agent.0 ]; then
    mkdir -p /dev/virtio-ports
    ln -sf /dev/${port##*/} /dev/virtio-ports/org.qemu.guest_agent.0
    qemu-ga -m virtio-serial -p /dev/virtio-ports/org.qemu.guest_agent.0 -t /tmp &
    echo $! > /tmp/qga.pid
  fi
done
"""
#: user-mode networking: QEMU's DHCP server gives eth0 its address
_NETWORK_INIT = """ip link set lo up
if ip link set eth0 up 2>/dev/null; then
  udhcpc -i eth0 -s /etc/udhcpc.script -q -n -t 5 >/dev/null 2>&1
fi
"""
#: qemu-ga's guest-shutdown runs /sbin/shutdown, which busybox does not have
_SHUTDOWN_SCRIPT = """#!/bin/sh
sync
case " $* " in
  *" -r "*) reboot -f ;;
  *) poweroff -f ;;
esac
"""
_UDHCPC_SCRIPT = """#!/bin/sh
case "$1" in
  bound|renew)
    ip addr flush dev "$interface"
    ip addr add "$ip/${mask:-24}" dev "$interface"
    [ -n "$router" ] && ip route add default via "${router%% *}" dev "$interface"
    ;;
esac
exit 0
"""


def agent_files(binary: Path) -> list[tuple[str, bytes]]:
    """``qemu-ga`` and every shared library it loads, as (path in the guest, bytes).

    The libraries are the host's (``ldd``): the binary comes from the same
    Debian release, and QEMU's own dependencies put them on the host.

    Raises:
        BackendUnavailable: ``ldd`` fails or a library is missing.
    """
    proc = _run(["ldd", str(binary)])
    if proc.returncode != 0:
        raise BackendUnavailable(
            f"ldd {binary} failed: {proc.stderr.strip()[-400:]}", hint="apt-get install libc-bin"
        )
    files = [("bin/qemu-ga", binary.read_bytes())]
    for line in proc.stdout.splitlines():
        match = re.search(r"(/\S+)\s+\(0x", line)
        if match is None:
            if "not found" in line:
                raise BackendUnavailable(
                    f"qemu-ga needs a library this host lacks: {line.strip()}",
                    hint="apt-get install qemu-system-x86 (it brings qemu-ga's libraries)",
                )
            continue
        library = Path(match.group(1))
        files.append((str(library).lstrip("/"), library.read_bytes()))
    return files


def _init_script(modules: Sequence[str], extra: str) -> str:
    insmods = "\n".join(f"insmod /lib/modules/{m}.ko" for m in modules)
    return f"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
{insmods}
acpid -f -c /etc/acpi -l /dev/null &
{extra}
echo "{READY_MARKER}"
export PS1='{PROMPT}'
while :; do setsid cttyhack sh; done
"""


def build_initramfs(
    kernel: LinuxKernel,
    out: Path,
    *,
    modules: Sequence[str] = DEFAULT_MODULES,
    extra_init: str = "",
    busybox: Path = BUSYBOX,
    agent: Path | None = None,
    network: bool = False,
) -> Path:
    """Write a gzipped newc initramfs for ``kernel`` to ``out``.

    Args:
        kernel: the kernel whose modules to include.
        out: the file to write.
        modules: modules ``/init`` loads (dependencies are added, in order).
        extra_init: shell lines run after the modules are loaded, before
            :data:`READY_MARKER` is printed.
        busybox: a statically linked busybox (Debian's ``busybox-static``).
        agent: a ``qemu-ga`` binary (:func:`fetch_guest_agent`) to include with
            its libraries and ``virtio_console``; ``/init`` starts it on the
            ``org.qemu.guest_agent.0`` port when the machine has one.
        network: load ``virtio_net`` and configure ``eth0`` by DHCP (QEMU's
            user-mode network gives 10.0.2.15).

    Raises:
        BackendUnavailable: busybox is missing.
        ConfigError: a module cannot be found.
    """
    if not busybox.is_file():
        raise BackendUnavailable(
            f"static busybox not found at {busybox}",
            hint="apt-get install busybox-static",
        )
    wanted = list(modules)
    if agent is not None:
        wanted.append("virtio_console")
        extra_init = _AGENT_INIT + extra_init
    if network:
        wanted.append("virtio_net")
        extra_init = _NETWORK_INIT + extra_init
    order = module_load_order(kernel.modules_dir, wanted)
    d, f, x = stat.S_IFDIR | 0o755, stat.S_IFREG | 0o644, stat.S_IFREG | 0o755
    entries: list[tuple[str, int, bytes, int]] = [
        (name, d, b"", 0)
        for name in (
            *("bin", "dev", "etc", "etc/acpi", "etc/acpi/PWRF", "lib", "lib/modules"),
            *("mnt", "proc", "root", "sys", "tmp"),
        )
    ]
    entries += [
        ("dev/console", stat.S_IFCHR | 0o600, b"", os.makedev(5, 1)),
        ("dev/null", stat.S_IFCHR | 0o666, b"", os.makedev(1, 3)),
        ("bin/busybox", x, busybox.read_bytes(), 0),
        ("bin/sh", stat.S_IFLNK | 0o777, b"busybox", 0),
        ("etc/acpi/PWRF/00000080", x, _POWER_ACTION.encode(), 0),
        ("init", x, _init_script([m for m, _ in order], extra_init).encode(), 0),
    ]
    entries += [(f"lib/modules/{m}.ko", f, ko.read_bytes(), 0) for m, ko in order]
    entries.append(("etc/udhcpc.script", x, _UDHCPC_SCRIPT.encode(), 0))
    if agent is not None:
        files = agent_files(agent)
        folders = sorted({str(Path(name).parent) for name, _ in files} - {"bin", "."})
        for folder in folders:  # parents first: lib64, usr, usr/lib/...
            parts = Path(folder).parts
            entries += [
                ("/".join(parts[: i + 1]), d, b"", 0)
                for i in range(len(parts))
                if not any(e[0] == "/".join(parts[: i + 1]) for e in entries)
            ]
        entries += [(name, x, data, 0) for name, data in files]
        entries += [("sbin", d, b"", 0), ("sbin/shutdown", x, _SHUTDOWN_SCRIPT.encode(), 0)]
        # guest-set-time runs /sbin/hwclock (-w after setting the clock, -s to read the RTC)
        entries.append(("sbin/hwclock", stat.S_IFLNK | 0o777, b"../bin/busybox", 0))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_bytes(gzip.compress(cpio_newc(entries), compresslevel=1, mtime=0))
    tmp.replace(out)
    return out
