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


@pytest.mark.parametrize("kw, msg", [
    ({"opt_batch": 5, "max_batch": 4}, r"batch needs min <= opt <= max, got 1 / 5 / 4"),
    ({"opt_width": 2048}, r"width needs min <= opt <= max, got 64 / 2048 / 1024"),
    ({"max_width": 1020}, r"max width 1020 is not a multiple of 8"),
    ({"min_height": 60}, r"min height 60 is not a multiple of 8"),
    ({"max_batch": True}, r"max batch True must be a positive integer"),
    ({"opt_height": 512.0}, r"opt height 512.0 must be a positive integer"),
])
def test_limits_validate_every_axis_and_corner(kw, msg):
    with pytest.raises(AsymInputError, match=msg):
        ShapeLimits(**kw)


def test_limits_from_dict_names_every_missing_key():
    d = ShapeLimits().to_dict()
    del d["opt_width"], d["max_batch"]
    with pytest.raises(AsymInputError, match=r"shape limits: missing max_batch, opt_width"):
        ShapeLimits.from_dict(d)


def test_limit_messages_name_the_option_that_moves_the_limit():
    lim = ShapeLimits.from_sizes("256", "512", "1024", max_batch=2)
    with pytest.raises(ShapeOutOfLimitsError, match=r"re-export with a larger --max-batch to allow it$"):
        lim.check(3, 512, 512)
    with pytest.raises(ShapeOutOfLimitsError, match=r"re-export with a larger --max-size to allow it$"):
        lim.check(1, 1032, 512)
    with pytest.raises(ShapeOutOfLimitsError, match=r"re-export with a smaller --min-size to allow it$"):
        lim.check(1, 512, 128)
    with pytest.raises(ShapeOutOfLimitsError) as e:
        lim.check(0, 512, 512)
    assert str(e.value) == "batch 0 is below this artifact's min_batch 1 (supported: batch 1..2)"
    assert lim.contains(Shape(2, 256, 1024)) and not lim.contains(Shape(2, 256, 1040))


@pytest.mark.parametrize("text", ["2x64x96x", "2x64x96 extra", "x2x64x96", "2x64", "2x64x96x8"])
def test_parse_shape_refuses_anything_but_bxhxw(text):
    with pytest.raises(AsymInputError, match=r"is not of the form BxHxW"):
        parse_shape(text)


@pytest.mark.parametrize("text", ["512x768x2", "512 768", "512x768 px"])
def test_parse_size_refuses_trailing_text(text):
    with pytest.raises(AsymInputError, match=r"is not of the form N or HxW"):
        parse_size(text)
