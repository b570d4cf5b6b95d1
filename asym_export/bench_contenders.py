"""asym-bench's contenders: what can be timed, how each one loads (its load time and memory
recorded) and one callable per graph, numpy in; which of them run on this machine by default.

The runtime's contenders are ``asym_runtime.load`` configurations; the PyTorch ones are diffusers
eager and ``torch.compile``, built from the folder's weights (``asym_export.reference``). Every
contender calls each graph as ``asym_export.graphs`` declares it.
"""

from __future__ import annotations

import contextlib
import gc
import time
from dataclasses import dataclass, field
from pathlib import Path

from .bench_machine import device_used_gib, rss_gib
from .graphs import BENCH_GRAPHS


@contextlib.contextmanager
def _no_grad():
    import torch

    with torch.inference_mode():
        yield


@dataclass
class Contender:
    """One thing to time: its name, where it computes, what loading it cost, one callable per
    graph (asym-bench's graph name -> fn(feed)) and how to free it."""

    name: str
    device: str
    load_s: float = 0.0
    load_rss_gib: float = 0.0
    device_mem_gib: float | None = None
    calls: dict = field(default_factory=dict, repr=False)  # graph -> fn(feed) -> output
    close: object = field(default=None, repr=False)


def _timed_load(name: str, device: str, fn) -> Contender:
    gc.collect()
    rss0, dev0 = rss_gib(), device_used_gib()
    t0 = time.perf_counter()
    calls, close = fn()
    b = Contender(name, device, time.perf_counter() - t0, rss_gib() - rss0, calls=calls, close=close)
    dev1 = device_used_gib()
    if dev0 is not None and dev1 is not None:
        b.device_mem_gib = dev1 - dev0
    return b


def diffusers_contender(manifest, device: str, dtype: str, cache: dict | None = None) -> Contender:
    """diffusers eager, built from the manifest's weights source, on ``device`` in ``dtype``."""
    import torch

    from .reference import reference_from_manifest

    def load():
        vae = reference_from_manifest(manifest, cache).to(device)  # float32, as built or loaded
        if dtype == "fp16":
            vae = vae.half()
        elif dtype == "bf16":  # torch's own BF16 on a CPU: what a PyTorch user tries first
            vae = vae.to(torch.bfloat16)
        tdtype = next(vae.parameters()).dtype
        sync = torch.cuda.synchronize if device != "cpu" else (lambda: None)

        def prep(feed):
            return {k: torch.from_numpy(v).to(device=device, dtype=tdtype) for k, v in feed.items()}

        def run(diffusers_call):
            def call(feed):
                with _no_grad():
                    out = diffusers_call(vae, prep(feed))
                sync()
                return out
            return call

        return {name: run(g.diffusers_call) for name, g in BENCH_GRAPHS.items()}, None

    return _timed_load(f"diffusers-{dtype}", device, load)


def torch_compile_contender(manifest, device: str, cache: dict | None = None) -> Contender:
    """What a PyTorch user would run instead of this toolkit: the diffusers model in FP16,
    channels-last, under ``torch.compile`` (default mode, one static compilation per shape).
    Compilation happens in the first call at each shape, which the table reports apart."""
    import torch

    from .reference import reference_from_manifest

    def load():
        vae = reference_from_manifest(manifest, cache).to(device).half().to(memory_format=torch.channels_last).eval()

        def prep(feed):
            return {k: torch.from_numpy(v).to(device=device, dtype=torch.float16).contiguous(
                memory_format=torch.channels_last) for k, v in feed.items()}

        def run(diffusers_call):
            fn = torch.compile(lambda t: diffusers_call(vae, t), dynamic=False)

            def call(feed):
                with _no_grad():
                    out = fn(prep(feed))
                if device != "cpu":
                    torch.cuda.synchronize()
                return out
            return call

        return {name: run(g.diffusers_call) for name, g in BENCH_GRAPHS.items()}, None

    return _timed_load("torch-compile-fp16", device, load)


#: asym-bench's names for the runtime configurations it can time -> asym_runtime.load arguments.
#: ``ort-cuda-*`` run the folder's CUDA form where it has one (as load() does by default);
#: ``*-portable`` force the standard graphs; ``*-cudagraph`` replay CUDA graphs.
RUNTIME_CONTENDERS = {
    "ort-cpu-fp32": {"backend": "onnxruntime-cpu", "precision": "fp32"},
    "ort-cpu-fp16": {"backend": "onnxruntime-cpu", "precision": "fp16"},
    "ort-cuda-fp32": {"backend": "onnxruntime-cuda", "precision": "fp32"},
    "ort-cuda-fp16": {"backend": "onnxruntime-cuda", "precision": "fp16"},
    "ort-cuda-fp16-cudagraph": {"backend": "onnxruntime-cuda", "precision": "fp16", "cuda_graph": True},
    "ort-cuda-fp32-portable": {"backend": "onnxruntime-cuda", "precision": "fp32", "graph_form": "portable"},
    "ort-cuda-fp16-portable": {"backend": "onnxruntime-cuda", "precision": "fp16", "graph_form": "portable"},
    "tensorrt-engine": {"backend": "tensorrt", "precision": None},
    "openvino-cpu-fp32": {"backend": "openvino", "precision": "fp32"},
    "openvino-cpu-bf16": {"backend": "openvino", "precision": "bf16"},
}
TORCH_CONTENDERS = ("diffusers-fp32", "diffusers-bf16", "diffusers-fp16", "torch-compile-fp16")


def runtime_contender(folder: Path, name: str, provider_options: dict | None = None) -> Contender:
    """asym_runtime.load with the arguments of ``name`` (:data:`RUNTIME_CONTENDERS`): numpy in,
    numpy out (what a service sees). ``provider_options``: precision -> ONNX Runtime CUDA
    options replacing the runtime's defaults."""
    import asym_runtime

    spec = dict(RUNTIME_CONTENDERS[name])
    if spec["backend"] == "onnxruntime-cuda" and provider_options:
        spec["provider_options"] = provider_options.get(spec["precision"])

    def load():
        vae = asym_runtime.load(folder, **spec)
        calls = {name: (lambda feed, call=g.runtime_call: call(vae, feed)) for name, g in BENCH_GRAPHS.items()}
        return calls, vae.close

    return _timed_load(name, "cpu" if spec["backend"] == "onnxruntime-cpu" else "cuda", load)


def default_contenders() -> list[str]:
    """Runtime backends that can run on this machine."""
    import torch

    out = ["ort-cpu-fp32", "ort-cpu-fp16"]
    gpu = torch.cuda.is_available()
    if gpu:  # on a GPU the CPU provider is no contender, and a decode there takes minutes
        out = ["torch-compile-fp16"]
    try:
        from asym_runtime.backends.onnxrt import cuda_provider_available

        if gpu and cuda_provider_available():
            out += ["ort-cuda-fp32", "ort-cuda-fp16", "ort-cuda-fp16-cudagraph"]
    except ImportError:  # pragma: no cover
        pass
    from .engines import tensorrt_unavailable_reason

    if tensorrt_unavailable_reason() is None:
        out.append("tensorrt-engine")
    if not gpu:
        from asym_runtime.backends import openvino as ov

        if ov.unavailable_reason() is None:
            out.append("openvino-cpu-fp32")
            if ov.bf16_reason() is None:  # like with like: torch's BF16 beside OpenVINO's
                out += ["openvino-cpu-bf16", "diffusers-bf16"]
    return out
