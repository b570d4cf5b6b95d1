"""asym-bench's measurement: every contender at every graph x shape, interleaved rounds, and the
JSON-ready result (one :class:`Row` per contender x graph x shape, the machine, the loads)."""

from __future__ import annotations

import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from asym_runtime.specs import Shape

from .bench_contenders import (Contender, diffusers_contender, parse_contender, runtime_contender,
                               torch_compile_contender)
from .bench_flops import graph_tflop
from .bench_machine import datasheet_tflops, device_name, measured_peak_tflops, peak_rss_gib
from .graphs import BENCH_GRAPHS


#: What every row is also compared with, besides the reference, when that contender ran:
#: (Row field = its median / the row's median, the table's column, the contender).
VERSUS = (("ratio_vs_compile", "x compile", "torch-compile/fp16"),
          ("ratio_vs_torch_bf16", "x torch bf16", "diffusers/bf16"))


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
    ratio_vs_compile: float | None = None  # torch-compile/fp16 median / this median, when it ran (VERSUS)
    datasheet_share: float | None = None  # of the GPU's datasheet dense FP16 peak, when known
    ratio_vs_torch_bf16: float | None = None  # diffusers/bf16 median / this median, when it ran (VERSUS)
    kernels: dict | None = None  # GPU work per call (bench_kernels.summarise), with kernels=True

    def to_dict(self) -> dict:
        return asdict(self)


def _p90(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(0.9 * (len(xs) - 1))))]


def measure(backends: list[Contender], graph: str, shape: Shape, feed: dict, *, warmup: int,
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
                  reference_cache: dict | None = None, kernels: bool = False, allow_pickle: bool = False) -> dict:
    """Load every backend, measure every graph x shape, return the JSON-ready result.

    ``backends`` and ``reference``: contender names, ``BACKEND/PRECISION[/OPTION]``
    (:data:`~asym_export.bench_contenders.RUNTIME_CONTENDERS`, ``TORCH_CONTENDERS``).
    ``kernels`` (GPU only): after every timing, record each row's GPU kernels for a few more
    calls (:mod:`~asym_export.bench_kernels`); recorded last, so the profiler cannot slow a timing."""
    import torch

    import asym_runtime

    from .feeds import make_feed

    manifest = asym_runtime.read_manifest(folder)
    if manifest.variant != variant:
        raise ValueError(f"{folder} holds variant {manifest.variant}, not {variant}")
    if not any(manifest.limits.contains(Shape(b, h, w)) for b in batches for h, w in sizes):
        # refused before minutes of loading: every timing would be skipped
        raise ValueError(f"no batch x size asked for lies inside {folder}'s shape limits ({manifest.limits}); "
                         "choose --sizes and --batches inside them")
    cuda = torch.cuda.is_available()
    if kernels and not cuda:
        raise ValueError("recording GPU kernels needs a CUDA GPU; torch sees none")
    device = "cuda" if cuda else "cpu"
    peak = measured_peak_tflops(device)
    name = device_name(device)
    machine = {"device": name, "measured_peak_tflops": round(peak["tflops"], 3), "peak_matmul": peak["matmul"],
               "datasheet_fp16_tflops": datasheet_tflops(name) if cuda else None,
               "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
               "platform": platform.platform()}
    progress(f"device: {name}; measured matmul peak {peak['tflops']:.3f} TFLOP/s ({peak['matmul']})")

    loaded: list[Contender] = []
    for text in [reference] + [b for b in backends if b != reference]:
        name = parse_contender(text)
        progress(f"loading {name} ...")
        if name.backend == "torch-compile":
            b = torch_compile_contender(manifest, device, reference_cache, allow_pickle)
        elif name.backend == "diffusers":
            b = diffusers_contender(manifest, device, name.precision, reference_cache, allow_pickle)
        else:
            b = runtime_contender(folder, name, provider_options)
        if any(x.name == b.name for x in loaded):  # e.g. tensorrt and tensorrt/fp16 for fp16 engines
            progress(f"  {text} loads {b.name} again: timed once")
            if b.close:
                b.close()
            continue
        loaded.append(b)
        progress(f"  {b.name}: load {b.load_s:.2f} s, +{b.load_rss_gib:.2f} GiB RSS")

    rows: list[Row] = []
    skipped = []
    to_profile = []  # (row, contender, graph, feed), recorded after every timing
    for graph in graphs:
        for batch in batches:
            for h, w in sizes:
                shape = Shape(batch, h, w)
                if not manifest.limits.contains(shape):
                    skipped.append({"graph": graph, "shape": str(shape), "reason": f"outside the shape limits ({manifest.limits})"})
                    continue
                feed = make_feed(BENCH_GRAPHS[graph].spec, shape, seed, manifest.scaling_factor)
                tflop = {True: graph_tflop(variant, graph, shape, exported=True),
                         False: graph_tflop(variant, graph, shape, exported=False)}
                progress(f"{graph} {shape}: {tflop[True]:.3f} TFLOP per call (diffusers: {tflop[False]:.3f}) ...")
                res = measure(loaded, graph, shape, feed, warmup=warmup, repeats=repeats)
                ref_median = statistics.median(res[loaded[0].name][1])
                versus = {field: statistics.median(res[name][1]) for field, _, name in VERSUS if name in res}
                progress("  " + "; ".join(f"{b.name} {1000 * statistics.median(res[b.name][1]):.1f} ms "
                                          f"(first {res[b.name][0]:.2f} s)" for b in loaded))
                for b in loaded:
                    first, ts = res[b.name]
                    med = statistics.median(ts)
                    # the FLOPs this backend executes: the exported graphs, or diffusers' model
                    # (what diffusers/* and torch-compile/* run)
                    fl = tflop[not b.name.startswith(("diffusers", "torch-compile"))]
                    sheet = machine["datasheet_fp16_tflops"]
                    rows.append(Row(variant, b.name, graph, str(shape), batch, h, w, first, med, _p90(ts), ts,
                                    batch / med, fl, fl / med, fl / med / peak["tflops"], ref_median / med,
                                    datasheet_share=fl / med / sheet if sheet else None,
                                    **{field: m / med for field, m in versus.items()}))
                    if kernels:
                        to_profile.append((rows[-1], b, graph, feed))
    if to_profile:
        from .bench_kernels import profile_calls

        for row, b, graph, feed in to_profile:
            progress(f"kernels: {graph} {row.shape} {b.name} ...")
            try:
                row.kernels = profile_calls(b.calls[graph], feed)
            except RuntimeError as e:  # the timings stand without it
                row.kernels = {"error": str(e)}
                progress(f"  not recorded: {e}")
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
