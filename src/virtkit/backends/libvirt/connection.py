"""One libvirt connection, the event loop thread, and the single error chokepoint.

* :func:`libvirt_module` imports ``libvirt`` (libvirt-python) lazily; a
  missing binding is ``BackendUnavailable`` with the install hint.
* :func:`ensure_event_loop` registers ``libvirtaio`` as libvirt's event
  implementation once per process, on an asyncio loop of virtkit's own that
  runs on a daemon thread (:mod:`~virtkit.backends.libvirt.events`): domain
  events, keep-alives and close callbacks are dispatched there.
* :class:`Connection` wraps ``virConnect``: it opens with a bounded wait (an
  unreachable ssh host cannot hang ``connect()``), turns on keep-alive so a
  dead or frozen daemon is noticed, and :meth:`Connection.call` is the
  one place where ``libvirtError`` becomes a virtkit ``BackendError`` that
  names the URI (``StateError`` for "domain is not running"-style refusals,
  ``BackendError`` saying the domain is gone when it was removed behind
  virtkit's back).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable
from types import ModuleType
from typing import Any, TypeVar

from virtkit.backends.libvirt import events
from virtkit.backends.libvirt.events import EVENT_THREAD_NAME
from virtkit.errors import BackendError, BackendUnavailable, StateError

__all__ = [
    "EVENT_THREAD_NAME",
    "INSTALL_HINT",
    "Connection",
    "default_uri",
    "ensure_event_loop",
    "libvirt_module",
]

T = TypeVar("T")

INSTALL_HINT = (
    "install the libvirt extra (pip install 'virtkit[libvirt]'; building it needs Debian's "
    "libvirt-dev pkg-config gcc) and run a libvirt daemon (Debian: apt-get install "
    "libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients; virtkit's scripts/libvirtd start)"
)
#: seconds ``Connection.open`` waits for libvirt to connect.
OPEN_TIMEOUT = 30.0


def libvirt_module() -> ModuleType:
    """The ``libvirt`` binding module.

    Raises:
        BackendUnavailable: libvirt-python is not installed (with the hint).
    """
    try:
        import libvirt  # noqa: PLC0415 - optional dependency, imported on use
    except ImportError as exc:
        raise BackendUnavailable(
            f"the libvirt backend needs the libvirt-python binding: {exc}", hint=INSTALL_HINT
        ) from exc
    module: ModuleType = libvirt
    return module


def default_uri() -> str:
    """``$LIBVIRT_DEFAULT_URI``, else ``qemu:///system``."""
    return os.environ.get("LIBVIRT_DEFAULT_URI") or "qemu:///system"


def ensure_event_loop() -> None:
    """Run libvirt's events through libvirtaio on virtkit's event thread (once per process)."""
    events.ensure_event_loop(libvirt_module())


def _silence_stderr_errors(lv: ModuleType) -> None:
    # libvirt-python prints every error to stderr unless a handler is registered;
    # we raise them as exceptions instead.
    lv.registerErrorHandler(lambda _ctx, _err: None, None)


def is_remote(uri: str) -> bool:
    """True for URIs that reach a daemon over a network transport (ssh, tcp, tls...)."""
    scheme = uri.split(":", 1)[0]
    return "+" in scheme and not scheme.endswith("+unix")


class Connection:
    """An open libvirt connection to ``uri``.

    Args:
        uri: any libvirt URI (``qemu:///system``, ``qemu+ssh://host/system``...).
        timeout: seconds to wait for the connection to open.

    Raises:
        BackendError: libvirt refused or the host did not answer in time (the
            message names the URI).
    """

    def __init__(self, uri: str, *, timeout: float = OPEN_TIMEOUT) -> None:
        self.lv = libvirt_module()
        _silence_stderr_errors(self.lv)
        ensure_event_loop()
        self.uri = uri
        self.closed_reason: str | None = None
        self._conn = self._open(uri, timeout)
        try:
            self._conn.registerCloseCallback(self._on_close, None)
            # a daemon that stops answering (a host gone, a frozen libvirtd, local too) is
            # dropped after ~interval*(count+1) s, failing the calls that wait on it
            try:
                self._conn.setKeepAlive(2, 3)
            except self.lv.libvirtError:
                if is_remote(uri):
                    raise
                # an in-process driver (test:///...) has no keep-alive and no daemon to lose
        except self.lv.libvirtError as exc:
            self._conn.close()
            raise self._translate(exc, "set up the connection") from exc

    def _open(self, uri: str, timeout: float) -> Any:
        result: dict[str, Any] = {}
        done = threading.Event()
        abandoned = threading.Event()

        def opener() -> None:
            try:
                conn = self.lv.open(uri)
            except BaseException as exc:  # handed to the caller's thread
                result["error"] = exc
            else:
                if abandoned.is_set():
                    conn.close()  # the caller gave up; do not leak the connection
                else:
                    result["conn"] = conn
            done.set()

        threading.Thread(target=opener, name=f"virtkit-libvirt-open {uri}", daemon=True).start()
        if not done.wait(timeout):
            abandoned.set()
            raise BackendError(
                f"libvirt at {uri}: no connection within {timeout} s (host unreachable or the "
                "daemon does not answer)"
            )
        if "error" in result:
            exc = result["error"]
            if isinstance(exc, self.lv.libvirtError):
                lv = self.lv
                unreachable = exc.get_error_code() == lv.VIR_ERR_NO_CONNECT or (
                    exc.get_error_code() == lv.VIR_ERR_SYSTEM_ERROR
                    and exc.get_error_domain() == lv.VIR_FROM_RPC
                )
                if not is_remote(uri) and unreachable:
                    raise BackendUnavailable(
                        f"libvirt at {uri}: no daemon answers here ({exc.get_error_message()})",
                        hint=INSTALL_HINT,
                    ) from exc
                raise self._translate(exc, "connect") from exc
            raise BackendError(f"libvirt at {uri}: cannot connect: {exc}") from exc
        return result["conn"]

    def _on_close(self, _conn: Any, reason: int, _opaque: Any) -> None:
        names = {
            0: "an I/O error",
            1: "end of file",
            2: "a keep-alive timeout",
            3: "a client close",
        }
        self.closed_reason = f"the connection was closed by {names.get(reason, 'libvirt')}"

    @property
    def raw(self) -> Any:
        """The ``virConnect`` object (for what virtkit does not wrap)."""
        return self._conn

    def _translate(self, exc: Any, what: str) -> BackendError | StateError:
        lv = self.lv
        code = exc.get_error_code()
        message = exc.get_error_message() or str(exc)
        text = f"libvirt at {self.uri}: {what} failed: {message}"
        if self.closed_reason is not None:
            text += f" ({self.closed_reason})"
        if code == lv.VIR_ERR_NO_DOMAIN:
            return BackendError(
                f"libvirt at {self.uri}: {what} failed: the domain no longer exists (undefined "
                f"or destroyed outside virtkit?): {message}"
            )
        if code == lv.VIR_ERR_OPERATION_INVALID:
            return StateError(text, action=what)
        return BackendError(text)

    def call(self, what: str, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)``; a ``libvirtError`` becomes a virtkit error naming the URI.

        Args:
            what: the operation in plain words (``"start domain 'web'"``).
        """
        try:
            return fn(*args)
        except self.lv.libvirtError as exc:
            raise self._translate(exc, what) from exc

    @property
    def alive(self) -> bool:
        """Whether the connection still works."""
        try:
            return bool(self._conn.isAlive())
        except self.lv.libvirtError:
            return False

    def close(self) -> None:
        """Close the connection (idempotent)."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        with contextlib.suppress(self.lv.libvirtError):
            conn.unregisterCloseCallback()
        with contextlib.suppress(self.lv.libvirtError):
            conn.close()
