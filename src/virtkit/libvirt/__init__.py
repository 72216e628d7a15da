"""``Machine`` <-> libvirt domain XML (no daemon needed), and adopting existing domains.

:func:`to_xml` and :func:`from_xml` translate; :func:`import_domain` takes a
domain created elsewhere (virt-install, virsh) into a VM folder and manages it
through a ``virtkit.connect("libvirt")`` hypervisor.

The mapping (what libvirt 9.0 can express is expressed in its own terms):

=====================  ==========================================================
model                  domain XML
=====================  ==========================================================
name, uuid             ``<name>``, ``<uuid>`` (the domain name may carry a prefix)
memory                 ``<memory unit='KiB'>`` (exact bytes kept in the metadata
                       when not a whole KiB)
cpus                   ``<vcpu>``; a ``CpuTopology`` also as ``<cpu><topology>``
firmware, type, arch   ``<os><type arch machine>``; UEFI as a pflash ``<loader>``
                       plus an ``<nvram>`` file in the VM folder
disks                  ``<disk device='disk'>`` with driver type/cache/discard,
                       ``<readonly/>``, ``<backingStore>`` for ``backing``
cdroms                 ``<disk device='cdrom'>`` (libvirt names them ``hdX``/``sdX``;
                       the model's ``cdrom0`` is kept in the metadata)
nics, user network     ``<interface type='user'>``; tap as ``type='ethernet'``
                       with ``<target dev managed='no'>``
port forwards          libvirt 9.0 has ``<portForward>`` only with the passt
                       back end, so a NIC with forwards becomes QEMU arguments
                       in ``<qemu:commandline>``: ``-netdev user,...,hostfwd=``
                       and ``-device <model>,netdev=,mac=[,bootindex=]``
serial                 a pty ``<serial>`` + ``<console>``
boot                   ``<boot order='N'/>`` on each device (``bootindex`` for
                       command-line NICs)
kernel boot            ``<kernel>``, ``<initrd>``, ``<cmdline>``
what libvirt cannot    ``<metadata><vk:machine>`` in virtkit's namespace: labels,
hold                   cloud-init, disk sizes, the folder-relative paths, NICs
                       with ``network='none'``, the serial log file
=====================  ==========================================================

Parsing refuses DTDs and entities (a domain XML has none), and reports every
element it does not map with a :class:`~virtkit.CapabilityWarning` instead of
dropping it silently.

The package: :mod:`~virtkit.libvirt.write` (to XML), :mod:`~virtkit.libvirt.parse`
(from XML), :mod:`~virtkit.libvirt.adopt` (import of existing domains),
:mod:`~virtkit.libvirt.schema` (the names they share).
"""

from __future__ import annotations

from virtkit.libvirt.adopt import LibvirtHost, import_domain
from virtkit.libvirt.parse import XmlReport, from_xml, parse_report
from virtkit.libvirt.schema import (
    DOMAIN_XML_FILE,
    NAMESPACE,
    OVMF_CODE,
    OVMF_VARS,
    QEMU_NAMESPACE,
)
from virtkit.libvirt.write import to_xml

__all__ = [
    "DOMAIN_XML_FILE",
    "NAMESPACE",
    "OVMF_CODE",
    "OVMF_VARS",
    "QEMU_NAMESPACE",
    "LibvirtHost",
    "XmlReport",
    "from_xml",
    "import_domain",
    "parse_report",
    "to_xml",
]
