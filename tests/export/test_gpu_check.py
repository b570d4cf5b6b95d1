"""scripts/gpu_check.py's machinery that a CPU can run: every GPU step runs in a child process
with a time limit (a killed child still leaves its output), the two bench processes are merged
into one result with torch.compile ratios, and the sweep's choice. The GPU steps themselves
need a GPU (the script refuses without one: tests/export/test_engines.py)."""

from __future__ import annotations

import json
import sys
import time

import pytest
from repo_files import load_file

gpu_check = load_file("scripts/gpu_check.py", "gpu_check_under_test")


def test_a_child_past_its_limit_is_killed_and_its_output_kept():
    code = "import time\nprint('step one', flush=True)\ntime.sleep(60)\nprint('never')"
    t = time.perf_counter()
    rc, lines = gpu_check.run_streamed([sys.executable, "-c", code], timeout=3)
    assert time.perf_counter() - t < 30
    assert rc is None and lines == ["step one"]
    rc, lines = gpu_check.run_streamed([sys.executable, "-c", "import sys; print('x'); sys.exit(3)"], timeout=30)
    assert rc == 3 and lines == ["x"]
    # a child that has ended while something it started still holds its output open (as
    # torch.compile's compile workers can): its exit code after 10 s, not the limit
    code = ("import subprocess, sys\nsubprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
            "print('done', flush=True)")
    t = time.perf_counter()
    rc, lines = gpu_check.run_streamed([sys.executable, "-c", code], timeout=100)
    assert rc == 0 and lines == ["done"] and time.perf_counter() - t < 40


def test_a_bench_child_runs_and_its_result_comes_back(tiny_artifact, tmp_path):
    """The real child path (argv JSON, the result line, the bench JSON), on the CPU with tiny."""
    job = {"artifact": str(tiny_artifact), "backends": ["onnxruntime-cpu/fp32"], "graphs": ["decode"],
           "sizes": [[64, 64]], "repeats": 1, "options": None, "kernels": False, "reference": "diffusers/fp32",
           "json": str(tmp_path / "bench.json")}
    res, lines, error = gpu_check.run_child("bench", job, timeout=600)
    assert error is None, "\n".join(lines[-20:])
    bench = json.loads((tmp_path / "bench.json").read_text())
    assert res == {"json": job["json"]}
    assert [r["backend"] for r in bench["rows"]] == ["diffusers/fp32", "onnxruntime-cpu/fp32"]
    # a child that raises: its traceback is in the lines, the error says how it ended
    res, lines, error = gpu_check.run_child("bench", dict(job, graphs=["no-such-graph"]), timeout=600)
    assert res is None and error.startswith("bench: exit 1: ") and any("Traceback" in ln for ln in lines)


def _row(backend, graph, shape, median, ref_median):
    return {"backend": backend, "graph": graph, "shape": shape, "median_s": median,
            "ratio_vs_reference": ref_median / median, "ratio_vs_compile": None}


def _result(reference, rows):
    names = list(dict.fromkeys(r["backend"] for r in rows))
    return {"reference": reference, "rows": rows, "skipped": [], "backends": [{"name": n} for n in names],
            "machine": {"device": "GPU"}}


def test_the_two_bench_processes_merge_with_torch_compile_ratios():
    ref = "diffusers/fp16"
    torch_res = _result(ref, [_row(ref, "decode", "1x512x512", 0.110, 0.110),
                              _row("torch-compile/fp16", "decode", "1x512x512", 0.060, 0.110),
                              _row(ref, "decode", "1x1024x1024", 0.368, 0.368),
                              _row("torch-compile/fp16", "decode", "1x1024x1024", 0.186, 0.368)])
    runtime_res = _result(ref, [_row(ref, "decode", "1x512x512", 0.093, 0.093),
                                _row("onnxruntime-cuda/fp16", "decode", "1x512x512", 0.0597, 0.093),
                                _row(ref, "decode", "1x1024x1024", 0.367, 0.367),
                                _row("onnxruntime-cuda/fp16", "decode", "1x1024x1024", 0.2365, 0.367)])
    m = gpu_check.merge_bench(torch_res, runtime_res)
    by = {(r["backend"], r["shape"]): r for r in m["rows"]}
    own = "diffusers/fp16 (torch.compile's process)"
    assert set(by) == {(b, s) for b in (ref, own, "torch-compile/fp16", "onnxruntime-cuda/fp16")
                       for s in ("1x512x512", "1x1024x1024")}
    assert by[("onnxruntime-cuda/fp16", "1x512x512")]["ratio_vs_compile"] == pytest.approx(0.060 / 0.0597)
    assert by[("onnxruntime-cuda/fp16", "1x1024x1024")]["ratio_vs_compile"] == pytest.approx(0.186 / 0.2365)
    # each row's x-eager stays against the eager run of its own process
    assert by[("onnxruntime-cuda/fp16", "1x512x512")]["ratio_vs_reference"] == pytest.approx(0.093 / 0.0597)
    assert by[("torch-compile/fp16", "1x512x512")]["ratio_vs_reference"] == pytest.approx(0.110 / 0.060)
    assert m["reference"] == ref and [b["name"] for b in m["backends"]] == [ref, "onnxruntime-cuda/fp16", own,
                                                                           "torch-compile/fp16"]
    assert m["processes"] == {"runtime": [ref, "onnxruntime-cuda/fp16"], "torch": [ref, "torch-compile/fp16"]}
    # the inputs are left as they were
    assert runtime_res["rows"][1]["ratio_vs_compile"] is None and torch_res["rows"][1]["ratio_vs_compile"] is None
    # one process only: its rows, and no ratio that was not measured
    alone = gpu_check.merge_bench(None, runtime_res)
    assert [r["ratio_vs_compile"] for r in alone["rows"]] == [None] * 4
    with pytest.raises(ValueError, match="neither bench process"):
        gpu_check.merge_bench(None, None)


def test_the_sweep_keeps_the_default_unless_a_clean_setting_beats_it_by_3_percent():
    from asym_runtime.backends.onnxrt import CUDA_PROVIDER_OPTIONS

    clean = {"Fallback mode": 0}
    default = {"label": "default", "precision": "fp16", "form": "cuda", "options": CUDA_PROVIDER_OPTIONS["fp16"],
               "warnings": clean, "psnr_db": 63.0, "max_abs": 0.05, "median_s": 0.100}
    faster = dict(default, label="faster", options={"x": "1"}, median_s=0.095)
    assert gpu_check.best_options([default, faster], "fp16")[0] == {"x": "1"}
    assert gpu_check.best_options([default, dict(faster, median_s=0.098)], "fp16")[0] is None
    # faster but warning (a cuDNN fallback) or below the FP16 floor: never chosen
    assert gpu_check.best_options([default, dict(faster, warnings={"Fallback mode": 3})], "fp16")[0] is None
    assert gpu_check.best_options([default, dict(faster, psnr_db=49.0)], "fp16")[0] is None


def test_the_gpu_tests_say_each_outcome_and_failure_as_it_ends(tmp_path):
    """ASYM_LIVE_REPORT=1 (set by the pytest step): every test's outcome on a line of its own the
    moment it ends, and a failure's message with it; without the variable, nothing extra."""
    import os
    import subprocess
    from pathlib import Path

    (tmp_path / "test_demo.py").write_text("def test_ok():\n    pass\n\n\ndef test_bad():\n"
                                           "    assert 1 == 2, 'the message'\n")
    tests_dir = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "conftest", "-p", "no:cacheprovider", "test_demo.py"]
    env = {**os.environ, "PYTHONPATH": str(tests_dir)}
    for live in ("1", "0"):
        p = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                           env={**env, "ASYM_LIVE_REPORT": live})
        lines = (p.stdout + p.stderr).splitlines()
        said = [ln for ln in lines if ln.startswith("LIVE ")]
        if live == "1":
            assert said[0].startswith("LIVE PASSED call test_demo.py::test_ok (")
            assert said[1].startswith("LIVE FAILED call test_demo.py::test_bad (")
            assert "LIVE | E       AssertionError: the message" in said
        else:
            assert said == [] and p.returncode == 1
