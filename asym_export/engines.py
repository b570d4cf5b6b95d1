"""TensorRT engines from the exported ONNX graphs: a thin layer over the tensorrt API.

Works with TensorRT 10.12+ and 11. Every network is strongly typed (TensorRT 11 has no other
kind; 10.12+ builds one when asked with ``NetworkDefinitionCreationFlag.STRONGLY_TYPED``), so
the precision comes from the ONNX graph itself: an FP16 graph gives an FP16 engine. The FP16
builder flag is never set (TensorRT 11 removed it).

This module only builds. Engines are run (by verification, the tests and the service alike)
through the runtime's :class:`asym_runtime.backends.tensorrt.TensorRTBackend`, which also owns
the TensorRT logger, the version parser, the install hint and the device query: one TensorRT
stack, and what is verified is what the runtime runs.

Nothing heavy is imported at module import time: ``tensorrt`` and ``torch`` load inside the
functions that need them, so :func:`tensorrt_unavailable_reason` can tell a machine without a
GPU what is missing in one sentence, and the rest of the toolkit imports without tensorrt.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

from asym_runtime.backends import tensorrt as trt_backend
from asym_runtime.errors import AsymInputError, BackendUnavailableError
from asym_runtime.specs import GraphSpec, ShapeLimits

from .artifact import write_bytes_atomic

log = logging.getLogger(__name__)

#: Oldest TensorRT that builds strongly typed networks the way this module does.
MIN_TENSORRT = (10, 12)
#: ``--hardware-compat`` choices -> ``trt.HardwareCompatibilityLevel`` member names.
HARDWARE_COMPAT = {"none": "NONE", "ampere_plus": "AMPERE_PLUS",
                   "same_compute_capability": "SAME_COMPUTE_CAPABILITY"}


class EngineBuildError(RuntimeError):
    """TensorRT could not parse a graph or build its engine; the message carries TensorRT's errors."""


@dataclass(frozen=True)
class EngineOptions:
    """How engines are built (``--opt-level``, ``--workspace-gib``, ``--version-compatible``,
    ``--hardware-compat``). The profile comes from the artifact's :class:`ShapeLimits`."""

    opt_level: int = 3
    workspace_gib: float | None = None
    version_compatible: bool = False
    hardware_compat: str = "none"

    def __post_init__(self) -> None:
        if not isinstance(self.opt_level, int) or not 0 <= self.opt_level <= 5:
            raise AsymInputError(f"--opt-level {self.opt_level!r}: the builder optimization level is 0..5 "
                                 "(3 is TensorRT's default; higher builds longer and may run faster)")
        if self.workspace_gib is not None and not 0 < self.workspace_gib < math.inf:
            raise AsymInputError(f"--workspace-gib {self.workspace_gib!r} must be a positive finite number")
        if self.hardware_compat not in HARDWARE_COMPAT:
            raise AsymInputError(f"--hardware-compat {self.hardware_compat!r}: choose one of "
                                 f"{', '.join(HARDWARE_COMPAT)}")


# --------------------------------------------------------------------------- availability

def _cuda_gpu_problem() -> str | None:
    """Ask the CUDA driver (not a toolkit or framework) whether a GPU is visible."""
    try:
        lib = ctypes.CDLL("libcuda.so.1" if os.name != "nt" else "nvcuda.dll")
    except OSError:
        return "no CUDA GPU is visible (the NVIDIA driver library libcuda is not installed)"
    rc = lib.cuInit(0)
    if rc != 0:
        hidden = os.environ.get("CUDA_VISIBLE_DEVICES")
        extra = f", CUDA_VISIBLE_DEVICES={hidden!r}" if hidden is not None else ""
        return f"no CUDA GPU is visible (the CUDA driver's cuInit returned status {rc}{extra})"
    count = ctypes.c_int(0)
    if lib.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value < 1:
        return "no CUDA GPU is visible (the NVIDIA driver reports no device)"
    return None


@functools.lru_cache(maxsize=1)
def tensorrt_unavailable_reason() -> str | None:
    """``None`` when engines can be built and verified here, else one sentence (without a final
    period) naming everything that is missing: the tensorrt package, a recent enough
    TensorRT, cuda-python (verification runs the engines through the runtime's backend), a CUDA
    GPU, a CUDA build of torch (the engine check runs the reference there)."""
    hint = trt_backend.INSTALL_HINT
    missing = []
    absent = [p for p in ("tensorrt", "cuda-python")
              if importlib.util.find_spec("tensorrt" if p == "tensorrt" else "cuda") is None]
    if "cuda-python" not in absent:
        try:
            trt_backend.import_cudart()
        except BackendUnavailableError:
            absent.append("cuda-python")
    if absent == ["cuda-python"]:
        missing.append(f"the cuda-python package is not installed (engines are verified through the runtime's "
                       f"TensorRT backend; {hint})")
    elif absent:
        names = " and ".join(absent)
        missing.append(f"the {names} Python package{'s are' if len(absent) > 1 else ' is'} not installed ({hint})")
    if "tensorrt" not in absent:
        try:
            import tensorrt as trt

            version = trt.__version__
        except Exception as e:  # noqa: BLE001 - a broken install shows up in many ways
            missing.append(f"the tensorrt package does not load ({type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else 'no message'})")
        else:
            if trt_backend.version_tuple(version)[:2] < MIN_TENSORRT:
                missing.append(f"tensorrt {version} is too old (strongly typed FP16 engines need TensorRT "
                               f"{'.'.join(map(str, MIN_TENSORRT))} or newer; {hint})")
    gpu = _cuda_gpu_problem()
    if gpu:
        missing.append(gpu)
    else:
        import torch

        if not torch.cuda.is_available():
            missing.append(f"torch {torch.__version__} cannot use the GPU (engine verification runs the "
                           "PyTorch reference there; install a CUDA build of torch)")
    return "; ".join(missing) if missing else None


def require_tensorrt():
    """Import tensorrt, or raise :class:`BackendUnavailableError` saying what is missing."""
    reason = tensorrt_unavailable_reason()
    if reason:
        raise BackendUnavailableError(reason)
    import tensorrt as trt

    return trt


# --------------------------------------------------------------------------- build

def _network_flags(trt) -> int:
    # STRONGLY_TYPED exists in 10.x (opt-in) and in 11 (deprecated there: always on)
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return 1 << int(flag) if flag is not None else 0


def engine_from_onnx(onnx_path: str | Path, plan_path: str | Path, graph: GraphSpec, limits: ShapeLimits, *,
                     opt_level: int = 3, workspace_gib: float | None = None,
                     timing_cache: Path | None = None, version_compatible: bool = False,
                     hardware_compatibility: str = "none") -> dict:
    """Parse ``onnx_path`` (external data beside it is found by the parser) into a strongly typed
    network, build it with one optimization profile from ``limits``, write ``plan_path``
    atomically and return what the manifest records about the build.

    ``timing_cache``: a file loaded when present and written back (atomically) after the build,
    so later builds on the same GPU and TensorRT reuse the measured tactics.
    """
    EngineOptions(opt_level, workspace_gib, version_compatible, hardware_compatibility)  # validates
    trt = require_tensorrt()
    onnx_path, plan_path = Path(onnx_path), Path(plan_path)
    logger = trt_backend.trt_logger(trt)
    mark = logger.mark()
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    # the native InstanceNormalization layer (not the plugin): default on, required for
    # version- or hardware-compatible engines, so say it explicitly
    parser.set_flag(trt.OnnxParserFlag.NATIVE_INSTANCENORM)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)] or [logger.errors_since(mark)]
        raise EngineBuildError(f"TensorRT could not parse {onnx_path.name}: " + "; ".join(errors))
    got = sorted(network.get_input(i).name for i in range(network.num_inputs))
    if got != sorted(graph.input_names):
        raise EngineBuildError(f"{onnx_path.name} has inputs {got}; the {graph.name} contract says "
                               f"{graph.input_names}")

    config = builder.create_builder_config()
    config.builder_optimization_level = opt_level
    # strongly typed: what the graph declares is what runs. TF32 (on by default) would round the
    # FP32 graphs' and FP32 islands' convolution inputs to a 10-bit mantissa behind that back.
    config.clear_flag(trt.BuilderFlag.TF32)
    if workspace_gib is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * 2**30))
    if version_compatible:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    config.hardware_compatibility_level = getattr(trt.HardwareCompatibilityLevel,
                                                  HARDWARE_COMPAT[hardware_compatibility])
    profile = builder.create_optimization_profile()
    shapes = limits.profile(graph)
    for name, (lo, opt, hi) in shapes.items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)

    blob = b""
    if timing_cache is not None and Path(timing_cache).is_file():
        blob = Path(timing_cache).read_bytes()
    cache = config.create_timing_cache(blob)
    cache_loaded = bool(blob)
    if cache is None or not config.set_timing_cache(cache, False):  # False: no mismatched cache
        if blob:
            log.warning("timing cache %s does not fit this GPU / TensorRT; starting a new one", timing_cache)
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, False)
        cache_loaded = False

    t0 = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    build_s = time.perf_counter() - t0
    if serialized is None:
        raise EngineBuildError(f"TensorRT could not build the {graph.name} engine from {onnx_path.name}: "
                               + (logger.errors_since(mark) or "no error message (see the log with -v)"))
    write_bytes_atomic(plan_path, serialized)
    if timing_cache is not None:
        write_bytes_atomic(Path(timing_cache), config.get_timing_cache().serialize())
    log.info("built %s from %s in %.1f s (%d bytes)", plan_path.name, onnx_path.name, build_s,
             plan_path.stat().st_size)
    return {
        "graph": graph.name,
        "source_onnx": onnx_path.name,
        "tensorrt_version": trt.__version__,
        "build_s": round(build_s, 2),
        "profile": {n: [list(s) for s in corner] for n, corner in shapes.items()},
        "builder_optimization_level": opt_level,
        "workspace_gib": workspace_gib,
        "version_compatible": version_compatible,
        "hardware_compatibility_level": hardware_compatibility,
        "flags": {"strongly_typed": True, "fp16_flag": False,
                  "tf32": bool(config.get_flag(trt.BuilderFlag.TF32)), "native_instancenorm": True},
        "timing_cache_loaded": cache_loaded,
    }
