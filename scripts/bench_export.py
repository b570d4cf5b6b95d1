#!/usr/bin/env python3
"""Measure the wall time and peak memory of a whole `asym-export` run (export + verification).

    python scripts/bench_export.py --variant x2            # seeded random weights
    python scripts/bench_export.py --variant x2 -- --no-fp16   # extra asym-export arguments after --

Runs the real command in a child process and reads the child's peak resident set size from
the kernel (getrusage RUSAGE_CHILDREN), so the number includes everything the export loads.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="x2")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", metavar="DIR", help="export into DIR and keep it (default: a temp folder)")
    p.add_argument("--json", metavar="FILE", help="also write the result as JSON")
    p.add_argument("extra", nargs="*", help="extra asym-export arguments (after --)")
    args = p.parse_args()

    out = args.keep or tempfile.mkdtemp(prefix="asym-bench-export-")
    cmd = [sys.executable, "-m", "asym_export.cli", "--variant", args.variant, "--random-weights",
           "--seed", str(args.seed), "--out", out, *args.extra]
    print("running:", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    r = subprocess.run(cmd)
    wall = time.perf_counter() - t0
    peak_gib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 / 2**30  # KiB on Linux
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(out) for f in fs)
    result = {
        "variant": args.variant, "exit_code": r.returncode, "wall_s": round(wall, 1),
        "peak_rss_gib": round(peak_gib, 2), "artifact_gb": round(size / 1e9, 2),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
        "command": " ".join(cmd[1:]),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)
    return r.returncode


if __name__ == "__main__":
    sys.exit(main())
