"""TensorRT engines on a real GPU: build, parity with PyTorch at the profile's min/opt/max, shapes
outside the profile refused, and `asym-export --engines` end to end.

These tests use real TensorRT, never a stand-in, and skip themselves on a machine without a CUDA
GPU, tensorrt and a CUDA build of torch. On a GPU machine run them with

    python scripts/gpu_check.py          # or: python -m pytest -m gpu tests/export/test_engines_gpu.py
"""

import json
import subprocess
import sys

import numpy as np
import pytest

from asym_export.engines import tensorrt_unavailable_reason

REASON = tensorrt_unavailable_reason()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(REASON is not None, reason=f"needs a GPU: {REASON}")]

from asym_export.engine_verify import profile_shapes, verify_engines
from asym_export.engines import engine_from_onnx
from asym_runtime.backends.tensorrt import TensorRTBackend
from asym_export.feeds import make_feed
from asym_export.verify import FP16_TOLERANCE, FP32_MAX_ABS
from asym_runtime.errors import ShapeOutOfLimitsError
from asym_runtime.manifest import read_manifest
from asym_runtime.specs import DECODER, GRAPHS, Shape, ShapeLimits
from asym_runtime.manifest import generation_folder as gen

#: Small profile so tiny engines build in seconds; min/opt/max differ in every axis.
LIMITS = ShapeLimits(min_batch=1, opt_batch=2, max_batch=3, min_height=32, opt_height=64, max_height=96,
                     min_width=40, opt_width=64, max_width=128)


@pytest.fixture(scope="module", params=["fp16", "fp32"])
def tiny_engines(request, tiny_artifact, tmp_path_factory):
    """Engines from the tiny export's own graphs: the FP32 ones and the mixed FP16 ones users get."""
    precision = request.param
    out = tmp_path_factory.mktemp(f"engines-{precision}")
    cache = out / "timing.cache"
    plans, infos = {}, {}
    for g in GRAPHS.values():
        plans[g.name] = out / f"{g.name}.plan"
        infos[g.name] = engine_from_onnx(gen(tiny_artifact) / g.file_name(precision), plans[g.name], g, LIMITS,
                                         opt_level=2, timing_cache=cache)
    return precision, plans, infos, cache


def test_build_records_what_the_manifest_needs(tiny_engines):
    _, plans, infos, cache = tiny_engines
    import tensorrt as trt

    assert cache.stat().st_size > 0
    for name, info in infos.items():
        assert plans[name].stat().st_size > 0
        assert info["tensorrt_version"] == trt.__version__
        assert info["flags"]["strongly_typed"] and not info["flags"]["fp16_flag"]
        assert not info["flags"]["tf32"]  # strongly typed FP32 layers must run in FP32
        if name != "encoder":
            assert info["profile"]["latent"] == [[1, 4, 4, 5], [2, 4, 8, 8], [3, 4, 12, 16]]
        if name != "decoder_uncond":  # the plain decoder takes the latent only
            assert info["profile"]["image"] == [[1, 3, 32, 40], [2, 3, 64, 64], [3, 3, 96, 128]]
        assert info["builder_optimization_level"] == 2
    assert not infos["encoder"]["timing_cache_loaded"] and infos["decoder"]["timing_cache_loaded"]
    assert not [p for p in plans["decoder"].parent.iterdir() if p.name.endswith(".tmp")]


def test_engines_match_pytorch_at_min_opt_max(tiny_engines, tiny_vae):
    precision, plans, _, _ = tiny_engines
    report = verify_engines(plans, tiny_vae, LIMITS, 0.18215, stage=f"engine_{precision}")
    print(report.table())
    assert report, report.failure_lines()
    if precision == "fp16":
        assert report.tolerance is FP16_TOLERANCE
    else:  # an FP32 engine is judged as FP32: the export's max abs error, not the FP16 floors
        assert report.tolerance.max_abs == FP32_MAX_ABS and report.tolerance.min_psnr_db is None
    assert [str(c.shape) for c in report.cases] == [str(s) for s in profile_shapes(LIMITS)] * len(GRAPHS)


def test_engine_profile_is_the_shape_limits(tiny_engines):
    _, plans, _, _ = tiny_engines
    with TensorRTBackend(DECODER, plans["decoder"].read_bytes(), label="decoder.plan") as b:
        assert b.limits == LIMITS  # the runtime reads the profile back as the limits it was built from
        assert tuple(tuple(d) for d in b._engine.get_tensor_profile_shape("latent", 0)) == LIMITS.profile(DECODER)["latent"]
        assert tuple(tuple(d) for d in b._engine.get_tensor_profile_shape("mask", 0)) == LIMITS.profile(DECODER)["mask"]


@pytest.mark.parametrize("shape", [Shape(4, 64, 64), Shape(1, 24, 64), Shape(1, 64, 136)], ids=str)
def test_shapes_outside_the_profile_are_refused(tiny_engines, shape):
    _, plans, _, _ = tiny_engines
    feed = make_feed(DECODER, shape, 0, 0.18215)
    with TensorRTBackend(DECODER, plans["decoder"].read_bytes(), label="decoder.plan") as b:
        with pytest.raises(ShapeOutOfLimitsError, match="(above|below) this artifact's (max|min)_"):
            b.infer(feed)
        # and TensorRT itself refuses it too, should a caller skip the check
        assert not b._context.set_input_shape("image", feed["image"].shape)
        ok = make_feed(DECODER, LIMITS.opt, 0, 0.18215)
        out = b.infer(ok)["sample"]  # the backend still works after the refusal
        assert out.shape == ok["image"].shape and np.isfinite(out).all()


def test_cli_engines_end_to_end(tmp_path):
    out = tmp_path / "a"
    r = subprocess.run([sys.executable, "-m", "asym_export.cli", "--variant", "tiny", "--random-weights",
                        "--engines", "--opt-level", "2", "--min-size", "32x40", "--opt-size", "64",
                        "--max-size", "96x128", "--max-batch", "3", "--opt-batch", "2", "--out", str(out)],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    m = read_manifest(out)
    for name in m.files:
        m.verify_file(name)
    e = m.data["engines"]
    assert e["variant"] == "tiny" and e["profile"] == LIMITS.to_dict()
    assert e["device"]["name"] and e["device"]["compute_capability"].count(".") == 1
    assert set(e["build_s"]) == set(GRAPHS) and e["builder_optimization_level"] == 2
    assert e["hardware_compatibility_level"] == "none" and e["version_compatible"] is False
    for g in GRAPHS.values():
        plan = m.files[g.engine_name()]
        assert plan.role == g.name and plan.format == "tensorrt_plan" and plan.precision in ("fp16", "fp32")
    assert m.files["engines/timing.cache"].role == "timing_cache"
    stage = next(k for k in m.data["verification"] if k.startswith("engine_"))
    v = m.data["verification"][stage]
    assert v["passed"] and {c["shape"] for c in v["cases"]} == {"1x32x40", "2x64x64", "3x96x128"}
    json.dumps(m.data)
