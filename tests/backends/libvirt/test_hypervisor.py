"""The libvirt hypervisor itself: URIs, honest accelerator, host figures, availability."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest
from libvirt_hosts import LOCAL, PREFIX, run

import virtkit
from virtkit import BackendUnavailable, ResourceError
from virtkit.backends.libvirt import LibvirtGuest, LibvirtHypervisor
from virtkit.model import (
    AllocationPolicy,
    Disk,
    HostResources,
    HypervisorType,
    Machine,
    Nic,
    PortForward,
    State,
)
from virtkit.testing import guests


def connect(root: Path, **options: object) -> LibvirtHypervisor:
    hv = virtkit.connect("libvirt", root=root, name_prefix=PREFIX, **options)
    assert isinstance(hv, LibvirtHypervisor)
    return hv


class TestConnect:
    """Which daemon, and what happens when there is none."""

    def test_default_uri_comes_from_the_environment(
        self, libvirtd: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """LIBVIRT_DEFAULT_URI picks the daemon; without it qemu:///system."""
        monkeypatch.setenv("LIBVIRT_DEFAULT_URI", "qemu+unix:///system")
        hv = connect(tmp_path, accel="tcg")
        try:
            assert hv.uri == "qemu+unix:///system"
        finally:
            hv.close()
        monkeypatch.delenv("LIBVIRT_DEFAULT_URI")
        hv = connect(tmp_path, accel="tcg")
        try:
            assert hv.uri == LOCAL
            assert hv.libvirt_version.startswith("9.")
        finally:
            hv.close()

    def test_no_daemon_is_unavailable_with_a_hint(self, tmp_path: Path) -> None:
        """A local URI whose socket nobody serves: BackendUnavailable with the install hint."""
        with pytest.raises(BackendUnavailable) as info:
            connect(tmp_path, uri="qemu+unix:///system?socket=/nonexistent/libvirt-sock")
        assert info.value.hint is not None
        assert "scripts/libvirtd start" in info.value.hint

    def test_no_binding_is_unavailable_with_a_hint(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Without libvirt-python, connect() says how to install it."""
        monkeypatch.setitem(sys.modules, "libvirt", None)  # import libvirt -> ImportError
        with pytest.raises(BackendUnavailable, match="libvirt-python") as info:
            virtkit.connect("libvirt", root=tmp_path)
        assert info.value.hint is not None
        assert "virtkit[libvirt]" in info.value.hint


class TestHonesty:
    """What the hypervisor reports about the host is what the host has."""

    def test_accelerator_is_probed(self, libvirtd: str, tmp_path: Path) -> None:
        """auto boots a KVM probe domain: kvm and TYPE1 only if it finished, else tcg, TYPE2."""
        hv = connect(tmp_path)
        try:
            choice = hv.accelerator
            assert choice.accel in ("kvm", "tcg")
            assert choice.reason
            expected = HypervisorType.TYPE1 if choice.accel == "kvm" else HypervisorType.TYPE2
            assert hv.kind is expected
            domain_type = "kvm" if choice.accel == "kvm" else "qemu"
            xml = hv.domain_xml(Machine(name="probe-check"), tmp_path)
            assert f'type="{domain_type}"' in xml
        finally:
            hv.close()
        forced = connect(tmp_path, accel="tcg")
        try:
            assert forced.accelerator.reason == "forced by the caller"
            assert forced.kind is HypervisorType.TYPE2
        finally:
            forced.close()

    def test_host_figures_come_from_the_node(self, libvirtd: str, tmp_path: Path) -> None:
        """CPUs and memory are virsh nodeinfo's; free memory is positive and below the total."""
        info = run("virsh", "-c", LOCAL, "nodeinfo").stdout
        cpus = int(
            next(line for line in info.splitlines() if line.startswith("CPU(s)")).split()[-1]
        )
        kib = int(next(line for line in info.splitlines() if "Memory size" in line).split()[-2])
        hv = connect(tmp_path, accel="tcg")
        try:
            assert hv.host.cpus == cpus
            assert abs(hv.host.memory - kib * 1024) < 2 * 1024**2  # virNodeGetInfo is in MiB
            assert 0 < hv.free_memory <= hv.host.memory
        finally:
            hv.close()

    def test_admission_counts_domains_virtkit_did_not_start(
        self, libvirtd: str, tmp_path: Path
    ) -> None:
        """A running domain started with virsh takes memory that start() then cannot have."""
        xml = tmp_path / "other.xml"
        xml.write_text(
            f"<domain type='qemu'><name>{PREFIX}other</name><memory unit='MiB'>64</memory>"
            "<os><type arch='x86_64' machine='pc'>hvm</type></os></domain>"
        )
        run("virsh", "-c", LOCAL, "create", str(xml))
        host = HostResources(cpus=4, memory="600MiB", storage="10GiB")
        policy = AllocationPolicy(reserved_memory="512MiB")  # 88 MiB for guests
        hv = connect(tmp_path, accel="tcg", host=host, policy=policy)
        try:
            assert hv.host.allocated_memory >= 64 * 1024**2
            guest = hv.define(Machine(name="squeezed", memory="32MiB"))
            with pytest.raises(ResourceError, match="did not start"):
                guest.start()
            assert guest.state is State.SHUTOFF
        finally:
            hv.close()
            run("virsh", "-c", LOCAL, "destroy", PREFIX + "other", check=False)


class TestPortForwards:
    """A forward with host_port=0 listens where the guest says it does."""

    @pytest.mark.parametrize("machine_type", ["pc", "q35"])
    def test_picked_host_port_is_the_one_qemu_listens_on(
        self, libvirtd: str, tmp_path: Path, machine_type: str
    ) -> None:
        """start() picks the port, the domain QEMU runs forwards exactly that one: the host
        side accepts there (slirp accepts before the guest is asked), and the live XML says so.
        The forwarding NIC (QEMU arguments) shares the PCI bus with libvirt's own devices (a
        virtio disk, an e1000 NIC) on both machine types."""
        disk = tmp_path / "counter.qcow2"
        guests.write_disk(disk, "counter", format="qcow2")
        hv = connect(tmp_path / "guests", accel="tcg")
        try:
            guest = hv.define(
                Machine(
                    name="fwd",
                    memory="32MiB",
                    machine_type=machine_type,
                    disks=(Disk(str(disk)),),
                    nics=(
                        Nic(forwards=(PortForward(host_port=0, guest_port=8080),)),
                        Nic(model="e1000"),
                        Nic(model="e1000", forwards=(PortForward(0, 8081),)),
                    ),
                )
            )
            assert isinstance(guest, LibvirtGuest)
            guest.start()
            port = guest.host_port(8080)
            assert port > 0
            assert f"hostfwd=tcp:127.0.0.1:{port}-:8080" in guest.xml()
            with socket.create_connection(("127.0.0.1", port), timeout=10):
                pass
            guest.console.expect("count 1", timeout=60)  # the guest runs, from its disk
            guest.kill()
            stored = virtkit.load(guest.folder, allow=[tmp_path])
            assert stored.nics[0].forwards[0].host_port == 0  # the folder still says "any"
        finally:
            hv.close()
