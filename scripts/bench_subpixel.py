#!/usr/bin/env python3
"""Does the sub-pixel upsampler rewrite pay on this device? Times, in PyTorch eager, diffusers'
decode against the export wrappers with (`subpixel=True`, what is exported) and without it.

    python scripts/bench_subpixel.py --variant x2 --sizes 512,1024           # on a GPU: FP16 and FP32
    python scripts/bench_subpixel.py --variant x2 --sizes 128 --repeats 3    # on a CPU: FP32

Seeded random weights; median over --repeats timed calls after --warmup untimed ones (CUDA
events on a GPU, wall clock on a CPU). Also prints the largest difference between the exported
formulation and diffusers, so a speed-up is never bought with other numbers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time


def timer(device: str):
    import torch

    def run(fn, repeats: int, warmup: int) -> float:
        with torch.no_grad():
            for _ in range(warmup):
                fn()
            times = []
            for _ in range(repeats):
                if device == "cuda":
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    fn()
                    end.record()
                    end.synchronize()
                    times.append(start.elapsed_time(end) / 1e3)
                else:
                    t0 = time.perf_counter()
                    fn()
                    times.append(time.perf_counter() - t0)
        return statistics.median(times)
    return run


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="x2")
    p.add_argument("--sizes", default="512", help="square sizes in pixels, comma separated")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--json", help="also write the rows as JSON")
    args = p.parse_args()

    import torch

    from asym_export.variants import get_variant
    from asym_export.weights import random_model
    from asym_export.wrappers import DecoderWrapper

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cudnn.benchmark = True
    run = timer(device)
    vae = random_model(get_variant(args.variant), seed=0).to(device)
    rows = []
    for dtype in ([torch.float16, torch.float32] if device == "cuda" else [torch.float32]):
        vae = vae.half() if dtype == torch.float16 else vae.float()
        cond, exact, uncond = (DecoderWrapper(vae, True, True).eval(), DecoderWrapper(vae, True, False).eval(),
                               DecoderWrapper(vae, False, True).eval())
        for size in (int(s) for s in args.sizes.split(",")):
            g = torch.Generator(device).manual_seed(0)
            z = torch.randn(1, 4, size // 8, size // 8, device=device, generator=g, dtype=dtype)
            image = torch.rand(1, 3, size, size, device=device, generator=g, dtype=dtype) * 2 - 1
            mask = (torch.rand(1, 1, size, size, device=device, generator=g) > 0.5).to(dtype)
            t = lambda fn: round(run(fn, args.repeats, args.warmup) * 1e3, 2)  # noqa: E731
            row = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                   "dtype": str(dtype).removeprefix("torch."), "size": size,
                   "diffusers_cond_ms": t(lambda: vae.decode(z, image=image, mask=mask)),
                   "subpixel_cond_ms": t(lambda: cond(z, image, mask)),
                   "exact_cond_ms": t(lambda: exact(z, image, mask)),
                   "diffusers_uncond_ms": t(lambda: vae.decode(z)),
                   "subpixel_uncond_ms": t(lambda: uncond(z))}
            with torch.no_grad():
                ref = vae.decode(z, image=image, mask=mask).sample.float()
                row["max_abs_vs_diffusers"] = float((cond(z, image, mask).float() - ref).abs().max())
            print(json.dumps(row), flush=True)
            rows.append(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
