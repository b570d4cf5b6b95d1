"""Reading and checking an artifact folder's ``manifest.json`` (docs/contracts.md, "The artifact folder").

The manifest is written last by ``asym-export``: a folder whose manifest exists is complete.
The runtime reads only the files the manifest lists and checks their sha256 before use.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import ArtifactError
from .specs import ShapeLimits

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
#: Bumped whenever a field changes meaning; the runtime refuses other versions.
SCHEMA_VERSION = 1

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

_JSON = {dict: "object", str: "string"}
_REQUIRED = ("schema_version", "variant", "model_config", "scaling_factor", "weights",
             "shape_limits", "files", "versions", "verification")


def sha256_file(path: str | os.PathLike, chunk: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class FileEntry:
    name: str  # path relative to the artifact folder, "/" separated
    role: str
    format: str
    precision: str | None
    sha256: str
    size: int
    data_of: str | None = None  # for external data: the graph file it belongs to

    @classmethod
    def from_dict(cls, name: str, d: dict) -> "FileEntry":
        try:
            return cls(name=name, role=d["role"], format=d["format"], precision=d.get("precision"),
                       sha256=d["sha256"], size=int(d["size"]), data_of=d.get("data_of"))
        except (KeyError, TypeError, ValueError) as e:
            raise ArtifactError(f"manifest entry for {name!r} is malformed ({e!r})") from None

    def to_dict(self) -> dict:
        d = {"role": self.role, "format": self.format, "precision": self.precision,
             "sha256": self.sha256, "size": self.size}
        if self.data_of:
            d["data_of"] = self.data_of
        return d


class Manifest:
    """A parsed, schema-checked manifest of one artifact folder."""

    def __init__(self, root: Path, data: dict):
        self.root = Path(root)
        self.data = data
        for key, kind in (("files", dict), ("model_config", dict), ("shape_limits", dict), ("variant", str)):
            if not isinstance(data[key], kind):
                raise ArtifactError(f"{root}/{MANIFEST_NAME}: '{key}' must be a JSON {_JSON[kind]}, "
                                    f"not {type(data[key]).__name__}")
        sf = data["scaling_factor"]
        if isinstance(sf, bool) or not isinstance(sf, (int, float)) or not sf > 0:
            raise ArtifactError(f"{root}/{MANIFEST_NAME}: 'scaling_factor' must be a positive number, not {sf!r}")
        self.files: dict[str, FileEntry] = {
            name: FileEntry.from_dict(name, d) for name, d in data["files"].items()
        }
        for name in self.files:
            p = Path(name)
            if p.is_absolute() or ".." in p.parts:
                raise ArtifactError(f"manifest lists {name!r}, which lies outside the artifact folder")
        try:
            self.limits = ShapeLimits.from_dict(data["shape_limits"])
        except (ValueError, TypeError, KeyError) as e:  # the folder's fault, not the caller's input
            raise ArtifactError(f"{root}/{MANIFEST_NAME}: 'shape_limits' is unusable: {e}") from None

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

    def path(self, name: str) -> Path:
        return self.root / name

    def find(self, role: str, fmt: str, precision: str | None = None) -> FileEntry | None:
        for e in self.files.values():
            if e.role == role and e.format == fmt and (precision is None or e.precision == precision):
                return e
        return None

    def companions(self, name: str) -> list[FileEntry]:
        """External data files that belong to graph file ``name``."""
        return [e for e in self.files.values() if e.data_of == name]

    # ----- checks
    def verify_file(self, name: str) -> Path:
        """Check that ``name`` exists with the size and sha256 the manifest records."""
        self._listed(name)
        p = self.path(name)
        if not p.is_file():
            raise self._missing(name)
        size = p.stat().st_size
        self._check(name, size)  # a wrong size fails before the file is hashed
        self._check(name, size, sha256_file(p))
        log.debug("verified %s (%d bytes)", name, size)
        return p

    def read_verified(self, name: str) -> bytes:
        """The bytes of ``name``, checked against the recorded size and sha256; read once, so
        what is checked is what is used (engines are deserialized from these bytes)."""
        self._listed(name)
        try:
            data = self.path(name).read_bytes()
        except FileNotFoundError:
            raise self._missing(name) from None
        self._check(name, len(data), hashlib.sha256(data).hexdigest())
        return data

    def _listed(self, name: str) -> FileEntry:
        entry = self.files.get(name)
        if entry is None:
            raise ArtifactError(f"{self.root}: {name!r} is not listed in {MANIFEST_NAME}")
        return entry

    def _missing(self, name: str) -> ArtifactError:
        return ArtifactError(f"{self.root}: {name} is listed in {MANIFEST_NAME} but missing")

    def _check(self, name: str, size: int, digest: str | None = None) -> None:
        entry = self.files[name]
        if size != entry.size:
            raise ArtifactError(
                f"{self.root}: {name} is {size} bytes, the manifest records {entry.size}; "
                "the file was changed or truncated after export"
            )
        if digest is not None and digest != entry.sha256:
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
    if not path.is_file():
        raise ArtifactError(
            f"{root} has no {MANIFEST_NAME}: it is not an asym-export artifact folder, or its "
            "export did not finish (the manifest is written last)"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{path} is not readable JSON: {e}") from None
    if not isinstance(data, dict):
        raise ArtifactError(f"{path} does not hold a JSON object")
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ArtifactError(
            f"{path} has schema_version {version!r}; this asym_runtime reads only version "
            f"{SCHEMA_VERSION}. Re-export the folder with a matching asym-export"
        )
    missing = [k for k in _REQUIRED if k not in data]
    if missing:
        raise ArtifactError(f"{path} lacks required field(s): {', '.join(missing)}")
    return Manifest(root, data)
