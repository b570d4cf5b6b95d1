"""The comparison itself: a verification never passes on a reference or an output it cannot trust."""

import math

import numpy as np

from asym_export.verify import FP16_TOLERANCE, OutputStats, Tolerance, VerificationReport
from asym_runtime.specs import DECODER, ENCODER, Shape

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
