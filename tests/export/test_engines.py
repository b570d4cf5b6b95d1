"""Everything around the TensorRT layer that a machine without a GPU can check: profiles from
the shape limits, engine options, the one-sentence "what is missing", and `--engines` on such
a machine (the ONNX artifact is complete and verified, no engines folder, exit 1)."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from cli_lines import said
from onnx_cache import cli_command

from asym_export.cli import main
from asym_export.engine_verify import profile_shapes
from asym_export.engines import EngineOptions, engine_from_onnx, require_tensorrt, tensorrt_unavailable_reason
from asym_export.reference import true_fp32
from asym_runtime.errors import AsymInputError, BackendUnavailableError
from asym_runtime.manifest import read_manifest
from asym_runtime.specs import DECODER, ENCODER, GRAPHS, Shape, ShapeLimits
from asym_runtime.manifest import generation_folder as gen

NO_ENGINES_HERE = tensorrt_unavailable_reason() is not None
needs_no_gpu = pytest.mark.skipif(not NO_ENGINES_HERE, reason="this machine can build engines")


def test_profile_is_derived_from_the_shape_limits():
    limits = ShapeLimits.from_sizes("64", "512x768", "1024", opt_batch=2, max_batch=4)
    p = limits.profile(DECODER)
    assert p["latent"] == ((1, 4, 8, 8), (2, 4, 64, 96), (4, 4, 128, 128))
    assert p["image"] == ((1, 3, 64, 64), (2, 3, 512, 768), (4, 3, 1024, 1024))
    assert p["mask"] == ((1, 1, 64, 64), (2, 1, 512, 768), (4, 1, 1024, 1024))
    assert list(limits.profile(ENCODER)) == ["image"]
    assert profile_shapes(limits) == [Shape(1, 64, 64), Shape(2, 512, 768), Shape(4, 1024, 1024)]
    same = ShapeLimits(1, 1, 1, 64, 64, 64, 64, 64, 64)
    assert profile_shapes(same) == [Shape(1, 64, 64)]  # one shape verified once


def test_engines_are_verified_on_inputs_the_fp16_islands_were_not_chosen_from():
    from asym_export.feeds import CALIBRATION, CALIBRATION_SEED, ENGINE_VERIFY_SEED, VERIFY_SEED

    n = 8  # seeds are base + index over at most a handful of shapes
    calibration = set(range(CALIBRATION_SEED, CALIBRATION_SEED + len(CALIBRATION)))
    assert calibration.isdisjoint(range(ENGINE_VERIFY_SEED, ENGINE_VERIFY_SEED + n))
    assert calibration.isdisjoint(range(VERIFY_SEED, VERIFY_SEED + n))


@pytest.mark.parametrize("kw, needle", [
    ({"opt_level": 6}, "0..5"), ({"opt_level": -1}, "0..5"), ({"workspace_gib": 0}, "positive"),
    ({"hardware_compat": "turing"}, "ampere_plus"),
])
def test_engine_options_are_validated(kw, needle):
    with pytest.raises(AsymInputError, match=needle):
        EngineOptions(**kw)


@pytest.mark.parametrize("args, needle", [
    (["--opt-level", "5"], "add --engines"),
    (["--hardware-compat", "ampere_plus"], "add --engines"),
    (["--engines", "--opt-level", "9"], "0..5"),
    (["--engines", "--hardware-compat", "any"], "none, ampere_plus, same_compute_capability"),
    (["--engines", "--workspace-gib", "-1"], "positive"),
])
def test_bad_engine_flags_exit_2(tmp_path, capsys, args, needle):
    assert main(["--variant", "tiny", "--random-weights", *args, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()  # rejected before anything was written


@needs_no_gpu
def test_what_is_missing_is_one_sentence():
    reason = tensorrt_unavailable_reason()
    assert "\n" not in reason and not reason.endswith(".")
    if importlib.util.find_spec("tensorrt") is None:
        assert ("the tensorrt Python package is not installed (pip install -e '.[tensorrt]' in this project's folder" in reason
                or "the tensorrt and cuda-python Python packages are not installed (pip install -e '.[tensorrt]' in this project's folder"
                in reason)
    with pytest.raises(BackendUnavailableError, match="tensorrt|GPU"):
        require_tensorrt()


@needs_no_gpu
def test_building_without_tensorrt_raises_a_clear_error(tiny_artifact, tmp_path):
    with pytest.raises(BackendUnavailableError) as e:
        engine_from_onnx(gen(tiny_artifact) / "decoder.onnx", tmp_path / "d.plan", DECODER, ShapeLimits(),
                         timing_cache=tmp_path / "timing.cache")
    assert str(e.value) == tensorrt_unavailable_reason()
    assert list(tmp_path.iterdir()) == []


def test_the_gpu_reference_runs_in_true_fp32_and_restores_torch_settings():
    import torch

    conv = torch.backends.cudnn.conv
    before = conv.fp32_precision
    with true_fp32():
        assert conv.fp32_precision == "ieee" and torch.backends.cuda.matmul.fp32_precision == "ieee"
    assert conv.fp32_precision == before


@needs_no_gpu
def test_engines_without_a_gpu_still_write_the_verified_onnx_artifact(tmp_path, onnx_cache_folder):
    """Done-when of issue 3: exit 1, one clear sentence, no traceback, no engines folder, and the
    ONNX artifact complete and verified (tiny variant: same code path as x2; asym-export's main()
    in its own process, its graph exports reused from the session's, see tests/cached_cli.py)."""
    out = tmp_path / "a"
    r = subprocess.run([*cli_command(onnx_cache_folder), "--variant", "tiny",
                        "--random-weights", "--engines", "--verify-shapes", "1x64x96", "--no-cuda-form",
                        "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr
    lines = said(r.stderr)  # besides progress: exactly the warning, up front, and the error, at the end
    assert len(lines) == 2, r.stderr
    warning, error = lines
    assert r.stderr.splitlines()[0] == warning  # said before minutes of export
    assert warning.startswith("asym-export: warning: --engines: no TensorRT engines can be built")
    assert error.startswith("asym-export: error: no TensorRT engines were built because ")
    assert tensorrt_unavailable_reason() in error and "complete and verified" in error
    m = read_manifest(out)
    assert not (m.folder / "engines").exists()
    assert sorted(p.name for p in out.iterdir()) == sorted([".lock", "manifest.json", m.generation])  # no staging
    assert "engines" not in m.data
    assert not [e for e in m.files.values() if e.format.startswith("tensorrt")]
    for name in m.files:
        m.verify_file(name)
    assert {g.file_name() for g in GRAPHS.values()} <= set(m.files)
    v = m.data["verification"]
    assert v["onnx_fp32"]["passed"] and v["tensorrt_readiness"]["passed"]
    assert not [k for k in v if k.startswith("engine_")]
    assert "decoder.onnx" in r.stdout  # the summary of what was written
    json.dumps(m.data)


@needs_no_gpu
def test_gpu_check_says_what_is_missing_and_exits_non_zero(tmp_path):
    r = subprocess.run([sys.executable, "scripts/gpu_check.py", "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, timeout=300,
                       cwd=Path(__file__).resolve().parents[2])
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().startswith("gpu_check: cannot run here: ")
    try:
        import torch

        gpu = torch.cuda.is_available()
    except ImportError:
        gpu = False
    if not gpu:  # the first thing missing here: a GPU that torch can see
        assert "torch sees no CUDA GPU" in r.stderr
    else:
        assert tensorrt_unavailable_reason() in r.stderr
    assert not (tmp_path / "o").exists()


def test_fp32_engines_are_judged_as_fp32_and_fp16_engines_by_the_floors():
    """An FP32 engine that computed in TF32 (10-bit mantissa: errors of a few 1e-3 at PSNR near
    60 dB) passes the FP16 floors, so judging FP32 engines by them would let it through; the
    FP32 stage's tolerance fails it. Runs without a GPU: the rule, not the engine."""
    import numpy as np

    from asym_export.engine_verify import engine_tolerance
    from asym_export.verify import FP16_TOLERANCE, FP32_MAX_ABS, VerificationReport

    assert engine_tolerance("engine_fp16") is FP16_TOLERANCE
    fp32 = engine_tolerance("engine_fp32")
    assert fp32.max_abs == FP32_MAX_ABS and fp32.min_psnr_db is None
    shape = Shape(1, 64, 64)
    rng = np.random.default_rng(0)
    ref = {"sample": rng.uniform(-1, 1, (1, 3, 64, 64)).astype(np.float32)}
    tf32_like = {"sample": ref["sample"] + rng.normal(0, 1.5e-3, ref["sample"].shape).astype(np.float32)}
    as_fp16 = VerificationReport("engine_fp16", engine_tolerance("engine_fp16"))
    as_fp16.add(DECODER, shape, ref, tf32_like)
    as_fp32 = VerificationReport("engine_fp32", fp32)
    as_fp32.add(DECODER, shape, ref, tf32_like)
    assert as_fp16 and not as_fp32
    assert "max abs" in as_fp32.failure_lines()[0]
