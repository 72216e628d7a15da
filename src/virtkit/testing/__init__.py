"""Test support shipped with virtkit, for virtkit's own tests and third-party backends.

* :mod:`virtkit.testing.conformance`: the backend conformance suite
  (``class TestMine(ConformanceSuite): backend = "mine"``).
* :mod:`virtkit.testing.guests`: boot-sector test guests built with NASM.
* :mod:`virtkit.testing.linux`: a small real Linux guest (kernel + initramfs).
* :mod:`virtkit.testing.faults`: fault injection under the image engine's byte
  I/O (crash after the N-th write, power loss, ENOSPC).
"""
