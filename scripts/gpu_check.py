#!/usr/bin/env python3
"""The whole GPU check in one command: export x2, tune and verify ONNX Runtime CUDA, check the
runtime's GPU paths, compare every backend with the PyTorch reference, and time every
contender against what a user would run instead.

    python scripts/gpu_check.py --report out/gpu            # x2, seeded random weights
    python scripts/gpu_check.py --artifact artifacts/x2 --report out/gpu   # an existing folder

Steps (a failing step is recorded and the check goes on; the exit code is 1 if any failed).
Every step after the export runs in a child process of its own, with a time limit: a CUDA
failure, GPU memory left allocated or a hang in one step cannot reach the next (on an H200 a
cuDNN launch failure in the timings was followed by allocation failures in the parity step of
the same process). The GPU memory in use is printed after each step.
  1. export: ``asym-export --variant x2 --random-weights`` (``--engines`` when tensorrt is
     installed) into --out, unless --artifact names a folder;
  2. reference: the conditional decode's feed and diffusers' true-FP32 output at 1x512x512
     and 1x1024x1024, on the GPU;
  3. ONNX Runtime CUDA settings sweep: the decoder at both sizes, each candidate in its own
     process (a bad setting can crash it), with ONNX Runtime's warnings captured (cuDNN
     "Fallback mode"), median latency and PSNR against the FP32 reference; the best FP16
     setting (geometric mean over the sizes) is used for the steps below when it beats the
     runtime's default by more than 3 %;
  4. runtime paths: numpy in/out, CUDA graphs (capture, replay, another shape, back), torch
     CUDA tensors on torch's stream: each output within the FP16 contract of the FP32
     reference, how far apart they are (ONNX Runtime's FP16 runs are not bit-reproducible),
     and what each costs;
  5. asym-bench of the conditional decode at --sizes, with every contender's CUDA kernels
     (GPU busy time against latency, launches, milliseconds per kind of work): diffusers FP16
     (the reference) and torch.compile FP16 in one process, diffusers FP16 and every runtime
     configuration in another (interleaved within each; the rows are merged, and each runtime
     row is compared with torch.compile's median at the same shape). The CUDA-graph contender
     only runs when step 4 saw CUDA graphs work;
  6. asym-parity on every CUDA backend and precision (CUDA form and portable graphs, TensorRT
     engines) at the shape limits' min, opt and max, reference on the GPU in true FP32, with
     every ONNX Runtime warning counted; a backend that fails to run is a failure, the others
     are still compared;
  7. ``pytest -m gpu`` (TensorRT engines, ONNX Runtime CUDA: FP16 islands on real FP16 kernels,
     threads raced, TF32 off for FP32), each test's outcome, time and failure printed as it
     ends; the step fails, saying so, where pytest is missing;
  8. one process: torch.compile's decode and ONNX Runtime's CUDA decode at 512, interleaved, as
     a pipeline that compiles its UNet and decodes with asym_runtime would run them; whether
     that works is recorded (it failed on an H200, cuDNN launch error, cause not established);
  9. asym-bench of the plain decode and the encoder, as in step 5.

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


def psnr(ref, out) -> float:
    """PSNR of a decode (values in [-1, 1], peak 2), computed as the export's verification does."""
    from asym_export.verify import psnr as verification_psnr

    return verification_psnr(ref, out, 2.0)


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
    # asked in a process of its own: the device name needs the CUDA runtime, and a context
    # created here would sit on the GPU for the whole check, beside every step's own
    name = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.get_device_name())"],
                          capture_output=True, text=True, timeout=120)
    have["gpu"] = name.stdout.strip() or f"unknown ({name.stderr.strip().splitlines()[-1:]})"
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


# --------------------------------------------------------------------------- child processes

#: Lines that carry nothing (ONNX Runtime 1.31 says this once per CUDA session it opens)
NOISE = ("No registered plugin EP device found",)


def run_streamed(cmd: list[str], timeout: float, env: dict | None = None) -> tuple[int | None, list[str]]:
    """Run ``cmd``, echoing its output (stdout and stderr, as they come: a child killed at its
    limit leaves its progress in the log) and keeping it. Returns (exit code, lines); the exit
    code is None when the child was killed after ``timeout`` seconds. The child gets a process
    group of its own, which is killed with it, and also once it has exited if something it
    started (torch.compile's compile workers, say) still holds its output open after 10 s."""
    import signal
    import threading

    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                         bufsize=1, start_new_session=True, env=env)
    lines: list[str] = []

    def read():
        for line in p.stdout:
            line = line.rstrip("\n")
            lines.append(line)
            if not any(n in line for n in NOISE):
                print(line, flush=True)

    def kill_group():
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.pid, signal.SIGKILL)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        code = p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group()
        p.wait()
        code = None
    reader.join(10)
    if reader.is_alive():
        kill_group()
        reader.join(5)
    return code, list(lines)


def run_child(kind: str, job: dict, timeout: float) -> tuple[dict | None, list[str], str | None]:
    """One step in a child process of this script (``--child KIND JOB``). Returns (its result,
    its output lines, what went wrong or None). The child writes its result into a file of its
    own (not into the output it shares with ONNX Runtime's C++ log); a result written counts,
    whatever happens in the child after it."""
    fd, result_file = tempfile.mkstemp(prefix=f"gpu-check-{kind}-", suffix=".json")
    os.close(fd)
    job = dict(job, timeout=timeout, result_file=result_file)
    try:
        code, lines = run_streamed([sys.executable, __file__, "--child", kind, json.dumps(job)], timeout)
        text = Path(result_file).read_text()
    finally:
        os.unlink(result_file)
    result = json.loads(text) if text else None
    if result is not None:
        if code:
            say(f"{kind}: the child wrote its result, then ended with {'a kill' if code is None else f'exit {code}'}")
        return result, lines, None
    if code is None:
        return None, lines, f"{kind}: no result after {timeout:.0f} s (killed; its stacks are printed above)"
    tail = " | ".join(ln for ln in lines[-8:] if not any(n in ln for n in NOISE))[-1500:]
    return None, lines, f"{kind}: exit {code}: {tail}"


def child_main(kind: str, job_text: str) -> int:
    job = json.loads(job_text)
    # a hang leaves its stacks in the log before the parent kills it
    faulthandler.dump_traceback_later(max(job["timeout"] - 10, 1), exit=True)
    result = CHILDREN[kind](job)
    faulthandler.cancel_dump_traceback_later()
    tmp = job["result_file"] + ".tmp"
    Path(tmp).write_text(json.dumps(result, default=str))
    os.replace(tmp, job["result_file"])  # whole or not at all
    sys.stdout.flush()
    sys.stderr.flush()
    # the result is out: no teardown (CUDA, ONNX Runtime, torch.compile's workers) can lose it
    # or hold the step up
    os._exit(0)


def gpu_memory() -> str:
    """The GPU memory in use now (nvidia-smi; every process's), for the log after each step."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used,memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20).stdout.split("\n")[0]
        used, total = (float(x) for x in out.split(","))
        return f"GPU memory in use: {used / 1024:.1f} of {total / 1024:.1f} GiB"
    except Exception as e:  # noqa: BLE001 - a diagnostic only
        return f"GPU memory in use: unknown ({type(e).__name__})"


# --------------------------------------------------------------------------- children


def child_reference(job: dict) -> dict:
    """The conditional decode's feed and diffusers' true-FP32 output at each size, on the GPU,
    saved into the work folder."""
    import numpy as np

    from asym_export.feeds import make_feed
    from asym_export.reference import reference_from_manifest, reference_outputs, true_fp32
    from asym_runtime import read_manifest
    from asym_runtime.specs import DECODER, Shape

    m = read_manifest(job["artifact"])
    vae = reference_from_manifest(m, {}).to("cuda")
    out = {}
    for h, w in job["sizes"]:
        feed = make_feed(DECODER, Shape(1, h, w), 7, m.scaling_factor)
        with true_fp32():
            ref = reference_outputs(vae, DECODER, feed)["sample"]
        base = Path(job["work"]) / f"decode-1x{h}x{w}"
        np.savez(f"{base}-feed.npz", **feed)
        np.save(f"{base}-ref.npy", ref)
        out[f"1x{h}x{w}"] = {"feed": f"{base}-feed.npz", "ref": f"{base}-ref.npy"}
    return out


def child_sweep(job: dict) -> dict:
    """One sweep candidate: one decoder session, timed at every reference shape."""
    import numpy as np
    import onnxruntime as ort

    from asym_runtime import read_manifest
    from asym_runtime.backends.onnxrt import session_options
    from asym_runtime.manifest import FORMAT_ONNX, FORMAT_ONNX_CUDA

    m = read_manifest(job["artifact"])
    fmt = FORMAT_ONNX_CUDA if job["form"] == "cuda" else FORMAT_ONNX
    entry = m.find("decoder", fmt, job["precision"])
    so = session_options("cuda")
    so.log_severity_level = 2
    t = time.perf_counter()
    sess = ort.InferenceSession(str(m.path(entry.name)), so,
                                providers=[("CUDAExecutionProvider", {"device_id": "0", **job["options"]})])
    result = {"file": entry.name, "load_s": time.perf_counter() - t, "shapes": {}}
    for shape, files in job["references"].items():
        feed = dict(np.load(files["feed"]))
        ref = np.load(files["ref"])

        def call():
            io = sess.io_binding()
            for k, v in feed.items():
                io.bind_cpu_input(k, v)
            io.bind_output("sample", "cuda", 0)
            sess.run_with_iobinding(io)
            return io.copy_outputs_to_cpu()[0]

        t = time.perf_counter()
        out = call()
        first = time.perf_counter() - t
        call()
        times = []
        for _ in range(job["repeats"]):
            t = time.perf_counter()
            call()
            times.append(time.perf_counter() - t)
        result["shapes"][shape] = {"first_s": first, "times_s": times, "median_s": statistics.median(times),
                                   "psnr_db": psnr(ref, out), "max_abs": float(np.abs(ref - out).max())}
    return result


def sweep(artifact: Path, references: dict, repeats: int) -> list[dict]:
    rows = []
    for label, precision, form, options in SWEEP:
        job = {"artifact": str(artifact), "precision": precision, "form": form, "options": options,
               "references": references, "repeats": repeats}
        row = {"label": label, "precision": precision, "form": form, "options": options}
        res, lines, error = run_child("sweep", job, timeout=180)
        row["warnings"] = count_warnings(lines)
        if error:
            row["error"] = error
        else:
            row.update(res)
            row["median_s"] = statistics.geometric_mean([v["median_s"] for v in res["shapes"].values()])
            row["psnr_db"] = min(v["psnr_db"] for v in res["shapes"].values())
            row["max_abs"] = max(v["max_abs"] for v in res["shapes"].values())
        say(f"sweep {label}: " + (row.get("error") or
                                  "; ".join(f"{k} {1000 * v['median_s']:.1f} ms, PSNR {v['psnr_db']:.1f} dB, "
                                            f"max abs {v['max_abs']:.2e}" for k, v in row["shapes"].items())
                                  + f"; warnings {row['warnings']}"))
        rows.append(row)
    return rows


def best_options(rows: list[dict], precision: str, form: str = "cuda") -> tuple[dict | None, str]:
    """The fastest clean setting of ``precision`` (no warnings, parity kept; speed as the
    geometric mean of its medians over the swept sizes) if it beats the runtime's default by
    more than 3 %; else None (keep the default)."""
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
        return dict(best["options"]), f"{best['label']} ({1000 * best['median_s']:.1f} ms, geometric mean)"
    return None, f"the default ({1000 * default['median_s']:.1f} ms, geometric mean) is within 3 % of the best"


def child_paths(job: dict) -> dict:
    import numpy as np

    files = job["reference"]
    return runtime_paths(Path(job["artifact"]), dict(np.load(files["feed"])), np.load(files["ref"]),
                         job["options"])


def runtime_paths(artifact: Path, feed: dict, ref, options: dict | None) -> dict:
    """numpy in/out, CUDA graphs and torch CUDA tensors through asym_runtime: every output within
    the FP16 contract of the FP32 reference (``ok``), and how far apart they are (recorded, not
    judged: ONNX Runtime's FP16 runs are not bit-reproducible, its GroupNorm kernels sum with
    atomics in whatever order the blocks finish, and a capturing session runs without the fused
    conv bias)."""
    import numpy as np
    import torch

    import asym_runtime
    out: dict = {}
    outputs: dict[str, object] = {}  # every output the step produced, by path

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

    def host(x):
        return x.cpu().numpy() if isinstance(x, torch.Tensor) else x

    lat, img, mask = feed["latent"], feed["image"], feed["mask"]
    opts = {"provider_options": options} if options else {}
    with asym_runtime.load(artifact, backend="onnxruntime-cuda", precision="fp16", graphs=("decoder",), **opts) as rt:
        base = outputs["numpy"] = rt.decode(lat, image=img, mask=mask)
        again = outputs["numpy_again"] = rt.decode(lat, image=img, mask=mask)
        out["graph_form"] = rt.graph_form
        # the same session twice on the same input: how far apart ONNX Runtime's FP16 runs are
        out["numpy_repeat_max_diff"] = float(np.abs(again - base).max())
        out["numpy_ms"] = 1000 * timed(lambda: rt.decode(lat, image=img, mask=mask))
        tl, ti, tm = (torch.from_numpy(x).cuda() for x in (lat, img, mask))
        got = outputs["torch"] = host(rt.decode(tl, image=ti, mask=tm))
        out["torch_stream_shared"] = rt.backends["decoder"]._stream is not None
        out["torch_max_diff_vs_numpy"] = float(np.abs(got - base).max())
        out["torch_ms"] = 1000 * timed(lambda: rt.decode(tl, image=ti, mask=tm))
    with asym_runtime.load(artifact, backend="onnxruntime-cuda", precision="fp16", graphs=("decoder",),
                           cuda_graph=True, **opts) as rt:
        runs = [rt.decode(lat, image=img, mask=mask) for _ in range(3)]  # capture, replay, replay
        h, w = lat.shape[2] // 2, lat.shape[3] // 2  # another shape (the ordinary session), then back
        for _ in range(2):
            rt.decode(lat[:, :, :h, :w].copy(), image=img[:, :, :8 * h, :8 * w].copy(),
                      mask=mask[:, :, :8 * h, :8 * w].copy())
        runs.append(rt.decode(lat, image=img, mask=mask))
        outputs.update({f"cuda_graph_{i}": r for i, r in enumerate(runs)})
        out["cuda_graph_max_diff_vs_numpy"] = [float(np.abs(r - base).max()) for r in runs]
        out["cuda_graph_replay_max_diff"] = max(float(np.abs(r - runs[1]).max()) for r in runs[2:])
        out["cuda_graph_ms"] = 1000 * timed(lambda: rt.decode(lat, image=img, mask=mask))
        out["captured_shape"] = str(rt.backends["decoder"].captured_shape)
    with asym_runtime.load(artifact, backend="onnxruntime-cuda", precision="fp16", graphs=("decoder",),
                           cuda_graph=True, **opts) as rt:  # a torch caller owns this graph
        got = [host(rt.decode(tl, image=ti, mask=tm)) for _ in range(3)]
        outputs.update({f"cuda_graph_torch_{i}": g for i, g in enumerate(got)})
        out["cuda_graph_torch_max_diff_vs_numpy"] = max(float(np.abs(g - base).max()) for g in got)
        out["cuda_graph_torch_ms"] = 1000 * timed(lambda: rt.decode(tl, image=ti, mask=tm))
    out["psnr_db"] = {k: (psnr(ref, v) if np.isfinite(v).all() else float("-inf")) for k, v in outputs.items()}
    out["numpy_psnr_db"] = out["psnr_db"]["numpy"]
    out["cuda_graph_psnr_db"] = out["psnr_db"]["cuda_graph_3"]
    from asym_export.verify import FP16_MIN_PSNR_DB

    out["ok"] = min(out["psnr_db"].values()) >= FP16_MIN_PSNR_DB["sample"]
    return out


def child_parity(job: dict) -> dict:
    from asym_export.parity import run_parity
    from asym_runtime import read_manifest

    artifact = Path(job["artifact"])
    lim = read_manifest(artifact).limits
    shapes = list(dict.fromkeys([lim.min, lim.opt, lim.max]))
    os.environ["ASYM_ORT_LOG_SEVERITY"] = "2"
    res = run_parity(artifact, backends=job["backends"], shapes=shapes, reference_device="cuda",
                     provider_options=job["options"])
    text = "\n\n".join(r.table() + f"\n  {r.stage}: {res.timings[r.stage]:.2f} s in runtime calls"
                       for r in res.reports)
    text += "".join(f"\nFAILED {label}: {message}" for label, message in res.errors)
    text += "".join(f"\nskipped {label}: {why}" for label, why in res.skipped)
    Path(job["text"]).write_text(text + "\n")
    print(text, flush=True)
    return {"passed": bool(res), "shapes": [str(s) for s in shapes],
            "stages": {r.stage: r.to_dict() for r in res.reports}, "errors": res.errors,
            "timings_s": res.timings, "skipped": res.skipped}


def parity(artifact: Path, backends: list[str], options: dict | None, report_dir: Path, timeout: float) -> dict:
    res, lines, error = run_child("parity", {"artifact": str(artifact), "backends": backends, "options": options,
                                             "text": str(report_dir / "parity.txt")}, timeout)
    if error:
        raise RuntimeError(error)
    res["ort_warnings"] = count_warnings(lines)
    return res


def child_bench(job: dict) -> dict:
    from asym_export.artifact import write_json_atomic
    from asym_export.bench_kernels import kernel_table
    from asym_export.bench_measure import run_benchmark

    from asym_runtime import read_manifest

    artifact = Path(job["artifact"])
    res = run_benchmark(read_manifest(artifact).variant, artifact, backends=job["backends"], graphs=job["graphs"],
                        sizes=[tuple(s) for s in job["sizes"]], batches=[1], warmup=1, repeats=job["repeats"],
                        reference=job.get("reference", "diffusers/fp16"), progress=say,
                        provider_options=job["options"], reference_cache={}, kernels=job["kernels"])
    if job["kernels"]:
        print("GPU kernels per call:\n" + kernel_table(res), flush=True)
    write_json_atomic(Path(job["json"]), res)
    return {"json": job["json"]}


def merge_bench(torch_res: dict | None, runtime_res: dict | None) -> dict:
    """One result of the two bench processes: the runtime's (its diffusers reference and every
    runtime contender, compared with torch.compile's median at the same graph and shape) and
    torch.compile's (its own diffusers reference kept as a row of its own, so the eager time of
    both processes is visible)."""
    parts = [r for r in (runtime_res, torch_res) if r]
    if not parts:
        raise ValueError("neither bench process gave a result")
    out = json.loads(json.dumps(parts[0]))
    out["processes"] = {}
    if runtime_res:
        out["processes"]["runtime"] = [b["name"] for b in runtime_res["backends"]]
    if torch_res and torch_res is not parts[0]:
        own = f"{torch_res['reference']} (torch.compile's process)"
        for b in torch_res["backends"]:
            out["backends"].append(dict(b, name=own) if b["name"] == torch_res["reference"] else b)
        for r in torch_res["rows"]:
            out["rows"].append(dict(r, backend=own) if r["backend"] == torch_res["reference"] else dict(r))
        out["skipped"] += torch_res.get("skipped", [])
    if torch_res:
        out["processes"]["torch"] = [b["name"] for b in torch_res["backends"]]
    compile_ms = {(r["graph"], r["shape"]): r["median_s"] for r in out["rows"] if r["backend"] == "torch-compile/fp16"}
    for r in out["rows"]:
        c = compile_ms.get((r["graph"], r["shape"]))
        r["ratio_vs_compile"] = c / r["median_s"] if c else None
    return out


def bench(artifact: Path, sizes: list[tuple[int, int]], repeats: int, options: dict | None, have: dict,
          report_dir: Path, work: Path, graphs: list[str], previous: dict | None = None,
          kernels: bool = False, timeout: float = 420, partial: dict | None = None) -> dict:
    """Both bench processes of ``graphs``, merged (after ``previous``), written and returned. When
    one process failed, what the other measured is still written and left in ``partial["result"]``
    before the step fails."""
    from asym_export.artifact import write_json_atomic
    from asym_export.bench_report import plot, table

    runtime = []
    if have.get("onnxruntime_cuda"):
        # FP32 speed is no target (parity is: step 6); its rows would cost a minute at 1024
        runtime += ["onnxruntime-cuda/fp16", "onnxruntime-cuda/fp16/portable"]
        if have.get("cuda_graph_ok"):  # the paths step saw CUDA graphs work (in a child process)
            runtime.insert(1, "onnxruntime-cuda/fp16/cudagraph")
        else:
            say("bench: no CUDA-graph contender (the runtime paths step did not see CUDA graphs work)")
    if have.get("tensorrt"):
        runtime.append("tensorrt")
    tag = "-".join(graphs)
    results, errors = {}, []
    for part, backends in (("torch", ["torch-compile/fp16"]), ("runtime", runtime)):
        if not backends:
            continue
        job = {"artifact": str(artifact), "backends": backends, "graphs": graphs, "sizes": sizes,
               "repeats": repeats, "options": options, "kernels": kernels,
               "json": str(work / f"bench-{tag}-{part}.json")}
        say(f"bench {tag}, {part} process: diffusers/fp16 (reference), {', '.join(backends)}")
        res, _, error = run_child("bench", job, timeout)
        if error:
            errors.append(error)
        else:
            results[part] = json.loads(Path(res["json"]).read_text())
    if not results:
        raise RuntimeError("; ".join(errors))
    res = merge_bench(results.get("torch"), results.get("runtime"))
    res["command"] = "scripts/gpu_check.py (asym-bench, in two processes)"
    if previous:  # one table for both parts (the decode first, so its numbers come early)
        seen = {b["name"] for b in previous["backends"]}
        res["rows"] = previous["rows"] + res["rows"]
        res["backends"] = previous["backends"] + [b for b in res["backends"] if b["name"] not in seen]
        res["skipped"] = previous.get("skipped", []) + res["skipped"]
        res["processes"] = {k: list(dict.fromkeys(previous.get("processes", {}).get(k, []) + v))
                            for k, v in res["processes"].items()}
    print(table(res), flush=True)
    write_json_atomic(report_dir / "bench.json", res)
    plot(res, report_dir / "bench.png")
    if errors:  # the rows that were measured are written and kept; the step still fails
        if partial is not None:
            partial["result"] = res
        raise RuntimeError("; ".join(errors))
    return res


def child_mixed(job: dict) -> dict:
    """torch.compile and ONNX Runtime's CUDA provider in one process, interleaved."""
    from asym_export.bench_measure import run_benchmark
    from asym_runtime import read_manifest

    artifact = Path(job["artifact"])
    res = run_benchmark(read_manifest(artifact).variant, artifact, backends=["torch-compile/fp16", "onnxruntime-cuda/fp16"],
                        graphs=["decode"], sizes=[(512, 512)], batches=[1], warmup=1, repeats=job["repeats"],
                        reference="diffusers/fp16", progress=say, provider_options=job["options"],
                        reference_cache={})
    return {r["backend"]: round(1000 * r["median_s"], 2) for r in res["rows"]}


CHILDREN = {"reference": child_reference, "sweep": child_sweep, "paths": child_paths, "parity": child_parity,
            "bench": child_bench, "mixed": child_mixed}


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
    p.add_argument("--sizes", default="512,1024", help="asym-bench and sweep resolutions (default 512,1024)")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds per bench row (default 5)")
    p.add_argument("--skip", default="",
                   help="comma-separated steps to skip: sweep,paths,bench (both bench steps),parity,pytest,mixed")
    p.add_argument("--pytest-timeout", type=int, default=300, metavar="S",
                   help="seconds the GPU tests may take before they are killed (default 300)")
    p.add_argument("--child", nargs=2, metavar=("KIND", "JOB"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child_main(*args.child)

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

    def step(name, fn):
        if name in skip or name.split("_")[0] in skip:
            say(f"{name}: skipped")
            return None
        t = time.perf_counter()
        say(f"{name} ...")
        try:
            value = fn()
            summary["steps"][name] = {"seconds": round(time.perf_counter() - t, 1)}
            return value
        except Exception as e:  # noqa: BLE001 - record, go on with the other steps
            traceback.print_exc()
            summary["errors"][name] = f"{type(e).__name__}: {e}"
            summary["steps"][name] = {"seconds": round(time.perf_counter() - t, 1), "failed": True}
            return None
        finally:
            say(f"{name} ended; {gpu_memory()}")
            (report_dir / "gpu_check.json").write_text(json.dumps(summary, indent=2, default=str))

    artifact = args.artifact
    if artifact is None:
        artifact = args.out or work / "x2"
        step("export", lambda: export(artifact, have["tensorrt"], args.weights))
    from asym_runtime.specs import parse_size

    sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    options = None
    bench_have = dict(have, cuda_graph_ok=False)  # what the bench may run: CUDA graphs only once seen working
    if have["onnxruntime_cuda"]:
        def reference():
            res, _, error = run_child("reference", {"artifact": str(artifact), "sizes": sizes, "work": str(work)}, 240)
            if error:
                raise RuntimeError(error)
            return res

        refs = step("reference", reference)
        if refs:
            def run_sweep():
                summary["sweep"] = sweep(artifact, refs, args.repeats)  # in the JSON at once
                return summary["sweep"]

            rows = step("sweep", run_sweep)
            if rows:
                fp16, why = best_options(rows, "fp16")
                fp32, why32 = best_options(rows, "fp32")
                options = {k: v for k, v in (("fp16", fp16), ("fp32", fp32)) if v}
                summary["options_used"] = {"fp16": fp16 or "default", "fp32": fp32 or "default",
                                           "why": {"fp16": why, "fp32": why32}}
                say(f"provider options for the next steps: {summary['options_used']}")

            def run_paths():
                res, _, error = run_child("paths", {"artifact": str(artifact), "reference": next(iter(refs.values())),
                                                    "options": (options or {}).get("fp16")}, 150)
                if error:
                    raise RuntimeError(f"the runtime paths failed: {error}")
                return res

            summary["paths"] = step("paths", run_paths)
            bench_have["cuda_graph_ok"] = bool(summary["paths"] and summary["paths"].get("ok"))
    backends = (["onnxruntime-cuda"] if have["onnxruntime_cuda"] else []) + (["tensorrt"] if have["tensorrt"] else [])
    # the conditional decode's timings first (the headline), then parity, tests, the rest
    partial: dict = {}  # what a bench step measured before one of its processes failed
    res = step("bench_decode", lambda: bench(artifact, sizes, args.repeats, options, bench_have, report_dir, work,
                                             ["decode"], kernels=True, partial=partial)) or partial.pop("result", None)
    summary["parity"] = step("parity", lambda: parity(artifact, backends, options, report_dir, timeout=420))
    if "pytest" not in skip:
        def tests():
            if importlib.util.find_spec("pytest") is None:
                raise RuntimeError("pytest is not installed here (pip install -e '.[test]'); the GPU tests "
                                   "(tests marked gpu) did not run")
            # a hanging GPU test (a CUDA-graph capture, a race) must not eat the rest of the check:
            # its stacks are dumped after 120 s, the run is killed at --pytest-timeout; each test's
            # outcome and failure are printed as it ends (ASYM_LIVE_REPORT, tests/conftest.py),
            # so a killed run still says what failed and why
            cmd = [sys.executable, "-m", "pytest", "-v", "-m", "gpu", "-p", "no:cacheprovider",
                   "-o", "faulthandler_timeout=120", f"--junitxml={(report_dir / 'pytest.xml').resolve()}",
                   str(ROOT / "tests")]
            code, lines = run_streamed(cmd, args.pytest_timeout, env={**os.environ, "ASYM_LIVE_REPORT": "1"})
            summary["pytest_outcomes"] = [ln[ln.index("LIVE "):] for ln in lines if "LIVE " in ln]
            if code is None:
                raise RuntimeError(f"pytest -m gpu did not finish in {args.pytest_timeout} s (killed; what ran "
                                   "is above and in pytest_outcomes)")
            if code:
                raise RuntimeError(f"pytest -m gpu exited {code}")
        step("pytest", tests)
    if have["onnxruntime_cuda"]:
        def mixed():
            res, _, error = run_child("mixed", {"artifact": str(artifact), "repeats": args.repeats,
                                                "options": options}, 300)
            if error:
                raise RuntimeError(f"torch.compile and ONNX Runtime CUDA in one process: {error}")
            return res

        summary["mixed"] = step("mixed", mixed)
    res = step("bench_other", lambda: bench(artifact, sizes, args.repeats, options, bench_have, report_dir, work,
                                            ["decode_uncond", "encode"], res, partial=partial)) \
        or partial.pop("result", None) or res
    if res:
        summary["verdicts"] = verdicts(res)
        summary["bench_rows"] = [{k: r.get(k) for k in ("graph", "shape", "backend", "first_call_s", "median_s",
                                                        "ratio_vs_reference", "ratio_vs_compile", "tflops", "kernels")}
                                 for r in res["rows"]]
    summary["total_s"] = round(time.perf_counter() - T0, 1)
    (report_dir / "gpu_check.json").write_text(json.dumps(summary, indent=2, default=str))
    failed = dict(summary["errors"])
    if summary.get("parity") and not summary["parity"]["passed"]:
        failed["parity"] = "a backend failed its tolerance or failed to run"
    if summary.get("paths") and not summary["paths"]["ok"]:
        failed["paths"] = "an output of the runtime paths is below the FP16 floor against the FP32 reference"
    say(f"done in {summary['total_s']} s; " + (f"FAILED: {failed}" if failed else "every step passed"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
