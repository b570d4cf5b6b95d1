"""asym-bench's contenders: what can be timed, how each one loads (its load time and memory
recorded) and one callable per graph, numpy in; which of them run on this machine by default.

The runtime's contenders are ``asym_runtime.load`` configurations; the PyTorch ones are diffusers
eager and ``torch.compile``, built from the folder's weights (``asym_export.reference``). All are
named ``BACKEND/PRECISION[/OPTION]`` (``asym_runtime.names``), and every contender calls each
graph as ``asym_export.graphs`` declares it.
"""

from __future__ import annotations

import contextlib
import gc
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from asym_runtime.names import BACKENDS, BackendName, parse_backend_name

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


def diffusers_contender(manifest, device: str, dtype: str, cache: dict | None = None,
                        allow_pickle: bool = False) -> Contender:
    """diffusers eager, built from the manifest's weights source, on ``device`` in ``dtype``."""
    import torch

    from .reference import reference_from_manifest

    def load():
        vae = reference_from_manifest(manifest, cache, allow_pickle).to(device)  # float32, as built or loaded
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

    return _timed_load(str(BackendName("diffusers", dtype)), device, load)


def torch_compile_contender(manifest, device: str, cache: dict | None = None, allow_pickle: bool = False) -> Contender:
    """What a PyTorch user would run instead of this toolkit: the diffusers model in FP16,
    channels-last, under ``torch.compile`` (default mode, one static compilation per shape).
    Compilation happens in the first call at each shape, which the table reports apart."""
    import torch

    from .reference import reference_from_manifest

    def load():
        vae = reference_from_manifest(manifest, cache, allow_pickle).to(device).half().to(memory_format=torch.channels_last).eval()

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

    return _timed_load(str(BackendName("torch-compile", "fp16")), device, load)


#: asym-bench's runtime contenders: ``asym_runtime.load`` configurations, written as the runtime
#: names them (``BACKEND/PRECISION[/OPTION]``, asym_runtime.names). ``onnxruntime-cuda`` runs the
#: folder's CUDA form where it has one (as load() does by default), ``/portable`` the standard
#: graphs, ``/cudagraph`` replays CUDA graphs; ``tensorrt`` alone runs the engines as built (its
#: rows then name the precision they were built in).
RUNTIME_CONTENDERS = (
    "onnxruntime-cpu/fp32", "onnxruntime-cpu/fp16",
    "onnxruntime-cuda/fp32", "onnxruntime-cuda/fp16", "onnxruntime-cuda/fp16/cudagraph",
    "onnxruntime-cuda/fp32/portable", "onnxruntime-cuda/fp16/portable",
    "tensorrt", "tensorrt/fp32", "tensorrt/fp16",
    "openvino/fp32", "openvino/bf16",
)
#: The PyTorch contenders in the same scheme: diffusers eager and torch.compile, by precision.
TORCH_CONTENDERS = ("diffusers/fp32", "diffusers/bf16", "diffusers/fp16", "torch-compile/fp16")
#: asym-bench's names from before the one scheme -> today's (the CLI accepts them with a note).
OLD_NAMES = {
    "ort-cpu-fp32": "onnxruntime-cpu/fp32", "ort-cpu-fp16": "onnxruntime-cpu/fp16",
    "ort-cuda-fp32": "onnxruntime-cuda/fp32", "ort-cuda-fp16": "onnxruntime-cuda/fp16",
    "ort-cuda-fp16-cudagraph": "onnxruntime-cuda/fp16/cudagraph",
    "ort-cuda-fp32-portable": "onnxruntime-cuda/fp32/portable",
    "ort-cuda-fp16-portable": "onnxruntime-cuda/fp16/portable",
    "tensorrt-engine": "tensorrt", "openvino-cpu-fp32": "openvino/fp32", "openvino-cpu-bf16": "openvino/bf16",
    "diffusers-fp32": "diffusers/fp32", "diffusers-bf16": "diffusers/bf16", "diffusers-fp16": "diffusers/fp16",
    "torch-compile-fp16": "torch-compile/fp16",
}
#: Backends of the PyTorch contenders (not asym_runtime's).
TORCH_BACKENDS = ("diffusers", "torch-compile")
#: Backends that need a GPU.
GPU_BACKENDS = ("onnxruntime-cuda", "tensorrt", "torch-compile")


def parse_contender(text: str) -> BackendName:
    """A contender's written name -> its parts (asym_runtime.names); refuses what asym-bench
    cannot time."""
    if text not in RUNTIME_CONTENDERS + TORCH_CONTENDERS:
        raise ValueError(f"asym-bench cannot time {text!r}; choose from "
                         f"{', '.join(RUNTIME_CONTENDERS + TORCH_CONTENDERS)}")
    return parse_backend_name(text, BACKENDS + TORCH_BACKENDS)


def runtime_contender(folder: Path, name: BackendName, provider_options: dict | None = None) -> Contender:
    """asym_runtime.load with the arguments ``name`` stands for: numpy in, numpy out (what a
    service sees). ``provider_options``: precision -> ONNX Runtime CUDA options replacing the
    runtime's defaults. The contender is named with the precision that loaded."""
    import asym_runtime

    spec = name.load_kwargs()
    if spec["backend"] == "onnxruntime-cuda" and provider_options:
        spec["provider_options"] = provider_options.get(spec["precision"])
    loaded = []

    def load():
        vae = asym_runtime.load(folder, **spec)
        loaded.append(vae)
        calls = {g_name: (lambda feed, call=g.runtime_call: call(vae, feed)) for g_name, g in BENCH_GRAPHS.items()}
        return calls, vae.close

    c = _timed_load(str(name), "cpu" if spec["backend"] in ("onnxruntime-cpu", "openvino") else "cuda", load)
    c.name = str(replace(name, precision=loaded[0].precision))
    c.device = "cpu" if loaded[0].device == "cpu" else "cuda"  # where it computed, as the runtime says
    return c


def offered_by(folder: Path, names: list[str]) -> tuple[list[str], list[str]]:
    """``names`` split into (what the artifact ``folder`` can run, what it lacks): ONNX Runtime
    needs graphs of the name's precision, OpenVINO the FP32 graphs, TensorRT engines; the
    PyTorch contenders need nothing from it."""
    from asym_runtime import read_manifest
    from asym_runtime.manifest import FORMAT_ONNX, FORMAT_PLAN

    files = read_manifest(folder).files.values()
    onnx = {e.precision for e in files if e.format == FORMAT_ONNX and e.role == "decoder"}
    engines = any(e.format == FORMAT_PLAN for e in files)
    keep, lacks = [], []
    for text in names:
        n = parse_backend_name(text, BACKENDS + tuple(c.split("/")[0] for c in TORCH_CONTENDERS))
        ok = {"tensorrt": engines, "openvino": "fp32" in onnx}.get(
            n.backend, n.backend not in BACKENDS or n.precision is None or n.precision in onnx)
        (keep if ok else lacks).append(text)
    return keep, lacks


def default_contenders() -> list[str]:
    """The contenders that can run on this machine, by name."""
    import torch

    out = ["onnxruntime-cpu/fp32", "onnxruntime-cpu/fp16"]
    gpu = torch.cuda.is_available()
    if gpu:  # on a GPU the CPU provider is no contender, and a decode there takes minutes
        out = ["torch-compile/fp16"]
    try:
        from asym_runtime.backends.onnxrt import cuda_provider_available

        if gpu and cuda_provider_available():
            out += ["onnxruntime-cuda/fp32", "onnxruntime-cuda/fp16", "onnxruntime-cuda/fp16/cudagraph"]
    except ImportError:  # pragma: no cover
        pass
    from .engines import tensorrt_unavailable_reason

    if tensorrt_unavailable_reason() is None:
        out.append("tensorrt")
    if not gpu:
        from asym_runtime.backends import openvino as ov

        if ov.unavailable_reason() is None:
            out.append("openvino/fp32")
            if ov.bf16_reason() is None:  # like with like: torch's BF16 beside OpenVINO's
                out += ["openvino/bf16", "diffusers/bf16"]
    return out
