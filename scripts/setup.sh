#!/usr/bin/env bash
# Shared set-up for scripts/demo and scripts/test: system packages, then a
# project-local virtual environment (.venv) with virtkit installed editable.
# Idempotent and quick when everything is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v qemu-system-x86_64 >/dev/null || need_apt+=(qemu-system-x86)
command -v qemu-img >/dev/null || need_apt+=(qemu-utils)
command -v nasm >/dev/null || need_apt+=(nasm)
[ -x /bin/busybox ] || need_apt+=(busybox-static)
command -v cpio >/dev/null || need_apt+=(cpio)
command -v iasl >/dev/null || need_apt+=(acpica-tools)  # the emulator's ACPI table tests
command -v tmux >/dev/null || need_apt+=(tmux)  # the interactive console test
command -v openssl >/dev/null || need_apt+=(openssl)  # signed OVA appliances (.cert) are checked with it
[ -d /usr/share/OVMF ] || need_apt+=(ovmf)
# independent VMDK/VHD readers (libyal, following VMware's and Microsoft's specs) for the format tests
[ -x /usr/bin/python3 ] && /usr/bin/python3 -c 'import pyvmdk, pyvhdi' 2>/dev/null ||
    need_apt+=(python3 python3-libvmdk python3-libvhdi)
# the libvirt backend: daemon, virsh, and what building libvirt-python needs; sshd for remote tests
for pkg in libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients libvirt-dev pkg-config gcc tini \
    openssh-server iproute2; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'ok installed' || need_apt+=("$pkg")
done
if [ "${VIRTKIT_SKIP_APT:-0}" != 1 ] && [ ${#need_apt[@]} -gt 0 ]; then
    echo "setup: installing Debian packages: ${need_apt[*]}"
    SUDO=""
    [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv"
    "$PY" -m venv .venv
fi
stamp=.venv/.virtkit-installed
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "setup: installing virtkit and its dependencies into .venv"
    .venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
    .venv/bin/python -m pip install -q -e '.[dev,libvirt]' 2>&1 | grep -v '^WARNING: Location' || true
    .venv/bin/python -c "import virtkit" 
    echo "$want" > "$stamp"
fi
# the optional libvirt binding (built against the installed libvirt-dev)
.venv/bin/python -c "import libvirt" 2>/dev/null ||
    .venv/bin/python -m pip install -q 'libvirt-python>=9.0' 2>&1 | grep -v '^WARNING: Location' || true
