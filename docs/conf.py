"""Sphinx configuration for the virtkit docs (built with -W: warnings are errors)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "_ext"))  # virtkit_clidoc

project = "virtkit"
author = "the virtkit developers"
copyright = "2026, the virtkit developers"  # noqa: A001 - Sphinx's setting name
extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.intersphinx",
    "sphinx.ext.viewcode",
    "sphinx.ext.doctest",
    "virtkit_clidoc",  # the CLI reference, generated from the click commands
]
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": True}
napoleon_google_docstring = True
nitpicky = False
intersphinx_mapping: dict[str, tuple[str, None]] = {}
html_theme = "alabaster"
html_static_path: list[str] = []
exclude_patterns = ["_build"]
suppress_warnings = ["ref.python"]
