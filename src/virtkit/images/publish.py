"""Publishing a new image file whole: build it under a hidden name, then link it into place.

A create killed at any point leaves nothing at the destination (at most a
hidden ``.NAME.virtkit-*.tmp`` beside it), and an existing file is never
replaced.
"""

from __future__ import annotations

import os
import secrets

from virtkit.errors import ImageError

__all__ = ["publish", "temp_name"]


def temp_name(path: str) -> str:
    """A hidden, unique name beside ``path`` to build a new file under."""
    folder, name = os.path.split(path)
    return os.path.join(folder, f".{name}.virtkit-{secrets.token_hex(4)}.tmp")


def publish(tmp: str, path: str) -> None:
    """Give the finished file at ``tmp`` the name ``path``, never replacing a file there.

    A hard link is atomic and fails if ``path`` exists; where links are not
    supported, a rename after a check. The directory is synced so the name
    survives a power loss.
    """
    try:
        os.link(tmp, path)
    except FileExistsError as exc:
        raise ImageError("file already exists", path=path) from exc
    except OSError:
        if os.path.lexists(path):
            raise ImageError("file already exists", path=path) from None
        os.rename(tmp, path)
    else:
        os.unlink(tmp)
    folder = os.path.dirname(path) or "."
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot sync directories; the name is there all the same
    finally:
        os.close(fd)
