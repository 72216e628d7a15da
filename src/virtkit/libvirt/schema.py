"""Names shared by the domain XML writer and parser: namespaces, files, device maps."""

from __future__ import annotations

import xml.etree.ElementTree as ET

__all__ = [
    "ARCH_LIBVIRT",
    "DEVICE_NIC",
    "DOMAIN_XML_FILE",
    "LIBVIRT_ARCH",
    "LIBVIRT_PREFIX",
    "MAX_XML",
    "NAMESPACE",
    "NIC_DEVICE",
    "NVRAM_FILE",
    "OVMF_CODE",
    "OVMF_VARS",
    "QEMU_NAMESPACE",
    "QEMU_TAG",
    "VK_TAG",
]

NAMESPACE = "https://virtkit.dev/xmlns/libvirt-domain/1"
QEMU_NAMESPACE = "http://libvirt.org/schemas/domain/qemu/1.0"
OVMF_CODE = ("/usr/share/OVMF/OVMF_CODE_4M.fd", "/usr/share/OVMF/OVMF_CODE.fd")
OVMF_VARS = ("/usr/share/OVMF/OVMF_VARS_4M.fd", "/usr/share/OVMF/OVMF_VARS.fd")
NVRAM_FILE = "OVMF_VARS.fd"
#: the imported domain's original XML, kept verbatim in the VM folder.
DOMAIN_XML_FILE = "libvirt-domain.xml"
MAX_XML = 4 * 1024 * 1024  # a domain XML is a few KiB

VK_TAG = f"{{{NAMESPACE}}}"
QEMU_TAG = f"{{{QEMU_NAMESPACE}}}"
NIC_DEVICE = {"virtio": "virtio-net-pci", "e1000": "e1000", "rtl8139": "rtl8139"}
DEVICE_NIC = {v: k for k, v in NIC_DEVICE.items()}
#: the model's arch -> libvirt's name for it (libvirt calls 32-bit x86 "i686")
ARCH_LIBVIRT = {"x86_64": "x86_64", "i386": "i686"}
LIBVIRT_ARCH = {v: k for k, v in ARCH_LIBVIRT.items()}
LIBVIRT_PREFIX = {"ide": "hd", "sata": "sd", "scsi": "sd", "virtio": "vd"}

ET.register_namespace("vk", NAMESPACE)
ET.register_namespace("qemu", QEMU_NAMESPACE)
