"""Where a contender's GPU time goes: its CUDA kernels during a few calls, recorded by torch's
profiler (Kineto on CUPTI, which sees every kernel in the process, ONNX Runtime's and
TensorRT's as well as PyTorch's), summed per kernel and per kind of work.

``asym-bench --kernels`` adds this to every row on a GPU: GPU time per call against the row's
median latency (the rest is the GPU waiting: launches, host work, copies through pageable
memory), kernel launches per call, milliseconds per category (convolution, normalisation,
elementwise, layout, ...) and the costliest kernels. It answers "is the runtime slower than
torch.compile in its convolutions, in its norms, or between kernels?" without reading a trace.
"""

from __future__ import annotations

import json
import os
import re
import tempfile

#: Trace categories that are work on the GPU (Kineto's names)
GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")

#: Kinds of work, by kernel name; the first pattern that matches names the kind. Norms first
#: (ONNX Runtime's GroupNormNHWC*, torch's group_norm / RowwiseMoments, torch.compile's
#: triton_*_fused_native_group_norm*), then torch.compile's other Triton kernels, which are named
#: after what they fuse (a "triton_poi_fused_convolution_silu" kernel is a convolution's bias and
#: activation, elementwise, not the convolution), then cuDNN's and CUTLASS's convolution kernels
#: (implicit GEMM, "xmma ... fprop", winograd), matrix products, attention's softmax, data
#: movement, elementwise work.
KINDS = (
    ("norm", re.compile(r"group_?norm|instance_?norm|layer_?norm|batch_?norm|rowwisemoments|welford", re.I)),
    ("elementwise", re.compile(r"^triton_poi", re.I)),
    ("reduction", re.compile(r"^triton_(red|per)", re.I)),
    ("convolution", re.compile(r"conv|fprop|implicit_?gemm|winograd", re.I)),
    ("matmul", re.compile(r"gemm|gemv|matmul|cublas|cutlass|xmma|ampere_|hopper_|sm\d+_|flash|fmha|attention", re.I)),
    ("softmax", re.compile(r"softmax", re.I)),
    ("layout", re.compile(r"transpose|permute|pad|concat|cat_|slice|gather|scatter|resize|upsample|interp"
                          r"|copy|reshape", re.I)),
    ("elementwise", re.compile(r"elementwise|unary|binary|add|mul|sigmoid|silu|swish|cast|where|clip|clamp"
                               r"|exp|sqrt|div|fill", re.I)),
    ("reduction", re.compile(r"reduce|mean|sum", re.I)),
)


def kind_of(name: str) -> str:
    """The kind of work a GPU kernel does, read from its name; "other" when no pattern matches."""
    for kind, pattern in KINDS:
        if pattern.search(name):
            return kind
    return "other"


def _busy_us(spans: list[tuple[float, float]]) -> float:
    """Time during which at least one span runs (spans on several streams may overlap)."""
    total, end = 0.0, float("-inf")
    for start, stop in sorted(spans):
        if stop <= end:
            continue
        total += stop - max(start, end)
        end = stop
    return total


def summarise(events: list[dict], calls: int, top: int = 12) -> dict:
    """Per-call GPU work of ``calls`` calls from Chrome-trace events (Kineto's export).

    Returns ``gpu_busy_ms`` (time the GPU ran anything, overlaps counted once), ``kernel_ms``
    (the kernels' durations summed), ``launches`` (kernels per call), ``kinds`` (ms per kind of
    work, largest first) and ``top`` (the ``top`` costliest kernel names: ms and count per call).
    """
    if calls < 1:
        raise ValueError(f"calls must be >= 1, got {calls}")
    work = [e for e in events if e.get("ph") == "X" and e.get("cat") in GPU_CATEGORIES and "dur" in e]
    kernels = [e for e in work if e["cat"] == "kernel"]
    per_name: dict[str, list[float]] = {}
    kind_by_name: dict[str, str] = {}  # copies go by their category, kernels by their name
    per_kind: dict[str, float] = {}
    for e in work:
        name = e["cat"] if e["cat"] != "kernel" else str(e.get("name", "?"))
        per_name.setdefault(name, []).append(float(e["dur"]))
        if name not in kind_by_name:
            kind_by_name[name] = "copy" if e["cat"] != "kernel" else kind_of(name)
        kind = kind_by_name[name]
        per_kind[kind] = per_kind.get(kind, 0.0) + float(e["dur"])
    busy = _busy_us([(float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in work])
    ranked = sorted(per_name.items(), key=lambda kv: -sum(kv[1]))[:top]
    return {
        "calls": calls,
        "gpu_busy_ms": round(busy / calls / 1000, 4),
        "kernel_ms": round(sum(float(e["dur"]) for e in kernels) / calls / 1000, 4),
        "launches": round(len(kernels) / calls, 2),
        "kinds": {k: round(v / calls / 1000, 4) for k, v in sorted(per_kind.items(), key=lambda kv: -kv[1])},
        "top": [{"name": n[:160], "kind": kind_by_name[n],
                 "ms": round(sum(d) / calls / 1000, 4), "count": round(len(d) / calls, 2)} for n, d in ranked],
    }


def profile_calls(call, feed: dict, calls: int = 3) -> dict:
    """Run ``call(feed)`` ``calls`` times under torch's profiler (CUDA activity) and summarise
    the GPU work per call. The caller warms up first (compilation, CUDA-graph capture and
    algorithm searches must not be recorded); ``call`` synchronises as every bench call does."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    if not torch.cuda.is_available():
        raise RuntimeError("recording GPU kernels needs a CUDA GPU")
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            call(feed)
        torch.cuda.synchronize()
    fd, path = tempfile.mkstemp(suffix=".json", prefix="asym-kernels-")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        with open(path, encoding="utf-8") as f:
            events = json.load(f).get("traceEvents", [])
    finally:
        os.unlink(path)
    out = summarise(events, calls)
    if not out["launches"]:
        raise RuntimeError("torch's profiler recorded no GPU kernel (CUPTI unavailable or blocked?)")
    return out


def kernel_table(result: dict) -> str:
    """asym-bench's kernel lines: per row, GPU time against latency, launches, the kinds of work."""
    lines = []
    for r in result["rows"]:
        k = r.get("kernels")
        if not k:
            continue
        if "error" in k:
            lines.append(f"{r['graph']} {r['shape']} {r['backend']}: not recorded: {k['error']}")
            continue
        median_ms = 1000 * r["median_s"]
        idle = max(0.0, 1 - k["gpu_busy_ms"] / median_ms) if median_ms else 0.0
        kinds = ", ".join(f"{kind} {ms:.2f}" for kind, ms in k["kinds"].items() if ms >= 0.005)
        lines.append(f"{r['graph']} {r['shape']} {r['backend']}: GPU busy {k['gpu_busy_ms']:.2f} of "
                     f"{median_ms:.2f} ms ({100 * idle:.0f} % waiting), {k['launches']:.0f} kernels; "
                     f"ms by kind: {kinds}")
        for t in k["top"][:5]:
            lines.append(f"    {t['ms']:8.3f} ms  x{t['count']:<6g} {t['kind']:<12} {t['name'][:100]}")
    return "\n".join(lines)
