#!/usr/bin/env python3
"""Measure ONNX Runtime session settings for one graph of an artifact, interleaved, against
diffusers eager in the same process; prints a table and writes JSON.

    python scripts/tune_onnxruntime.py --artifact artifacts/x2 --graph decoder --size 256

Every candidate session is created up front, then timed in rotating rounds (one call per
candidate per round), so drift of the machine cancels in the ratios. The settings the
runtime uses (asym_runtime.backends.onnxrt.session_options) are the candidate "runtime".
What was measured, and why the runtime's settings are what they are, is in the README.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from asym_runtime.specs import GRAPHS


def candidates(device: str = "cpu") -> dict:
    import onnxruntime as ort

    from asym_runtime.backends.onnxrt import session_options

    def opts(level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL, threads=0, **config):
        so = ort.SessionOptions()
        so.graph_optimization_level = level
        so.intra_op_num_threads = threads
        so.log_severity_level = 3
        for k, v in config.items():
            if k == "arena":
                so.enable_cpu_mem_arena = v
            elif k == "mem_pattern":
                so.enable_mem_pattern = v
            else:
                so.add_session_config_entry(k.replace("__", "."), v)
        return so

    return {
        "defaults": opts(),  # a plain ort.SessionOptions(): what an untuned user gets
        "runtime": session_options(device),
        "basic": opts(ort.GraphOptimizationLevel.ORT_ENABLE_BASIC),
        "extended": opts(ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED),
        "no_spin": opts(**{"session__intra_op__allow_spinning": "0"}),
        "denormal_zero": opts(**{"session__set_denormal_as_zero": "1"}),
        "no_arena": opts(arena=False),
        "no_mem_pattern": opts(mem_pattern=False),
        "threads_1": opts(threads=1),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifact", type=Path, required=True)
    p.add_argument("--graph", default="decoder", choices=list(GRAPHS))
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--only", help="comma-separated candidate names (default: all)")
    p.add_argument("--no-reference", action="store_true", help="skip diffusers eager")
    p.add_argument("--json", type=Path)
    args = p.parse_args()

    import onnxruntime as ort
    import torch

    import asym_runtime
    from asym_export.feeds import make_feed
    from asym_export.reference import diffusers_forward, reference_from_manifest
    from asym_runtime.specs import Shape

    manifest = asym_runtime.read_manifest(args.artifact)
    graph = GRAPHS[args.graph]
    feed = make_feed(graph, Shape(args.batch, args.size, args.size), 0, manifest.scaling_factor)
    path = str(manifest.path(graph.file_name("fp32")))
    cands = candidates()
    if args.only:
        cands = {k: v for k, v in cands.items() if k in args.only.split(",")}
    runs = {}
    for name, so in cands.items():
        t0 = time.perf_counter()
        sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        load = time.perf_counter() - t0
        runs[name] = (lambda s=sess: s.run(None, feed), load)
        print(f"{name}: session {load:.1f} s", flush=True)
    if not args.no_reference:
        vae = reference_from_manifest(manifest)
        t = {k: torch.from_numpy(v) for k, v in feed.items()}

        def ref():
            with torch.inference_mode():
                return diffusers_forward(vae, args.graph, t)

        runs = {"diffusers": (ref, 0.0), **runs}
    names = list(runs)
    for name in names:  # first call + one warm-up each
        runs[name][0]()
        runs[name][0]()
    times = {n: [] for n in names}
    for r in range(args.repeats):
        for n in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            runs[n][0]()
            times[n].append(time.perf_counter() - t0)
        print(f"round {r + 1}/{args.repeats} done", flush=True)
    base = statistics.median(times["diffusers"]) if "diffusers" in times else None
    print(f"\n{args.graph} {args.batch}x{args.size}x{args.size}, {args.repeats} interleaved rounds, "
          f"torch threads {torch.get_num_threads()}")
    print(f"{'candidate':16s} {'median s':>9s} {'min s':>8s} {'max s':>8s} {'x diffusers':>12s}")
    result = {}
    for n in names:
        med = statistics.median(times[n])
        result[n] = {"median_s": med, "times_s": times[n], "session_s": runs[n][1],
                     "x_diffusers": (base / med) if base else None}
        ratio = f"{base / med:12.3f}" if base else ""
        print(f"{n:16s} {med:9.3f} {min(times[n]):8.3f} {max(times[n]):8.3f} {ratio}")
    if args.json:
        args.json.write_text(json.dumps({"graph": args.graph, "size": args.size, "batch": args.batch,
                                         "onnxruntime": ort.__version__, "torch": torch.__version__,
                                         "results": result}, indent=2))
    return 0


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    sys.exit(main())
