"""ONNX Runtime backend: the CPU provider everywhere, the CUDA provider with IO binding on a GPU.

Threading: ``InferenceSession.run`` and ``run_with_iobinding`` are safe to call from several
threads at once on one session (ONNX Runtime documents this); this backend keeps no per-call
state on itself (an IO binding is made per call), so one activated backend serves any number
of threads without a lock.

Session settings live in one place, :func:`session_options` and :func:`provider_options`, so
a measurement can tune them without touching the backend.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from .. import arrays
from ..checks import output_shapes, request_shape
from ..errors import ArtifactError, AsymInputError, BackendUnavailableError
from ..specs import GraphSpec
from .base import Backend

log = logging.getLogger(__name__)

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def session_options(device: str):
    """SessionOptions per provider (``cpu`` or ``cuda``); the one place to tune them.

    * all graph optimizations (constant folding, fusions, NCHWc layouts on the CPU): the
      export's FP32 verification ran at this level too;
    * sequential execution: the VAE is one chain of convolutions, nothing runs in parallel
      branches, so only intra-op threads matter;
    * CPU: intra-op threads 0 = ONNX Runtime's default, one per physical core;
    * CUDA: no memory-pattern planning: it only pays off for fixed shapes, and the graphs
      are dynamic.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3  # errors only; ONNX Runtime warns about every unused initializer
    if device == "cpu":
        so.intra_op_num_threads = 0
        so.inter_op_num_threads = 1
    else:
        so.enable_mem_pattern = False
    return so


def provider_options(device: str, device_id: int = 0) -> dict:
    """Options for the execution provider of ``device``."""
    if device == "cuda":
        # * use_tf32 off: TF32 rounds convolution inputs to a 10-bit mantissa (about 1e-3
        #   relative), which would break the FP32 graphs' parity with the reference; FP16
        #   graphs keep their FP32 islands in full FP32 too.
        # * cuDNN's exhaustive algorithm search (the default) runs once per new shape and
        #   caches; a service sees few shapes many times, so keep it.
        return {"device_id": str(device_id), "use_tf32": "0"}
    return {}


def cuda_provider_available() -> bool:
    """Whether the installed onnxruntime has the CUDA provider (onnxruntime-gpu); says nothing
    about a GPU being present: a session that cannot start it falls back to the CPU."""
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    return PROVIDERS["cuda"] in ort.get_available_providers()


class OnnxRuntimeBackend(Backend):
    """One ONNX graph in an ``onnxruntime.InferenceSession`` on ``device`` (``cpu``/``cuda``)."""

    def __init__(self, graph: GraphSpec, path: str | Path, device: str = "cpu", device_id: int = 0):
        super().__init__(graph)
        if device not in PROVIDERS:
            raise ValueError(f"device {device!r}: use cpu or cuda")
        self.path = Path(path)
        self.device = device
        self.device_id = device_id
        self.name = f"onnxruntime-{device}"
        self.session = None

    def _activate(self) -> None:
        try:
            import onnxruntime as ort
        except ImportError:  # pragma: no cover - a dependency of the package
            raise BackendUnavailableError("onnxruntime is not installed (pip install onnxruntime)") from None
        providers: list = [PROVIDERS["cpu"]]
        if self.device == "cuda":
            if not cuda_provider_available():
                raise BackendUnavailableError(
                    "the installed onnxruntime has no CUDA provider; install onnxruntime-gpu "
                    "(and only it) to run ONNX Runtime on a GPU"
                )
            providers = [(PROVIDERS["cuda"], provider_options("cuda", self.device_id)), PROVIDERS["cpu"]]
        try:
            sess = ort.InferenceSession(str(self.path), session_options(self.device), providers=providers)
        except Exception as e:  # onnxruntime raises its own exception types
            raise ArtifactError(f"onnxruntime cannot load {self.path.name}: {e}") from None
        if self.device == "cuda" and PROVIDERS["cuda"] not in sess.get_providers():
            raise BackendUnavailableError(
                "onnxruntime's CUDA provider did not start (no usable GPU, or CUDA/cuDNN libraries "
                "missing); see onnxruntime's log"
            )
        self._check_io(sess)
        self.session = sess

    def _check_io(self, sess) -> None:
        got_in = [i.name for i in sess.get_inputs()]
        got_out = [o.name for o in sess.get_outputs()]
        if sorted(got_in) != sorted(self.graph.input_names) or sorted(got_out) != sorted(self.graph.output_names):
            raise ArtifactError(
                f"{self.path.name} has inputs {got_in} and outputs {got_out}; the {self.graph.name} "
                f"contract is {self.graph.input_names} -> {self.graph.output_names}"
            )
        for v in list(sess.get_inputs()) + list(sess.get_outputs()):
            if v.type != "tensor(float)":
                raise ArtifactError(
                    f"{self.path.name}: {v.name} is {v.type}; the contract has float32 inputs and "
                    "outputs (FP16 graphs cast inside)"
                )

    def _deactivate(self) -> None:
        self.session = None

    def _infer(self, feed: dict[str, Any]) -> dict[str, Any]:
        # one read of the session per call: close() from another thread sets it to None
        sess = self.session
        if sess is None:
            raise RuntimeError("this AsymVAE is closed")
        ref = next(iter(feed.values()))
        if self.device == "cuda":
            if arrays.is_cuda_tensor(ref):
                return self._infer_cuda_tensors(sess, feed)
            return self._infer_bound_host(sess, feed)
        host = {k: arrays.to_numpy(v) for k, v in feed.items()}
        outs = sess.run(self.graph.output_names, host)
        return {k: arrays.like(v, ref) for k, v in zip(self.graph.output_names, outs)}

    def _infer_bound_host(self, sess, feed: dict[str, Any]) -> dict[str, Any]:
        """Host inputs on the CUDA provider: bind them, keep outputs on the GPU until one copy back."""
        ref = next(iter(feed.values()))
        io = sess.io_binding()
        for name, v in feed.items():
            io.bind_cpu_input(name, arrays.to_numpy(v))
        for name in self.graph.output_names:
            io.bind_output(name, "cuda", self.device_id)
        sess.run_with_iobinding(io)
        outs = io.copy_outputs_to_cpu()
        return {k: arrays.like(v, ref) for k, v in zip(self.graph.output_names, outs)}

    def _infer_cuda_tensors(self, sess, feed: dict[str, Any]) -> dict[str, Any]:
        """torch CUDA tensors in and out, bound by pointer: no host round trip."""
        torch = arrays.torch_module()
        ref = next(iter(feed.values()))
        if (ref.device.index or 0) != self.device_id:
            raise AsymInputError(f"inputs are on {ref.device}, this session runs on cuda:{self.device_id}; "
                                 f"move them there or load the folder with device_id={ref.device.index}")
        shape = request_shape(self.graph, feed)
        outs = {name: torch.empty(s, dtype=torch.float32, device=ref.device)
                for name, s in output_shapes(self.graph, shape).items()}
        io = sess.io_binding()
        for name, t in feed.items():
            io.bind_input(name, "cuda", self.device_id, np.float32, tuple(t.shape), t.data_ptr())
        for name, t in outs.items():
            io.bind_output(name, "cuda", self.device_id, np.float32, tuple(t.shape), t.data_ptr())
        # the inputs were written on torch's stream; ONNX Runtime runs on its own
        torch.cuda.current_stream(ref.device).synchronize()
        sess.run_with_iobinding(io)
        io.synchronize_outputs()
        return outs
