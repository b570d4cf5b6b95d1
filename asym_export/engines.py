"""TensorRT engines from the exported ONNX graphs: a thin layer over the tensorrt API.

Works with TensorRT 10.12+ and 11. Every network is strongly typed (TensorRT 11 has no other
kind; 10.12+ builds one when asked with ``NetworkDefinitionCreationFlag.STRONGLY_TYPED``), so
the precision comes from the ONNX graph itself: an FP16 graph gives an FP16 engine. The FP16
builder flag is never set (TensorRT 11 removed it).

Nothing heavy is imported at module import time: ``tensorrt`` and ``torch`` load inside the
functions that need them, so :func:`tensorrt_unavailable_reason` can tell a machine without a
GPU what is missing in one sentence, and the rest of the toolkit imports without tensorrt.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from asym_runtime.errors import AsymInputError, BackendUnavailableError, ShapeOutOfLimitsError
from asym_runtime.specs import GraphSpec, ShapeLimits

from .artifact import write_bytes_atomic

log = logging.getLogger(__name__)

#: Oldest TensorRT that builds strongly typed networks the way this module does.
MIN_TENSORRT = (10, 12)
#: ``--hardware-compat`` choices -> ``trt.HardwareCompatibilityLevel`` member names.
HARDWARE_COMPAT = {"none": "NONE", "ampere_plus": "AMPERE_PLUS",
                   "same_compute_capability": "SAME_COMPUTE_CAPABILITY"}
INSTALL_HINT = "pip install 'asym-export[tensorrt]' where NVIDIA's package index is reachable"


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
        if self.workspace_gib is not None and not self.workspace_gib > 0:
            raise AsymInputError(f"--workspace-gib {self.workspace_gib!r} must be positive")
        if self.hardware_compat not in HARDWARE_COMPAT:
            raise AsymInputError(f"--hardware-compat {self.hardware_compat!r}: choose one of "
                                 f"{', '.join(HARDWARE_COMPAT)}")


# --------------------------------------------------------------------------- availability

def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text)[:3])


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
    TensorRT, a CUDA GPU, a CUDA build of torch (the engine check runs the reference there)."""
    missing = []
    if importlib.util.find_spec("tensorrt") is None:
        missing.append(f"the tensorrt Python package is not installed ({INSTALL_HINT})")
    else:
        try:
            import tensorrt as trt

            version = trt.__version__
        except Exception as e:  # noqa: BLE001 - a broken install shows up in many ways
            missing.append(f"the tensorrt package does not load ({type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else 'no message'})")
        else:
            if _version_tuple(version)[:2] < MIN_TENSORRT:
                missing.append(f"tensorrt {version} is too old (strongly typed FP16 engines need TensorRT "
                               f"{'.'.join(map(str, MIN_TENSORRT))} or newer; {INSTALL_HINT})")
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


def device_info() -> dict:
    """Name and compute capability of the GPU engines are built on (recorded in the manifest;
    the runtime refuses an engine whose compute capability differs)."""
    import torch

    major, minor = torch.cuda.get_device_capability()
    return {"name": torch.cuda.get_device_name(), "compute_capability": f"{major}.{minor}"}


# --------------------------------------------------------------------------- build

def _logger(trt):
    """A TensorRT logger that routes to ``logging`` and keeps errors for the exception text."""

    class _Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg):  # must not raise: TensorRT calls it from C++
            if int(severity) <= int(trt.ILogger.ERROR):
                self.errors.append(msg)
                log.error("TensorRT: %s", msg)
            elif int(severity) == int(trt.ILogger.WARNING):
                log.info("TensorRT warning: %s", msg)
            else:
                log.debug("TensorRT: %s", msg)

    return _Logger()


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
    logger = _logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    # the native InstanceNormalization layer (not the plugin): default on, required for
    # version- or hardware-compatible engines, so say it explicitly
    parser.set_flag(trt.OnnxParserFlag.NATIVE_INSTANCENORM)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)] or logger.errors
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
                               + ("; ".join(logger.errors) or "no error message (see the log with -v)"))
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


# --------------------------------------------------------------------------- run

def _torch_dtypes(trt) -> dict:
    import torch

    table = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT32": torch.int32,
             "INT64": torch.int64, "INT8": torch.int8, "UINT8": torch.uint8, "BOOL": torch.bool}
    return {getattr(trt.DataType, k): v for k, v in table.items() if hasattr(trt.DataType, k)}


class EngineRunner:
    """Run one serialized engine on the GPU with torch CUDA buffers (activate / infer / deactivate;
    ``with runner:`` does both ends). Inputs and outputs are numpy arrays; the engine's own
    I/O dtypes decide the device buffers. Used by engine verification and the GPU tests."""

    def __init__(self, plan_path: str | Path, *, host_code_allowed: bool = False):
        self.plan_path = Path(plan_path)
        self.host_code_allowed = host_code_allowed
        self.engine = self.context = self._bound = None

    def __enter__(self) -> "EngineRunner":
        self.activate()
        return self

    def __exit__(self, *exc) -> None:
        self.deactivate()

    def activate(self) -> None:
        trt = require_tensorrt()
        import torch

        self.stream = torch.cuda.Stream()
        self._trt = trt
        self._logger = _logger(trt)
        self._runtime = trt.Runtime(self._logger)
        if self.host_code_allowed:  # version-compatible plans embed the lean runtime
            self._runtime.engine_host_code_allowed = True
        self.engine = self._runtime.deserialize_cuda_engine(self.plan_path.read_bytes())
        if self.engine is None:
            raise EngineBuildError(f"TensorRT could not load {self.plan_path.name}: "
                                   + ("; ".join(self._logger.errors) or "no error message"))
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise EngineBuildError(f"TensorRT could not create an execution context for {self.plan_path.name}: "
                                   + ("; ".join(self._logger.errors) or "out of device memory?"))
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.inputs = [n for n in names if is_input[n]]
        self.outputs = [n for n in names if not is_input[n]]
        self._dtypes = _torch_dtypes(trt)

    def deactivate(self) -> None:
        self.context = self.engine = self._bound = None

    def profile_shapes(self, name: str) -> tuple[tuple[int, ...], ...]:
        """(min, opt, max) of input ``name`` in the engine's only profile."""
        return tuple(tuple(d) for d in self.engine.get_tensor_profile_shape(name, 0))

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.context is None:
            raise RuntimeError("EngineRunner is not active; use `with runner:` or call activate()")
        if sorted(feed) != sorted(self.inputs):
            raise AsymInputError(f"{self.plan_path.name} takes inputs {self.inputs}, got {sorted(feed)}")
        for name, value in feed.items():
            lo, _, hi = self.profile_shapes(name)
            if len(value.shape) != len(lo) or any(not a <= v <= b for v, a, b in zip(value.shape, lo, hi)):
                raise ShapeOutOfLimitsError(f"{name} shape {tuple(value.shape)} is outside the engine's "
                                            f"profile (min {lo}, max {hi})")
        buffers = self.bind(feed)
        self.launch()
        return {n: buffers[n].float().cpu().numpy() for n in self.outputs}

    def bind(self, feed: dict[str, np.ndarray]) -> dict:
        """Copy ``feed`` to the GPU, set the input shapes, allocate the outputs and bind every
        address; returns the torch CUDA tensors by name. :meth:`launch` then runs the engine
        on them as often as wanted (what the latency benchmark times)."""
        import torch

        ctx, buffers = self.context, {}
        for name in self.inputs:
            dtype = self._dtypes[self.engine.get_tensor_dtype(name)]
            t = torch.from_numpy(np.ascontiguousarray(feed[name])).to("cuda", dtype)
            if not ctx.set_input_shape(name, tuple(t.shape)):
                raise ShapeOutOfLimitsError(f"TensorRT refused shape {tuple(t.shape)} for {name}")
            buffers[name] = t
        for name in self.outputs:
            shape = tuple(ctx.get_tensor_shape(name))
            buffers[name] = torch.empty(shape, dtype=self._dtypes[self.engine.get_tensor_dtype(name)],
                                        device="cuda")
        for name, t in buffers.items():
            ctx.set_tensor_address(name, t.data_ptr())
        self._bound = buffers  # keeps the memory alive while its addresses are bound
        return buffers

    def launch(self, synchronize: bool = True) -> None:
        """Run the engine on the buffers of the last :meth:`bind`, on :attr:`stream`."""
        import torch

        # a stream of our own (TensorRT warns about the default stream), ordered after the copies
        self.stream.wait_stream(torch.cuda.current_stream())
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise EngineBuildError(f"TensorRT failed to run {self.plan_path.name}: "
                                   + ("; ".join(self._logger.errors) or "execute_async_v3 returned False"))
        if synchronize:
            self.stream.synchronize()
