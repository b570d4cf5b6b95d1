"""TensorRT backend: one serialized engine, buffers preallocated per shape, optional CUDA graphs.

Written against the TensorRT 10.12+/11 Python API and cuda-python (``cuda.bindings.runtime``,
or ``cuda.cudart`` in older releases); both are imported only when a backend is activated, so
this module imports on any machine and :func:`check_engine_compatibility` is plain Python.

Threading: a TensorRT execution context is not safe to share between threads. This backend
keeps ONE context and serialises calls on it with a lock: a VAE decode fills the GPU by itself,
so concurrent contexts would gain little, while each context takes its own activation memory
(for x2 at the top of the profile, gigabytes). Calls from several threads are therefore safe
and give the same results as serial calls; they queue on the lock.

Per call (under the lock): ``set_input_shape`` and ``set_tensor_address`` for every I/O tensor,
copy the inputs into preallocated device buffers (host->device for numpy, device->device for
torch CUDA tensors, so a torch caller never round-trips through the host),
``execute_async_v3`` (its return value checked) or a CUDA graph captured at the same shape,
copy the outputs out, synchronize the stream.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .. import arrays
from ..checks import DIM_AXES, output_shapes, request_shape
from ..errors import ArtifactError, AsymInputError, BackendError, BackendUnavailableError, IncompatibleEngineError
from ..specs import GraphSpec, Shape, ShapeLimits
from .base import Backend
# the TensorRT environment (imports, devices, versions, compatibility, logger), also reached
# through this module by its callers
from .trt_env import (HW_LEVELS, INSTALL_HINT, cuda_call, check_engine_compatibility,  # noqa: F401
                      device_info, import_cudart, import_tensorrt, native_handle, trt_logger,
                      unavailable_reason, version_tuple)

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- backend

def _np_dtype(trt, dtype) -> np.dtype:
    table = {trt.float32: np.float32, trt.float16: np.float16, trt.int32: np.int32,
             trt.int8: np.int8, trt.bool: np.bool_}
    for name, np_t in (("int64", np.int64), ("uint8", np.uint8)):
        if hasattr(trt, name):
            table[getattr(trt, name)] = np_t
    if dtype not in table:
        raise ArtifactError(f"engine I/O dtype {dtype} has no numpy equivalent; the contract is float32 I/O")
    return np.dtype(table[dtype])


def _torch_dtype(np_dtype: np.dtype):
    torch = arrays.torch_module()
    return {np.dtype(np.float32): torch.float32, np.dtype(np.float16): torch.float16}[np.dtype(np_dtype)]


@dataclass
class _Slot:
    """Device buffers (and optionally a CUDA graph) for one request shape."""

    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, np.dtype]
    ptrs: dict[str, int] = field(default_factory=dict)
    graph_exec: Any = None

    def nbytes(self, name: str) -> int:
        return int(np.prod(self.shapes[name])) * self.dtypes[name].itemsize


class TensorRTBackend(Backend):
    """One TensorRT engine (plan bytes already sha256-checked by the caller) on one GPU.

    ``cuda_graph=True`` (for a service that decodes at one fixed shape): the second
    consecutive call at a shape captures a CUDA graph, later calls at that shape replay it,
    and a call at another shape drops it (the context it captured has moved on); if capture
    fails the backend logs it and runs without graphs.
    ``max_shapes`` bounds how many shapes keep their buffers (least recently used go).
    """

    name = "tensorrt"

    def __init__(self, graph: GraphSpec, plan: bytes, *, device_id: int = 0, cuda_graph: bool = False,
                 max_shapes: int = 4, version_compatible: bool = False, label: str = "engine"):
        super().__init__(graph)
        self.plan = plan
        self.device_id = device_id
        self.cuda_graph = cuda_graph
        self.max_shapes = max(1, int(max_shapes))
        self.version_compatible = version_compatible
        self.label = label
        self._lock = threading.Lock()
        self._slots: OrderedDict[Shape, _Slot] = OrderedDict()
        self._last_shape: Shape | None = None  # the shape of the context's last enqueue
        self._trt = self._cudart = None
        self._runtime = self._engine = self._context = self._stream = None
        self._dtypes: dict[str, np.dtype] = {}

    # ----- lifecycle
    def _activate(self) -> None:
        reason = unavailable_reason(self.device_id)
        if reason:
            raise BackendUnavailableError(reason)
        trt, cudart = import_tensorrt(), import_cudart()
        self._trt, self._cudart = trt, cudart
        cuda_call(cudart.cudaSetDevice(self.device_id))
        logger = trt_logger(trt)
        mark = logger.mark()
        runtime = trt.Runtime(logger)
        if self.version_compatible:
            # a version-compatible plan carries its own lean runtime (host code); the plan's
            # sha256 was checked against the manifest before we got here
            runtime.engine_host_code_allowed = True
        engine = runtime.deserialize_cuda_engine(self.plan)
        if engine is None:
            raise IncompatibleEngineError(
                f"TensorRT {trt.__version__} could not deserialize {self.label} "
                f"({logger.errors_since(mark) or 'no message'}); rebuild the engines on this machine"
            )
        self._check_io(trt, engine)
        context = engine.create_execution_context()
        if context is None:
            raise BackendError(f"TensorRT could not create an execution context for {self.label} "
                               f"({logger.errors_since(mark) or 'out of GPU memory?'})")
        self._runtime, self._engine, self._context = runtime, engine, context
        # non-blocking: a capturing blocking stream would make the legacy default stream (torch's
        # default, plain cudaMemcpy) unusable for every other thread until the capture ends;
        # ordering with torch's stream is explicit below (synchronize before reading its tensors)
        self._stream = cuda_call(cudart.cudaStreamCreateWithFlags(cudart.cudaStreamNonBlocking))
        self.limits = self._profile_limits(engine)

    def _check_io(self, trt, engine) -> None:
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if sorted(inputs) != sorted(self.graph.input_names) or sorted(outputs) != sorted(self.graph.output_names):
            raise ArtifactError(
                f"{self.label} has inputs {inputs} and outputs {outputs}; the {self.graph.name} "
                f"contract is {self.graph.input_names} -> {self.graph.output_names}"
            )
        for n in names:
            dt = _np_dtype(trt, engine.get_tensor_dtype(n))
            if dt not in (np.float32, np.float16):
                raise ArtifactError(f"{self.label}: {n} is {dt}; the contract has float I/O")
            self._dtypes[n] = dt

    def _profile_limits(self, engine) -> ShapeLimits | None:
        """The engine's own optimization profile 0 as shape limits (pixels)."""
        lo = {"batch": 0, "height": 0, "width": 0}
        opt = {}
        hi = {"batch": 1 << 30, "height": 1 << 30, "width": 1 << 30}
        for spec in self.graph.inputs:
            mins, opts, maxs = (tuple(d) for d in engine.get_tensor_profile_shape(spec.name, 0))
            for i, dim in enumerate(spec.dims):
                if isinstance(dim, str):
                    axis, scale = DIM_AXES[dim]
                    lo[axis] = max(lo[axis], mins[i] * scale)
                    hi[axis] = min(hi[axis], maxs[i] * scale)
                    opt.setdefault(axis, opts[i] * scale)
        try:
            return ShapeLimits(
                min_batch=lo["batch"], opt_batch=opt["batch"], max_batch=hi["batch"],
                min_height=lo["height"], opt_height=opt["height"], max_height=hi["height"],
                min_width=lo["width"], opt_width=opt["width"], max_width=hi["width"],
            )
        except ValueError as e:
            log.warning("%s: cannot read its optimization profile as shape limits (%s)", self.label, e)
            return None

    def _deactivate(self) -> None:
        with self._lock:
            for slot in self._slots.values():
                self._free(slot)
            self._slots.clear()
            self._last_shape = None
            if self._stream is not None:
                self._cudart.cudaStreamDestroy(self._stream)
            # destroy in dependency order: context, engine, runtime
            self._context = None
            self._engine = None
            self._runtime = None
            self._stream = None

    def _free(self, slot: _Slot) -> None:
        cudart = self._cudart
        if slot.graph_exec is not None:
            cudart.cudaGraphExecDestroy(slot.graph_exec)
            slot.graph_exec = None
        for ptr in slot.ptrs.values():
            cudart.cudaFree(ptr)
        slot.ptrs.clear()

    # ----- buffers
    def _slot(self, shape: Shape) -> _Slot:
        slot = self._slots.get(shape)
        if slot is not None:
            self._slots.move_to_end(shape)
            return slot
        ctx = self._context
        in_shapes = {t.name: t.shape(shape.batch, shape.height, shape.width) for t in self.graph.inputs}
        for name, s in in_shapes.items():
            if not ctx.set_input_shape(name, s):
                raise BackendError(f"{self.label}: set_input_shape({name}, {s}) was refused (outside "
                                   "the engine's optimization profile?)")
        shapes = dict(in_shapes)
        expected = output_shapes(self.graph, shape)
        for name in self.graph.output_names:
            s = tuple(ctx.get_tensor_shape(name))
            if s != expected[name]:
                raise BackendError(f"{self.label}: output {name} has shape {s} at {shape}, the "
                                   f"contract says {expected[name]}")
            shapes[name] = s
        # the least recently used shapes go first, so at most max_shapes buffer sets ever exist
        while len(self._slots) >= self.max_shapes:
            _, old = self._slots.popitem(last=False)
            self._free(old)
        slot = _Slot(shapes, {n: self._dtypes[n] for n in shapes})
        try:
            for name in shapes:
                slot.ptrs[name] = cuda_call(self._cudart.cudaMalloc(max(slot.nbytes(name), 1)))
        except BackendError:
            self._free(slot)
            raise
        self._slots[shape] = slot
        log.debug("%s: buffers for %s allocated", self.label, shape)
        return slot

    # ----- running
    def _infer(self, feed: dict[str, Any]) -> dict[str, Any]:
        cudart = self._cudart
        shape = request_shape(self.graph, feed)
        if self.limits is not None:  # the engine's profile: refused here with the limit it breaks
            self.limits.check(shape.batch, shape.height, shape.width)
        ref = next(iter(feed.values()))
        on_gpu = arrays.is_cuda_tensor(ref)
        if on_gpu and (ref.device.index or 0) != self.device_id:
            raise AsymInputError(f"inputs are on {ref.device}, this engine runs on cuda:{self.device_id}; "
                                 f"move them there or load the folder with device_id={ref.device.index}")
        H2D, D2H, D2D = (cudart.cudaMemcpyKind.cudaMemcpyHostToDevice,
                         cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost,
                         cudart.cudaMemcpyKind.cudaMemcpyDeviceToDevice)
        with self._lock:
            if self._context is None:  # closed by another thread while this call waited
                raise RuntimeError("this AsymVAE is closed")
            cuda_call(cudart.cudaSetDevice(self.device_id))  # the current device is per thread
            slot = self._slot(shape)
            ctx, stream = self._context, self._stream
            for spec in self.graph.inputs:
                if not ctx.set_input_shape(spec.name, slot.shapes[spec.name]):
                    raise BackendError(f"{self.label}: set_input_shape({spec.name}) was refused")
            for name, ptr in slot.ptrs.items():
                if not ctx.set_tensor_address(name, ptr):
                    raise BackendError(f"{self.label}: set_tensor_address({name}) was refused")

            # sources stay alive until the stream is synchronized
            if on_gpu:
                torch = arrays.torch_module()
                # dtype / layout conversions are queued on torch's stream: convert first, then wait
                # for that stream, so our stream never reads a half-written source
                srcs = {n: x.to(_torch_dtype(slot.dtypes[n])).contiguous() for n, x in feed.items()}
                torch.cuda.current_stream(ref.device).synchronize()
                for name, src in srcs.items():
                    cuda_call(cudart.cudaMemcpyAsync(slot.ptrs[name], src.data_ptr(), slot.nbytes(name), D2D, stream))
            else:
                srcs = {n: np.ascontiguousarray(arrays.to_numpy(x), dtype=slot.dtypes[n]) for n, x in feed.items()}
                for name, src in srcs.items():
                    cuda_call(cudart.cudaMemcpyAsync(slot.ptrs[name], src.ctypes.data, slot.nbytes(name), H2D, stream))

            self._execute(slot, shape)

            outs = {}
            for name in self.graph.output_names:
                dt = slot.dtypes[name]
                if on_gpu:
                    dst = torch.empty(slot.shapes[name], dtype=_torch_dtype(dt), device=ref.device)
                    cuda_call(cudart.cudaMemcpyAsync(dst.data_ptr(), slot.ptrs[name], slot.nbytes(name), D2D, stream))
                else:
                    dst = np.empty(slot.shapes[name], dtype=dt)
                    cuda_call(cudart.cudaMemcpyAsync(dst.ctypes.data, slot.ptrs[name], slot.nbytes(name), D2H, stream))
                outs[name] = dst
            cuda_call(cudart.cudaStreamSynchronize(stream))
            del srcs

        result = {}
        for name, v in outs.items():
            if on_gpu:
                result[name] = v.float() if v.dtype != _torch_dtype(np.dtype(np.float32)) else v
            else:
                result[name] = arrays.like(v.astype(np.float32, copy=False), ref)
        return result

    def _execute(self, slot: _Slot, shape: Shape) -> None:
        """Enqueue the engine on our stream, or replay this shape's CUDA graph.

        A captured graph holds the execution context's state at its capture shape, and the
        context is shared by every shape, so a graph is only replayed while calls keep the
        shape it was captured at (TensorRT's rule: recapture after the input shapes change).
        Another shape drops it; the second consecutive call at one shape captures it again,
        right after an ordinary enqueue at that shape (as trtexec does), and later calls replay.
        """
        cudart, ctx, stream = self._cudart, self._context, self._stream
        same = shape == self._last_shape
        self._last_shape = shape
        if self.cuda_graph and not same:
            self._drop_graphs()
        if self.cuda_graph and slot.graph_exec is not None:
            cuda_call(cudart.cudaGraphLaunch(slot.graph_exec, stream))
            return
        if not ctx.execute_async_v3(native_handle(stream)):
            raise BackendError(f"{self.label}: execute_async_v3 returned False (see the TensorRT "
                               "messages logged above)")
        if self.cuda_graph and same:
            self._capture(slot)  # this call's results are already enqueued; the next one replays

    def _drop_graphs(self) -> None:
        for slot in self._slots.values():
            if slot.graph_exec is not None:
                self._cudart.cudaGraphExecDestroy(slot.graph_exec)
                slot.graph_exec = None

    def _capture(self, slot: _Slot) -> bool:
        """Capture one execution of the context, just enqueued at this slot's shape, into a
        CUDA graph. On failure, CUDA graphs are switched off for this backend (logged)."""
        cudart, stream = self._cudart, self._stream
        cuda_call(cudart.cudaStreamSynchronize(stream))  # capture nothing but the engine's own work
        try:
            cuda_call(cudart.cudaStreamBeginCapture(
                stream, cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal))
        except BackendError as e:  # this call's results are already enqueued: keep them, stop capturing
            cudart.cudaGetLastError()
            log.warning("%s: CUDA graph capture could not start (%s); running without CUDA graphs", self.label, e)
            self.cuda_graph = False
            return False
        ok = self._context.execute_async_v3(native_handle(stream))
        err, graph = cudart.cudaStreamEndCapture(stream)
        try:
            if not ok or int(err) != 0:
                cudart.cudaGetLastError()  # clear the capture error so later calls do not see it
                log.warning("%s: CUDA graph capture failed (execute_async_v3 %s, %s); running without "
                            "CUDA graphs", self.label, ok, err)
                self.cuda_graph = False
                return False
            try:
                slot.graph_exec = cuda_call(cudart.cudaGraphInstantiate(graph, 0))
            except BackendError as e:
                log.warning("%s: CUDA graph instantiation failed (%s); running without CUDA graphs",
                            self.label, e)
                self.cuda_graph = False
                return False
        finally:
            if graph is not None and int(err) == 0:
                cudart.cudaGraphDestroy(graph)
        log.debug("%s: CUDA graph captured for %s", self.label, slot.shapes)
        return True
