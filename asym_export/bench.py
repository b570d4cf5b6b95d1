"""``asym-bench``: every backend side by side against the PyTorch reference, in one process.

For each variant, graph (encode, conditional decode, plain decode), batch and resolution it
measures, per backend:

* **load** time (manifest + sha256 + session/engine creation for the runtime; building or
  loading the model for diffusers) and the **first call** at each shape, apart from
* the **steady state**: median and p90 over repeated calls after warm-up, throughput in
  images/s, and the **ratio** to the reference backend. Calls are **interleaved** (one call
  per backend per round, the order rotating every round), so drift of the machine (clock,
  other load) hits every backend alike and cancels in the ratio;
* achieved **TFLOP/s** from a FLOP count of what the backend computes at that shape (torch's
  flop counter on the meta device: 2 per multiply-add; convolutions and matmuls, not the
  elementwise ops; the exported graphs' sub-pixel upsamplers need fewer than diffusers'),
  and its share of the device's **peak**, measured on the spot as the best rate of a large
  matmul on the same device (and, for known GPUs, the datasheet's dense FP16 peak);
* **memory**: host RSS growth while loading and the process's peak RSS; on a GPU the device
  memory in use after loading.

Output: a table on the terminal, JSON (``--json``) and a PNG plot of latency against
resolution per backend (``--plot``).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from asym_runtime.specs import Shape

from .artifact import write_json_atomic
from .cliutil import EXIT_FAILED, EXIT_USAGE, OneLineParser, add_debug, exit_codes, guarded, parse
from .graphs import BENCH_GRAPHS

log = logging.getLogger(__name__)

#: Dense FP16 tensor-core peaks from NVIDIA datasheets (TFLOP/s, without sparsity), matched
#: against torch.cuda.get_device_name().
DATASHEET_FP16_TFLOPS = {
    "H200": 989.4, "H100 SXM": 989.4, "H100 80GB HBM3": 989.4, "H100 NVL": 835.5, "H100 PCIe": 756.5,
    "A100": 312.0, "L40S": 362.1, "L4": 121.0, "A10": 125.0, "RTX 4090": 165.2, "T4": 65.0,
}


# --------------------------------------------------------------------------- machine

def rss_gib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**30


def peak_rss_gib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30  # KiB on Linux


def _best_rate(fn, flop: float, seconds: float, sync=lambda: None) -> float:
    """Best single-call rate (FLOP/s) of ``fn`` over ``seconds`` after one warm-up call."""
    fn()
    sync()
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        fn()
        sync()
        best = max(best, flop / (time.perf_counter() - t0))
    return best


def measured_peak_tflops(device: str, seconds: float = 0.5) -> dict:
    """The device's practical peak: the best rate of a large dense matmul, FP32 on the CPU
    (torch and numpy BLAS, 1024 and 2048 square; the best of all), FP16 on a GPU (cuBLAS,
    8192 square). A convolution kernel that packs its data well can beat a BLAS matmul
    slightly, so a share near or above 100 % means "at the FMA limit"."""
    import torch

    if device == "cpu":
        best = {"tflops": 0.0}
        for n in (1024, 2048):
            a, b = torch.randn(n, n), torch.randn(n, n)
            an, bn = a.numpy(), b.numpy()
            for name, fn in (("torch", lambda: torch.matmul(a, b)), ("numpy", lambda: an @ bn)):
                r = _best_rate(fn, 2 * n**3, seconds) / 1e12
                if r > best["tflops"]:
                    best = {"tflops": r, "matmul": f"{name} {n}x{n} float32"}
        best["threads"] = torch.get_num_threads()
        return best
    n = 8192
    a = torch.randn(n, n, dtype=torch.float16, device=device)
    b = torch.randn(n, n, dtype=torch.float16, device=device)
    r = _best_rate(lambda: torch.matmul(a, b), 2 * n**3, seconds, torch.cuda.synchronize) / 1e12
    return {"tflops": r, "matmul": f"cuBLAS {n}x{n} float16", "threads": None}


def datasheet_tflops(device_name: str) -> float | None:
    for key, value in DATASHEET_FP16_TFLOPS.items():
        if key in device_name:
            return value
    return None


def device_name(device: str) -> str:
    if device == "cpu":
        model, flags = "", set()
        try:
            with open("/proc/cpuinfo") as f:
                for ln in f:
                    if ln.startswith("model name") and not model:
                        model = ln.split(":", 1)[1].strip()
                    elif ln.startswith("flags") and not flags:
                        flags = set(ln.split(":", 1)[1].split())
        except OSError:
            pass
        # the units BF16/FP16 speed depends on (AMX tiles, AVX-512 BF16/FP16)
        units = [f for f in ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_fp16") if f in flags]
        bf16 = "BF16 units" if {"avx512_bf16", "amx_bf16"} & flags else "no BF16 units"
        extra = f" ({', '.join(units) or 'no vector flags read'}; {bf16})" if flags else ""
        return f"{model or platform.processor() or platform.machine()}, {os.cpu_count()} cores{extra}"
    import torch

    return torch.cuda.get_device_name()


@contextlib.contextmanager
def _no_grad():
    import torch

    with torch.inference_mode():
        yield


def graph_tflop(variant: str, graph: str, shape: Shape, exported: bool = True) -> float:
    """TFLOP of one call (2 per multiply-add) from torch's flop counter, on the meta device
    (shapes only, no memory, no time). ``exported=True``: what the exported graphs compute
    (sub-pixel upsamplers); ``False``: diffusers' own formulation, what eager PyTorch runs."""
    import torch
    from diffusers import AsymmetricAutoencoderKL
    from torch.utils.flop_counter import FlopCounterMode

    from .variants import get_variant

    entry = BENCH_GRAPHS[graph]
    with torch.device("meta"):
        model = AsymmetricAutoencoderKL(**get_variant(variant).config).eval()
        args = [torch.empty(t.shape(shape.batch, shape.height, shape.width)) for t in entry.spec.inputs]
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        entry.wrapper(model, exported)(*args)
    return counter.get_total_flops() / 1e12


# --------------------------------------------------------------------------- backends

@dataclass
class Backend:
    """One thing to time: a label, how it loads, and one callable per graph."""

    name: str
    device: str
    load_s: float = 0.0
    load_rss_gib: float = 0.0
    device_mem_gib: float | None = None
    calls: dict = field(default_factory=dict, repr=False)  # graph -> fn(feed) -> output
    close: object = field(default=None, repr=False)


def _device_used_gib() -> float | None:
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        free, total = torch.cuda.mem_get_info()
        return (total - free) / 2**30
    except Exception:  # noqa: BLE001 - a report field, never a reason to fail
        return None


def _timed_load(name: str, device: str, fn) -> Backend:
    gc.collect()
    rss0, dev0 = rss_gib(), _device_used_gib()
    t0 = time.perf_counter()
    calls, close = fn()
    b = Backend(name, device, time.perf_counter() - t0, rss_gib() - rss0, calls=calls, close=close)
    dev1 = _device_used_gib()
    if dev0 is not None and dev1 is not None:
        b.device_mem_gib = dev1 - dev0
    return b


def diffusers_backend(manifest, device: str, dtype: str, cache: dict | None = None) -> Backend:
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


def torch_compile_backend(manifest, device: str, cache: dict | None = None) -> Backend:
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
RUNTIME_BACKENDS = {
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
TORCH_BACKENDS = ("diffusers-fp32", "diffusers-bf16", "diffusers-fp16", "torch-compile-fp16")


def runtime_backend(folder: Path, name: str, provider_options: dict | None = None) -> Backend:
    """asym_runtime.load with the arguments of ``name`` (:data:`RUNTIME_BACKENDS`): numpy in,
    numpy out (what a service sees). ``provider_options``: precision -> ONNX Runtime CUDA
    options replacing the runtime's defaults."""
    import asym_runtime

    spec = dict(RUNTIME_BACKENDS[name])
    if spec["backend"] == "onnxruntime-cuda" and provider_options:
        spec["provider_options"] = provider_options.get(spec["precision"])

    def load():
        vae = asym_runtime.load(folder, **spec)
        calls = {name: (lambda feed, call=g.runtime_call: call(vae, feed)) for name, g in BENCH_GRAPHS.items()}
        return calls, vae.close

    return _timed_load(name, "cpu" if spec["backend"] == "onnxruntime-cpu" else "cuda", load)


# --------------------------------------------------------------------------- measuring

@dataclass
class Row:
    """One backend x graph x shape."""

    variant: str
    backend: str
    graph: str
    shape: str
    batch: int
    height: int
    width: int
    first_call_s: float
    median_s: float
    p90_s: float
    times_s: list
    images_per_s: float
    tflop: float
    tflops: float
    peak_share: float
    ratio_vs_reference: float | None = None  # reference median / this median: > 1 is faster
    ratio_vs_compile: float | None = None  # torch-compile-fp16 median / this median, when it ran
    datasheet_share: float | None = None  # of the GPU's datasheet dense FP16 peak, when known

    def to_dict(self) -> dict:
        return asdict(self)


def _p90(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(0.9 * (len(xs) - 1))))]


def measure(backends: list[Backend], graph: str, shape: Shape, feed: dict, *, warmup: int,
            repeats: int) -> dict[str, tuple[float, list[float]]]:
    """First call, then ``warmup`` untimed calls, then ``repeats`` interleaved timed rounds."""
    first = {}
    for b in backends:
        t0 = time.perf_counter()
        b.calls[graph](feed)
        first[b.name] = time.perf_counter() - t0
        for _ in range(warmup):
            b.calls[graph](feed)
    times: dict[str, list[float]] = {b.name: [] for b in backends}
    for r in range(repeats):
        order = backends[r % len(backends):] + backends[:r % len(backends)]  # rotate: no position bias
        for b in order:
            t0 = time.perf_counter()
            b.calls[graph](feed)
            times[b.name].append(time.perf_counter() - t0)
    return {name: (first[name], ts) for name, ts in times.items()}


def run_benchmark(variant: str, folder: Path, *, backends: list[str], graphs: list[str],
                  sizes: list[tuple[int, int]], batches: list[int], warmup: int, repeats: int,
                  reference: str, seed: int = 0, progress=print, provider_options: dict | None = None,
                  reference_cache: dict | None = None) -> dict:
    """Load every backend, measure every graph x shape, return the JSON-ready result."""
    import torch

    import asym_runtime

    from .feeds import make_feed

    manifest = asym_runtime.read_manifest(folder)
    if manifest.variant != variant:
        raise ValueError(f"{folder} holds variant {manifest.variant}, not {variant}")
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    peak = measured_peak_tflops(device)
    name = device_name(device)
    machine = {"device": name, "measured_peak_tflops": round(peak["tflops"], 3), "peak_matmul": peak["matmul"],
               "datasheet_fp16_tflops": datasheet_tflops(name) if cuda else None,
               "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
               "platform": platform.platform()}
    progress(f"device: {name}; measured matmul peak {peak['tflops']:.3f} TFLOP/s ({peak['matmul']})")

    loaded: list[Backend] = []
    for spec in [reference] + [b for b in backends if b != reference]:
        progress(f"loading {spec} ...")
        if spec == "torch-compile-fp16":
            loaded.append(torch_compile_backend(manifest, device, reference_cache))
        elif spec.startswith("diffusers-"):
            loaded.append(diffusers_backend(manifest, device, spec.rpartition("-")[2], reference_cache))
        else:
            loaded.append(runtime_backend(folder, spec, provider_options))
        b = loaded[-1]
        progress(f"  {b.name}: load {b.load_s:.2f} s, +{b.load_rss_gib:.2f} GiB RSS")

    rows: list[Row] = []
    skipped = []
    for graph in graphs:
        for batch in batches:
            for h, w in sizes:
                shape = Shape(batch, h, w)
                if not manifest.limits.contains(shape):
                    skipped.append({"graph": graph, "shape": str(shape), "reason": "outside the shape limits"})
                    continue
                feed = make_feed(BENCH_GRAPHS[graph].spec, shape, seed, manifest.scaling_factor)
                tflop = {True: graph_tflop(variant, graph, shape, exported=True),
                         False: graph_tflop(variant, graph, shape, exported=False)}
                progress(f"{graph} {shape}: {tflop[True]:.3f} TFLOP per call (diffusers: {tflop[False]:.3f}) ...")
                res = measure(loaded, graph, shape, feed, warmup=warmup, repeats=repeats)
                ref_median = statistics.median(res[loaded[0].name][1])
                compiled = res.get("torch-compile-fp16")
                compile_median = statistics.median(compiled[1]) if compiled else None
                progress("  " + "; ".join(f"{b.name} {1000 * statistics.median(res[b.name][1]):.1f} ms "
                                          f"(first {res[b.name][0]:.2f} s)" for b in loaded))
                for b in loaded:
                    first, ts = res[b.name]
                    med = statistics.median(ts)
                    fl = tflop[not b.name.startswith("diffusers")]  # the FLOPs this backend executes
                    sheet = machine["datasheet_fp16_tflops"]
                    rows.append(Row(variant, b.name, graph, str(shape), batch, h, w, first, med, _p90(ts), ts,
                                    batch / med, fl, fl / med, fl / med / peak["tflops"], ref_median / med,
                                    compile_median / med if compile_median else None,
                                    fl / med / sheet if sheet else None))
    for b in loaded:
        if b.close:
            b.close()
    return {
        "variant": variant, "artifact": str(folder), "reference": loaded[0].name,
        "settings": {"warmup": warmup, "repeats": repeats, "seed": seed, "interleaved": True},
        "machine": machine,
        "backends": [{"name": b.name, "device": b.device, "load_s": round(b.load_s, 3),
                      "load_rss_gib": round(b.load_rss_gib, 3), "device_mem_gib": b.device_mem_gib}
                     for b in loaded],
        "peak_rss_gib": round(peak_rss_gib(), 3),
        "rows": [r.to_dict() for r in rows],
        "skipped": skipped,
    }


# --------------------------------------------------------------------------- output

def table(result: dict) -> str:
    compiled = any(r.get("ratio_vs_compile") for r in result["rows"])
    head = ("graph", "shape", "backend", "first s", "median s", "p90 s", "img/s", "TFLOP/s", "% peak", "x ref") \
        + (("x compile",) if compiled else ())
    rows = [head]
    for r in result["rows"]:
        rows.append((r["graph"], r["shape"], r["backend"], f"{r['first_call_s']:.3f}", f"{r['median_s']:.4f}",
                     f"{r['p90_s']:.4f}", f"{r['images_per_s']:.2f}", f"{r['tflops']:.3f}",
                     f"{100 * r['peak_share']:.1f}", f"{r['ratio_vs_reference']:.2f}")
                    + ((f"{r['ratio_vs_compile']:.2f}" if r.get("ratio_vs_compile") else "-",) if compiled else ()))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(head))]
    lines = ["  ".join(str(v).rjust(w) if i > 2 else str(v).ljust(w) for i, (v, w) in enumerate(zip(row, widths)))
             for row in rows]
    loads = "; ".join(f"{b['name']} load {b['load_s']:.2f} s (+{b['load_rss_gib']:.2f} GiB)" for b in result["backends"])
    m = result["machine"]
    return "\n".join(lines + ["", loads, f"peak RSS {result['peak_rss_gib']:.2f} GiB; {m['device']}; "
                              f"measured peak {m['measured_peak_tflops']:.3f} TFLOP/s ({m['peak_matmul']}); "
                              f"x ref = {result['reference']} median / backend median"
                              + ("; x compile = torch-compile-fp16 median / backend median" if compiled else "")])


def plot(result: dict, path: Path) -> Path:
    """Latency (median, p90 as error bar) against resolution, one line per backend, one panel
    per graph and batch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    graphs = [g for g in BENCH_GRAPHS if any(r["graph"] == g for r in rows)]
    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(len(graphs), len(batches), figsize=(5.5 * len(batches), 3.6 * len(graphs)),
                             squeeze=False)
    for (i, graph), (j, batch) in ((gi, bj) for gi in enumerate(graphs) for bj in enumerate(batches)):
        ax = axes[i][j]
        for backend in dict.fromkeys(r["backend"] for r in rows):
            pts = sorted((r["height"] * r["width"], r["median_s"], r["p90_s"])
                         for r in rows if r["graph"] == graph and r["batch"] == batch and r["backend"] == backend)
            if not pts:
                continue
            x = [np.sqrt(p[0]) for p in pts]
            med = [p[1] for p in pts]
            err = [p[2] - p[1] for p in pts]
            ax.errorbar(x, med, yerr=[np.zeros(len(err)), err], marker="o", capsize=3, label=backend)
        ax.set_title(f"{result['variant']} {graph}, batch {batch}", fontsize=10)
        ax.set_xlabel("resolution: sqrt(H x W) pixels")
        ax.set_ylabel("median latency (s); bar to p90")
        ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"asym-bench on {result['machine']['device']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- CLI

def available_backends() -> list[str]:
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


def _parse_list(text: str, what: str, allowed=None) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise ValueError(f"{what}: empty list")
    if allowed is not None:
        bad = [t for t in items if t not in allowed]
        if bad:
            raise ValueError(f"{what}: unknown {', '.join(bad)}; choose from {', '.join(allowed)}")
    return items


DESCRIPTION = """\
Time every backend against the PyTorch reference in one process: for each graph, batch and
size, the load time, the first call (apart), and the steady state over interleaved rounds
(one call per backend per round, the order rotating, so drift of the machine hits every
backend alike): median and p90 latency, images/s, the ratio to the reference and, where
torch.compile ran, to it; TFLOP/s from a FLOP count of what each backend computes, and its
share of the device's peak (a large matmul measured on the spot; on known GPUs also the
datasheet's FP16 peak); host and GPU memory. A table on the terminal, JSON and a PNG plot.
"""

EPILOG = f"""\
backends: {", ".join(RUNTIME_BACKENDS)} (asym_runtime);
  {", ".join(TORCH_BACKENDS)} (PyTorch).
  ort-cuda-* run the folder's CUDA form, *-portable the standard graphs, *-cudagraph replay a
  CUDA graph; openvino-cpu-* run the FP32 graphs with OpenVINO (bf16: BF16 compute, on CPUs
  with BF16 units); every ort-*, openvino-* and tensorrt-* call is numpy in, numpy out.
graphs: {", ".join(BENCH_GRAPHS)}.

examples:
  asym-bench --variant x2 --sizes 256                              # CPU: ONNX Runtime vs diffusers FP32
  asym-bench --variant x2 --artifact artifacts/x2 --sizes 512,1024 --json b.json --plot b.png
  asym-bench --variant x2 --artifact artifacts/x2 --backends torch-compile-fp16,ort-cuda-fp16 --sizes 512

{exit_codes("measured", "the implicit export failed or a backend could not run", "bad arguments or an unusable artifact folder")}
"""


def build_parser() -> argparse.ArgumentParser:
    from .variants import VARIANTS

    p = OneLineParser(prog="asym-bench", description=DESCRIPTION, epilog=EPILOG)
    add_debug(p)
    p.add_argument("--variant", default="x2", choices=list(VARIANTS), metavar="{" + ",".join(VARIANTS) + "}",
                   help="the model (default x2)")
    p.add_argument("--artifact", type=Path, metavar="DIR",
                   help="an artifact folder of that variant (default: export one with --random-weights "
                        "--seed 0 into a temporary folder first)")
    p.add_argument("--backends", metavar="LIST",
                   help="comma-separated backends to time against the reference (listed below; default: on a "
                        "CPU ort-cpu-fp32, ort-cpu-fp16, and where OpenVINO is installed openvino-cpu-fp32 "
                        "(plus openvino-cpu-bf16 and diffusers-bf16 on CPUs with BF16 units); on a GPU "
                        "torch-compile-fp16, ort-cuda-fp32, ort-cuda-fp16, ort-cuda-fp16-cudagraph, and "
                        "tensorrt-engine where it runs)")
    p.add_argument("--reference", default=None, choices=["diffusers-fp32", "diffusers-fp16"],
                   help="the backend ratios are taken against (default: diffusers-fp32 on a CPU, "
                        "diffusers-fp16 on a GPU)")
    p.add_argument("--graphs", default=",".join(BENCH_GRAPHS), metavar="LIST",
                   help=f"comma-separated, of {', '.join(BENCH_GRAPHS)} (default: all)")
    p.add_argument("--sizes", default="256", metavar="LIST",
                   help="resolutions, N or HxW pixels, comma separated (default 256)")
    p.add_argument("--batches", default="1", metavar="LIST", help="batch sizes, comma separated (default 1)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls per backend after the first (default 1)")
    p.add_argument("--repeats", type=int, default=5, help="timed interleaved rounds (default 5)")
    p.add_argument("--json", type=Path, metavar="FILE", help="write the full result (every timing) as JSON")
    p.add_argument("--plot", type=Path, metavar="FILE", help="write a PNG of latency against resolution")
    return p


def main(argv: list[str] | None = None) -> int:
    args, code = parse(build_parser(), argv)
    if args is None:
        return code
    logging.basicConfig(level=logging.WARNING, format="%(name)s %(levelname)s: %(message)s")
    return guarded("asym-bench", args.debug, lambda: _main(args, argv))


def _main(args, argv) -> int:
    from asym_runtime.specs import parse_size

    from .variants import VARIANTS

    try:
        if args.variant not in VARIANTS:
            raise ValueError(f"unknown variant {args.variant!r}; choose one of {', '.join(VARIANTS)}")
        graphs = _parse_list(args.graphs, "--graphs", list(BENCH_GRAPHS))
        sizes = [parse_size(s) for s in _parse_list(args.sizes, "--sizes")]
        batches = [int(b) for b in _parse_list(args.batches, "--batches")]
        if any(b < 1 for b in batches) or args.repeats < 1 or args.warmup < 0:
            raise ValueError("--batches and --repeats must be >= 1, --warmup >= 0")
        import torch

        reference = args.reference or ("diffusers-fp16" if torch.cuda.is_available() else "diffusers-fp32")
        if reference not in ("diffusers-fp32", "diffusers-fp16"):
            raise ValueError(f"--reference {reference}: use diffusers-fp32 or diffusers-fp16")
        if reference == "diffusers-fp16" and not torch.cuda.is_available():
            raise ValueError("--reference diffusers-fp16 needs a GPU (PyTorch FP16 on a CPU is no reference)")
        allowed = list(RUNTIME_BACKENDS) + list(TORCH_BACKENDS)
        backends = _parse_list(args.backends, "--backends", allowed) if args.backends else available_backends()
        if not torch.cuda.is_available():
            gpu_only = [b for b in backends if b == "torch-compile-fp16" or "cuda" in b or b == "tensorrt-engine"]
            if gpu_only:
                raise ValueError(f"--backends {','.join(gpu_only)}: need a GPU")
    except ValueError as e:
        print(f"asym-bench: error: {e}", file=sys.stderr)
        return 2

    from .verify import VerificationError

    try:
        with contextlib.ExitStack() as stack:
            folder = args.artifact
            if folder is None:
                from .export import ExportOptions, export_artifact
                from .progress import ConsoleProgress

                tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="asym-bench-")))
                folder = tmp / args.variant
                print(f"no --artifact: exporting {args.variant} with seeded random weights into {folder}")
                export_artifact(ExportOptions(variant=args.variant, out=folder, random_weights=True, seed=0),
                                ConsoleProgress())
            result = run_benchmark(args.variant, folder, backends=backends, graphs=graphs, sizes=sizes,
                                   batches=batches, warmup=args.warmup, repeats=args.repeats,
                                   reference=reference)
    except VerificationError as e:  # the implicit export did not verify: show what failed
        print(e.report.table(), file=sys.stderr)
        print(f"asym-bench: error: {e}", file=sys.stderr)
        return 1
    except ValueError as e:  # an unusable folder or bad input (ArtifactError, AsymInputError ...)
        print(f"asym-bench: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (RuntimeError, OSError) as e:  # a failed export, an unavailable backend
        print(f"asym-bench: error: {e}", file=sys.stderr)
        return EXIT_FAILED
    result["command"] = "asym-bench " + " ".join(argv if argv is not None else sys.argv[1:])
    print(table(result))
    for s in result["skipped"]:
        print(f"skipped {s['graph']} {s['shape']}: {s['reason']}")
    try:
        if args.json:
            write_json_atomic(args.json, result)
            print(f"wrote {args.json}")
        if args.plot:
            plot(result, args.plot)
            print(f"wrote {args.plot}")
    except OSError as e:
        print(f"asym-bench: error: cannot write the results: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
