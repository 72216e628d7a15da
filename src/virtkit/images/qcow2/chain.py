"""Backing (and external data) files: where they may come from, how they open.

An image file is untrusted, so the name it gives for its backing file is
too. A name is resolved as QEMU does (relative to the directory of the image
that names it) and then allowed only if the real path (symlinks resolved)
lies inside that image's own directory tree or inside one of the caller's
``allow_backing`` entries. Protocol names (``nbd:``, ``json:``, URLs) are
refused outright.

Formats: a backing file opens with its recorded format. When none is
recorded, virtkit looks only at the magic: a qcow2 file opens as qcow2; any
other file is refused with an error asking for the format, because probing a
raw file's content as a format is exactly the hole QEMU closed by requiring
``-F``. (QEMU would still open it as raw with a warning; we do not.)
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Iterable

from virtkit.errors import CorruptImageError, ImageError, UnsupportedFeatureError
from virtkit.images.probe import probe_file

__all__ = ["BACKING_FORMATS", "OpenStack", "backing_format", "resolve"]

MAX_CHAIN_DEPTH = 64
_PROTOCOL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def resolve(
    image_path: str, name: str, allow: Iterable[str | os.PathLike[str]], *, what: str
) -> str:
    """Return the real path of ``name`` (named by ``image_path``) if allowed.

    Raises:
        ImageError: the name is a protocol, escapes the allowed locations or
            does not exist.
    """
    if _PROTOCOL.match(name) and not os.path.isabs(name):
        raise ImageError(
            f"{what} {name!r} uses a protocol or json: name; virtkit opens only plain files",
            path=image_path,
        )
    base = os.path.dirname(os.path.abspath(image_path))
    candidate = name if os.path.isabs(name) else os.path.join(base, name)
    real = os.path.realpath(candidate)
    roots = [os.path.realpath(base)] + [os.path.realpath(os.fspath(a)) for a in allow]
    if not any(_inside(real, r) for r in roots):
        raise ImageError(
            f"{what} {name!r} resolves to {real}, outside the image's directory; "
            "pass its file or folder in allow_backing=[...] to permit it",
            path=image_path,
        )
    if not os.path.isfile(real):
        raise ImageError(f"{what} {name!r} ({real}) does not exist", path=image_path)
    return real


class OpenStack(threading.local):
    """The chain of images being opened on this thread (loop and depth guard)."""

    def __init__(self) -> None:
        self.paths: list[str] = []

    def push(self, path: str) -> None:
        """Enter ``path``; refuse loops and absurd depth."""
        real = os.path.realpath(path)
        if real in self.paths:
            raise CorruptImageError(
                "backing chain loops back to an image already in the chain", path=path
            )
        if len(self.paths) >= MAX_CHAIN_DEPTH:
            raise ImageError(f"backing chain deeper than {MAX_CHAIN_DEPTH} images", path=path)
        self.paths.append(real)

    def pop(self) -> None:
        """Leave the innermost image."""
        self.paths.pop()


STACK = OpenStack()


#: formats a qcow2 image may name as its backing file's (each has a native reader)
BACKING_FORMATS = ("qcow2", "raw", "vmdk", "vpc", "vhdx", "vdi")


def backing_format(recorded: str | None, real: str, image_path: str) -> str:
    """The format to open a backing file with (see the module docstring)."""
    if recorded is not None:
        if recorded not in BACKING_FORMATS:
            raise UnsupportedFeatureError(
                f"backing format {recorded!r} is not supported ({', '.join(BACKING_FORMATS)})",
                feature=f"backing format {recorded}",
                path=image_path,
            )
        return recorded
    try:
        with open(real, "rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise ImageError(f"cannot open backing file: {exc.strerror}", path=real) from exc
    if magic == b"QFI\xfb":
        return "qcow2"
    probed = probe_file(real)  # only to name it: a probed format is never used unasked
    raise ImageError(
        f"the image records no backing format and its backing file {real} is not qcow2 (it "
        f"probes as {probed}); virtkit does not guess. If it is {probed}, record that: "
        f"qemu-img rebase -u -F {probed} -b {real} {image_path}",
        path=image_path,
    )
