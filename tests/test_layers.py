"""The layering rules of DESIGN.md, checked on the source: imports only point downwards."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src" / "virtkit"

# package -> virtkit packages it may import (besides itself)
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "units": {"errors"},
    "model": {"errors", "units"},
    "images": {"errors", "units"},
    "bundle": {"errors", "units", "model", "images"},
    "ova": {"errors", "units", "model", "images", "bundle"},
    "clone": {"errors", "units", "model", "images", "bundle"},
    "provision": {"errors", "units", "model"},
    "agent": {"errors"},
    "libvirt": {"errors", "units", "model", "bundle"},
    "backends": {"errors", "units", "model", "images", "bundle", "provision", "agent", "libvirt"},
    "fleet": {"errors", "units", "model", "backends"},
    "testing": {
        *("errors", "units", "model", "images", "bundle", "provision", "agent", "backends", ""),
    },
    "cli": {"errors", "units", "model", "images", "bundle", "backends", ""},
    "aio": {"errors", "units", "model", "images", "backends"},
    "pytest_plugin": {"errors", "model", "backends", "testing", ""},
}


def _classify(dotted: str) -> str | None:
    """The virtkit subpackage a dotted name lives in; ``""`` for a top-level public name."""
    parts = dotted.split(".")
    if parts[0] != "virtkit":
        return None
    if len(parts) > 1 and ((SRC / parts[1]).is_dir() or (SRC / f"{parts[1]}.py").exists()):
        return parts[1]
    return ""


def _imports(path: Path) -> set[str]:
    """The virtkit subpackages a module imports (``""`` for the top-level package)."""
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "virtkit":
                names += [f"virtkit.{a.name}" for a in node.names]
            else:
                names.append(node.module)
        elif isinstance(node, ast.Import):
            names += [a.name for a in node.names]
    return {c for c in map(_classify, names) if c is not None}


def _layer(path: Path) -> str:
    rel = path.relative_to(SRC)
    return rel.parts[0].removesuffix(".py")


MODULES = sorted(p for p in SRC.rglob("*.py") if _layer(p) in ALLOWED)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(SRC)))
def test_imports_point_downwards(path: Path) -> None:
    """Each module imports only the layers below its own."""
    layer = _layer(path)
    bad = _imports(path) - ALLOWED[layer] - {layer}
    assert not bad, f"{path.relative_to(SRC)} ({layer}) imports {sorted(bad)}"


def test_backends_do_not_import_each_other() -> None:
    """The emulator and qemu backends never import one another."""
    for a, b in (("emulator", "qemu"), ("qemu", "emulator")):
        for path in (SRC / "backends" / a).rglob("*.py"):
            text = path.read_text()
            assert f"virtkit.backends.{b}" not in text, f"{path} imports the {b} backend"


def test_no_shell_true() -> None:
    """No subprocess runs through a shell anywhere in the package."""
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.keyword) and node.arg == "shell":
                assert isinstance(node.value, ast.Constant) and node.value.value is False, path
