"""The asyncio conformance suite on the libvirt backend (qemu:///system, TCG)."""

from __future__ import annotations

from typing import Any, ClassVar

import pytest
from libvirt_hosts import PREFIX

from virtkit.testing.conformance_aio import AsyncConformanceSuite


@pytest.mark.usefixtures("libvirtd")
class TestLibvirtAio(AsyncConformanceSuite):
    """libvirt domains driven through virtkit.aio."""

    backend = "libvirt"
    connect_options: ClassVar[dict[str, Any]] = {
        "uri": "qemu:///system",
        "accel": "tcg",
        "name_prefix": PREFIX + "aio-",
    }
    timeout = 60.0
