"""Writing an artifact folder so the runtime can never load a half-written one.

* Any old ``manifest.json`` is removed before the first file changes, so an interrupted
  re-export leaves a folder without a manifest, which the runtime refuses.
* Files are produced in a staging folder inside the output folder (same file system) and
  moved into place with ``os.replace`` only after they were verified.
* ``manifest.json`` is written last, itself through a temporary name, and lists every file
  with its role, precision, sha256 and size.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from asym_runtime.manifest import MANIFEST_NAME, SCHEMA_VERSION, FileEntry, sha256_file

log = logging.getLogger(__name__)

STAGING_PREFIX = ".staging-"


class OutputDirError(ValueError):
    """The output folder cannot be created or written."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes_atomic(path: Path, data) -> None:
    """Write ``data`` (bytes-like) under a temporary name in the same folder, fsync, then rename
    over ``path``: a reader sees the old file or the whole new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; artifacts are meant to be read
        with os.fdopen(fd, "wb") as f:
            f.write(memoryview(data))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, data: dict) -> None:
    write_bytes_atomic(path, (json.dumps(data, indent=2) + "\n").encode("utf-8"))


class ArtifactWriter:
    """Stage, verify, then publish files into ``out``; write the manifest last.

    Use as a context manager: on an exception the staging folder is removed and no
    manifest is written.
    """

    def __init__(self, out: str | os.PathLike):
        self.out = Path(out).expanduser()
        self.entries: dict[str, FileEntry] = {}
        self.staging: Path | None = None

    # ----- lifecycle
    def __enter__(self) -> "ArtifactWriter":
        self.open()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()

    def open(self) -> None:
        out = self.out
        if out.exists() and not out.is_dir():
            raise OutputDirError(f"--out {out}: exists and is not a folder")
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputDirError(f"--out {out}: cannot create the folder ({e.strerror})") from None
        if not os.access(out, os.W_OK | os.X_OK):
            raise OutputDirError(f"--out {out}: folder is not writable")
        try:
            # an old manifest would describe files we are about to replace
            (out / MANIFEST_NAME).unlink(missing_ok=True)
            self.staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=out))
        except OSError as e:
            raise OutputDirError(f"--out {out}: cannot write into the folder ({e.strerror})") from None
        log.debug("staging in %s", self.staging)

    def close(self) -> None:
        if self.staging is not None:
            shutil.rmtree(self.staging, ignore_errors=True)
            self.staging = None

    # ----- files
    def stage_path(self, name: str) -> Path:
        """Where to produce ``name`` (relative, "/" separated) before it is published."""
        assert self.staging is not None, "ArtifactWriter is not open"
        p = self.staging / name
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def publish(self, name: str, *, role: str, fmt: str, precision: str | None,
                data_of: str | None = None) -> FileEntry:
        """Hash the staged ``name`` and move it into the output folder."""
        src = self.stage_path(name)
        if not src.is_file():
            raise FileNotFoundError(f"nothing staged under {name}")
        entry = FileEntry(name=name, role=role, format=fmt, precision=precision,
                          sha256=sha256_file(src), size=src.stat().st_size, data_of=data_of)
        dst = self.out / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(src, 0o666 & ~_umask())  # some writers (onnx external data) create 0600 files
        with open(src, "rb") as f:  # on disk before the manifest that vouches for it can be
            os.fsync(f.fileno())
        os.replace(src, dst)
        self.entries[name] = entry
        log.debug("published %s (%d bytes)", name, entry.size)
        return entry

    def write_manifest(self, fields: dict) -> Path:
        """Write ``manifest.json`` last; ``fields`` are everything but schema and files."""
        data = {"schema_version": SCHEMA_VERSION, **fields,
                "files": {n: e.to_dict() for n, e in sorted(self.entries.items())}}
        path = self.out / MANIFEST_NAME
        write_json_atomic(path, data)
        log.info("wrote %s", path)
        return path
