#!/usr/bin/env python3
"""How much memory loading an artifact costs: the peak resident set while ``asym_runtime.load()``
runs, and what stays after it, for one backend and graph, in a process of its own (Linux: the
high-water mark is reset through /proc/self/clear_refs after the imports, so it measures the load
alone).

    python scripts/load_memory.py artifacts/x2 --backend openvino --graph decoder
    python scripts/load_memory.py artifacts/x2 --backend onnxruntime-cpu --graph decoder --json out.json

The weights' size (the graph's external data files, as the manifest lists them) is printed
beside it, so a peak reads as so many times the weights. OpenVINO's compiled-model cache goes
to a new temporary folder unless --cache-dir names one: a first load compiles, a second one with
the same --cache-dir imports the compiled model.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path


def _status(key: str) -> float:
    """A /proc/self/status memory line in GiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 2**20
    raise RuntimeError(f"/proc/self/status has no {key}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dir", type=Path, help="an artifact folder written by asym-export")
    p.add_argument("--backend", default="openvino", help="a load() backend (default openvino)")
    p.add_argument("--precision", default=None, help="load()'s precision (default: the backend's)")
    p.add_argument("--graph", default="decoder", help="the one graph to load (default decoder)")
    p.add_argument("--cache-dir", type=Path, help="OpenVINO's compiled-model cache (default: a new temporary folder)")
    p.add_argument("--json", type=Path, help="also write the numbers as JSON")
    args = p.parse_args()
    if not Path("/proc/self/clear_refs").exists():
        print("load_memory: needs Linux (/proc/self/clear_refs)", file=sys.stderr)
        return 2

    import asym_runtime  # every import before the mark is reset

    if args.backend == "openvino":
        import openvino  # noqa: F401
    else:
        import onnxruntime  # noqa: F401
    import onnx

    from asym_runtime.onnx_data import external_tensors

    m = asym_runtime.read_manifest(args.dir)
    entry = m.find(args.graph, "onnx", args.precision if args.precision in ("fp32", "fp16") else "fp32")
    if entry is None:
        print(f"load_memory: {args.dir} has no ONNX {args.graph} graph", file=sys.stderr)
        return 2
    graph = onnx.load(str(m.path(entry.name)), load_external_data=False)
    locations = {e.value for t in external_tensors(graph) for e in t.external_data if e.key == "location"}
    weights = sum(m.path(loc).stat().st_size for loc in locations) / 2**30
    del graph
    kw = {"precision": args.precision} if args.precision else {}
    if args.backend == "openvino":
        kw["cache_dir"] = args.cache_dir or tempfile.mkdtemp(prefix="asym-load-memory-")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the high-water mark starts again from here
    before = _status("VmRSS")
    t = time.perf_counter()
    rt = asym_runtime.load(args.dir, backend=args.backend, graphs=(args.graph,), **kw)
    seconds = time.perf_counter() - t
    out = {"artifact": str(args.dir), "backend": args.backend, "precision": rt.precision, "graph": args.graph,
           "weights_gib": round(weights, 3), "load_s": round(seconds, 1),
           "peak_gib": round(_status("VmHWM") - before, 2), "after_gib": round(_status("VmRSS") - before, 2)}
    rt.close()
    print(f"{args.graph} on {args.backend} ({out['precision']}): weights {out['weights_gib']:.2f} GiB; load "
          f"{out['load_s']:.1f} s; resident during the load up to +{out['peak_gib']:.2f} GiB "
          f"({out['peak_gib'] / weights:.1f}x the weights), +{out['after_gib']:.2f} GiB after it")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
