"""Variant configs are the published ones (docs/contracts.md), checked by size, not only by value."""

import pytest
import torch

from asym_export.variants import PUBLISHED, VARIANTS, get_variant
from asym_export.wrappers import feature_levels


def _meta_model(name):
    from diffusers import AsymmetricAutoencoderKL

    with torch.device("meta"):
        return AsymmetricAutoencoderKL(**get_variant(name).config)


def _params(module) -> float:
    return sum(p.numel() for p in module.parameters()) / 1e6


@pytest.mark.parametrize("name, decoder_m", [("x1.5", 160.1), ("x2", 372.0)])
def test_published_sizes_match_facts(name, decoder_m):
    m = _meta_model(name)
    dec = _params(m.decoder) + _params(m.post_quant_conv)
    enc = _params(m.encoder) + _params(m.quant_conv)
    assert dec == pytest.approx(decoder_m, abs=0.05)
    assert enc == pytest.approx(34.2, abs=0.05)


def test_hub_ids():
    assert VARIANTS["x1.5"].hub_id == "cross-attention/asymmetric-autoencoder-kl-x-1-5"
    assert VARIANTS["x2"].hub_id == "cross-attention/asymmetric-autoencoder-kl-x-2"
    assert VARIANTS["tiny"].hub_id is None
    assert set(PUBLISHED) == {"x1.5", "x2"}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_feature_levels_follow_the_real_structure(name):
    # 4 up blocks read condition layers 4, 3, 2, 1 and the final blend reads layer 0
    assert feature_levels(_meta_model(name).decoder) == ([4, 3, 2, 1], 0)


def test_unknown_variant_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown variant 'x3'.*x1.5, x2"):
        get_variant("x3")


def test_mismatches_name_the_key():
    cfg = dict(get_variant("x2").config, layers_per_up_block=3)
    (msg,) = get_variant("x2").mismatches(cfg)
    assert "layers_per_up_block" in msg and "got 3" in msg
