"""The repository's own files, for tests that read or import them (scripts, examples)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_file(relpath: str, name: str | None = None):
    """Import a repository .py file that is not in a package (``scripts/x.py``) as a module."""
    path = ROOT / relpath
    spec = importlib.util.spec_from_file_location(name or path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
