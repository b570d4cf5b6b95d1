#!/usr/bin/env python3
"""What checking an artifact costs at load: time and peak resident memory of
``asym_runtime.load`` in three ways, each in a fresh process (so its peak is its own).

    python scripts/bench_load.py --artifact artifacts/x2 [--precision fp16] [--repeats 2]

* ``checked``: the default. Every file is read once, its sha256 checked, and ONNX Runtime
  makes the session from those bytes (external data from memory).
* ``hash-then-path``: how the runtime loaded before: hash each file, then let ONNX Runtime
  open the files again by path (the window in which a swapped file went in unchecked).
* ``unchecked``: ``verify_onnx=False``: ONNX Runtime opens the files by path, nothing is checked.

Run it twice: the first pass also measures the disk; later ones read from the page cache.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

MODES = ("checked", "hash-then-path", "unchecked")


def child(artifact: str, mode: str, precision: str) -> dict:
    import asym_runtime
    from asym_runtime.api import _onnx_entries  # the files a CPU load uses
    from asym_runtime.specs import GRAPHS

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    if mode == "hash-then-path":  # as the runtime did: stream each file through sha256, then reopen
        from asym_runtime.manifest import sha256_file

        m = asym_runtime.read_manifest(artifact)
        for name in _onnx_entries(m, precision, tuple(GRAPHS)).values():
            for entry in [m.files[name], *m.companions(name)]:
                if sha256_file(m.path(entry.name)) != entry.sha256:
                    raise SystemExit(f"{entry.name} does not match the manifest")
    vae = asym_runtime.load(artifact, backend="onnxruntime-cpu", precision=precision,
                            verify_onnx=mode == "checked")
    load_s = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with open("/proc/self/statm") as f:  # resident pages now, after load: what the service keeps
        resident = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    vae.close()
    return {"mode": mode, "precision": precision, "load_s": round(load_s, 2),
            "peak_rss_gib": round(peak / 2**20, 2), "rss_after_load_gib": round(resident / 2**30, 2),
            "rss_before_load_gib": round(rss0 / 2**20, 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifact", required=True)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "fp16"])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.artifact, args.child, args.precision)))
        return 0
    rows = []
    for r in range(args.repeats):
        for mode in MODES:
            out = subprocess.run([sys.executable, __file__, "--artifact", args.artifact, "--precision",
                                  args.precision, "--child", mode], capture_output=True, text=True)
            if out.returncode:
                print(out.stderr, file=sys.stderr)
                return 1
            row = json.loads(out.stdout.strip().splitlines()[-1]) | {"pass": r + 1}
            rows.append(row)
            print(f"pass {row['pass']}  {mode:15s} {args.precision}  load {row['load_s']:6.2f} s  "
                  f"peak RSS {row['peak_rss_gib']:5.2f} GiB, after load {row['rss_after_load_gib']:5.2f} GiB", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
