"""OpenVINO on the CPU: the portable FP32 graphs, in FP32 or with BF16 compute.

OpenVINO's CPU plugin (oneDNN) runs the exported ONNX graphs unchanged. ``precision="bf16"``
asks for BF16 inference (``INFERENCE_PRECISION_HINT``), which pays off on CPUs with BF16
units (Intel AMX, AVX512-BF16). A CPU with AVX-512 but no such units still computes BF16 when
asked (oneDNN emulates it: BF16's numbers, below FP32's speed); the load goes ahead with a
warning that says so. Where OpenVINO cannot compute BF16 at all (AVX2 CPUs) it silently
computes in FP32; this backend refuses instead, so a BF16 request never runs as something
else. :func:`bf16_support` decides which case a CPU is by compiling one convolution under the
bf16 hint and reading the precision OpenVINO runs it in.

The graph reaches OpenVINO as the checked bytes (``manifest.GraphSource``): its external data
is embedded into an in-memory ONNX model, nothing is read again by path.

Compiled models are cached by this backend, not by OpenVINO's ``CACHE_DIR`` (which neither
checks a blob's contents, so a damaged blob loads and computes wrong numbers, nor writes it
atomically, so processes starting together on an empty cache could read a half-written one).
``cache_dir/<key>/compiled-<sha256>.blob``: the key is a hash of the graph's and its data's
recorded sha256s, the precision, the compile options, the OpenVINO version and the CPU (name
and capabilities), so a changed graph, release or CPU never meets a blob compiled for another;
the file is OpenVINO's ``export_model()`` output, written to a temporary file, fsynced and
renamed into place, and named by its own sha256, which is checked before
``import_model()``: a blob that does not match is deleted and the graph compiled again. A
cache that cannot be written (read-only home, a file in the way) is skipped with a warning.
Every load still reads and checks the folder's files; what it checks decides the key. The cache
is as trusted as the process: anyone who can write it can plant a blob with a matching name.
Each export (and precision, release) adds a blob about the size of its weights, so the cache
has a size limit (``ASYM_OPENVINO_CACHE_MAX_GB``, default 10): after a blob is written, the
least recently used blobs of the whole cache (a blob's mtime is its last use: imports touch
it) are deleted until the cache fits; the blob just written always stays, and temporary files
that killed writers left (older than an hour) go too.

Threading: one ``CompiledModel`` is shared; each call makes its own infer request, so calls from
several threads are safe and give the serial results. With the ``LATENCY`` hint OpenVINO runs
one stream per compiled model, so concurrent calls on one graph mostly queue; each uses all
cores.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from .. import arrays
from ..errors import ArtifactError, BackendError, BackendUnavailableError
from ..files import read_regular
from ..manifest import GraphSource, external_tensors
from ..specs import GraphSpec
from .base import Backend

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16")
_HINT = {"fp32": "f32", "bf16": "bf16"}
BLOB_PREFIX, BLOB_SUFFIX = "compiled-", ".blob"
#: the cache's size limit unless ``ASYM_OPENVINO_CACHE_MAX_GB`` says otherwise (a blob is about
#: its graph's weights, 0.94 MB for tiny's 1.1 MB graph; x2's three FP32 graphs hold 3.1 GB)
CACHE_MAX_GB_ENV, DEFAULT_CACHE_MAX_GB = "ASYM_OPENVINO_CACHE_MAX_GB", 10.0
#: a temporary file older than this was left by a killed writer (writing takes seconds)
STALE_TMP_S = 3600.0


def unavailable_reason() -> str | None:
    """Why OpenVINO cannot run here, or None."""
    try:
        import openvino  # noqa: F401
    except ImportError:
        return "openvino is not installed (pip install -e '.[openvino]')"
    return None


def cpu_capabilities() -> list[str]:
    """OpenVINO's optimization capabilities of this CPU (e.g. FP32, BF16, INT8)."""
    import openvino as ov

    return list(ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


def conv_precisions(compiled) -> dict[str, int]:
    """How many convolutions a compiled model runs in which precision (``{"bf16": 74}``), as
    its runtime model reports them."""
    out: dict[str, int] = {}
    for op in compiled.get_runtime_model().get_ops():
        info = op.get_rt_info()
        if info["layerType"].astype(str) == "Convolution":
            p = info["runtimePrecision"].astype(str)
            out[p] = out.get(p, 0) + 1
    return out


@functools.lru_cache(maxsize=None)
def bf16_support() -> str:
    """How OpenVINO computes BF16 on this CPU: ``"units"`` (BF16 dot-product units: AMX,
    AVX512-BF16, AVX-NE-CONVERT; OpenVINO lists BF16 among its capabilities), ``"emulated"``
    (no such units, but OpenVINO still computes BF16 when asked, with plain AVX-512
    instructions: BF16's numbers at below FP32's speed) or ``"none"`` (it silently computes
    FP32). Decided by compiling one small convolution under the bf16 hint and reading the
    precision OpenVINO runs it in, not by a list of CPU flags."""
    import openvino as ov
    from openvino import opset13 as ops

    x = ops.parameter([1, 16, 8, 8], np.float32, name="x")
    conv = ops.convolution(x, ops.constant(np.ones((16, 16, 3, 3), np.float32)), [1, 1], [1, 1], [1, 1], [1, 1])
    core = ov.Core()
    compiled = core.compile_model(ov.Model([conv], [x]), "CPU", {"INFERENCE_PRECISION_HINT": "bf16"})
    if set(conv_precisions(compiled)) != {"bf16"}:
        return "none"
    return "units" if "BF16" in cpu_capabilities() else "emulated"


def emulated_bf16_warning() -> str | None:
    """What a BF16 load on this CPU should warn about (emulated BF16 is slow), or None."""
    if bf16_support() != "emulated":
        return None
    return EMULATED_BF16.format(caps=", ".join(cpu_capabilities()))


def bf16_reason() -> str | None:
    """Why OpenVINO cannot compute BF16 on this CPU, or None (also where it emulates it)."""
    if bf16_support() != "none":
        return None
    caps = cpu_capabilities()
    return (f"this CPU has no BF16 units (OpenVINO reports {', '.join(caps)}; its BF16 needs Intel AMX, "
            "AVX512-BF16 or AVX-NE-CONVERT, or AVX-512 to emulate it); use precision='fp32'")


#: logged when a BF16 load lands on a CPU that emulates BF16 (measured on a 2-core Xeon with
#: AVX-512 but no BF16 units: the x2 decoder at 256x256 took 84.6 s in BF16, 23.5 s in FP32)
EMULATED_BF16 = ("this CPU has no BF16 units (OpenVINO reports {caps}): OpenVINO computes BF16 with plain "
                 "AVX-512 instructions, so the results are BF16's but the speed is below FP32's; use "
                 "precision='fp32' unless BF16's numbers are what you want")


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "asym-export" / "openvino"


def cache_limit_bytes() -> int:
    """The cache's size limit: ``ASYM_OPENVINO_CACHE_MAX_GB`` (GiB, a number >= 0), else the default."""
    raw = os.environ.get(CACHE_MAX_GB_ENV)
    if raw is None or not raw.strip():
        return int(DEFAULT_CACHE_MAX_GB * 2**30)
    try:
        gb = float(raw)
        if not gb >= 0 or gb == float("inf"):
            raise ValueError
    except ValueError:
        log.warning("%s=%r is not a size in GiB (a number >= 0); using %g", CACHE_MAX_GB_ENV, raw,
                    DEFAULT_CACHE_MAX_GB)
        return int(DEFAULT_CACHE_MAX_GB * 2**30)
    return int(gb * 2**30)


def _cache_files(root: Path):
    """Every entry inside the key folders of ``root``. Other processes remove key folders as
    they evict (and pathlib's glob raises when one goes between listing ``root`` and listing
    it), so a folder that is gone, or cannot be listed, is skipped."""
    try:
        with os.scandir(root) as it:
            keys = [e.path for e in it if e.is_dir(follow_symlinks=False)]
    except OSError:
        return
    for key in keys:
        try:
            with os.scandir(key) as it:
                names = [e.name for e in it]
        except OSError:
            continue
        for name in names:
            yield Path(key) / name


def prune_cache(root: Path, limit: int, keep: Path | None = None) -> list[Path]:
    """Delete the least recently used blobs under ``root`` (``<key>/compiled-*.blob``) until they
    fit ``limit`` bytes, never ``keep``; and temporary files older than ``STALE_TMP_S``. Returns
    what was deleted. Files another process deletes meanwhile are skipped."""
    import time

    removed: list[Path] = []
    now = time.time()
    files = list(_cache_files(root))
    for tmp in (f for f in files if f.name.startswith(".tmp-")):
        try:
            if now - tmp.stat().st_mtime > STALE_TMP_S:
                tmp.unlink()
                removed.append(tmp)
        except OSError:
            pass
    blobs = []
    for blob in (f for f in files if f.name.startswith(BLOB_PREFIX) and f.name.endswith(BLOB_SUFFIX)):
        try:
            st = blob.stat()
        except OSError:
            continue
        blobs.append((st.st_mtime, st.st_size, blob))
    total = sum(size for _, size, _ in blobs)
    for _, size, blob in sorted(blobs, key=lambda b: b[0]):  # least recently used first
        if total <= limit:
            break
        if keep is not None and blob == keep:
            continue
        try:
            blob.unlink()
        except OSError:
            continue
        total -= size
        removed.append(blob)
        try:
            blob.parent.rmdir()  # the key's folder, once empty
        except OSError:
            pass
    return removed


def embedded_model(source: GraphSource) -> bytes:
    """The ONNX model of ``source`` with its external data (the checked bytes) inside.

    OpenVINO reads ONNX from memory only whole, so the weights go into the model bytes. Through
    protobuf that costs about five times the weights at its peak (x2's decoder: 8.4 GiB for
    1.45 GiB of weights, measured: the tensors' copies in the message, the encoder's buffer and
    the bytes it returns). So the graph's external initializers are taken out of the message,
    which is serialized without them (small), and each goes back in as protobuf's wire format
    allows: one more ``graph`` field holding one ``initializer`` (a singular message field given
    twice is merged, a repeated one appended, by every conforming parser), its header
    serialized by protobuf and its ``raw_data`` the checked bytes themselves, joined into the
    result in one copy. Tensors kept elsewhere (node attributes, subgraphs, sparse) take the
    protobuf path."""
    import onnx

    model = onnx.ModelProto.FromString(bytes(source.model))
    external = [t for t in external_tensors(model) if t.data_location == onnx.TensorProto.EXTERNAL]
    top = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    if len(top) != len(external):
        return _embedded_through_protobuf(model, source)
    slices = [_checked_slice(source, t) for t in top]
    kept = [t for t in model.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL]
    heads = []
    for t in top:
        head = onnx.TensorProto()
        head.CopyFrom(t)
        del head.external_data[:]
        head.ClearField("data_location")
        heads.append(head.SerializeToString())
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    graph_field = onnx.ModelProto.DESCRIPTOR.fields_by_name["graph"].number
    initializer_field = onnx.GraphProto.DESCRIPTOR.fields_by_name["initializer"].number
    raw_field = onnx.TensorProto.DESCRIPTOR.fields_by_name["raw_data"].number
    pieces: list = [model.SerializeToString()]
    for head, data in zip(heads, slices):
        raw_key = _field_key(raw_field) + _varint(len(data))
        tensor_len = len(head) + len(raw_key) + len(data)
        init_key = _field_key(initializer_field) + _varint(tensor_len)
        pieces += [_field_key(graph_field) + _varint(len(init_key) + tensor_len), init_key, head, raw_key, data]
    return b"".join(pieces)


def _field_key(number: int) -> bytes:
    """A protobuf field key with wire type 2 (length-delimited)."""
    return _varint(number << 3 | 2)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _checked_slice(source: GraphSource, t) -> memoryview:
    """The checked bytes an external tensor names (no copy)."""
    info = {e.key: e.value for e in t.external_data}
    data = source.external[info["location"]]
    offset = int(info.get("offset", 0))
    length = int(info["length"]) if "length" in info else len(data) - offset
    if offset < 0 or length < 0 or offset + length > len(data):
        raise ArtifactError(f"{source.name}: tensor {t.name!r} reads past the end of {info['location']}")
    return memoryview(data)[offset:offset + length]


def _embedded_through_protobuf(model, source: GraphSource) -> bytes:
    """:func:`embedded_model` for graphs with external tensors outside the top-level
    initializers: every tensor's bytes copied into the message, then serialized."""
    import onnx

    for t in external_tensors(model):
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        t.raw_data = bytes(_checked_slice(source, t))
        del t.external_data[:]
        t.data_location = onnx.TensorProto.DEFAULT
    return model.SerializeToString()


class OpenVinoBackend(Backend):
    """One portable ONNX graph compiled by OpenVINO for the CPU."""

    name = "openvino"

    def __init__(self, graph: GraphSpec, source: GraphSource, *, precision: str = "fp32",
                 cache_dir: str | os.PathLike | None = None):
        super().__init__(graph)
        if precision not in PRECISIONS:
            raise ValueError(f"precision {precision!r}: OpenVINO runs fp32 or bf16")
        self._source: GraphSource | None = source
        self.label = source.name
        self.precision = precision
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.cache_key = ",".join(source.digests)  # the recorded sha256 of the graph and its data
        self.compiled = None

    def _activate(self) -> None:
        reason = unavailable_reason()
        if reason:
            raise BackendUnavailableError(reason)
        if self.precision == "bf16":
            reason = bf16_reason()
            if reason:
                raise BackendUnavailableError(reason)
        if self._source is None:
            raise BackendUnavailableError(f"{self.label}: the checked bytes were released after the first "
                                          "activation; load the artifact again")
        import openvino as ov

        core = ov.Core()
        config = {"INFERENCE_PRECISION_HINT": _HINT[self.precision], "PERFORMANCE_HINT": "LATENCY"}
        folder = self._cache_folder(ov, core, config)
        compiled = self._cached(ov, core, folder, config) if folder is not None else None
        from_cache = compiled is not None
        if from_cache:
            self._check_io(compiled)  # a blob's ports, as a read graph's below
        else:
            # the checked bytes go into the model bytes, and are let go of at once: of the
            # weights' copies, only the model bytes and OpenVINO's own are alive while it reads
            source, self._source = self._source, None
            try:
                data = embedded_model(source)
                del source
                model = core.read_model(data)
                del data
            except ArtifactError:
                raise
            except Exception as e:  # noqa: BLE001 - OpenVINO raises its own exception types
                # the bytes were checked against the manifest: this is OpenVINO's limit, not tampering
                raise BackendUnavailableError(f"OpenVINO {ov.__version__} cannot read {self.label}: {e}") from None
            self._check_io(model)
            try:
                compiled = core.compile_model(model, "CPU", config)
            except Exception as e:  # noqa: BLE001
                raise BackendError(f"OpenVINO could not compile {self.label} for the CPU: {e}") from None
            del model
        self._source = None  # OpenVINO holds the weights now
        got = compiled.get_property("INFERENCE_PRECISION_HINT")
        name = got.get_type_name() if hasattr(got, "get_type_name") else str(got)
        if name != _HINT[self.precision]:  # OpenVINO falls back silently; a request must not
            raise BackendUnavailableError(f"OpenVINO compiled {self.label} with {name} inference instead of "
                                          f"{self.precision}")
        if folder is not None and not from_cache:  # only what passed every check is cached
            self._store(compiled, folder)
        self.compiled = compiled

    # ----- the compiled-model cache
    def _cache_folder(self, ov, core, config: dict) -> Path | None:
        """``cache_dir/<key>``, made if needed; None when there is no cache or it cannot be used."""
        if self.cache_dir is None:
            return None
        material = json.dumps({
            "graph": self.cache_key, "precision": self.precision, "config": config, "openvino": ov.__version__,
            "cpu": core.get_property("CPU", "FULL_DEVICE_NAME"),
            "capabilities": sorted(core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")),
        }, sort_keys=True)
        folder = self.cache_dir / hashlib.sha256(material.encode()).hexdigest()[:24]
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            log.warning("%s: the compiled-model cache %s cannot be used (%s); compiling without it",
                        self.label, folder, e.strerror or e)
            return None
        return folder

    def _cached(self, ov, core, folder: Path, config: dict):
        """The newest intact blob of ``folder`` imported, or None (damaged ones are deleted)."""
        def mtime(p):
            try:
                return p.stat().st_mtime
            except OSError:
                return 0.0

        blobs = sorted(folder.glob(f"{BLOB_PREFIX}*{BLOB_SUFFIX}"), key=mtime, reverse=True)
        for blob in blobs:
            # read straight into a tensor OpenVINO owns: import_model takes it without a copy and
            # its weights stay in it (a bytearray handed over as a Tensor was copied first: x2's
            # decoder peaked at three times its weights on a cached load, now two)
            tensor: list = []

            def allocate(size, tensor=tensor):
                tensor.append(ov.Tensor(ov.Type.u8, ov.Shape([size])))
                return tensor[0].data

            try:
                data = read_regular(blob, allocate=allocate)
            except (OSError, ArtifactError) as e:  # gone meanwhile (another process replaced it), or odd
                log.debug("%s: cached %s unreadable (%s)", self.label, blob.name, e)
                continue
            want = blob.name[len(BLOB_PREFIX):-len(BLOB_SUFFIX)]
            if hashlib.sha256(data).hexdigest() != want:
                log.warning("%s: cached compiled model %s is damaged (its sha256 does not match its name); "
                            "deleting it and compiling again", self.label, blob)
                try:
                    blob.unlink()
                except OSError:
                    pass
                continue
            del data
            try:
                compiled = core.import_model(tensor[0], "CPU", config)
            except Exception as e:  # noqa: BLE001 - e.g. a blob of another build with the same version
                log.warning("%s: OpenVINO cannot import the cached %s (%s); compiling again", self.label, blob, e)
                continue
            log.debug("%s: compiled model from the cache (%s)", self.label, blob)
            try:
                os.utime(blob)  # its last use: the size limit deletes the least recently used first
            except OSError:
                pass
            return compiled
        return None

    def _store(self, compiled, folder: Path) -> None:
        """Write ``compiled`` into ``folder`` atomically, named by its sha256; older blobs go."""
        try:
            data = compiled.export_model()
            data = data.getvalue() if hasattr(data, "getvalue") else bytes(data)
            digest = hashlib.sha256(data).hexdigest()
            final = folder / f"{BLOB_PREFIX}{digest}{BLOB_SUFFIX}"
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, final)
            except BaseException:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
                raise
            for old in folder.glob(f"{BLOB_PREFIX}*{BLOB_SUFFIX}"):
                if old != final:  # another process's earlier blob for the same key: one is enough
                    try:
                        old.unlink()
                    except OSError:
                        pass
        except Exception as e:  # noqa: BLE001 - a cache that cannot be written must not fail the load
            log.warning("%s: could not write the compiled model into the cache %s (%s)", self.label, folder, e)
            return
        limit = cache_limit_bytes()  # read once: a bad value warns once
        try:
            removed = prune_cache(folder.parent, limit, keep=final)
        except OSError as e:  # the size limit is kept by the next load; never a reason to fail this one
            log.warning("%s: could not prune the compiled-model cache %s (%s)", self.label, folder.parent, e)
            return
        if removed:
            log.info("%s: the compiled-model cache %s was over its limit (%s GiB, %s): deleted %d least "
                     "recently used file(s)", self.label, folder.parent, f"{limit / 2**30:g}",
                     CACHE_MAX_GB_ENV, len(removed))

    def _check_io(self, model) -> None:
        got_in = sorted(p.get_any_name() for p in model.inputs)
        got_out = sorted(p.get_any_name() for p in model.outputs)
        if got_in != sorted(self.graph.input_names) or got_out != sorted(self.graph.output_names):
            raise ArtifactError(f"{self.label} has inputs {got_in} and outputs {got_out}; the {self.graph.name} "
                                f"contract is {self.graph.input_names} -> {self.graph.output_names}")

    def _infer(self, feed: dict[str, Any]) -> dict[str, Any]:
        compiled = self.compiled  # one read: close() from another thread sets it to None
        if compiled is None:
            raise RuntimeError("this AsymVAE is closed")
        ref = next(iter(feed.values()))
        request = compiled.create_infer_request()
        results = request.infer({k: arrays.to_numpy(v) for k, v in feed.items()})
        by_name = {port.get_any_name(): value for port, value in results.items()}
        return {k: arrays.like(np.array(by_name[k], dtype=np.float32, copy=True), ref)
                for k in self.graph.output_names}

    def _deactivate(self) -> None:
        self.compiled = None
