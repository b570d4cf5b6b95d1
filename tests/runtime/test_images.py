"""PIL helpers give the batches StableDiffusionInpaintPipeline's processors give, and back."""

import numpy as np
import pytest
import torch
from PIL import Image

from runtime_helpers import assert_same_pixels, diffusers_inpaint_pixels, pipeline_processors

import asym_runtime
from asym_runtime.errors import AsymInputError


def _photo(w=96, h=64, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _mask(w=96, h=64):
    m = np.zeros((h, w), np.uint8)
    m[10:40, 20:70] = 255
    m[0, :] = 127  # just below the 0.5 threshold: keep
    m[1, :] = 128  # just above: repaint
    return Image.fromarray(m)


@pytest.fixture(scope="module")
def processors():
    return pipeline_processors()


def test_images_to_batch_equals_the_pipeline_preprocessing(processors):
    ims = [_photo(seed=0), _photo(seed=1)]
    got = asym_runtime.images_to_batch(ims)
    want = processors[0].preprocess(ims, height=64, width=96).numpy()
    assert got.shape == (2, 3, 64, 96) and got.dtype == np.float32
    assert got.min() >= -1 and got.max() <= 1
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
    # resizing (Lanczos, like diffusers)
    got = asym_runtime.images_to_batch(_photo(100, 70), width=96, height=64)
    want = processors[0].preprocess(_photo(100, 70), height=64, width=96).numpy()
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)


def test_masks_are_binarised_white_is_repaint(processors):
    got = asym_runtime.masks_to_batch(_mask())
    assert got.shape == (1, 1, 64, 96) and set(np.unique(got)) == {0.0, 1.0}
    assert got[0, 0, 20, 30] == 1 and got[0, 0, 50, 5] == 0  # white repaint, black keep
    assert got[0, 0, 0].max() == 0 and got[0, 0, 1].min() == 1  # 127/255 < 0.5 <= 128/255
    want = processors[1].preprocess(_mask(), height=64, width=96).numpy()
    np.testing.assert_array_equal(got, want)
    rgba = _mask().convert("RGBA")  # any mode goes through grayscale
    np.testing.assert_array_equal(asym_runtime.masks_to_batch([rgba]), got)


def test_batch_to_images_equals_the_pipeline_postprocessing(processors):
    x = np.random.default_rng(2).uniform(-1.2, 1.2, (2, 3, 16, 24)).astype(np.float32)  # clipped too
    got = asym_runtime.batch_to_images(x)
    want = processors[0].postprocess(torch.from_numpy(x), output_type="pil")
    assert len(got) == 2
    for g, w in zip(got, want):
        assert g.mode == "RGB" and g.size == (24, 16)
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
    np.testing.assert_array_equal(np.asarray(asym_runtime.batch_to_images(torch.from_numpy(x))[0]), np.asarray(got[0]))


def test_square_sizes_may_be_one_number_or_a_pair():
    a = asym_runtime.images_to_batch(_photo(100, 70), size=64)
    b = asym_runtime.images_to_batch(_photo(100, 70), size=(64, 64))
    c = asym_runtime.images_to_batch(_photo(100, 70), width=64, height=64)
    assert a.shape == (1, 3, 64, 64)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)
    # width/height are the PIL image's: a 96-wide, 64-high target gives [.., 64, 96]
    assert asym_runtime.masks_to_batch(_mask(), width=96, height=64).shape == (1, 1, 64, 96)


def test_a_portrait_image_is_resized_to_a_landscape_size_of_the_same_numbers(processors):
    """A 64x96 (width x height) photo asked for as width=96, height=64 must be resized, not taken
    as it is: the size compare is in PIL's (width, height) order."""
    got = asym_runtime.images_to_batch(_photo(64, 96), width=96, height=64)
    want = processors[0].preprocess(_photo(64, 96), height=64, width=96).numpy()
    assert got.shape == (1, 3, 64, 96)
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
    assert asym_runtime.masks_to_batch(_mask(64, 96), width=96, height=64).shape == (1, 1, 64, 96)


def test_any_iterable_of_images_is_a_batch():
    """The helpers take an iterable of images (a generator expression, an iterator), not only a
    list or tuple: each item is one image of the batch."""
    ims = [_photo(seed=0), _photo(seed=1)]
    np.testing.assert_array_equal(asym_runtime.images_to_batch(im for im in ims), asym_runtime.images_to_batch(ims))
    np.testing.assert_array_equal(asym_runtime.masks_to_batch(iter([_mask(), _mask()])),
                                  asym_runtime.masks_to_batch([_mask(), _mask()]))


def test_numpy_integer_sizes_are_taken_like_ints():
    """Sizes computed with numpy (from an array's shape, ``np.int64``) are integers: taken as
    ints, not refused as if they were strings or fractions."""
    want = asym_runtime.images_to_batch(_photo(100, 70), width=96, height=64)
    got = asym_runtime.images_to_batch(_photo(100, 70), width=np.int64(96), height=np.int64(64))
    np.testing.assert_array_equal(got, want)
    square = asym_runtime.masks_to_batch(_mask(100, 70), size=64)
    np.testing.assert_array_equal(asym_runtime.masks_to_batch(_mask(100, 70), size=np.int64(64)), square)
    pair = (np.int32(64), np.int32(64))
    np.testing.assert_array_equal(asym_runtime.masks_to_batch(_mask(100, 70), size=pair), square)


def test_round_trip_through_the_runtime_gives_the_diffusers_pixels(tiny_rt, tiny_vae):
    """PIL in, PIL out through the runtime = the same photo and mask through diffusers'
    processors and the reference model, pixel for pixel (up to one 8-bit level, rarely)."""
    image, mask = _photo(), _mask()
    x, m = asym_runtime.images_to_batch(image), asym_runtime.masks_to_batch(mask)
    z = tiny_rt.encode(x).mean
    out = asym_runtime.batch_to_images(tiny_rt.decode(z, image=x, mask=m))
    assert out[0].size == image.size and out[0].mode == "RGB"
    assert_same_pixels(np.asarray(out[0]), diffusers_inpaint_pixels(tiny_vae, image, mask, 96, 64))


@pytest.mark.parametrize("call, message", [
    (lambda: asym_runtime.images_to_batch(_photo(100, 64)), r"100x64 .* multiples of 8. Pass width=96, height=64"),
    (lambda: asym_runtime.images_to_batch([_photo(96, 64), _photo(64, 64)]), r"different sizes"),
    (lambda: asym_runtime.images_to_batch([]), r"no images"),
    (lambda: asym_runtime.images_to_batch([np.zeros((8, 8, 3))]), r"expected PIL images, got ndarray"),
    (lambda: asym_runtime.masks_to_batch(_mask(), width=96, height=60), r"size 60x96 is not allowed"),
    # PIL says (width, height), numpy (height, width): a non-square pair is refused, not guessed
    (lambda: asym_runtime.images_to_batch(_photo(), size=(64, 96)), r"size=\(64, 96\) is ambiguous .* width="),
    (lambda: asym_runtime.images_to_batch(_photo(), width=96), r"pass both width= and height="),
    (lambda: asym_runtime.masks_to_batch(_mask(), size=64, height=64), r"either size= or width=/height="),
    (lambda: asym_runtime.batch_to_images(np.zeros((1, 4, 8, 8))), r"expected \[batch, 3, height, width\]"),
    # wider than 8 bits: PIL's convert clips instead of scaling (a 16-bit photo came out almost
    # white, a float mask of 0.8 as 'keep everything')
    (lambda: asym_runtime.images_to_batch(Image.fromarray(np.full((64, 64), 60000, np.uint16))),
     r"PIL mode 'I;16' \(more than 8-bit pixels\) would be clipped to 0..255, not scaled"),
    (lambda: asym_runtime.masks_to_batch(Image.fromarray(np.full((64, 64), 0.8, np.float32))),
     r"PIL mode 'F' \(float pixels\) would be clipped .*\(masks: \[0, 1\]"),
    (lambda: asym_runtime.images_to_batch(_photo(), size=(96, 64)), r"size=\(96, 64\) is ambiguous"),
    (lambda: asym_runtime.images_to_batch(_photo(), width=100, height=64), r"size 64x100 is not allowed"),
    (lambda: asym_runtime.images_to_batch(_photo(96, 60)), r"96x60 .* multiples of 8. Pass width=96, height=56"),
    (lambda: asym_runtime.images_to_batch(_photo(), width=0, height=0), r"positive multiples of 8"),
    # an empty image passed the multiple-of-8 check as it is (0 % 8 == 0)
    (lambda: asym_runtime.images_to_batch(Image.new("RGB", (0, 0))), r"image is 0x0 .* positive multiples of 8"),
    (lambda: asym_runtime.masks_to_batch(Image.new("L", (0, 16))), r"image is 0x16 .* positive multiples of 8"),
    (lambda: asym_runtime.images_to_batch(_photo(), size=-8), r"positive multiples of 8"),
    # sizes are integers: a string was read digit by digit ('88' resized to 8x8 without a word),
    # a fraction truncated
    (lambda: asym_runtime.images_to_batch(_photo(), size="88"), r"size='88' must be one number"),
    (lambda: asym_runtime.masks_to_batch(_mask(), size=("64", "64")), r"size='64' must be an integer"),
    (lambda: asym_runtime.images_to_batch(_photo(), width="abc", height=64), r"width='abc' must be an integer"),
    (lambda: asym_runtime.images_to_batch(_photo(), width=64.9, height=64), r"width=64.9 must be an integer"),
    (lambda: asym_runtime.masks_to_batch(_mask(), width=64, height=True), r"height=True must be an integer"),
    # a decoded batch with NaN came out as black pixels; a list raised AttributeError
    (lambda: asym_runtime.batch_to_images(np.full((1, 3, 8, 8), np.nan, np.float32)), r"contains NaN or Inf"),
    (lambda: asym_runtime.batch_to_images([[0.0]]), r"numpy array or a torch tensor, got list"),
    (lambda: asym_runtime.batch_to_images(np.zeros((1, 3, 8, 8), np.uint8)), r"float batch"),
    # each of height and width must be a positive multiple of 8, not only one of them
    (lambda: asym_runtime.images_to_batch(_photo(), width=0, height=64), r"size 64x0 is not allowed"),
    (lambda: asym_runtime.masks_to_batch(_mask(), width=96, height=0), r"size 0x96 is not allowed"),
    # a bool is not a size, also as size= (True would have been a 1x1 square)
    (lambda: asym_runtime.images_to_batch(_photo(), size=True), r"size=True must be one number"),
    # Inf, not only NaN: it would come out as a saturated pixel without a word
    (lambda: asym_runtime.batch_to_images(np.full((1, 3, 8, 8), -np.inf, np.float32)), r"contains NaN or Inf"),
    # rank is checked, not only the channel axis: a 5-D batch reached numpy's transpose
    (lambda: asym_runtime.batch_to_images(np.zeros((1, 3, 8, 8, 1), np.float32)),
     r"expected \[batch, 3, height, width\], got shape \(1, 3, 8, 8, 1\)"),
    # a tensor without dense data is an input error too, not torch's own ValueError
    (lambda: asym_runtime.batch_to_images(torch.zeros((1, 3, 8, 8)).to_sparse()),
     r"^batch_to_images: got a sparse_coo tensor; only dense \(strided\) tensors hold pixels$"),
    (lambda: asym_runtime.batch_to_images(torch.zeros((1, 3, 8, 8), device="meta")),
     r"^batch_to_images: got a tensor on device 'meta'; only CPU and CUDA tensors carry data here$"),
])
def test_helper_errors_say_what_to_do(call, message):
    with pytest.raises(AsymInputError, match=message):
        call()


#: every PIL mode wider than 8 bits per pixel, as Image.fromarray makes them
_WIDE = {
    "I": lambda: Image.fromarray(np.full((64, 64), 70000, np.int32)),  # convert("RGB") clips it to white
    "I;16": lambda: Image.fromarray(np.full((64, 64), 60000, np.uint16)),
    "I;16B": lambda: Image.fromarray(np.full((64, 64), 60000, ">u2")),
    "F": lambda: Image.fromarray(np.full((64, 64), 0.8, np.float32)),
    "I;16L": lambda: Image.new("I;16L", (64, 64), 60000),  # PIL's other 16-bit modes (Image.new makes them)
    "I;16N": lambda: Image.new("I;16N", (64, 64), 60000),
}


@pytest.mark.parametrize("mode", list(_WIDE))
@pytest.mark.parametrize("helper", ["images_to_batch", "masks_to_batch"])
def test_every_wide_pil_mode_is_refused_by_both_helpers(mode, helper):
    image = _WIDE[mode]()
    assert image.mode == mode
    with pytest.raises(AsymInputError, match=rf"PIL mode '{mode}' .* would be clipped to 0..255"):
        getattr(asym_runtime, helper)(image)


def test_batch_to_images_takes_bfloat16_tensors():
    """torch's bfloat16 has no numpy dtype: the helper widens it instead of failing in .numpy()."""
    torch = pytest.importorskip("torch")
    x = torch.linspace(-1, 1, 3 * 8 * 8).reshape(1, 3, 8, 8)
    want = np.asarray(asym_runtime.batch_to_images(x.to(torch.bfloat16).float())[0])
    assert np.array_equal(np.asarray(asym_runtime.batch_to_images(x.to(torch.bfloat16))[0]), want)
