#!/usr/bin/env python3
"""The whole GPU check in one command: export x2, tune and verify ONNX Runtime CUDA, check the
runtime's GPU paths, compare every backend with the PyTorch reference, and time every
contender against what a user would run instead.

    python scripts/gpu_check.py --report out/gpu            # x2, seeded random weights
    python scripts/gpu_check.py --artifact artifacts/x2 --report out/gpu   # an existing folder

Steps (a failing step is recorded and the check goes on; the exit code is 1 if any failed):
  1. export: ``asym-export --variant x2 --random-weights`` (``--engines`` when tensorrt is
     installed) into --out, unless --artifact names a folder;
  2. ONNX Runtime CUDA settings sweep: the decoder at 1x512x512, each candidate in its own
     process (a bad setting can crash it), with ONNX Runtime's warnings captured (cuDNN
     "Fallback mode"), median latency and PSNR against the FP32 reference; the best FP16
     setting is used for the steps below when it beats the runtime's default;
  3. runtime paths: numpy in/out, CUDA graphs (capture, replay, another shape, back), torch
     CUDA tensors on torch's stream: the same numbers, and what each costs;
  4. asym-parity on every CUDA backend and precision (CUDA form and portable graphs, TensorRT
     engines) at the shape limits' min, opt and max, reference on the GPU in true FP32, with
     every ONNX Runtime warning counted;
  5. ``pytest -m gpu`` (TensorRT engines, ONNX Runtime CUDA: FP16 islands on real FP16 kernels,
     threads raced, TF32 off for FP32); the step fails, saying so, where pytest is missing;
  6. asym-bench at --sizes (default 512,1024), every graph, with diffusers FP16 (reference),
     torch.compile FP16 and every runtime configuration, interleaved; for the conditional
     decode also every contender's CUDA kernels (``asym-bench --kernels``: GPU busy time against
     latency, launches, milliseconds per kind of work), to show where a gap to torch.compile is.

Writes into --report: gpu_check.json (everything, with verdicts), bench.json, bench.png,
parity.txt, pytest.xml (the GPU tests' results). Needs a CUDA GPU, a CUDA build of torch, and
onnxruntime-gpu and/or tensorrt.
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
T0 = time.perf_counter()

#: The sweep's candidates: (label, precision, graph form, provider options). The runtime's
#: defaults are in asym_runtime.backends.onnxrt.CUDA_PROVIDER_OPTIONS.
SWEEP = [
    ("fp16-cuda-default", "fp16", "cuda", {"cudnn_conv_algo_search": "HEURISTIC", "use_tf32": "1",
                                           "fuse_conv_bias": "1"}),
    ("fp16-cuda-heuristic-tf32", "fp16", "cuda", {"cudnn_conv_algo_search": "HEURISTIC", "use_tf32": "1"}),
    ("fp16-cuda-exhaustive-tf32-fusebias", "fp16", "cuda",
     {"cudnn_conv_algo_search": "EXHAUSTIVE", "use_tf32": "1", "fuse_conv_bias": "1"}),
    ("fp16-cuda-heuristic-notf32", "fp16", "cuda", {"cudnn_conv_algo_search": "HEURISTIC", "use_tf32": "0"}),
    ("fp16-portable-default", "fp16", "portable", {"cudnn_conv_algo_search": "HEURISTIC", "use_tf32": "1",
                                                   "fuse_conv_bias": "1"}),
    ("fp32-cuda-default", "fp32", "cuda", {"cudnn_conv_algo_search": "EXHAUSTIVE", "use_tf32": "0"}),
    ("fp32-cuda-exhaustive-notf32-fusebias", "fp32", "cuda",
     {"cudnn_conv_algo_search": "EXHAUSTIVE", "use_tf32": "0", "fuse_conv_bias": "1"}),
]
#: ONNX Runtime log lines that mean a convolution runs on a slow fallback kernel, or memory failed
WARNING_PATTERNS = ("Fallback mode", "No execution plans", "Failed to allocate", "BFCArena")


def say(msg: str) -> None:
    print(f"[gpu_check {time.perf_counter() - T0:6.1f} s] {msg}", flush=True)


def psnr(ref, out, peak: float = 2.0) -> float:
    import numpy as np

    mse = float(np.mean((ref.astype(np.float64) - out.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(peak * peak / mse)


@contextlib.contextmanager
def captured_stderr():
    """Everything written to file descriptor 2 (ONNX Runtime's C++ log included) into a list of
    lines, still echoed to the real stderr at the end."""
    lines: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield lines
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            text = tmp.read().decode("utf-8", "replace")
            lines.extend(text.splitlines())
            if text:
                sys.stderr.write(text[-4000:])


def count_warnings(lines: list[str]) -> dict[str, int]:
    return {p: sum(1 for ln in lines if p in ln) for p in WARNING_PATTERNS}


# --------------------------------------------------------------------------- prerequisites

def prerequisites() -> tuple[str | None, dict]:
    have = {}
    try:
        import torch
    except ImportError:
        return "torch is not installed", have
    if not torch.cuda.is_available():
        return "torch sees no CUDA GPU (a CUDA build of torch and a GPU are needed)", have
    have["gpu"] = torch.cuda.get_device_name()
    try:
        from asym_runtime.backends.onnxrt import cuda_provider_available

        have["onnxruntime_cuda"] = cuda_provider_available()
    except ImportError as e:
        return f"asym-export is not installed ({e}); run pip install -e '.[test]' first", have
    from asym_export.engines import tensorrt_unavailable_reason

    have["tensorrt"] = tensorrt_unavailable_reason() is None
    if not (have["onnxruntime_cuda"] or have["tensorrt"]):
        return "neither onnxruntime-gpu (CUDA provider) nor tensorrt is installed", have
    return None, have


# --------------------------------------------------------------------------- steps

def export(out: Path, engines: bool, weights: str | None) -> None:
    src = ["--weights", weights] if weights else ["--random-weights", "--seed", "0"]
    cmd = [sys.executable, "-m", "asym_export.cli", "--variant", "x2", *src, "--out", str(out)]
    if engines:
        cmd.append("--engines")
    say(" ".join(cmd[1:]))
    if subprocess.run(cmd).returncode:
        raise RuntimeError("asym-export failed (see above)")


def reference_decode(artifact: Path, cache: dict, shape) -> tuple[dict, object]:
    """The conditional decode's feed at ``shape`` and diffusers' true-FP32 output, on the GPU."""
    import torch

    from asym_export.feeds import make_feed
    from asym_export.reference import reference_from_manifest, reference_outputs, true_fp32
    from asym_runtime import read_manifest
    from asym_runtime.specs import DECODER

    m = read_manifest(artifact)
    feed = make_feed(DECODER, shape, 7, m.scaling_factor)
    vae = reference_from_manifest(m, cache).to("cuda")
    with true_fp32():
        ref = reference_outputs(vae, DECODER, feed)["sample"]
    del vae
    torch.cuda.empty_cache()
    return feed, ref


def sweep_one(args) -> int:
    """Child process of the sweep: load one decoder session, time it, save its output."""
    import numpy as np
    import onnxruntime as ort

    from asym_runtime import read_manifest
    from asym_runtime.backends.onnxrt import session_options
    from asym_runtime.manifest import FORMAT_ONNX, FORMAT_ONNX_CUDA

    job = json.loads(args.sweep_one)
    m = read_manifest(job["artifact"])
    fmt = FORMAT_ONNX_CUDA if job["form"] == "cuda" else FORMAT_ONNX
    entry = m.find("decoder", fmt, job["precision"])
    feed = dict(np.load(job["feed"]))
    result = {"file": entry.name}
    so = session_options("cuda")
    so.log_severity_level = 2
    t = time.perf_counter()
    sess = ort.InferenceSession(str(m.path(entry.name)), so,
                                providers=[("CUDAExecutionProvider", {"device_id": "0", **job["options"]})])
    result["load_s"] = time.perf_counter() - t

    def call():
        io = sess.io_binding()
        for k, v in feed.items():
            io.bind_cpu_input(k, v)
        io.bind_output("sample", "cuda", 0)
        sess.run_with_iobinding(io)
        return io.copy_outputs_to_cpu()[0]

    t = time.perf_counter()
    out = call()
    result["first_s"] = time.perf_counter() - t
    call()
    times = []
    for _ in range(job["repeats"]):
        t = time.perf_counter()
        call()
        times.append(time.perf_counter() - t)
    result["times_s"] = times
    result["median_s"] = statistics.median(times)
    np.save(job["out"], out)
    print("SWEEP_RESULT " + json.dumps(result), flush=True)
    return 0


def sweep(artifact: Path, feed: dict, ref, repeats: int, work: Path) -> list[dict]:
    import numpy as np

    feed_path = work / "feed.npz"
    np.savez(feed_path, **feed)
    rows = []
    for label, precision, form, options in SWEEP:
        out = work / f"{label}.npy"
        job = {"artifact": str(artifact), "precision": precision, "form": form, "options": options,
               "feed": str(feed_path), "out": str(out), "repeats": repeats}
        row = {"label": label, "precision": precision, "form": form, "options": options}
        try:
            p = subprocess.run([sys.executable, __file__, "--sweep-one", json.dumps(job)], capture_output=True,
                               text=True, timeout=180)
            lines = (p.stdout + p.stderr).splitlines()
            row["warnings"] = count_warnings(lines)
            res = next((json.loads(ln[len("SWEEP_RESULT "):]) for ln in lines if ln.startswith("SWEEP_RESULT ")), None)
            if p.returncode or res is None:
                row["error"] = f"exit {p.returncode}: " + " | ".join(ln for ln in lines[-6:])[-600:]
            else:
                row.update(res)
                o = np.load(out)
                row["psnr_db"] = psnr(ref, o)
                row["max_abs"] = float(np.abs(ref - o).max())
        except subprocess.TimeoutExpired:
            row["error"] = "timed out after 180 s"
        say(f"sweep {label}: " + (row.get("error") or
                                  f"{1000 * row['median_s']:.1f} ms, PSNR {row['psnr_db']:.1f} dB, "
                                  f"max abs {row['max_abs']:.2e}, warnings {row['warnings']}"))
        rows.append(row)
    return rows


def best_options(rows: list[dict], precision: str, form: str = "cuda") -> tuple[dict | None, str]:
    """The fastest clean setting of ``precision`` (no warnings, parity kept) if it beats the
    runtime's default by more than 3 %; else None (keep the default)."""
    from asym_runtime.backends.onnxrt import CUDA_PROVIDER_OPTIONS

    floor = 50.0 if precision == "fp16" else 70.0
    ok = [r for r in rows if r["precision"] == precision and r["form"] == form and "error" not in r
          and not any(r["warnings"].values()) and r["psnr_db"] >= floor
          and (precision == "fp16" or r["max_abs"] <= 1e-3)]
    if not ok:
        return None, f"no clean {precision} setting; keeping the default"
    best = min(ok, key=lambda r: r["median_s"])
    default = next((r for r in ok if r["options"] == CUDA_PROVIDER_OPTIONS[precision]), None)
    if default is None or best["median_s"] < 0.97 * default["median_s"]:
        return dict(best["options"]), f"{best['label']} ({1000 * best['median_s']:.1f} ms)"
    return None, f"the default ({1000 * default['median_s']:.1f} ms) is within 3 % of the best"


def paths_one(args) -> int:
    """Child process of the paths step (a hang there must not take the whole check with it)."""
    import faulthandler

    import numpy as np

    job = json.loads(args.paths_one)
    faulthandler.dump_traceback_later(job["timeout"] - 10, exit=True)  # a hang leaves its stack
    feed = dict(np.load(job["feed"]))
    out = runtime_paths(Path(job["artifact"]), feed, np.load(job["ref"]), job["options"])
    print("PATHS_RESULT " + json.dumps(out), flush=True)
    return 0


def paths(artifact: Path, feed: dict, ref, options: dict | None, work: Path, timeout: int = 150) -> dict:
    import numpy as np

    np.savez(work / "paths_feed.npz", **feed)
    np.save(work / "paths_ref.npy", ref)
    job = {"artifact": str(artifact), "feed": str(work / "paths_feed.npz"), "ref": str(work / "paths_ref.npy"),
           "options": options, "timeout": timeout}
    try:
        p = subprocess.run([sys.executable, __file__, "--paths-one", json.dumps(job)], capture_output=True,
                           text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise RuntimeError(f"the runtime paths did not finish in {timeout} s: "
                           f"{(e.stdout or '')[-1500:]} {(e.stderr or '')[-3000:]}") from None
    lines = p.stdout.splitlines()
    res = next((json.loads(ln[len("PATHS_RESULT "):]) for ln in lines if ln.startswith("PATHS_RESULT ")), None)
    if p.returncode or res is None:
        tail = "\n".join(ln for ln in (p.stdout + p.stderr).splitlines() if "W:onnxruntime" not in ln)[-3000:]
        raise RuntimeError(f"the runtime paths failed (exit {p.returncode}):\n{tail}")
    return res


def runtime_paths(artifact: Path, feed: dict, ref, options: dict | None) -> dict:
    """numpy in/out, CUDA graphs and torch CUDA tensors through asym_runtime: same numbers?"""
    import numpy as np
    import torch

    import asym_runtime
    out: dict = {}

    def timed(fn, n=10):
        fn()
        torch.cuda.synchronize()
        ts = []
        for _ in range(n):
            t = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            ts.append(time.perf_counter() - t)
        return statistics.median(ts)

    lat, img, mask = feed["latent"], feed["image"], feed["mask"]
    opts = {"provider_options": options} if options else {}
    with asym_runtime.load(artifact, backend="onnxruntime-cuda", precision="fp16", graphs=("decoder",), **opts) as rt:
        base = rt.decode(lat, image=img, mask=mask)
        out["graph_form"] = rt.graph_form
        out["numpy_psnr_db"] = psnr(ref, base)
        out["numpy_ms"] = 1000 * timed(lambda: rt.decode(lat, image=img, mask=mask))
        tl, ti, tm = (torch.from_numpy(x).cuda() for x in (lat, img, mask))
        got = rt.decode(tl, image=ti, mask=tm)
        out["torch_stream_shared"] = rt.backends["decoder"]._stream is not None
        out["torch_max_diff_vs_numpy"] = float(np.abs(got.cpu().numpy() - base).max())
        out["torch_ms"] = 1000 * timed(lambda: rt.decode(tl, image=ti, mask=tm))
    with asym_runtime.load(artifact, backend="onnxruntime-cuda", precision="fp16", graphs=("decoder",),
                           cuda_graph=True, **opts) as rt:
        runs = [rt.decode(lat, image=img, mask=mask) for _ in range(3)]  # capture, replay, replay
        h, w = lat.shape[2] // 2, lat.shape[3] // 2  # another shape (the ordinary session), then back
        for _ in range(2):
            rt.decode(lat[:, :, :h, :w].copy(), image=img[:, :, :8 * h, :8 * w].copy(),
                      mask=mask[:, :, :8 * h, :8 * w].copy())
        runs.append(rt.decode(lat, image=img, mask=mask))
        out["cuda_graph_max_diff_vs_numpy"] = [float(np.abs(r - base).max()) for r in runs]
        out["cuda_graph_psnr_db"] = psnr(ref, runs[-1])
        out["cuda_graph_ms"] = 1000 * timed(lambda: rt.decode(lat, image=img, mask=mask))
        out["captured_shape"] = str(rt.backends["decoder"].captured_shape)
    with asym_runtime.load(artifact, backend="onnxruntime-cuda", precision="fp16", graphs=("decoder",),
                           cuda_graph=True, **opts) as rt:  # a torch caller owns this graph
        got = [rt.decode(tl, image=ti, mask=tm) for _ in range(3)]
        out["cuda_graph_torch_max_diff_vs_numpy"] = max(float(np.abs(g.cpu().numpy() - base).max()) for g in got)
        out["cuda_graph_torch_ms"] = 1000 * timed(lambda: rt.decode(tl, image=ti, mask=tm))
    out["ok"] = (out["numpy_psnr_db"] >= 50 and out["cuda_graph_psnr_db"] >= 50
                 and max(out["cuda_graph_max_diff_vs_numpy"]) < 0.05 and out["torch_max_diff_vs_numpy"] < 0.05
                 and out["cuda_graph_torch_max_diff_vs_numpy"] < 0.05)
    return out


def parity(artifact: Path, backends: list[str], options: dict | None, cache: dict, report_dir: Path) -> dict:
    from asym_export.parity import run_parity
    from asym_runtime import read_manifest

    lim = read_manifest(artifact).limits
    shapes = list(dict.fromkeys([lim.min, lim.opt, lim.max]))
    os.environ["ASYM_ORT_LOG_SEVERITY"] = "2"
    try:
        with captured_stderr() as lines:
            res = run_parity(artifact, backends=backends, shapes=shapes, reference_device="cuda",
                             provider_options=options, reference_cache=cache)
    finally:
        os.environ.pop("ASYM_ORT_LOG_SEVERITY", None)
    text = "\n\n".join(r.table() + f"\n  {r.stage}: {res.timings[r.stage]:.2f} s in runtime calls"
                       for r in res.reports)
    text += "".join(f"\nskipped {label}: {why}" for label, why in res.skipped)
    (report_dir / "parity.txt").write_text(text + "\n")
    print(text, flush=True)
    return {"passed": bool(res), "shapes": [str(s) for s in shapes],
            "stages": {r.stage: r.to_dict() for r in res.reports},
            "timings_s": res.timings, "skipped": res.skipped, "ort_warnings": count_warnings(lines)}


def bench(artifact: Path, sizes: list[tuple[int, int]], repeats: int, options: dict | None, have: dict,
          cache: dict, report_dir: Path, graphs: list[str], previous: dict | None = None,
          kernels: bool = False) -> dict:
    from asym_export.bench_kernels import kernel_table
    from asym_export.bench_measure import run_benchmark
    from asym_export.bench_report import plot, table
    from asym_export.artifact import write_json_atomic

    backends = ["torch-compile/fp16"]
    if have.get("onnxruntime_cuda"):
        # FP32 speed is no target (parity is: step 4); its rows would cost a minute at 1024
        backends += ["onnxruntime-cuda/fp16", "onnxruntime-cuda/fp16/cudagraph", "onnxruntime-cuda/fp16/portable"]
    if have.get("tensorrt"):
        backends.append("tensorrt")
    res = run_benchmark("x2", artifact, backends=backends, graphs=graphs,
                        sizes=sizes, batches=[1], warmup=1, repeats=repeats, reference="diffusers/fp16",
                        progress=say, provider_options=options, reference_cache=cache, kernels=kernels)
    res["command"] = "scripts/gpu_check.py (asym-bench, in process)"
    if kernels:
        print("GPU kernels per call:\n" + kernel_table(res), flush=True)
    if previous:  # one table for both parts (the decode first, so its numbers come early)
        res["rows"] = previous["rows"] + res["rows"]
        res["backends"] = previous["backends"] + res["backends"]
    print(table(res), flush=True)
    write_json_atomic(report_dir / "bench.json", res)
    plot(res, report_dir / "bench.png")
    return res


def verdicts(res: dict) -> dict:
    """The issue's targets, read off the bench rows."""
    rows = res["rows"]
    out = {}
    for graph in ("decode", "decode_uncond", "encode"):
        for r in [r for r in rows if r["graph"] == graph and r["backend"].startswith("onnxruntime-cuda/fp16")
                  and "portable" not in r["backend"]]:
            key = f"{graph} {r['shape']} {r['backend']}"
            out[key] = {"median_ms": round(1000 * r["median_s"], 2),
                        "x_diffusers_fp16": round(r["ratio_vs_reference"], 3),
                        "x_torch_compile": round(r["ratio_vs_compile"], 3) if r.get("ratio_vs_compile") else None,
                        "meets_compile": bool(r.get("ratio_vs_compile") and r["ratio_vs_compile"] >= 1.0),
                        "meets_1.8x_eager": r["ratio_vs_reference"] >= 1.8}
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifact", type=Path, help="an existing x2 artifact folder (default: export one)")
    p.add_argument("--out", type=Path, help="where to export (default: a temporary folder)")
    p.add_argument("--weights", help="real weights (folder or hub id) for the export; default: seeded random")
    p.add_argument("--report", type=Path, default=Path("gpu-check"), help="folder for the results (default gpu-check)")
    p.add_argument("--sizes", default="512,1024", help="asym-bench resolutions (default 512,1024)")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds per bench row (default 5)")
    p.add_argument("--skip", default="", help="comma-separated steps to skip: sweep,paths,parity,pytest,bench")
    p.add_argument("--pytest-timeout", type=int, default=300, metavar="S",
                   help="seconds the GPU tests may take before they are killed (default 300)")
    p.add_argument("--sweep-one", help=argparse.SUPPRESS)
    p.add_argument("--paths-one", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.sweep_one:
        return sweep_one(args)
    if args.paths_one:
        return paths_one(args)

    missing, have = prerequisites()
    if missing:
        print(f"gpu_check: cannot run here: {missing}", file=sys.stderr)
        return 1
    say(f"machine: {have}")
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    report_dir = args.report
    report_dir.mkdir(parents=True, exist_ok=True)
    summary: dict = {"machine": have, "steps": {}, "errors": {}}
    versions = {}
    for mod in ("torch", "onnxruntime", "diffusers", "onnx"):
        with contextlib.suppress(Exception):
            versions[mod] = __import__(mod).__version__
    summary["versions"] = versions
    work = Path(tempfile.mkdtemp(prefix="asym-gpu-check-"))
    cache: dict = {}

    def step(name, fn):
        if name in skip or name.split("_")[0] in skip:
            say(f"{name}: skipped")
            return None
        t = time.perf_counter()
        say(f"{name} ...")
        faulthandler.dump_traceback_later(300)  # a step still running after 5 minutes shows where
        try:
            value = fn()
            summary["steps"][name] = {"seconds": round(time.perf_counter() - t, 1)}
            return value
        except Exception as e:  # noqa: BLE001 - record, go on with the other steps
            traceback.print_exc()
            summary["errors"][name] = f"{type(e).__name__}: {e}"
            return None
        finally:
            faulthandler.cancel_dump_traceback_later()
            (report_dir / "gpu_check.json").write_text(json.dumps(summary, indent=2, default=str))

    artifact = args.artifact
    if artifact is None:
        artifact = args.out or work / "x2"
        step("export", lambda: export(artifact, have["tensorrt"], args.weights))
    from asym_runtime.specs import Shape, parse_size

    sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    options = None
    if have["onnxruntime_cuda"]:
        ref = step("reference", lambda: reference_decode(artifact, cache, Shape(1, 512, 512)))
        if ref is not None:
            feed, ref_out = ref
            def run_sweep():
                summary["sweep"] = sweep(artifact, feed, ref_out, args.repeats, work)  # in the JSON at once
                return summary["sweep"]

            rows = step("sweep", run_sweep)
            if rows:
                fp16, why = best_options(rows, "fp16")
                fp32, why32 = best_options(rows, "fp32")
                options = {k: v for k, v in (("fp16", fp16), ("fp32", fp32)) if v}
                summary["options_used"] = {"fp16": fp16 or "default", "fp32": fp32 or "default",
                                           "why": {"fp16": why, "fp32": why32}}
                say(f"provider options for the next steps: {summary['options_used']}")
            summary["paths"] = step("paths", lambda: paths(artifact, feed, ref_out, (options or {}).get("fp16"), work))
    backends = (["onnxruntime-cuda"] if have["onnxruntime_cuda"] else []) + (["tensorrt"] if have["tensorrt"] else [])
    # the conditional decode's timings first (the headline), then parity, then the other graphs
    res = step("bench_decode", lambda: bench(artifact, sizes, args.repeats, options, have, cache, report_dir,
                                             ["decode"], kernels=True))
    summary["parity"] = step("parity", lambda: parity(artifact, backends, options, cache, report_dir))
    if "pytest" not in skip:
        def tests():
            if importlib.util.find_spec("pytest") is None:
                raise RuntimeError("pytest is not installed here (pip install -e '.[test]'); the GPU tests "
                                   "(tests marked gpu) did not run")
            # a hanging GPU test (a CUDA-graph capture, a race) must not eat the rest of the check:
            # its stacks are dumped after 120 s, the run is killed at --pytest-timeout; the
            # results are in the report (pytest.xml) either way
            cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-o", "faulthandler_timeout=120",
                   f"--junitxml={(report_dir / 'pytest.xml').resolve()}", "tests"]
            try:
                rc = subprocess.run(cmd, cwd=ROOT, timeout=args.pytest_timeout).returncode
            except subprocess.TimeoutExpired:
                raise RuntimeError(f"pytest -m gpu did not finish in {args.pytest_timeout} s (killed; "
                                   "the stacks of a test running past 120 s are printed above)") from None
            if rc:
                raise RuntimeError(f"pytest -m gpu exited {rc}")
        step("pytest", tests)
    res = step("bench_other", lambda: bench(artifact, sizes, args.repeats, options, have, cache, report_dir,
                                            ["decode_uncond", "encode"], res)) or res
    if res:
        summary["verdicts"] = verdicts(res)
        summary["bench_rows"] = [{k: r[k] for k in ("graph", "shape", "backend", "first_call_s", "median_s",
                                                    "ratio_vs_reference", "ratio_vs_compile", "tflops", "kernels")}
                                 for r in res["rows"]]
    summary["total_s"] = round(time.perf_counter() - T0, 1)
    (report_dir / "gpu_check.json").write_text(json.dumps(summary, indent=2, default=str))
    failed = dict(summary["errors"])
    if summary.get("parity") and not summary["parity"]["passed"]:
        failed["parity"] = "a backend failed its tolerance"
    if summary.get("paths") and not summary["paths"]["ok"]:
        failed["paths"] = "runtime paths disagree"
    say(f"done in {summary['total_s']} s; " + (f"FAILED: {failed}" if failed else "every step passed"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
