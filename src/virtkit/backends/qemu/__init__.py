"""The ``qemu`` backend: guests as supervised ``qemu-system-*`` processes over QMP.

Layout: ``argv`` (Machine -> command line), ``accel`` (honest KVM probe),
``process`` (supervision), ``qmp`` (private event loop + QMP session),
``layers`` (external snapshot bookkeeping), ``guest`` / ``hypervisor``
(the backend classes), ``aio`` (the coroutine twin of the Guest API).
"""

from virtkit.backends.qemu.accel import AccelChoice
from virtkit.backends.qemu.aio import AsyncQemuGuest
from virtkit.backends.qemu.argv import KernelBoot
from virtkit.backends.qemu.guest import QemuGuest
from virtkit.backends.qemu.hypervisor import QemuHypervisor

__all__ = ["AccelChoice", "AsyncQemuGuest", "KernelBoot", "QemuGuest", "QemuHypervisor"]
