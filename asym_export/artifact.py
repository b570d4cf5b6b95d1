"""Writing an artifact folder so that a reader only ever sees a complete artifact.

Layout (docs/contracts.md, "The artifact folder")::

    OUT/manifest.json           names the generation below and lists its files
    OUT/gen-<utc>-<random>/     every file of one export (graphs, external data, engines)
    OUT/.lock                   held (flock) by the export writing into OUT

An export works in ``OUT/.staging-*`` (same file system), fsyncs every file, renames the
staging folder to a new generation and then switches ``manifest.json`` to it with one
rename. Before that rename the old manifest and the old generation are untouched, so a
failed, interrupted or killed export leaves the old artifact exactly as it was; after it
the new artifact is complete. The old generation is removed after the switch (a reader
that was still reading it retries on the new manifest: asym_runtime.load does).

One export per folder at a time: the second one fails at once naming the holder. Each
export removes what killed exports left (staging folders, generations no manifest names).
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import re
import secrets
import shutil
import socket
import stat
import sys
import tempfile
from pathlib import Path

from asym_runtime.errors import ArtifactError
from asym_runtime.manifest import (
    GENERATION_PREFIX, MANIFEST_NAME, SCHEMA_VERSION, FileEntry, read_manifest, schema_errors, sha256_file,
)

log = logging.getLogger(__name__)

STAGING_PREFIX = ".staging-"
#: The names an export makes in OUT, exactly (tempfile's random part: 8 of [a-z0-9_]); only
#: these are ever removed as debris, so a user's own "gen-notes" or ".staging-x" stays.
_GENERATION_NAME = re.compile(re.escape(GENERATION_PREFIX) + r"\d{8}T\d{6}Z-[0-9a-f]{8}")
_STAGING_NAME = re.compile(re.escape(STAGING_PREFIX) + r"[a-z0-9_]{8}")
_TMP_MANIFEST_NAME = re.compile(re.escape(f".{MANIFEST_NAME}.") + r"[a-z0-9_]{8}\.tmp")
LOCK_NAME = ".lock"


class OutputDirError(ValueError):
    """The output folder cannot be created or written."""


class OutputBusyError(OutputDirError):
    """Another export is writing into the output folder right now."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_dir(path: Path) -> None:
    """Make a folder's entries (renames, new files) durable; a no-op where folders cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # pragma: no cover - Windows
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
        fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, data: dict) -> None:
    write_bytes_atomic(path, (json.dumps(data, indent=2, allow_nan=False) + "\n").encode("utf-8"))


# --------------------------------------------------------------------------- the lock

class FolderLock:
    """An exclusive OS lock on ``OUT/.lock`` (flock; released by the kernel if the process dies).

    The lock file stays (removing it would race with the next holder); it holds the
    holder's pid, host and start time for the message the next export prints.
    """

    def __init__(self, folder: Path):
        self.path = folder / LOCK_NAME
        self.fd: int | None = None

    def acquire(self) -> None:
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666 & ~_umask())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._holder(fd)
            os.close(fd)
            raise OutputBusyError(
                f"--out {self.path.parent}: another export is writing into this folder ({holder}); "
                "wait for it to finish or choose another --out") from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "since_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "command": " ".join(sys.argv)[:300]}
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        self.fd = fd

    @staticmethod
    def _holder(fd: int) -> str:
        try:
            info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
            return f"pid {info['pid']} on {info['host']}, since {info['since_utc']}"
        except (ValueError, KeyError, TypeError, OSError):
            return "holder unknown"

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = None


# --------------------------------------------------------------------------- the writer

def new_generation_name() -> str:
    now = _dt.datetime.now(_dt.timezone.utc)
    return f"{GENERATION_PREFIX}{now:%Y%m%dT%H%M%SZ}-{secrets.token_hex(4)}"


def current_manifest(out: Path):
    """The folder's current manifest, or None if it has none or one this version cannot read."""
    if not (out / MANIFEST_NAME).exists():
        return None
    try:
        return read_manifest(out)
    except ArtifactError as e:
        log.info("%s: the current manifest is not readable (%s); it is replaced as a whole", out, e)
        return None


def _raw_manifest(out: Path) -> dict:
    """``manifest.json`` as plain JSON, without the schema ({} if it is missing or not a JSON object):
    what an export may still learn from a manifest this version cannot use."""
    try:
        data = json.loads((out / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return {}
    return data if isinstance(data, dict) else {}


def _named_generation(out: Path) -> str | None:
    """The generation ``manifest.json`` names, read leniently: a manifest this version cannot
    use (another schema version) still keeps its generation from being taken for debris."""
    data = _raw_manifest(out)
    gen = data.get("generation")
    return gen if isinstance(gen, str) and gen.startswith(GENERATION_PREFIX) and "/" not in gen else None


def _legacy_files(out: Path) -> list[Path]:
    """Files a schema_version 1 manifest (files beside it) lists: replaced by the new generation."""
    data = _raw_manifest(out)
    if not (data.get("schema_version") == 1 and isinstance(data.get("files"), dict)):
        return []
    paths = []
    for name in data["files"]:
        p = Path(name)
        if isinstance(name, str) and not p.is_absolute() and ".." not in p.parts and p.parts:
            paths.append(out / p)
    return paths


class ArtifactWriter:
    """Stage, verify, then publish one generation of files into ``out``; the manifest switches to it last.

    Use as a context manager: on an exception (or a kill) the staging folder is not
    published, the old manifest and generation stay as they were.
    """

    def __init__(self, out: str | os.PathLike):
        self.out = Path(out).expanduser()
        self.entries: dict[str, FileEntry] = {}
        self.staging: Path | None = None
        self.generation: str | None = None
        self.previous = None  # the Manifest this export replaces, if readable
        self._lock: FolderLock | None = None

    # ----- lifecycle
    def __enter__(self) -> "ArtifactWriter":
        self.open()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()

    def open(self) -> None:
        out = self.out
        if out.is_symlink() or (out.exists() and not out.is_dir()):
            raise OutputDirError(f"--out {out}: exists and is not a folder")
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputDirError(f"--out {out}: cannot create the folder ({e.strerror})") from None
        if not os.access(out, os.W_OK | os.X_OK):
            raise OutputDirError(f"--out {out}: folder is not writable")
        lock = FolderLock(out)
        try:
            lock.acquire()
        except OSError as e:
            raise OutputDirError(f"--out {out}: cannot lock the folder ({e.strerror})") from None
        self._lock = lock
        try:
            self.previous = current_manifest(out)
            self.remove_debris()
            self.staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=out))
            os.chmod(self.staging, 0o777 & ~_umask())  # mkdtemp makes 0700; the generation is meant to be read
        except OSError as e:
            self.close()
            raise OutputDirError(f"--out {out}: cannot write into the folder ({e.strerror})") from None
        except BaseException:
            self.close()
            raise
        log.debug("staging in %s", self.staging)

    def close(self) -> None:
        if self.staging is not None:
            shutil.rmtree(self.staging, ignore_errors=True)
            self.staging = None
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def remove_debris(self, keep: str | None = None) -> list[str]:
        """Remove what killed or replaced exports left: staging folders, generations that the
        current manifest does not name, temporary manifests. Only names this writer makes are
        touched; other files in ``out`` are left alone. Needs the lock."""
        keep = keep or (self.previous.generation if self.previous else _named_generation(self.out))
        removed = []
        for p in self.out.iterdir():
            n = p.name
            folder = p.is_dir() and not p.is_symlink()
            ours = ((folder and (_STAGING_NAME.fullmatch(n) or (_GENERATION_NAME.fullmatch(n) and n != keep)))
                    or (_TMP_MANIFEST_NAME.fullmatch(n) and p.is_file() and not p.is_symlink()))
            if not ours:
                continue
            try:
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                else:
                    p.unlink()
                removed.append(n)
            except OSError as e:  # reported, never fatal: the next export tries again
                log.warning("could not remove %s left by an earlier export: %s", p, e)
        if removed:
            log.info("removed %s from earlier exports: %s", self.out, ", ".join(sorted(removed)))
        return removed

    # ----- files
    def stage_path(self, name: str) -> Path:
        """Where to produce ``name`` (relative, "/" separated) before it is published."""
        assert self.staging is not None, "ArtifactWriter is not open"
        p = self.staging / name
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def publish(self, name: str, *, role: str, fmt: str, precision: str | None,
                data_of: str | None = None) -> FileEntry:
        """Hash the staged ``name``, make it durable and list it; it goes live with the manifest."""
        src = self.stage_path(name)
        st = os.lstat(src) if src.exists() or src.is_symlink() else None
        if st is None or not stat.S_ISREG(st.st_mode):
            raise FileNotFoundError(f"nothing staged under {name}")
        os.chmod(src, 0o666 & ~_umask())  # some writers (onnx external data) create 0600 files
        with open(src, "rb") as f:  # on disk before the manifest that vouches for it can be
            os.fsync(f.fileno())
        entry = FileEntry(name=name, role=role, format=fmt, precision=precision,
                          sha256=sha256_file(src), size=src.stat().st_size, data_of=data_of)
        self.entries[name] = entry
        log.debug("published %s (%d bytes)", name, entry.size)
        return entry

    def previous_file(self, name: str) -> Path | None:
        """``name`` in the artifact this export replaces, if it lists it (e.g. a timing cache to reuse)."""
        if self.previous is None or name not in self.previous.files:
            return None
        p = self.previous.path(name)
        return p if p.is_file() and not p.is_symlink() else None

    def write_manifest(self, fields: dict) -> Path:
        """Publish: the staging folder becomes a generation, then ``manifest.json`` switches to it.

        ``fields`` are everything but schema version, generation and files. The manifest is
        checked against the schema before anything is switched.
        """
        assert self.staging is not None, "ArtifactWriter is not open"
        generation = new_generation_name()
        data = {"schema_version": SCHEMA_VERSION, "generation": generation, **fields,
                "files": {n: e.to_dict() for n, e in sorted(self.entries.items())}}
        problems = schema_errors(json.loads(json.dumps(data, allow_nan=False)))
        if problems:  # a bug in the export, never the user's input
            raise RuntimeError(f"the manifest to be written breaks the schema: {'; '.join(problems[:5])}")
        unlisted = [str(p.relative_to(self.staging)) for p in self.staging.rglob("*")
                    if p.is_file() and p.relative_to(self.staging).as_posix() not in self.entries]
        for name in unlisted:  # intermediate files (emulation twins ...) are not part of the artifact
            (self.staging / name).unlink()
        for d in sorted({p.parent for p in self.staging.rglob("*")} | {self.staging}, key=lambda p: -len(p.parts)):
            fsync_dir(d)
        target = self.out / generation
        os.rename(self.staging, target)  # the new generation, not yet named by any manifest
        self.staging = None
        fsync_dir(self.out)
        legacy = _legacy_files(self.out)
        path = self.out / MANIFEST_NAME
        write_json_atomic(path, data)  # the switch
        self.generation = generation
        log.info("wrote %s (generation %s)", path, generation)
        self.remove_debris(keep=generation)
        for p in legacy:
            if p.is_file() and not p.is_symlink():
                p.unlink(missing_ok=True)
        return path
