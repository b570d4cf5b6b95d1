"""Negative controls for the FP32 tolerance (max abs 1e-3): three semantic mistakes a decoder
export could make, each exported for real and checked the way every export is checked. Each must
fail verification at the default tolerance, or the tolerance proves nothing."""

from __future__ import annotations

import pytest
from torch.nn import functional as F

import asym_export.onnx_export as oe
from asym_export.export import Reference
from asym_export.onnx_export import onnx_from_model
from asym_export.verify import FP32_MAX_ABS, Tolerance, VerificationReport
from asym_export.wrappers import DecoderWrapper
from asym_runtime.specs import DECODER, Shape


class MutatedDecoder(DecoderWrapper):
    """``DecoderWrapper.forward`` with one deliberate mistake (``mutation``)."""

    def __init__(self, vae, mutation: str):
        super().__init__(vae, conditional=True, subpixel=True)
        self.mutation = mutation

    def forward(self, latent, image=None, mask=None):
        d = self.decoder
        sample = d.mid_block(d.conv_in(self.post_quant_conv(latent)), None)
        feats = self._condition_features((1 - mask) * image)
        for i, level in enumerate(self.block_features):
            feat = feats[level]
            if self.mutation == "wrong feature level" and i == 1:
                # the next coarser feature, upsampled to fit: runs, but reads the wrong level
                feat = F.interpolate(feats[self.block_features[0]], size=feat.shape[-2:], mode="nearest")
            m_ = F.interpolate(mask, size=sample.shape[-2:], mode="nearest")
            if self.mutation == "swapped mask polarity":
                sample = sample * (1 - m_) + feat * m_
            elif not (self.mutation == "dropped blend" and i == 2):
                sample = sample * m_ + feat * (1 - m_)
            sample = self._up_block(i, sample)
        sample = sample * mask + feats[self.final_feature] * (1 - mask)
        return d.conv_out(d.conv_act(d.conv_norm_out(sample)))


@pytest.mark.parametrize("mutation", ["wrong feature level", "swapped mask polarity", "dropped blend"])
def test_a_semantic_mistake_fails_the_fp32_check(tiny_vae, tmp_path, monkeypatch, mutation):
    monkeypatch.setattr(oe, "wrapper_for", lambda vae, name: MutatedDecoder(vae, mutation).eval())
    path = onnx_from_model(tiny_vae, DECODER, tmp_path / "decoder.onnx", variant="tiny", scaling_factor=0.18215)
    ref = Reference.compute(tiny_vae, DECODER, [Shape(2, 64, 64), Shape(1, 64, 96)], 0.18215)
    report = VerificationReport("onnx_fp32", Tolerance(max_abs=FP32_MAX_ABS))
    ref.check(path, report)
    assert not report, f"{mutation} passed the FP32 check"
    worst = max(o.max_abs for c in report.cases for o in c.outputs)
    assert worst > 10 * FP32_MAX_ABS  # not a near miss: the tolerance is far from these errors
