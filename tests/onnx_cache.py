"""Reuse of exported FP32 graphs between tests whose subject comes after ``torch.onnx.export``.

``torch.onnx.export`` is most of a tiny export's time (about 20 s of a graph's 25 s on the CI
machines: tracing and decompositions, whatever the model's size), and a dozen tests export the
same tiny model only to check what the export does *with* the graphs: FP16 islands, publishing,
the failure paths, local weights. Those tests opt in (the ``reuse_onnx_exports`` fixture, or
``cli_command``: a process of their own running ``cached_cli.py``); the first export of a model
is real and its two files are kept; a later export of the same model copies them. Every other step (verification
against PyTorch, FP16, CUDA forms, readiness, publishing) still runs for real.

What makes two exports "the same" is their whole input, read from the objects themselves:
the model's class, config and every tensor of its state dict (names, dtypes, shapes, bytes),
the graph, the file name and the exporter's keyword arguments. And only while the export code
is the code this module saw at import: if a test has replaced anything the export runs
(``asym_export.wrappers``, ``asym_export.onnx_export``, ``asym_export.feeds`` or
``torch.onnx.export``; the negative controls do), the export is real and nothing is kept.

Entries are shared by the pytest-xdist workers of one run (a lock per entry: the second worker
waits for the first's export rather than repeating it), and never outlive the run.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

import asym_export.export as _export
import asym_export.feeds as _feeds
import asym_export.onnx_export as _onnx_export
import asym_export.wrappers as _wrappers

log = logging.getLogger(__name__)

_WATCHED_MODULES = (_wrappers, _onnx_export, _feeds)


def _export_code() -> list[tuple[str, object]]:
    """Every object the export code is made of: the watched modules' globals, the attributes of
    the classes they define, and ``torch.onnx.export``."""
    found = [("torch.onnx.export", torch.onnx.export)]
    for mod in _WATCHED_MODULES:
        for name, value in vars(mod).items():
            found.append((f"{mod.__name__}.{name}", value))
            if isinstance(value, type) and value.__module__ == mod.__name__:
                found.extend((f"{mod.__name__}.{name}.{a}", v) for a, v in vars(value).items())
    return found


_PRISTINE = _export_code()
REAL_EXPORT = _onnx_export.onnx_from_model


def export_code_is_pristine() -> bool:
    """True while nothing the export runs has been replaced since this module was imported (the
    pristine objects stay referenced here, so a replacement can never share one's identity)."""
    now = _export_code()
    return len(now) == len(_PRISTINE) and all(a == c and b is d for (a, b), (c, d) in zip(now, _PRISTINE))


def export_key(vae, graph, file_name: str, kwargs: dict) -> str:
    h = hashlib.sha256()
    config = {k: v for k, v in dict(vae.config).items() if not k.startswith("_")}  # not its origin
    h.update(json.dumps([type(vae).__module__, type(vae).__qualname__, config, graph.name, file_name,
                         sorted((k, repr(v)) for k, v in kwargs.items()), torch.__version__],
                        sort_keys=True, default=repr).encode())
    for name, t in vae.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:32]


@contextlib.contextmanager
def _locked(path: Path):
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class OnnxExportCache:
    """A folder of exported graphs, keyed by :func:`export_key`. ``export`` has
    ``onnx_from_model``'s signature; ``hits`` and ``misses`` count this process's calls."""

    def __init__(self, folder: Path, real: Callable = REAL_EXPORT):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.real = real
        self.hits = self.misses = self.bypassed = 0

    def export(self, vae, graph, path, **kwargs) -> Path:
        path = Path(path)
        if not export_code_is_pristine():
            self.bypassed += 1
            log.info("export code replaced by the test: exporting %s for real, keeping nothing", graph.name)
            return self.real(vae, graph, path, **kwargs)
        key = export_key(vae, graph, path.name, kwargs)
        entry = self.folder / key
        names = (path.name, path.name + ".data")  # the graph names its data file by this name
        with _locked(self.folder / f"{key}.lock"):
            if not entry.is_dir():
                self.misses += 1
                result = self.real(vae, graph, path, **kwargs)
                staged = Path(tempfile.mkdtemp(prefix=".staging-", dir=self.folder))
                for n in names:
                    shutil.copyfile(path.parent / n, staged / n)
                os.rename(staged, entry)  # whole entries only
                return result
        self.hits += 1
        for n in names:
            shutil.copyfile(entry / n, path.parent / n)
        return path


def install(cache: OnnxExportCache, monkeypatch=None) -> None:
    """Serve ``export_artifact``'s graph exports from ``cache`` (with ``monkeypatch``: until the
    test ends; without: for the rest of this process)."""
    if monkeypatch is not None:
        monkeypatch.setattr(_export, "onnx_from_model", cache.export)
    else:
        _export.onnx_from_model = cache.export


def cli_command(folder: Path) -> list[str]:
    """The start of a command line that runs asym-export's ``main()`` in a process of its own with
    its graph exports served from ``folder`` (tests/cached_cli.py); asym-export's arguments follow."""
    return [sys.executable, str(Path(__file__).with_name("cached_cli.py")), str(folder)]


def shared_folder(tmp_path_factory) -> Path:
    """One folder per run, shared by its pytest-xdist workers (their base folders are siblings;
    without xdist the base folder's parent holds earlier runs, so the base folder itself)."""
    base = tmp_path_factory.getbasetemp()
    return (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "onnx-export-cache"
