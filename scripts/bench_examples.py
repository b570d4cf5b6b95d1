#!/usr/bin/env python3
"""Time and peak memory of the README's runtime example on this machine: load, encode, the
conditional decode and the plain decode of one image, each size in a fresh process.

    python scripts/bench_examples.py --artifact artifacts/x2 --sizes 256,512

Each size runs in its own child process so its peak resident set size (read from the kernel)
is that example's alone.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def child(artifact: str, size: int, backend: str) -> dict:
    import numpy as np

    import asym_runtime

    out = {"size": size}
    t = time.perf_counter()
    vae = asym_runtime.load(artifact, backend=backend)
    out["backend"], out["load_s"] = vae.backend, time.perf_counter() - t
    rng = np.random.default_rng(0)
    image = rng.uniform(-1, 1, (1, 3, size, size)).astype(np.float32)
    mask = np.zeros((1, 1, size, size), np.float32)
    mask[..., size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 1
    t = time.perf_counter()
    z = vae.encode(image).mean
    out["encode_s"] = time.perf_counter() - t
    t = time.perf_counter()
    vae.decode(z, image=image, mask=mask)
    out["decode_s"] = time.perf_counter() - t
    t = time.perf_counter()
    vae.decode(z)
    out["plain_decode_s"] = time.perf_counter() - t
    out["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifact", required=True)
    p.add_argument("--sizes", default="256,512")
    p.add_argument("--backend", default="auto")
    p.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.artifact, args.child, args.backend)))
        return 0
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        r = subprocess.run([sys.executable, __file__, "--artifact", args.artifact, "--backend", args.backend,
                            "--child", str(size)], capture_output=True, text=True, check=True)
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    print(f"{'size':>5} {'backend':16} {'load s':>7} {'encode s':>9} {'decode s':>9} {'plain s':>8} {'peak RSS GiB':>12}")
    for r in rows:
        print(f"{r['size']:>5} {r['backend']:16} {r['load_s']:7.1f} {r['encode_s']:9.1f} {r['decode_s']:9.1f} "
              f"{r['plain_decode_s']:8.1f} {r['peak_rss_gib']:12.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
