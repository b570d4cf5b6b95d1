"""Bad input is refused with a ValueError that names the problem, before any backend runs."""

import numpy as np
import pytest
import torch
from PIL import Image
from runtime_helpers import diffusers_decode, feed

from asym_export.verify import FP32_MAX_ABS

from asym_runtime.errors import AsymInputError, ShapeOutOfLimitsError
from asym_runtime.specs import Shape


@pytest.fixture
def spied(tiny_rt, monkeypatch):
    """tiny_rt whose backends record every call: a refused input must leave the list empty."""
    calls = []
    for name, backend in tiny_rt.backends.items():
        monkeypatch.setattr(backend, "infer", lambda f, name=name: calls.append(name))
    return tiny_rt, calls


def _good():
    return feed("decoder", Shape(2, 64, 96), seed=11)


def _with(**changes):
    f = _good()
    f.update(changes)
    return f


def _nan(a):
    a = a.copy()
    a.flat[7] = np.nan
    return a


def _inf(a):
    a = a.copy()
    a.flat[3] = -np.inf
    return a


def _pinf(a):
    a = a.copy()
    a.flat[5] = np.inf
    return a


def _torch(values):
    """The same inputs as CPU torch tensors."""
    return {k: torch.from_numpy(v) for k, v in values.items()}


def _reach(a, value):
    """``a`` with one element set to ``value`` (past the image bound's slack, or on it)."""
    a = a.copy()
    a.flat[9] = value
    return a


G = _good()
BAD_DECODES = [
    # (id, kwargs, error class, regex the message must match)
    ("latent-rank", dict(latent=G["latent"][0]), AsymInputError, r"latent has rank 3 .* must be rank 4"),
    ("latent-channels", dict(latent=G["latent"][:, :3]), AsymInputError, r"latent has 3 channels .* 4 channels"),
    ("image-channels", _with(image=G["image"][:, :1]), AsymInputError, r"image has 1 channels .*3 channels"),
    ("mask-channels", _with(mask=np.repeat(G["mask"], 3, axis=1)), AsymInputError, r"mask has 3 channels .*1 channels"),
    ("int-dtype", dict(latent=G["latent"].astype(np.int32)), AsymInputError, r"dtype int32; a floating dtype"),
    ("uint8-image", _with(image=(G["image"] * 127 + 128).astype(np.uint8)), AsymInputError, r"image has dtype uint8"),
    ("bool-mask", _with(mask=G["mask"].astype(bool)), AsymInputError, r"mask has dtype bool"),
    ("size-not-multiple-of-8", _with(image=G["image"][..., :92], mask=G["mask"][..., :92]), AsymInputError,
     r"image width 92 is not a multiple of 8"),
    ("image-size-vs-latent", _with(image=G["image"][..., :88], mask=G["mask"][..., :88]), AsymInputError,
     r"sizes disagree: latent \(2, 4, 8, 12\) is 64x96 pixels, image \(2, 3, 64, 88\) is 64x88 pixels, mask "
     r"\(2, 1, 64, 88\) is 64x88 pixels; image and mask must be 8x the latent's height and width$"),
    ("mask-size-vs-image", _with(mask=G["mask"][:, :, :56]), AsymInputError, r"sizes disagree: .*mask .* is 56x96"),
    ("batch", _with(image=G["image"][:1]), AsymInputError,
     r"batch sizes disagree: latent has 2, image has 1, mask has 2"),
    ("empty", dict(latent=G["latent"][:0]), AsymInputError, r"empty dim"),
    ("nan-latent", _with(latent=_nan(G["latent"])), AsymInputError, r"latent contains NaN"),
    ("inf-image", _with(image=_inf(G["image"])), AsymInputError, r"image contains Inf"),
    ("nan-latent-plain", dict(latent=_nan(G["latent"])), AsymInputError, r"latent contains NaN"),
    ("plus-inf-latent", _with(latent=_pinf(G["latent"])), AsymInputError, r"latent contains Inf"),
    ("plus-inf-latent-plain", dict(latent=_pinf(G["latent"])), AsymInputError, r"latent contains Inf"),
    # float64 past float32's range became Inf on conversion: it was reported as Inf, with numpy's
    # overflow warning
    ("f64-beyond-f32", dict(latent=_reach(G["latent"].astype(np.float64), 1e300)), AsymInputError,
     r"latent has values beyond float32's range \(min .*, max 1e\+300\)"),
    # the documented bound is [-1, 1] with slack 0.5: just past it either way is refused
    ("image-above-1.5", _with(image=_reach(G["image"], 1.6)), AsymInputError,
     r"image values must lie in \[-1, 1\] \(checked with slack 0.5\); got min .*, max 1.60000002"),
    ("image-below-minus-1.5", _with(image=_reach(G["image"], -1.6)), AsymInputError,
     r"image values must lie in \[-1, 1\] \(checked with slack 0.5\); got min -1.60000002"),
    # the message says what the mask means, not only its range
    ("mask-above-1", _with(mask=G["mask"] * 255), AsymInputError,
     r"mask values must lie in \[0, 1\] \(1 = repaint, 0 = keep\); got min 0, max 255$"),
    ("mask-below-0", _with(mask=G["mask"] - 0.5), AsymInputError, r"mask values must lie in \[0, 1\] .*min -0.5"),
    # one float32 ulp past 1: the message must show it, not round it back to "max 1"
    ("mask-one-ulp-above-1", _with(mask=np.nextafter(G["mask"], np.float32(2))), AsymInputError,
     r"mask values must lie in \[0, 1\] .*max 1.00000012"),
    ("image-0-255", _with(image=(G["image"] + 1) * 127.5), AsymInputError, r"image values must lie in \[-1, 1\]"),
    ("image-without-mask", dict(latent=G["latent"], image=G["image"]), AsymInputError, r"got image but no mask"),
    ("mask-without-image", dict(latent=G["latent"], mask=G["mask"]), AsymInputError, r"got mask but no image"),
    ("batch-above-limit", dict(latent=np.zeros((5, 4, 8, 8), np.float32)), ShapeOutOfLimitsError,
     r"batch 5 is above this artifact's max_batch 4"),
    ("height-above-limit", dict(latent=np.zeros((1, 4, 129, 8), np.float32)), ShapeOutOfLimitsError,
     r"height 1032 is above this artifact's max_height 1024"),
    ("width-below-limit", _with(latent=G["latent"][..., :7], image=G["image"][..., :56], mask=G["mask"][..., :56]),
     ShapeOutOfLimitsError, r"width 56 is below this artifact's min_width 64"),
    ("list", dict(latent=G["latent"].tolist()), AsymInputError,
     r"latent must be a numpy array or a torch tensor, got builtins.list"),
    ("pil", _with(image=Image.new("RGB", (96, 64))), AsymInputError, r"got PIL.Image.Image; convert PIL images"),
    ("mixed-kinds", _with(image=torch.from_numpy(G["image"])), AsymInputError,
     r"must all be numpy arrays or all torch tensors"),
    # rank is checked both ways: a latent with an extra trailing axis went on to the backend
    ("latent-rank-5", dict(latent=G["latent"][..., None]), AsymInputError, r"latent has rank 5 .* must be rank 4"),
    # complex is not floating: converting it to float32 would drop the imaginary part
    ("complex-latent", dict(latent=G["latent"].astype(np.complex64)), AsymInputError,
     r"latent has dtype complex64; a floating dtype is required"),
    # tensors without readable dense data are input errors that say why, not errors from inside torch
    ("sparse-latent", dict(latent=torch.from_numpy(G["latent"]).to_sparse()), AsymInputError,
     r"latent is a sparse_coo tensor; only dense \(strided\) tensors hold pixels"),
    ("meta-latent", dict(latent=torch.empty(G["latent"].shape, device="meta")), AsymInputError,
     r"latent is a tensor on device 'meta'; only CPU and CUDA tensors carry data"),
    # value ranges hold for torch tensors as for numpy arrays, at both ends
    ("torch-mask-above-1", _torch(_with(mask=G["mask"] * 255)), AsymInputError,
     r"mask values must lie in \[0, 1\] .*max 255"),
    ("torch-image-below-minus-1.5", _torch(_with(image=_reach(G["image"], -1.6))), AsymInputError,
     r"image values must lie in \[-1, 1\] \(checked with slack 0.5\); got min -1.60000002"),
]


@pytest.mark.parametrize("kwargs, error, message", [c[1:] for c in BAD_DECODES], ids=[c[0] for c in BAD_DECODES])
def test_bad_decode_input_is_refused_before_the_backend(spied, kwargs, error, message):
    rt, calls = spied
    with pytest.raises(error, match=message) as e:
        rt.decode(**kwargs)
    assert isinstance(e.value, ValueError)
    assert str(e.value).startswith("decode: ")
    assert calls == []


def test_wide_floats_are_converted_quietly_or_named(spied):
    """longdouble is converted like float64 (it was refused as 'not a floating dtype'); a value
    float32 cannot hold is named, with no numpy overflow warning on the way."""
    import warnings

    from asym_runtime.checks import check_inputs
    from asym_runtime.specs import DECODER_UNCOND

    rt, calls = spied

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        req = check_inputs("decode", DECODER_UNCOND.inputs, {"latent": G["latent"].astype(np.longdouble)}, rt.limits)
        np.testing.assert_array_equal(req.feed["latent"], G["latent"])
        with pytest.raises(AsymInputError, match="beyond float32's range"):
            rt.decode(_reach(G["latent"].astype(np.float64), -1e300))
    assert calls == []


BAD_ENCODES = [
    ("rank", G["image"][0], AsymInputError, r"image has rank 3"),
    ("channels", np.zeros((1, 4, 64, 64), np.float32), AsymInputError, r"image has 4 channels"),
    ("height", np.zeros((1, 3, 60, 64), np.float32), AsymInputError, r"image height 60 is not a multiple of 8"),
    ("nan", _nan(G["image"]), AsymInputError, r"image contains NaN"),
    ("limit", np.zeros((1, 3, 64, 1040), np.float32), ShapeOutOfLimitsError, r"width 1040 is above .*max_width 1024"),
    ("float-torch-int", torch.zeros((1, 3, 64, 64), dtype=torch.int64), AsymInputError, r"dtype int64"),
    ("torch-complex", torch.zeros((1, 3, 64, 64), dtype=torch.complex64), AsymInputError,
     r"image has dtype complex64; a floating dtype is required"),
]


@pytest.mark.parametrize("image, error, message", [c[1:] for c in BAD_ENCODES], ids=[c[0] for c in BAD_ENCODES])
def test_bad_encode_input_is_refused_before_the_backend(spied, image, error, message):
    rt, calls = spied
    with pytest.raises(error, match=message):
        rt.encode(image)
    assert calls == []


def test_nan_in_a_torch_tensor_is_caught_too(spied):
    rt, calls = spied
    bad = torch.from_numpy(_nan(G["latent"]))
    with pytest.raises(AsymInputError, match="latent contains NaN"):
        rt.decode(bad)
    assert calls == []


def test_soft_masks_and_slightly_overshooting_images_are_accepted(tiny_rt, tiny_vae):
    """[0, 1] masks need not be binary (the graph blends), and resampled images that overshoot
    [-1, 1] a little are normal; neither is refused."""
    f = _good()
    ramp = np.linspace(0, 0.4, f["mask"].shape[-1], dtype=np.float32)  # a feathered edge
    soft = np.clip(f["mask"] * 0.6 + ramp, 0, 1)
    image = np.clip(f["image"] * 1.2, -1.3, 1.3)
    assert len(np.unique(soft)) > 2 and np.abs(image).max() > 1
    edge = f["image"].copy()
    edge.flat[9], edge.flat[10] = 1.5, -1.5
    tiny_rt.decode(f["latent"], image=edge, mask=soft)  # the bound itself is accepted
    got = tiny_rt.decode(f["latent"], image=image, mask=soft)
    # accepted AND computed as the reference computes it (not clipped or binarised on the way)
    want = diffusers_decode(tiny_vae, f["latent"], image, soft)
    np.testing.assert_allclose(got, want, atol=FP32_MAX_ABS, rtol=0)
    binary = tiny_rt.decode(f["latent"], image=image, mask=(soft >= 0.5).astype(np.float32))
    assert np.abs(got - binary).max() > 10 * FP32_MAX_ABS  # the soft values reached the graph


def test_checked_inputs_are_contiguous_float32_of_the_callers_kind(tiny_rt):
    """Request promises contiguous float32: the CUDA, TensorRT and CUDA-graph paths bind inputs
    by pointer. ONNX Runtime on the CPU copies a strided array itself, so the decode tests above
    cannot see a strided feed; the checked feed is looked at here."""
    from asym_runtime.checks import check_inputs
    from asym_runtime.specs import DECODER

    channels_last = G["image"].transpose(0, 2, 3, 1).copy().transpose(0, 3, 1, 2)
    values = {"latent": np.asfortranarray(G["latent"].astype(np.float64)), "image": channels_last, "mask": G["mask"]}
    req = check_inputs("decode", DECODER.inputs, values, tiny_rt.limits)
    assert req.shape == Shape(2, 64, 96)
    for name, x in req.feed.items():
        assert isinstance(x, np.ndarray) and x.dtype == np.float32 and x.flags.c_contiguous, name
        np.testing.assert_array_equal(x, G[name])
    tensors = _torch(G)
    tensors["latent"] = tensors["latent"].transpose(2, 3).contiguous().transpose(2, 3)
    tensors["image"] = tensors["image"].to(memory_format=torch.channels_last)
    req = check_inputs("decode", DECODER.inputs, tensors, tiny_rt.limits)
    for name, x in req.feed.items():
        assert isinstance(x, torch.Tensor) and x.dtype == torch.float32 and x.is_contiguous(), name
        np.testing.assert_array_equal(x.numpy(), G[name])


def test_request_and_output_shapes_count_a_latent_dim_as_8_pixels():
    """The CUDA and TensorRT backends size their output buffers from these two (no CPU test runs
    those paths): a latent dim is 8 pixels, height and width are not swapped."""
    from asym_runtime.checks import output_shapes, request_shape
    from asym_runtime.specs import DECODER, DECODER_UNCOND, ENCODER

    shape = request_shape(DECODER_UNCOND, {"latent": G["latent"]})
    assert shape == Shape(2, 64, 96) == request_shape(DECODER, G) == request_shape(ENCODER, {"image": G["image"]})
    assert output_shapes(DECODER, shape) == {"sample": (2, 3, 64, 96)}
    assert output_shapes(ENCODER, shape) == {"latent_mean": (2, 4, 8, 12), "latent_logvar": (2, 4, 8, 12)}
