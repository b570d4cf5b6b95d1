"""asym-bench's machine probes: memory (host RSS, GPU memory in use), the device's name and
compute units, its practical peak (the best rate of a large matmul, measured on the spot) and,
for known GPUs, the datasheet's dense FP16 peak."""

from __future__ import annotations

import os
import platform
import time

#: Dense FP16 tensor-core peaks from NVIDIA datasheets (TFLOP/s, without sparsity), matched
#: against torch.cuda.get_device_name().
DATASHEET_FP16_TFLOPS = {
    "H200": 989.4, "H100 SXM": 989.4, "H100 80GB HBM3": 989.4, "H100 NVL": 835.5, "H100 PCIe": 756.5,
    "A100": 312.0, "L40S": 362.1, "L4": 121.0, "A10": 125.0, "RTX 4090": 165.2, "T4": 65.0,
}


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


def _bf16_verdict(flags: set[str]) -> str:
    """Whether BF16 runs here, as the contenders are chosen: OpenVINO's own verdict where it is
    installed (it also counts AVX-NE-CONVERT CPUs), else the BF16 dot-product units."""
    try:
        from asym_runtime.backends import openvino as ov

        if ov.unavailable_reason() is None:
            return {"units": "OpenVINO BF16: yes", "emulated": "OpenVINO BF16: emulated, slower than FP32",
                    "none": "OpenVINO BF16: no"}[ov.bf16_support()]
    except Exception:  # noqa: BLE001 - a report field, never a reason to fail
        pass
    return "BF16 units" if {"avx512_bf16", "amx_bf16"} & flags else "no BF16 units"


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
        # the units BF16/FP16 speed depends on (AMX tiles, AVX-512 BF16/FP16, AVX-NE-CONVERT)
        units = [f for f in ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "avx_ne_convert", "amx_tile",
                             "amx_bf16", "amx_fp16") if f in flags]
        extra = f" ({', '.join(units) or 'no vector flags read'}; {_bf16_verdict(flags)})" if flags else ""
        return f"{model or platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs{extra}"
    import torch

    return torch.cuda.get_device_name()


def device_used_gib() -> float | None:
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        free, total = torch.cuda.mem_get_info()
        return (total - free) / 2**30
    except Exception:  # noqa: BLE001 - a report field, never a reason to fail
        return None
