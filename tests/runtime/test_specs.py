"""The graph contract and the shape limits (pure data; no torch)."""

import pytest

from asym_runtime.errors import AsymInputError, ShapeOutOfLimitsError
from asym_runtime.specs import DECODER, ENCODER, Shape, ShapeLimits, parse_shape, parse_size


def test_contract_names_match_design():
    assert ENCODER.input_names == ["image"]
    assert ENCODER.output_names == ["latent_mean", "latent_logvar"]
    assert DECODER.input_names == ["latent", "image", "mask"]
    assert DECODER.output_names == ["sample"]
    assert DECODER.tensor("latent").dims == ("batch", 4, "latent_height", "latent_width")
    assert DECODER.tensor("mask").dims == ("batch", 1, "height", "width")


def test_concrete_shapes():
    assert DECODER.tensor("latent").shape(2, 96, 160) == (2, 4, 12, 20)
    assert DECODER.tensor("image").shape(2, 96, 160) == (2, 3, 96, 160)


@pytest.mark.parametrize("text, hw", [("512", (512, 512)), ("512x768", (512, 768)), (" 64 X 128 ", (64, 128))])
def test_parse_size(text, hw):
    assert parse_size(text) == hw


@pytest.mark.parametrize("text, msg", [("500", "multiples of 8"), ("abc", "N or HxW"), ("0", "multiples"),
                                       ("512x", "N or HxW")])
def test_parse_size_errors(text, msg):
    with pytest.raises(AsymInputError, match=msg):
        parse_size(text)


def test_parse_shape():
    assert parse_shape("2x64x96") == Shape(2, 64, 96)
    with pytest.raises(AsymInputError, match="batch must be"):
        parse_shape("0x64x64")
    with pytest.raises(AsymInputError, match="width 20"):
        parse_shape("1x64x20")


def test_limits_validate():
    with pytest.raises(AsymInputError, match="min <= opt <= max"):
        ShapeLimits(min_batch=2, opt_batch=1)
    with pytest.raises(AsymInputError, match="multiple of 8"):
        ShapeLimits(max_height=1020)
    with pytest.raises(AsymInputError, match="positive integer"):
        ShapeLimits(min_batch=0)


def test_limits_check_names_the_limit():
    lim = ShapeLimits.from_sizes("256", "512x768", "1024", max_batch=2)
    lim.check(2, 256, 1024)
    with pytest.raises(ShapeOutOfLimitsError, match="batch 3 is above this artifact's max_batch 2"):
        lim.check(3, 512, 512)
    with pytest.raises(ShapeOutOfLimitsError, match="height 128 is below this artifact's min_height 256"):
        lim.check(1, 128, 512)
    with pytest.raises(ShapeOutOfLimitsError, match="width 1032 is above"):
        lim.check(1, 512, 1032)
    assert isinstance(ShapeOutOfLimitsError("x"), ValueError)


def test_profile_from_limits():
    lim = ShapeLimits.from_sizes("256", "512x768", "1024", max_batch=2)
    p = lim.profile(DECODER)
    assert p["latent"] == ((1, 4, 32, 32), (1, 4, 64, 96), (2, 4, 128, 128))
    assert p["mask"] == ((1, 1, 256, 256), (1, 1, 512, 768), (2, 1, 1024, 1024))
    assert ShapeLimits.from_dict(lim.to_dict()) == lim
