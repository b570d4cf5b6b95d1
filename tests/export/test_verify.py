"""The comparison itself: a verification never passes on a reference or an output it cannot trust."""

import json
import math
import re

import numpy as np
import pytest

from asym_export.verify import (
    BF16_TOLERANCE, FP16_MIN_PSNR_DB, FP16_TOLERANCE, FP32_MAX_ABS, OutputStats, Tolerance, VerificationError,
    VerificationReport, output_stats, psnr,
)
from asym_runtime.specs import DECODER, ENCODER, Shape

from repo_files import ROOT

SHAPE = Shape(1, 16, 16)


def _encoder_outputs(fill=0.0):
    s = ENCODER.tensor("latent_mean").shape(SHAPE.batch, SHAPE.height, SHAPE.width)
    return {"latent_mean": np.full(s, fill, np.float32), "latent_logvar": np.full(s, fill, np.float32)}


def test_equal_outputs_pass():
    for tol in (Tolerance(), FP16_TOLERANCE):
        r = VerificationReport("t", tol)
        ref = _encoder_outputs()
        ref["latent_mean"][0, 0, 0, 0] = 1.0  # a peak-to-peak range for the PSNR
        assert r.add(ENCODER, SHAPE, ref, {k: v.copy() for k, v in ref.items()}) and r


def test_nan_in_the_reference_fails_every_tolerance():
    for tol in (Tolerance(), FP16_TOLERANCE):
        r = VerificationReport("t", tol)
        ref = _encoder_outputs()
        ref["latent_mean"][0, 0, 0, 0] = math.nan
        case = r.add(ENCODER, SHAPE, ref, _encoder_outputs())
        assert not case and not r
        assert case.failures == ["latent_mean: NaN/Inf in the PyTorch reference"]


def test_nan_statistics_never_pass_a_tolerance():
    nan = OutputStats("sample", math.nan, math.nan, math.nan, True, 2.0)
    assert Tolerance().failures(nan) == ["max abs nan > 0.001"]
    assert FP16_TOLERANCE.failures(nan) == ["PSNR nan dB < 50 dB"]


def test_a_wrong_output_shape_is_a_failing_case_not_an_exception():
    r = VerificationReport("t", Tolerance())
    ref = {"sample": np.zeros(DECODER.tensor("sample").shape(SHAPE.batch, SHAPE.height, SHAPE.width), np.float32)}
    case = r.add(DECODER, SHAPE, ref, {"sample": np.zeros((1, 3, 8, 8), np.float32)})
    assert not r
    assert case.failures == ["sample: output shape (1, 3, 8, 8) differs from the reference (1, 3, 16, 16)"]
    assert "sample" in r.failure_lines()[0]


# --------------------------------------------------------------------------- the statistics themselves

def _sample(fill=0.0):
    return np.full(DECODER.tensor("sample").shape(SHAPE.batch, SHAPE.height, SHAPE.width), fill, np.float32)


def test_statistics_of_a_known_error():
    """Half the pixels off by 0.02, half exact, on an image output: max 0.02, mean 0.01, MSE 2e-4
    against the [-1, 1] range's peak 2.0: PSNR = 10 log10(4 / 2e-4) = 43.01 dB, computed in float64."""
    ref, out = _sample(), _sample()
    out.reshape(-1)[::2] = 0.02
    s = output_stats("sample", ref, out, DECODER.tensor("sample").value_range)
    assert s.finite and s.peak == 2.0
    assert s.max_abs == pytest.approx(0.02, rel=1e-6) and s.mean_abs == pytest.approx(0.01, rel=1e-6)
    assert s.psnr_db == pytest.approx(10 * math.log10(4 / 2e-4), abs=1e-4)
    assert psnr(ref, out, 2.0) == s.psnr_db and psnr(ref, ref, 2.0) == math.inf


def test_an_image_output_s_peak_is_its_range_and_a_latent_s_is_the_reference_s():
    """Images: the contract's [-1, 1] range, however little of it the reference spans. Latents
    (unbounded): the reference's own peak-to-peak range, and 1.0 for a constant reference, so
    an error on it is still a finite PSNR, not a division by zero."""
    s = output_stats("sample", _sample(0.5), _sample(0.6), (-1.0, 1.0))
    assert s.peak == 2.0 and s.psnr_db == pytest.approx(20 * math.log10(2 / 0.1), abs=1e-3)
    ref = _encoder_outputs()["latent_mean"]
    ref.reshape(-1)[0] = 4.0
    assert output_stats("latent_mean", ref, ref + 0.1, None).peak == 4.0
    constant = output_stats("latent_mean", _encoder_outputs(3.0)["latent_mean"], _encoder_outputs(3.1)["latent_mean"], None)
    assert constant.peak == 1.0 and constant.psnr_db == pytest.approx(20.0, abs=1e-3)


def test_a_nan_in_the_output_fails_with_what_it_is():
    out = _sample()
    out.reshape(-1)[7] = math.nan
    for tol in (Tolerance(), FP16_TOLERANCE):
        r = VerificationReport("t", tol)
        case = r.add(DECODER, SHAPE, {"sample": _sample()}, {"sample": out})
        assert case.failures == ["sample: NaN/Inf in output"]


def test_the_fp32_bound_is_the_bound():
    """A finite error just past 1e-3 fails and one just inside passes: the other tests' errors
    are NaN or far larger, so a bound loosened tenfold would have passed them all."""
    for err, failures in ((2e-3, ["sample: max abs 0.002 > 0.001"]), (9e-4, [])):
        out = _sample()
        out.reshape(-1)[5] = err
        case = VerificationReport("t", Tolerance()).add(DECODER, SHAPE, {"sample": _sample()}, {"sample": out})
        assert case.failures == failures, err


@pytest.mark.parametrize("inf", [math.inf, -math.inf])
def test_an_infinity_fails_as_a_nan_does(inf):
    """+-Inf in the output is a failure with what it is (not an exception from the PSNR), and in
    the reference it fails every tolerance."""
    out = _sample()
    out.reshape(-1)[3] = inf
    for tol in (Tolerance(), FP16_TOLERANCE, BF16_TOLERANCE):
        case = VerificationReport("t", tol).add(DECODER, SHAPE, {"sample": _sample()}, {"sample": out})
        assert case.failures == ["sample: NaN/Inf in output"], tol
        case = VerificationReport("t", tol).add(DECODER, SHAPE, {"sample": out}, {"sample": _sample()})
        assert case.failures == ["sample: NaN/Inf in the PyTorch reference"], tol


def test_the_bf16_floors_are_44_db_for_images_and_latent_means_and_35_for_log_variances():
    """An error of known PSNR on each output just below and just above its BF16 floor."""
    for name, floor in (("sample", 44.0), ("latent_mean", 44.0), ("latent_logvar", 35.0)):
        for db, fails in ((floor - 0.5, True), (floor + 0.5, False)):
            ref = _sample(0.0)
            ref.reshape(-1)[0] = 2.0  # peak-to-peak 2.0 for the latents too, as the image range gives
            off = 2.0 * 10 ** (-db / 20)  # a constant error e gives PSNR 20 log10(2 / e)
            s = output_stats(name, ref, ref + off, (-1.0, 1.0) if name == "sample" else None)
            assert s.psnr_db == pytest.approx(db, abs=1e-3)
            assert bool(BF16_TOLERANCE.failures(s)) is fails, (name, db)


def test_one_psnr_floor_for_every_output():
    tol = Tolerance(max_abs=None, min_psnr_db=45.0)
    s = output_stats("latent_logvar", _sample(0.0), _sample(0.02), (-1.0, 1.0))  # 40 dB
    assert tol.failures(s) == ["PSNR 40.0 dB < 45 dB"]
    assert Tolerance(max_abs=None, min_psnr_db=39.0).failures(s) == []


def test_a_missing_output_is_a_failure_of_its_own():
    r = VerificationReport("t", Tolerance())
    ref = _encoder_outputs()
    case = r.add(ENCODER, SHAPE, ref, {"latent_mean": ref["latent_mean"].copy()})
    assert case.failures == ["latent_logvar: missing from the graph's outputs"] and not r


def test_a_stage_that_compared_nothing_never_passes():
    r = VerificationReport("onnx_fp32", Tolerance())
    assert not r and r.to_dict()["passed"] is False
    assert str(VerificationError(r)) == "onnx_fp32 verification failed:\n  no cases were run"


def test_reports_say_what_failed_and_are_strict_json():
    """The report goes into manifest.json, which allows no NaN/Infinity: an exact output's
    infinite PSNR is written as null."""
    r = VerificationReport("fp16", FP16_TOLERANCE)
    ref = _encoder_outputs()
    ref["latent_mean"].reshape(-1)[0] = 1.0
    exact = r.add(ENCODER, SHAPE, ref, {k: v.copy() for k, v in ref.items()})
    assert exact and exact.to_dict()["outputs"]["latent_mean"]["psnr_db"] is None
    bad = {k: v.copy() for k, v in ref.items()}
    bad["latent_logvar"] += 0.5
    r.add(ENCODER, SHAPE, ref, bad)
    d = json.loads(json.dumps(r.to_dict(), allow_nan=False))
    assert d["passed"] is False and [c["passed"] for c in d["cases"]] == [True, False]
    assert d["cases"][1]["failures"] == ["latent_logvar: PSNR 6.0 dB < 40 dB"]
    rows = [line.split() for line in r.table().splitlines()]
    assert rows[0][-1] == "result" and [row[-1] for row in rows[1:]] == ["ok", "ok", "ok", "FAIL"]
    assert r.failure_lines() == [f"encoder @ {SHAPE}: latent_logvar: PSNR 6.0 dB < 40 dB"]


def test_tolerances_describe_themselves():
    assert Tolerance().describe() == "max abs <= 0.001"
    assert FP16_TOLERANCE.describe() == "PSNR >= 50 dB (sample), 50 dB (latent_mean), 40 dB (latent_logvar)"
    assert Tolerance(max_abs=None).describe() == "no criterion"


def test_the_readme_states_the_floors_the_code_applies():
    """The README's thresholds are what users trust; they must be the ones verify.py applies."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    stated = {name: float(v) for name, v in re.findall(r"`(sample|latent_mean|latent_logvar)` >= (\d+) dB", text)}
    assert stated == FP16_MIN_PSNR_DB
    fp32 = re.search(r"Default tolerance for the FP32 graphs: max abs error <= ([0-9.e-]+)", " ".join(text.split()))
    assert fp32 and float(fp32.group(1)) == FP32_MAX_ABS
