#!/usr/bin/env python3
"""Load test of asym-serve on localhost: N concurrent clients against a real Triton server,
compared with one in-process runtime measured in the same run.

    python scripts/load_test_serve.py --artifact artifacts/x2 --graph decoder --size 64x64 \\
        --clients 16 --requests 64 [--instances 1] [--max-batch N] [--queue-delay-us 2000] [--backend onnxruntime-cpu]

1. in process: ``asym_runtime.load`` on the folder, one warm-up call, then ``--requests`` calls
   one after another (batch 1): latency and throughput of a single caller;
2. served: ``asym-serve`` started on free localhost ports (the same backend), one warm-up call,
   then ``--clients`` threads, each with its own connection (``asym_runtime.remote``), share
   ``--requests`` calls (batch 1 each): throughput, p50/p99 latency, and the batch sizes Triton
   actually formed (its statistics, before/after);
3. the ratio served/in-process throughput.

Bounded: at most ``--requests`` calls per phase and ``--time-limit`` seconds for the served
phase; localhost only. Prints one table and, with ``--json``, writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import sys
import threading
import time
from pathlib import Path

import numpy as np


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _request(graph: str, size: tuple[int, int], seed: int) -> dict:
    h, w = size
    rng = np.random.default_rng(seed)
    image = rng.uniform(-1, 1, (1, 3, h, w)).astype(np.float32)
    mask = (rng.uniform(0, 1, (1, 1, h, w)) > 0.5).astype(np.float32)
    latent = rng.standard_normal((1, 4, h // 8, w // 8)).astype(np.float32)
    return {"encoder": {"image": image}, "decoder": {"latent": latent, "image": image, "mask": mask},
            "decoder_uncond": {"latent": latent}}[graph]


def _call(vae, graph: str, req: dict):
    if graph == "encoder":
        return vae.encode(req["image"]).mean
    if graph == "decoder":
        return vae.decode(req["latent"], image=req["image"], mask=req["mask"])
    return vae.decode(req["latent"])


def _pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


def _batch_stats(url: str, model: str) -> dict[int, int]:
    import tritonclient.http as h

    stats = h.InferenceServerClient(url).get_inference_statistics(model_name=model)
    return {int(b["batch_size"]): int(b["compute_infer"]["count"]) for b in stats["model_stats"][0].get("batch_stats", [])}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifact", required=True, type=Path)
    ap.add_argument("--graph", default="decoder", choices=["encoder", "decoder", "decoder_uncond"])
    ap.add_argument("--size", default="64x64", help="HxW pixels (default 64x64)")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=64, help="calls per phase (default 64)")
    ap.add_argument("--instances", type=int, default=1)
    ap.add_argument("--max-batch", type=int, default=None, help="asym-serve --max-batch (default: the folder's)")
    ap.add_argument("--queue-delay-us", type=int, default=2000)
    ap.add_argument("--backend", default="onnxruntime-cpu")
    ap.add_argument("--time-limit", type=float, default=600.0, help="seconds for the served phase (default 600)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    import asym_runtime
    from asym_runtime.serving.server import ServeOptions, TritonServer
    from asym_runtime.specs import parse_size

    size = parse_size(args.size)
    n = args.requests
    reqs = [_request(args.graph, size, i) for i in range(n)]

    # 1. in process, one caller
    vae = asym_runtime.load(args.artifact, backend=args.backend)
    _call(vae, args.graph, reqs[0])
    local_lat = []
    t0 = time.perf_counter()
    for r in reqs:
        t = time.perf_counter()
        _call(vae, args.graph, r)
        local_lat.append(time.perf_counter() - t)
    local_wall = time.perf_counter() - t0
    vae.close()

    # 2. served, N clients
    http, grpc, metrics = _free_ports(3)
    opts = ServeOptions(artifact=args.artifact, backend=args.backend, http_port=http, grpc_port=grpc,
                        metrics_port=metrics, instances=args.instances, queue_delay_us=args.queue_delay_us,
                        max_batch=args.max_batch)
    t = time.perf_counter()
    server = TritonServer(opts).start()
    start_s = time.perf_counter() - t
    try:
        url = f"127.0.0.1:{http}"
        rvae = asym_runtime.remote(url, timeout=max(60.0, args.time_limit))
        _call(rvae, args.graph, reqs[0])
        before = _batch_stats(url, args.graph)
        lat: list[float] = []
        errors: list[str] = []
        next_i = iter(range(n))
        lock = threading.Lock()
        deadline = time.perf_counter() + args.time_limit

        def client():
            while time.perf_counter() < deadline:
                with lock:
                    i = next(next_i, None)
                if i is None:
                    return
                t = time.perf_counter()
                try:
                    _call(rvae, args.graph, reqs[i])
                except Exception as e:  # noqa: BLE001 - counted and shown
                    errors.append(f"{type(e).__name__}: {e}")
                    continue
                with lock:
                    lat.append(time.perf_counter() - t)

        threads = [threading.Thread(target=client) for _ in range(args.clients)]
        t0 = time.perf_counter()
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        served_wall = time.perf_counter() - t0
        after = _batch_stats(url, args.graph)
        rvae.close()
    finally:
        server.stop()
    formed = {b: after.get(b, 0) - before.get(b, 0) for b in sorted(after) if after.get(b, 0) - before.get(b, 0)}

    local_tp = n / local_wall
    served_tp = len(lat) / served_wall if served_wall else float("nan")
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.processor() or platform.platform()}",
        "artifact": str(args.artifact), "graph": args.graph, "size": args.size, "backend": args.backend,
        "clients": args.clients, "requests": n, "instances": args.instances, "max_batch": args.max_batch, "queue_delay_us": args.queue_delay_us,
        "server_start_s": round(start_s, 1),
        "in_process": {"throughput_per_s": round(local_tp, 2), "p50_ms": round(_pct(local_lat, 50) * 1e3, 1),
                       "p99_ms": round(_pct(local_lat, 99) * 1e3, 1)},
        "served": {"done": len(lat), "errors": len(errors), "throughput_per_s": round(served_tp, 2),
                   "p50_ms": round(_pct(lat, 50) * 1e3, 1), "p99_ms": round(_pct(lat, 99) * 1e3, 1),
                   "batches_formed": formed},
        "served_over_in_process": round(served_tp / local_tp, 2),
    }
    print(f"{args.graph} {args.size}, batch 1 per request, {args.backend}, {args.artifact}")
    print(f"  in process, 1 caller:       {local_tp:7.2f}/s   p50 {result['in_process']['p50_ms']:8.1f} ms   "
          f"p99 {result['in_process']['p99_ms']:8.1f} ms")
    print(f"  asym-serve, {args.clients:2d} clients:     {served_tp:7.2f}/s   p50 {result['served']['p50_ms']:8.1f} ms   "
          f"p99 {result['served']['p99_ms']:8.1f} ms   ({len(lat)} done, {len(errors)} errors)")
    print(f"  batches Triton formed (size: count): {formed}")
    print(f"  served / in process throughput: {result['served_over_in_process']:.2f}x  (server start {start_s:.1f} s)")
    if errors:
        print(f"  first error: {errors[0]}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 1 if errors or len(lat) < n else 0


if __name__ == "__main__":
    sys.exit(main())
