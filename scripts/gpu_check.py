#!/usr/bin/env python3
"""One command for a GPU machine: export x2 with TensorRT engines, verify them, run the GPU
tests and print a latency table.

    python scripts/gpu_check.py                       # x2, seeded random weights
    python scripts/gpu_check.py --weights ./my-vae    # real weights (a save_pretrained folder or hub id)

Steps (each stops the check with a non-zero exit code when it fails):
  1. prerequisites: the tensorrt package (TensorRT 10.12+), a CUDA GPU, a CUDA build of torch;
     on a machine without them it prints what is missing and exits 1 before doing anything;
  2. `asym-export --variant x2 --engines` into --out (engines verified against the FP32 PyTorch
     reference at the profile's min, opt and max shapes);
  3. `pytest -m gpu` (engine build, parity at min/opt/max, shapes outside the profile refused);
  4. latency at the opt shape of the profile: TensorRT engine vs PyTorch FP32 and FP16 on the
     same GPU, median (and p90) over --repeats timed runs after warm-up, GPU time by CUDA events.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def prerequisites() -> str | None:
    try:
        from asym_export.engines import tensorrt_unavailable_reason
    except ImportError as e:
        return f"asym-export is not installed ({e}); run pip install -e '.[test,tensorrt]' first"
    reason = tensorrt_unavailable_reason()
    if reason:
        return reason
    import importlib.util

    if importlib.util.find_spec("pytest") is None:
        return "pytest is not installed (pip install -e '.[test,tensorrt]')"
    return None


def _time_ms(fn, repeats: int, warmup: int = 3) -> list[float]:
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(torch.cuda.current_stream())
        fn()
        end.record(torch.cuda.current_stream())
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


def latency_table(out: Path, weights: str | None, seed: int, repeats: int) -> str:
    import numpy as np
    import torch

    from asym_export.engine_verify import _true_fp32
    from asym_export.engines import EngineRunner
    from asym_export.feeds import make_feed
    from asym_export.onnx_export import diffusers_forward
    from asym_export.variants import get_variant
    from asym_export.weights import load_reference
    from asym_runtime.manifest import read_manifest
    from asym_runtime.specs import GRAPHS

    m = read_manifest(out)
    limits, e = m.limits, m.data["engines"]
    shape = limits.opt
    vae, _ = load_reference(get_variant(m.variant), weights, random_weights=weights is None, seed=seed)
    vae = vae.to("cuda").eval()
    vae16 = copy.deepcopy(vae).to(torch.float16)
    rows = [("graph", "shape", "backend", "median ms", "p90 ms", "vs PyTorch FP32")]
    for graph in GRAPHS.values():
        feed = make_feed(graph, shape, 0, m.scaling_factor)

        def torch_call(model, dtype):
            t = {k: torch.from_numpy(v).to("cuda", dtype) for k, v in feed.items()}
            return lambda: diffusers_forward(model, graph.name, t)

        results = {}
        with torch.no_grad():
            with _true_fp32():
                results["PyTorch FP32"] = _time_ms(torch_call(vae, torch.float32), repeats)
            results["PyTorch FP32 (TF32 allowed)"] = _time_ms(torch_call(vae, torch.float32), repeats)
            results["PyTorch FP16"] = _time_ms(torch_call(vae16, torch.float16), repeats)
        entry = m.files[graph.engine_name()]
        m.verify_file(entry.name)
        with EngineRunner(out / entry.name, host_code_allowed=e["version_compatible"]) as runner:
            runner.bind(feed)

            def engine_call():
                runner.launch(synchronize=False)  # on runner.stream, after the current stream
                torch.cuda.current_stream().wait_stream(runner.stream)  # so the end event follows it

            results[f"TensorRT {entry.precision.upper()} engine"] = _time_ms(engine_call, repeats)
        base = float(np.median(results["PyTorch FP32"]))
        for name, ts in results.items():
            med = float(np.median(ts))
            rows.append((graph.name, str(shape), name, f"{med:.2f}", f"{np.percentile(ts, 90):.2f}",
                         f"{base / med:.2f}x"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in rows]
    head = (f"GPU {e['device']['name']} (compute {e['device']['compute_capability']}), TensorRT "
            f"{e['tensorrt_version']}, torch {torch.__version__}; {repeats} timed runs per row after warm-up, "
            f"GPU time (CUDA events), inputs already on the GPU")
    return head + "\n" + "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="x2", help="x2 (default) or x1.5")
    p.add_argument("--weights", help="real weights (folder or hub id); default: seeded random weights")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="artifact folder to write (default: a temporary folder)")
    p.add_argument("--repeats", type=int, default=20, help="timed runs per latency row (default 20)")
    p.add_argument("--skip-tests", action="store_true", help="skip step 3 (pytest -m gpu)")
    p.add_argument("export_args", nargs="*", help="extra asym-export arguments after --, e.g. -- --opt-level 4")
    args = p.parse_args()

    missing = prerequisites()
    if missing:
        print(f"gpu_check: cannot run here: {missing}", file=sys.stderr)
        return 1
    out = args.out or Path(tempfile.mkdtemp(prefix="asym-gpu-check-"))
    source = ["--weights", args.weights] if args.weights else ["--random-weights", "--seed", str(args.seed)]
    cmd = [sys.executable, "-m", "asym_export.cli", "--variant", args.variant, *source, "--engines",
           "--out", str(out), *args.export_args]
    print("[gpu_check 1/3] " + " ".join(cmd[1:]), flush=True)
    if subprocess.run(cmd).returncode:
        print("gpu_check: the export with engines failed (see above)", file=sys.stderr)
        return 1
    v = json.loads((out / "manifest.json").read_text())["verification"]
    stage = next(k for k in v if k.startswith("engine_"))
    print(f"engines verified: {stage} passed={v[stage]['passed']}", flush=True)
    if not args.skip_tests:
        print("[gpu_check 2/3] python -m pytest -q -m gpu tests", flush=True)
        if subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests"], cwd=ROOT,
                          env=dict(os.environ)).returncode:
            print("gpu_check: GPU tests failed (see above)", file=sys.stderr)
            return 1
    print("[gpu_check 3/3] latency at the profile's opt shape", flush=True)
    print(latency_table(out, args.weights, args.seed, args.repeats))
    print(f"artifact folder: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
