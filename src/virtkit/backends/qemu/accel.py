"""Choose the accelerator honestly: KVM only when it really runs guests.

A present ``/dev/kvm`` is not proof: on some hosts (nested virtualisation
without EPT, broken MSR emulation) QEMU starts fine with ``-accel kvm`` and
even runs real-mode code, yet a Linux guest crawls or hangs; and
``-machine accel=kvm:tcg`` does not fall back because KVM *initialises*.
So the probe boots a tiny guest under KVM: a boot sector that prints ``R``
in real mode, enters protected mode (``P``), long mode with paging (``L``),
clears 64 MiB of RAM through the page tables (``M``), then powers off. A
healthy KVM does this in milliseconds; if the full marker does not appear
within a short timeout, KVM is not used and TCG is.

The answer is cached per host: in memory, and in a small JSON file keyed by
the host's boot id, the QEMU binary and /dev/kvm, so a later process on the
same boot does not pay for the probe again. Users can force either
accelerator (``virtkit.connect("qemu", accel="tcg")`` or
``VIRTKIT_QEMU_ACCEL=tcg``).

The boot sector (nasm source, assembled once; kept as bytes below)::

    bits 16 / org 0x7c00: cli; ds=ss=0; sp=0x7c00; out 0x3f8,'R'; lgdt; cr0.PE=1; jmp 08:pm
    bits 32: ds=es=ss=0x10; out 'P'; zero 0x1000-0x3fff; PML4[0]->0x2000,
             PDPT[0]->0x3000, PD[0..511] = 2 MiB pages; cr3; cr4.PAE; EFER.LME; cr0.PG; jmp 18:lm
    bits 64: out 'L'; rep stosq 64 MiB at 4 MiB; out 'M'; out '\\n'; out 0x604,0x2000; hlt
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import attrs

from virtkit.backends.kvmprobe import PROBE_MARKER, PROBE_TIMEOUT, probe_image
from virtkit.images.args import check_choice

__all__ = ["ACCELERATORS", "AccelChoice", "choose_accel", "probe_image", "probe_kvm"]

ACCELERATORS = ("auto", "kvm", "tcg")


@attrs.frozen
class AccelChoice:
    """The accelerator a guest runs with, and why.

    Attributes:
        accel: ``"kvm"`` or ``"tcg"``.
        reason: one line a human can read (``"forced by the caller"``,
            ``"/dev/kvm is absent"``, ``"KVM probe timed out after 4.0 s"``...).
    """

    accel: str
    reason: str


_memo: dict[str, AccelChoice] = {}
_memo_lock = threading.Lock()


def _host_key(binary: str) -> str:
    binary = shutil.which(binary) or binary
    try:
        boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot_id = "unknown-boot"
    try:
        st = os.stat(binary)
        ident = f"{os.path.realpath(binary)}:{st.st_size}:{st.st_mtime_ns}"
    except OSError:
        ident = binary
    try:
        kvm = os.stat("/dev/kvm")
        ident += f":kvm{kvm.st_rdev}"
    except OSError:
        ident += ":nokvm"
    return hashlib.sha256(f"{boot_id}|{ident}".encode()).hexdigest()[:32]


def _cache_file() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "virtkit" / "accel-probe.json"


def _load_cached(key: str) -> AccelChoice | None:
    try:
        doc = json.loads(_cache_file().read_text())
        entry = doc[key]
        if entry["accel"] in ("kvm", "tcg") and isinstance(entry["reason"], str):
            return AccelChoice(entry["accel"], entry["reason"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def _store_cached(key: str, choice: AccelChoice) -> None:
    path = _cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            doc = json.loads(path.read_text())
            if not isinstance(doc, dict):
                doc = {}
        except (OSError, ValueError):
            doc = {}
        doc[key] = {"accel": choice.accel, "reason": choice.reason}
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(doc, indent=1))
        tmp.replace(path)
    except OSError:
        pass  # a cache that cannot be written only costs a probe next time


def probe_kvm(binary: str, *, timeout: float = PROBE_TIMEOUT) -> AccelChoice:
    """Boot the probe guest under KVM and report whether KVM really works.

    Never raises for a broken KVM: the answer then is TCG with the reason.
    """
    if not os.path.exists("/dev/kvm"):
        return AccelChoice("tcg", "/dev/kvm is absent")
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return AccelChoice("tcg", "/dev/kvm is not accessible to this user")
    with tempfile.TemporaryDirectory(prefix="virtkit-kvm-probe-") as tmp:
        image = Path(tmp) / "probe.img"
        image.write_bytes(probe_image())
        blockdev = json.dumps(
            {
                "driver": "raw",
                "node-name": "probe",
                "file": {"driver": "file", "filename": str(image)},
            }
        )
        argv = [
            binary, "-nodefaults", "-no-user-config", "-display", "none", "-accel", "kvm",
            "-m", "256", "-serial", "stdio", "-monitor", "none", "-no-reboot",
            "-blockdev", blockdev, "-device", "ide-hd,drive=probe",
        ]  # fmt: skip
        try:
            proc = subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            seen = (exc.stdout or b"").decode("ascii", "replace").strip()
            return AccelChoice(
                "tcg",
                f"KVM probe guest did not finish within {timeout} s (printed {seen!r}); "
                "KVM is present but does not run guests usefully here",
            )
        except OSError as exc:
            return AccelChoice("tcg", f"KVM probe could not run {binary}: {exc.strerror}")
    if PROBE_MARKER in proc.stdout:
        return AccelChoice("kvm", "KVM probe guest ran to completion")
    err = proc.stderr.decode("utf-8", "replace").strip().splitlines()
    return AccelChoice(
        "tcg",
        f"KVM probe guest failed (exit code {proc.returncode}"
        + (f": {err[-1]}" if err else "")
        + ")",
    )


def choose_accel(binary: str, requested: str = "auto") -> AccelChoice:
    """Pick ``kvm`` or ``tcg`` for ``binary``.

    Args:
        binary: the QEMU executable.
        requested: ``"auto"`` (probe, cached per host), ``"kvm"`` or ``"tcg"``
            (forced). ``VIRTKIT_QEMU_ACCEL`` overrides ``"auto"``.

    Raises:
        ConfigError: ``requested`` is not one of :data:`ACCELERATORS`.
    """
    check_choice(requested, ACCELERATORS, "accel")
    if requested == "auto":
        env = os.environ.get("VIRTKIT_QEMU_ACCEL", "auto")
        if env in ("kvm", "tcg"):
            return AccelChoice(env, "forced by VIRTKIT_QEMU_ACCEL")
    else:
        return AccelChoice(requested, "forced by the caller")
    key = _host_key(binary)
    with _memo_lock:
        if key in _memo:
            return _memo[key]
        choice = _load_cached(key)
        if choice is None:
            choice = probe_kvm(binary)
            _store_cached(key, choice)
        _memo[key] = choice
        return choice
