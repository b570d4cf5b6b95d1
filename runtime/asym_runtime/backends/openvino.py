"""OpenVINO on the CPU: the portable FP32 graphs, in FP32 or with BF16 compute.

OpenVINO's CPU plugin (oneDNN) runs the exported ONNX graphs unchanged. ``precision="bf16"``
asks for BF16 inference (``INFERENCE_PRECISION_HINT``), which pays off on CPUs with BF16
units (Intel AMX, AVX512-BF16). Where the CPU has none, OpenVINO silently computes in FP32;
this backend refuses instead, so a BF16 request never runs as something else.

The graph reaches OpenVINO as the checked bytes (``manifest.GraphSource``): its external data
is embedded into an in-memory ONNX model, nothing is read again by path.

Compiled models are cached in ``cache_dir/<key>``, the key being the sha256 of the graph's
and its data's recorded sha256s and the precision, so a changed graph never meets a blob
compiled from another one. The cache holds OpenVINO's own blobs, which this code does not
check; a cache directory must be as trusted as the process.

Threading: one ``CompiledModel`` is shared; each call makes its own infer request, so calls
from several threads run concurrently and give the serial results.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from .. import arrays
from ..errors import ArtifactError, BackendUnavailableError
from ..manifest import GraphSource, external_tensors
from ..specs import GraphSpec
from .base import Backend

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16")
_HINT = {"fp32": "f32", "bf16": "bf16"}


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


def bf16_reason() -> str | None:
    """Why this CPU cannot run BF16, or None."""
    caps = cpu_capabilities()
    if "BF16" in caps:
        return None
    return (f"this CPU has no BF16 units (OpenVINO reports {', '.join(caps)}; BF16 needs Intel AMX or "
            "AVX512-BF16); use precision='fp32'")


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "asym-export" / "openvino"


def embedded_model(source: GraphSource) -> bytes:
    """The ONNX model of ``source`` with its external data (the checked bytes) inside."""
    import onnx

    model = onnx.ModelProto.FromString(bytes(source.model))
    for t in external_tensors(model):
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in t.external_data}
        data = source.external[info["location"]]
        offset = int(info.get("offset", 0))
        length = int(info["length"]) if "length" in info else len(data) - offset
        if offset < 0 or length < 0 or offset + length > len(data):
            raise ArtifactError(f"{source.name}: tensor {t.name!r} reads past the end of {info['location']}")
        t.raw_data = bytes(memoryview(data)[offset:offset + length])
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
        if self.cache_dir is not None:
            key = hashlib.sha256(f"{self.cache_key}/{self.precision}/{ov.__version__}".encode()).hexdigest()[:24]
            folder = self.cache_dir / key
            folder.mkdir(parents=True, exist_ok=True)
            core.set_property({"CACHE_DIR": str(folder)})
        try:
            model = core.read_model(embedded_model(self._source))
        except ArtifactError:
            raise
        except Exception as e:  # noqa: BLE001 - OpenVINO raises its own exception types
            raise ArtifactError(f"OpenVINO cannot read {self.label}: {e}") from None
        self._source = None  # OpenVINO holds the weights now
        self._check_io(model)
        config = {"INFERENCE_PRECISION_HINT": _HINT[self.precision], "PERFORMANCE_HINT": "LATENCY"}
        self.compiled = core.compile_model(model, "CPU", config)
        got = self.compiled.get_property("INFERENCE_PRECISION_HINT")
        name = got.get_type_name() if hasattr(got, "get_type_name") else str(got)
        if name != _HINT[self.precision]:  # OpenVINO falls back silently; a request must not
            raise BackendUnavailableError(f"OpenVINO compiled {self.label} with {name} inference instead of "
                                          f"{self.precision}")

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
