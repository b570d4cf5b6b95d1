"""Reading and checking an artifact folder (docs/contracts.md, "The artifact folder").

Layout: ``manifest.json`` at the top names one *generation* folder (``gen-...``) that holds
every file of one export; ``asym-export`` switches from one generation to the next by
renaming a new ``manifest.json`` over the old one, so a reader sees a complete old or a
complete new artifact. The manifest is checked against ``manifest.schema.json`` (shipped
with this package) with strict types.

What the runtime uses is what it checked: files are opened without following symlinks,
must be regular files inside the generation, are read once, and their bytes are compared
with the recorded size and sha256; sessions and engines are made from those same bytes.
The external data an ONNX graph reads is taken from the graph itself, not from the
manifest's hints, and every such file must be listed (size, sha256) and inside the folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import posixpath
import stat
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

from .errors import ArtifactError, ArtifactMissing  # noqa: F401  (ArtifactMissing: callers import it here too)
from .files import read_regular, refuse_links, sha256_file  # noqa: F401  (sha256_file: for callers)
from .onnx_data import GraphSource, external_locations, external_tensors  # noqa: F401
from .specs import ShapeLimits

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
SCHEMA_NAME = "manifest.schema.json"
#: Bumped whenever a field changes meaning; the runtime refuses other versions.
#: 2: files live in the generation folder the manifest names (1: beside the manifest).
SCHEMA_VERSION = 2
GENERATION_PREFIX = "gen-"
#: A manifest is a few tens of kB; anything far larger is not one of ours.
MAX_MANIFEST_BYTES = 16 << 20
#: Deepest JSON nesting a manifest may have (ours: 6).
MAX_DEPTH = 32

ROLE_EXTERNAL_DATA = "external_data"
ROLE_TIMING_CACHE = "timing_cache"
FORMAT_ONNX = "onnx"
#: The CUDA form of a graph (``decoder.fp16.cuda.onnx``): ONNX with ONNX Runtime's
#: com.microsoft CUDA kernels (GroupNorm, SkipGroupNorm, NhwcConv), which only its CUDA
#: provider runs. A format of its own, so nothing that reads portable ONNX ever picks it.
FORMAT_ONNX_CUDA = "onnx_cuda"
FORMAT_ONNX_DATA = "onnx_external_data"
FORMAT_PLAN = "tensorrt_plan"
FORMAT_TIMING_CACHE = "tensorrt_timing_cache"
GRAPH_FORMATS = (FORMAT_ONNX, FORMAT_ONNX_CUDA)


# --------------------------------------------------------------------------- schema

@lru_cache(maxsize=1)
def schema() -> dict:
    """The manifest's JSON Schema (``manifest.schema.json`` in this package)."""
    return json.loads(resources.files(__package__).joinpath(SCHEMA_NAME).read_text(encoding="utf-8"))


@lru_cache(maxsize=1)
def _validator():
    from jsonschema import Draft202012Validator

    Draft202012Validator.check_schema(schema())
    return Draft202012Validator(schema())


def _field(error) -> str:
    path = "/".join(str(p) for p in error.absolute_path)
    return f"'{path}'" if path else "the top level"


def schema_errors(data) -> list[str]:
    """Every violation of the schema, as "'field/path': what is wrong" lines (empty: valid)."""
    from jsonschema.exceptions import relevance

    errors = sorted(_validator().iter_errors(data), key=relevance)
    return [f"{_field(e)}: {e.message}" for e in errors]


def _depth_ok(data, limit: int = MAX_DEPTH) -> bool:
    stack = [(data, 0)]
    while stack:
        x, d = stack.pop()
        if d > limit:
            return False
        if isinstance(x, dict):
            stack.extend((v, d + 1) for v in x.values())
        elif isinstance(x, list):
            stack.extend((v, d + 1) for v in x)
    return True


def _finite(text: str) -> float:
    v = float(text)
    if not math.isfinite(v):
        raise ValueError(f"{text} is not a finite number")
    return v


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON (numbers must be finite)")


def parse_manifest_bytes(raw: bytes, where: str) -> dict:
    """Parse and schema-check a manifest; every violation is an :class:`ArtifactError`."""
    try:
        data = json.loads(raw.decode("utf-8"), parse_float=_finite, parse_constant=_no_constant)
    except RecursionError:
        raise ArtifactError(f"{where}: JSON nested deeper than {MAX_DEPTH} levels") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise ArtifactError(f"{where} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ArtifactError(f"{where} does not hold a JSON object")
    if not _depth_ok(data):
        raise ArtifactError(f"{where}: JSON nested deeper than {MAX_DEPTH} levels")
    version = data.get("schema_version")
    if type(version) is not int or version != SCHEMA_VERSION:
        hint = (" (version 1 folders keep their files beside the manifest)" if version == 1 and type(version) is int
                else "")
        raise ArtifactError(
            f"{where} has schema_version {version!r}{hint}; this asym_runtime reads only version "
            f"{SCHEMA_VERSION}. Re-export the folder with a matching asym-export"
        )
    problems = schema_errors(data)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ArtifactError(f"{where} breaks the manifest schema at {problems[0]}{more}")
    return data


# --------------------------------------------------------------------------- entries

@dataclass(frozen=True)
class FileEntry:
    name: str  # path relative to the generation folder, "/" separated
    role: str
    format: str
    precision: str | None
    sha256: str
    size: int
    data_of: str | None = None  # for external data: the graph file it belongs to (a hint)

    @classmethod
    def from_dict(cls, name: str, d: dict) -> "FileEntry":
        return cls(name=name, role=d["role"], format=d["format"], precision=d.get("precision"),
                   sha256=d["sha256"], size=d["size"], data_of=d.get("data_of"))

    def to_dict(self) -> dict:
        d = {"role": self.role, "format": self.format, "precision": self.precision,
             "sha256": self.sha256, "size": self.size}
        if self.data_of:
            d["data_of"] = self.data_of
        return d


# --------------------------------------------------------------------------- manifest

class Manifest:
    """A parsed, schema-checked manifest of one artifact folder."""

    def __init__(self, root: Path, data: dict):
        self.root = Path(root)
        self.data = data
        self.generation: str = data["generation"]
        self.files: dict[str, FileEntry] = {name: FileEntry.from_dict(name, d) for name, d in data["files"].items()}
        sf = data["scaling_factor"]
        try:
            self.limits = ShapeLimits.from_dict(data["shape_limits"])
        except (ValueError, TypeError, KeyError) as e:  # the folder's fault, not the caller's input
            raise ArtifactError(f"{self.root}/{MANIFEST_NAME}: 'shape_limits' is unusable: {e}") from None
        assert sf > 0  # the schema says so

    # ----- fields
    @property
    def variant(self) -> str:
        return self.data["variant"]

    @property
    def scaling_factor(self) -> float:
        return float(self.data["scaling_factor"])

    @property
    def model_config(self) -> dict:
        return self.data["model_config"]

    @property
    def folder(self) -> Path:
        """The generation folder that holds the files."""
        return self.root / self.generation

    def path(self, name: str) -> Path:
        """Where ``name`` lies (for tools that hand paths on; the runtime reads :meth:`read_verified`)."""
        return self.root / self.generation / name

    def find(self, role: str, fmt: str, precision: str | None = None) -> FileEntry | None:
        for e in self.files.values():
            if e.role == role and e.format == fmt and (precision is None or e.precision == precision):
                return e
        return None

    def companions(self, name: str) -> list[FileEntry]:
        """The listed files graph ``name`` reads its external data from, per the manifest's hint.
        :meth:`graph_source` takes them from the graph itself."""
        return [e for e in self.files.values() if e.data_of == name]

    # ----- checks
    def _entry(self, name: str) -> FileEntry:
        entry = self.files.get(name)
        if entry is None:
            raise ArtifactError(f"{self.root}: {name!r} is not listed in {MANIFEST_NAME}")
        return entry

    def read_verified(self, name: str) -> bytes:
        """The bytes of ``name``, read once through a descriptor that is not a link and is a
        regular file, and checked against the recorded size and sha256: what is checked is
        what is used."""
        entry = self._entry(name)
        path = refuse_links(self.root, f"{self.generation}/{name}")
        data = read_regular(path, expect_size=entry.size)
        self._check(name, len(data), hashlib.sha256(data).hexdigest())
        log.debug("verified %s (%d bytes)", name, len(data))
        return data

    def check_file(self, name: str) -> Path:
        """Check ``name`` as :meth:`read_verified` does (no link, a regular file, size, sha256)
        without holding its bytes (the hash is streamed), and return its path: for checks ahead
        of a load that another process makes (asym-serve), which checks again what it reads."""
        entry = self._entry(name)
        path = refuse_links(self.root, f"{self.generation}/{name}")
        try:
            st = os.stat(path)
            if not stat.S_ISREG(st.st_mode):
                raise ArtifactError(f"{path} is not a regular file; an artifact folder holds regular files only")
            digest = sha256_file(path) if st.st_size == entry.size else ""
        except OSError as e:  # EACCES ...: the load would fail the same way
            raise ArtifactError(f"{path}: cannot be read ({e.strerror})") from None
        self._check(name, st.st_size, digest)
        return path

    def check_graph(self, name: str) -> None:
        """:meth:`check_file` for graph ``name`` and every external data file it names (as
        :meth:`graph_source` finds them: from the graph's own tensors, each listed here)."""
        model = self.read_verified(name)
        for _, rel in self._external_files(name, model):
            self.check_file(rel)

    def verify_file(self, name: str) -> Path:
        """Check ``name`` (size, sha256, a regular file, no link) and return its path, for
        tools that hand the path to another program. The runtime itself uses the bytes."""
        self.read_verified(name)
        return self.path(name)

    def graph_source(self, name: str) -> GraphSource:
        """Graph ``name`` and every external data file it reads, checked.

        The locations come from the graph's own tensors; each must resolve inside the
        generation folder to a file the manifest lists, and is read and hashed like the graph.
        """
        model = self.read_verified(name)
        external: dict[str, bytes] = {}
        digests = [self.files[name].sha256]
        for loc, rel in self._external_files(name, model):
            external[loc] = self.read_verified(rel)
            digests.append(self.files[rel].sha256)
        return GraphSource(name, model, external, tuple(digests))

    def _external_files(self, name: str, model: bytes) -> list[tuple[str, str]]:
        """(location as the graph writes it, listed file name) of every external data file graph
        ``name`` reads; each must resolve inside the generation folder to a listed file."""
        base = posixpath.dirname(name)
        out = []
        for loc in external_locations(model, f"{self.root}/{name}"):
            rel = posixpath.normpath(posixpath.join(base, loc))
            if posixpath.isabs(loc) or rel == ".." or rel.startswith("../") or "\\" in loc:
                raise ArtifactError(f"{self.root}: {name} reads external data from {loc!r}, outside the artifact folder")
            if rel not in self.files:
                raise ArtifactError(f"{self.root}: {name} reads external data from {loc!r}, which {MANIFEST_NAME} "
                                    "does not list (size, sha256); the folder cannot be checked")
            out.append((loc, rel))
        return out

    def _check(self, name: str, size: int, digest: str) -> None:
        entry = self.files[name]
        if size != entry.size:
            raise ArtifactError(
                f"{self.root}: {name} is {size} bytes, the manifest records {entry.size}; "
                "the file was changed or truncated after export"
            )
        if digest != entry.sha256:
            raise ArtifactError(
                f"{self.root}: sha256 of {name} is {digest[:16]}..., the manifest records "
                f"{entry.sha256[:16]}...; the file was changed after export"
            )


def read_manifest(root: str | os.PathLike) -> Manifest:
    """Parse and schema-check ``root/manifest.json``; raise :class:`ArtifactError` if unusable."""
    root = Path(root)
    if not root.is_dir():
        raise ArtifactError(f"{root} is not a folder (expected an artifact folder written by asym-export)")
    path = root / MANIFEST_NAME
    try:
        raw = read_regular(path, max_size=MAX_MANIFEST_BYTES)
    except ArtifactMissing:
        raise ArtifactError(
            f"{root} has no {MANIFEST_NAME}: it is not an asym-export artifact folder, or its "
            "first export did not finish (the manifest is written last)"
        ) from None
    data = parse_manifest_bytes(bytes(raw), str(path))
    gen = root / data["generation"]
    try:
        st = os.lstat(gen)
    except FileNotFoundError:
        raise ArtifactMissing(gen) from None
    if not stat.S_ISDIR(st.st_mode):
        raise ArtifactError(f"{gen} is not a folder (a symbolic link or a file); the manifest's generation "
                            "must be a folder inside the artifact folder")
    return Manifest(root, data)


def generation_folder(root: str | os.PathLike) -> Path:
    """The folder that holds the current artifact's files (``root/gen-...``), for tools that want
    paths (trtexec, Netron). It changes with every export; the manifest names it."""
    return read_manifest(root).folder
