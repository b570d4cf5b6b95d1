"""Time asym_runtime against diffusers on one artifact folder (encode, conditional and plain decode).

    python scripts/bench_runtime.py artifacts/x2 --shape 2x96x160 --repeats 3

Prints load time, median wall time per call for the runtime (each backend asked for) and for
the PyTorch reference rebuilt from the manifest, and the max abs difference per output.
Inputs are the export's seeded verification feeds. Not imported by the packages.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np


def timed(fn, repeats: int, warmup: int):
    for _ in range(warmup):
        out = fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return out, statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dir")
    p.add_argument("--shape", default="2x96x160", help="BxHxW (default 2x96x160)")
    p.add_argument("--backends", default="auto", help="comma list of asym_runtime.load backends (default auto)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--no-reference", action="store_true", help="skip the PyTorch timings")
    args = p.parse_args()

    import asym_runtime
    from asym_export.feeds import make_feed
    from asym_runtime.specs import DECODER, ENCODER, parse_shape

    shape = parse_shape(args.shape)
    manifest = asym_runtime.read_manifest(args.dir)
    sf = manifest.scaling_factor
    enc = make_feed(ENCODER, shape, 1, sf)
    dec = make_feed(DECODER, shape, 2, sf)
    calls = {
        "encode (mean)": lambda vae: np.asarray(vae.encode(enc["image"]).mean),
        "decode conditional": lambda vae: np.asarray(vae.decode(dec["latent"], image=dec["image"], mask=dec["mask"])),
        "decode plain": lambda vae: np.asarray(vae.decode(dec["latent"])),
    }
    results: dict[str, dict[str, tuple[np.ndarray, float]]] = {}
    for backend in args.backends.split(","):
        t0 = time.perf_counter()
        vae = asym_runtime.load(args.dir, backend=backend)
        load_s = time.perf_counter() - t0
        label = f"{vae.backend}/{vae.precision}"
        print(f"{label}: load {load_s:.1f} s")
        results[label] = {name: timed(lambda fn=fn, vae=vae: fn(vae), args.repeats, args.warmup)
                          for name, fn in calls.items()}
        vae.close()

    if not args.no_reference:
        import torch

        from asym_export.parity import reference_from_manifest

        ref = reference_from_manifest(manifest)
        t = {k: torch.from_numpy(v) for k, v in {**enc, **{f"d_{k}": v for k, v in dec.items()}}.items()}
        ref_calls = {
            "encode (mean)": lambda: ref.encode(t["image"]).latent_dist.mean.numpy(),
            "decode conditional": lambda: ref.decode(t["d_latent"], image=t["d_image"],
                                                     mask=t["d_mask"]).sample.numpy(),
            "decode plain": lambda: ref.decode(t["d_latent"]).sample.numpy(),
        }
        with torch.no_grad():
            results[f"diffusers (torch {torch.__version__}, {torch.get_num_threads()} threads)"] = {
                name: timed(fn, args.repeats, args.warmup) for name, fn in ref_calls.items()}

    labels = list(results)
    ref_label = labels[-1] if not args.no_reference else None
    print(f"\nshape {shape}, median of {args.repeats} (after {args.warmup} warm-up)")
    print(f"{'call':20s}" + "".join(f"{lab:>44s}" for lab in labels))
    for name in calls:
        row = f"{name:20s}"
        for lab in labels:
            out, sec = results[lab][name]
            err = ""
            if ref_label and lab != ref_label:
                err = f" (max abs {np.abs(out - results[ref_label][name][0]).max():.1e})"
            row += f"{f'{sec:.2f} s{err}':>44s}"
        print(row)


if __name__ == "__main__":
    main()
