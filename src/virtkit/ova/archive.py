"""The files of an appliance: an OVA tar archive or an .ovf with files beside it, and its manifest.

Everything here is hostile input. An OVA member is accepted only if it is a
regular file with a plain name (no directories, ``..``, absolute paths,
symlinks, hard links, devices, FIFOs or sparse members), appears once, and
lies inside the archive; members are read in place through ``tarfile``'s
bounded file objects and never extracted by ``tarfile`` itself. A manifest
(``name.mf``, lines ``SHA256(file)= hex`` as OVF 1.x specifies, also SHA1
and SHA512) must be well formed, name only files that exist, and match every
digest it lists; the descriptor's digest is checked before it is parsed and
each disk's while it is copied.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, cast

from virtkit.errors import ConfigError, CorruptImageError, ImageError

__all__ = ["Manifest", "Source", "open_source"]

#: At most this many members in an archive (real appliances have a handful).
MAX_MEMBERS = 4096
#: The largest descriptor or manifest read into memory.
MAX_TEXT = 16 << 20
_CHUNK = 1 << 20
_MF_LINE = re.compile(r"^(SHA1|SHA256|SHA512)\((?P<name>[^()]+)\)\s?=\s?(?P<hex>[0-9A-Fa-f]+)$")
_HEX_LEN = {"SHA1": 40, "SHA256": 64, "SHA512": 128}


def plain_name(name: str, where: str, path: str) -> str:
    """``name`` if it is a plain file name (a leading ``./`` is dropped), else refuse it.

    Raises:
        CorruptImageError: an absolute path, ``..``, a directory part, NUL or an empty name.
    """
    clean = name[2:] if name.startswith("./") else name
    if (
        not clean
        or "\0" in clean
        or "/" in clean
        or "\\" in clean
        or clean in (".", "..")
        or os.path.isabs(name)
    ):
        raise CorruptImageError(
            f"{where} names {name!r}; only plain file names are allowed (no directories, "
            "'..' or absolute paths)",
            path=path,
        )
    return clean


class Source:
    """The files of one appliance, by plain name."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sizes: dict[str, int] = {}
        self.order: list[str] = []
        self._tar: tarfile.TarFile | None = None
        self._members: dict[str, tarfile.TarInfo] = {}
        self._folder: Path | None = None

    @property
    def is_archive(self) -> bool:
        """Whether the files come from an OVA archive (else from a folder beside an .ovf)."""
        return self._tar is not None

    # -- opening ----------------------------------------------------------------------
    @classmethod
    def from_tar(cls, path: str) -> Source:
        """Index an OVA archive, refusing any member that is not a plain regular file."""
        src = cls(path)
        try:
            tar = tarfile.open(path, mode="r:")  # noqa: SIM115 - closed by close()
        except (tarfile.TarError, OSError) as exc:
            raise CorruptImageError(f"not a readable OVA (tar) archive: {exc}", path=path) from exc
        src._tar = tar
        total = os.path.getsize(path)
        try:
            while True:
                member = tar.next()
                if member is None:
                    break
                if len(src.order) >= MAX_MEMBERS:
                    raise CorruptImageError(f"the archive has more than {MAX_MEMBERS} members",
                                            path=path)  # fmt: skip
                src._add(member, total)
        except tarfile.TarError as exc:
            tar.close()
            raise CorruptImageError(f"damaged OVA archive: {exc}", path=path) from exc
        except BaseException:
            tar.close()
            raise
        return src

    def _add(self, member: tarfile.TarInfo, total: int) -> None:
        kind = (
            "a symbolic link" if member.issym() else "a hard link" if member.islnk()
            else "a device" if member.isdev() else "a directory" if member.isdir()
            else "a sparse file" if member.issparse() else None
        )  # fmt: skip
        if kind is None and not member.isreg():
            kind = f"of tar type {member.type!r}"
        if kind is not None:
            raise CorruptImageError(
                f"the archive member {member.name!r} is {kind}; an OVA may hold only regular files",
                path=self.path,
            )
        name = plain_name(member.name, "an archive member", self.path)
        if name in self._members:
            raise CorruptImageError(f"the archive holds {name!r} twice", path=self.path)
        if member.size < 0 or member.offset_data + member.size > total:
            raise CorruptImageError(
                f"the archive member {name!r} claims {member.size} bytes, past the end of the "
                "archive (truncated or hostile)",
                path=self.path,
            )
        self._members[name] = member
        self.sizes[name] = member.size
        self.order.append(name)

    @classmethod
    def from_folder(cls, ovf: str) -> Source:
        """The .ovf file and the regular files beside it."""
        src = cls(ovf)
        folder = Path(ovf).resolve().parent
        src._folder = folder
        for entry in sorted(folder.iterdir()):
            if entry.is_file() and not entry.is_symlink():
                src.sizes[entry.name] = entry.stat().st_size
                src.order.append(entry.name)
        return src

    # -- reading ------------------------------------------------------------------------
    def open(self, name: str) -> IO[bytes]:
        """A binary file object for member ``name``.

        Raises:
            CorruptImageError: no such file in the appliance.
        """
        if name not in self.sizes:
            raise CorruptImageError(f"the appliance has no file {name!r}", path=self.path)
        if self._tar is not None:
            fh = self._tar.extractfile(self._members[name])
            if fh is None:  # not a regular file: refused when indexed
                raise CorruptImageError(f"cannot read {name!r}", path=self.path)
            return fh
        assert self._folder is not None
        try:
            return (self._folder / name).open("rb")
        except OSError as exc:
            raise ImageError(f"cannot read {name!r}: {exc.strerror}", path=self.path) from exc

    def read_text(self, name: str, what: str) -> bytes:
        """All of a small member (descriptor, manifest), refusing huge ones."""
        if self.sizes.get(name, 0) > MAX_TEXT:
            raise CorruptImageError(
                f"the {what} {name!r} is {self.sizes[name]} bytes (at most {MAX_TEXT})",
                path=self.path,
            )
        with self.open(name) as fh:
            return fh.read(MAX_TEXT + 1)

    def copy(
        self,
        name: str,
        dst: Path,
        *,
        limit: int,
        on_bytes: Callable[[bytes], None],
        decompress: bool = False,
    ) -> int:
        """Copy member ``name`` to ``dst`` (gunzipped with ``decompress``), at most ``limit`` bytes.

        Raises:
            CorruptImageError: the output would pass ``limit`` or the gzip stream is damaged.
        """
        import gzip  # noqa: PLC0415 - rarely needed
        import zlib  # noqa: PLC0415

        written = 0
        with self.open(name) as raw, dst.open("xb") as out:
            hashing = _Tee(raw, on_bytes)
            reader: Any = (
                gzip.GzipFile(fileobj=cast("Any", hashing), mode="rb") if decompress else hashing
            )
            try:
                while True:
                    chunk = reader.read(_CHUNK)
                    if not chunk:
                        break
                    written += len(chunk)
                    if written > limit:
                        raise CorruptImageError(
                            f"{name!r} unpacks to more than {limit} bytes, more than its disk "
                            "can hold",
                            path=self.path,
                        )
                    out.write(chunk)
            except (OSError, EOFError, zlib.error) as exc:
                if isinstance(exc, CorruptImageError):
                    raise
                raise CorruptImageError(f"cannot unpack {name!r}: {exc}", path=self.path) from exc
            if decompress:
                hashing.drain()
        return written

    def close(self) -> None:
        """Release the archive."""
        if self._tar is not None:
            self._tar.close()
            self._tar = None


class _Tee:
    """A reader that passes every byte it reads to ``on_bytes`` (for digests)."""

    def __init__(self, raw: IO[bytes], on_bytes: Callable[[bytes], None]) -> None:
        self.raw = raw
        self.on_bytes = on_bytes

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        if data:
            self.on_bytes(data)
        return data

    def drain(self) -> None:
        """Read (and pass on) whatever the decompressor left unread, so digests cover the file."""
        while self.read(_CHUNK):
            pass


def open_source(path: str) -> Source:
    """An OVA archive or an .ovf descriptor (by content: a tar archive, else a descriptor).

    Raises:
        ImageError: the path is not a regular file.
        CorruptImageError: a damaged or hostile archive.
    """
    if not os.path.isfile(path):
        raise ImageError("no such appliance file", path=path)
    if tarfile.is_tarfile(path):
        return Source.from_tar(path)
    if not path.lower().endswith(".ovf"):
        raise CorruptImageError("neither an OVA (tar) archive nor an .ovf descriptor", path=path)
    return Source.from_folder(path)


class Manifest:
    """The digests a manifest lists, checked as files are read."""

    def __init__(self, digests: dict[str, tuple[str, str]], path: str) -> None:
        self.digests = digests
        self.path = path

    @classmethod
    def parse(cls, text: bytes, source: Source, name: str) -> Manifest:
        """Parse manifest ``name``; every line must be ``ALG(file)= hex`` naming a present file.

        Raises:
            CorruptImageError: naming the bad line.
        """
        try:
            lines = text.decode("utf-8").splitlines()
        except UnicodeDecodeError as exc:
            raise CorruptImageError(f"the manifest {name!r} is not UTF-8 text",
                                    path=source.path) from exc  # fmt: skip
        digests: dict[str, tuple[str, str]] = {}
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            m = _MF_LINE.match(line.strip())
            if m is None or len(m["hex"]) != _HEX_LEN[m[1]]:
                raise CorruptImageError(
                    f"manifest {name!r} line {number} is not 'SHA256(file)= hex': {line[:120]!r}",
                    path=source.path,
                )
            file = plain_name(m["name"], f"manifest {name!r} line {number}", source.path)
            if file in digests:
                raise CorruptImageError(f"manifest {name!r} lists {file!r} twice",
                                        path=source.path)  # fmt: skip
            if file not in source.sizes:
                raise CorruptImageError(
                    f"manifest {name!r} lists {file!r}, which the appliance does not contain",
                    path=source.path,
                )
            digests[file] = (m[1].lower(), m["hex"].lower())
        return cls(digests, source.path)

    def hasher(self, name: str) -> hashlib._Hash | None:
        """A fresh hash object for ``name``, or None when the manifest does not list it."""
        entry = self.digests.get(name)
        return None if entry is None else hashlib.new(entry[0])

    def verify(self, name: str, digest: hashlib._Hash | None) -> None:
        """Compare a finished hash with the manifest.

        Raises:
            CorruptImageError: the digests differ, or ``name`` is not covered.
        """
        entry = self.digests.get(name)
        if entry is None or digest is None:
            raise CorruptImageError(f"the manifest does not cover {name!r}", path=self.path)
        if digest.hexdigest() != entry[1]:
            raise CorruptImageError(
                f"{name!r} does not match the manifest ({entry[0].upper()} {digest.hexdigest()}, "
                f"manifest says {entry[1]}): the appliance is damaged or was modified",
                path=self.path,
            )


def remove_tree(path: Path) -> None:
    """Delete a directory tree we made, ignoring what is already gone."""
    shutil.rmtree(path, ignore_errors=True)


def check_new_folder(folder: Path) -> bool:
    """Whether ``folder`` must be created; an existing one must be an empty directory.

    Raises:
        ConfigError: it exists and is not an empty directory.
    """
    if not folder.exists():
        return True
    if not folder.is_dir() or any(folder.iterdir()):
        raise ConfigError(
            f"'folder' {folder} already exists and is not an empty directory", field="folder"
        )
    return False
