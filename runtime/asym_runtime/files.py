"""Reading an artifact's files so that what is checked is what is used: no symbolic link below the
folder (:func:`refuse_links`), regular files only, opened without following links or blocking,
read once through the descriptor that was checked (:func:`read_regular`), and the sha256 of a file
(:func:`sha256_file`) for the tools that hash by path."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

from .errors import ArtifactError, ArtifactMissing


def sha256_file(path: str | os.PathLike, chunk: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def refuse_links(root: Path, rel: str) -> Path:
    """``root/rel`` after checking that no part below ``root`` is a symlink (lstat)."""
    path = root
    for part in rel.split("/"):
        path = path / part
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            raise ArtifactMissing(path) from None
        except OSError as e:
            raise ArtifactError(f"{path}: cannot be read ({e.strerror})") from None
        if stat.S_ISLNK(st.st_mode):
            raise ArtifactError(f"{path} is a symbolic link; an artifact folder holds its own files, "
                                "links are refused (they can lead outside the folder)")
    return path


def read_regular(path: Path, *, max_size: int | None = None, expect_size: int | None = None,
                 allocate=None) -> bytes:
    """The bytes of ``path``, which must be a regular file (not a link, FIFO, device or folder).

    Opened with O_NOFOLLOW and O_NONBLOCK (a FIFO must not block the load), checked with
    fstat on the open descriptor, then read through that same descriptor. A wrong size
    (``expect_size``) or one above ``max_size`` fails before anything is read.
    ``allocate(size)``: the writable buffer to read into (one a library owns, so that what it is
    handed next needs no copy), returned filled; default a bytearray.
    """
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise ArtifactMissing(path) from None
    except OSError as e:  # ELOOP: a symlink; EACCES ...
        raise ArtifactError(f"{path}: cannot be opened as a regular file ({e.strerror})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ArtifactError(f"{path} is not a regular file; an artifact folder holds regular files only")
        if expect_size is not None and st.st_size != expect_size:
            raise ArtifactError(f"{path} is {st.st_size} bytes, the manifest records {expect_size}; "
                                "the file was changed or truncated after export")
        if max_size is not None and st.st_size > max_size:
            raise ArtifactError(f"{path} is {st.st_size} bytes, more than the {max_size} a manifest may have")
        buf = allocate(st.st_size) if allocate is not None else bytearray(st.st_size)
        view, got = memoryview(buf), 0
        with os.fdopen(fd, "rb", closefd=False) as f:
            while got < len(buf):
                n = f.readinto(view[got:])
                if not n:
                    break
                got += n
            grew = bool(f.read(1))
        if got != len(buf) or grew:
            raise ArtifactError(f"{path} changed size while it was read; the folder is being rewritten")
        if allocate is not None:
            return buf
        return bytes(buf) if len(buf) < (1 << 20) else buf  # large files: no second copy
    finally:
        os.close(fd)
