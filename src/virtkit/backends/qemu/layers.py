"""Per-guest disk layer bookkeeping for external (overlay) snapshots.

A disk starts as one file. A disk-only snapshot freezes each writable
disk's *active layer* and puts a new qcow2 overlay on top of it; the frozen
file is what the snapshot captured. Reverting puts a fresh overlay on top of
the snapshot's frozen layer (the frozen file itself is never written, so one
can revert to it again); deleting merges the frozen layer into the layers
that use it as their backing file and removes it (the disk's original file
is never removed).

Overlays are created next to the layer they cover, with the backing file
stored as a bare file name (relative, so the guest folder stays relocatable
and ``virtkit.images`` opens the chain under its default backing policy).

The state is a small JSON file in the guest folder (``qemu-layers.json``),
written atomically.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import attrs

from virtkit.errors import BackendError, ImageError

__all__ = ["LayerState", "qemu_img"]

STATE_FILE = "qemu-layers.json"


def qemu_img(binary: str, *args: str) -> str:
    """Run ``qemu-img`` and return stdout.

    Raises:
        BackendError: it failed (its stderr is included).
    """
    try:
        proc = subprocess.run(
            [binary, *args], capture_output=True, text=True, check=False, timeout=600
        )
    except FileNotFoundError as exc:
        raise BackendError(f"{binary} is not installed (apt-get install qemu-utils)") from exc
    if proc.returncode != 0:
        raise BackendError(
            f"qemu-img {args[0]} failed",
            exit_code=proc.returncode,
            argv=[binary, *args],
            stderr_tail=proc.stderr[-2000:],
        )
    return proc.stdout


@attrs.define
class LayerState:
    """Which file is each disk's active layer, and what each snapshot froze.

    Attributes:
        active: disk target -> absolute path of the active layer.
        frozen: snapshot name -> (disk target -> frozen layer path).
        full: full-snapshot name -> (disk target -> layer holding it).
        counter: for unique overlay names.
    """

    active: dict[str, str] = attrs.field(factory=dict)
    frozen: dict[str, dict[str, str]] = attrs.field(factory=dict)
    full: dict[str, dict[str, str]] = attrs.field(factory=dict)
    counter: int = 0

    @classmethod
    def load(cls, folder: Path) -> LayerState:
        """Read the state (empty when absent)."""
        path = folder / STATE_FILE
        try:
            doc: Any = json.loads(path.read_text())
        except FileNotFoundError:
            return cls()
        except (OSError, ValueError) as exc:
            raise ImageError(f"cannot read disk layer state: {exc}", path=str(path)) from exc
        try:
            return cls(
                active={str(k): str(v) for k, v in doc["active"].items()},
                frozen={str(s): _str_map(m) for s, m in doc["frozen"].items()},
                full={str(s): _str_map(m) for s, m in doc["full"].items()},
                counter=int(doc["counter"]),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ImageError(f"disk layer state is malformed: {exc!r}", path=str(path)) from exc

    def save(self, folder: Path) -> None:
        """Write the state atomically."""
        path = folder / STATE_FILE
        tmp = path.with_name(f".{STATE_FILE}.{os.getpid()}.tmp")
        doc = {
            "active": self.active,
            "frozen": self.frozen,
            "full": self.full,
            "counter": self.counter,
        }
        tmp.write_text(json.dumps(doc, indent=1, sort_keys=True))
        tmp.replace(path)

    def next_overlay(self, below: Path, original: Path) -> Path:
        """A new overlay file name next to ``below``, derived from the disk's original name."""
        self.counter += 1
        return below.parent / f"{original.stem}.s{self.counter}.qcow2"


def _str_map(value: Any) -> dict[str, str]:
    return {str(k): str(v) for k, v in value.items()}
