"""Export wrappers around diffusers' AsymmetricAutoencoderKL submodules.

They reuse every diffusers submodule (and so every weight) as is, and replace one thing:
``MaskConditionDecoder`` stores the condition features in a dict keyed by
``str(tuple(x.shape))`` and looks them up by the current activation's shape. With symbolic
shapes that key is not a concrete string, so ``torch.export`` fails (FACTS.md). Here the
features are kept in a list and each up block reads the one at a level fixed when the
wrapper is built. The level is chosen by the same rule the dict applies at run time (same
channel count and same spatial size; the last match wins, as a dict overwrite would), so
the wrapper computes what diffusers computes for every valid shape.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution


class EncoderWrapper(nn.Module):
    """image [B, 3, H, W] -> (latent_mean, latent_logvar), as ``vae.encode(image).latent_dist``."""

    def __init__(self, vae):
        super().__init__()
        self.encoder = vae.encoder
        self.quant_conv = vae.quant_conv

    def forward(self, image: torch.Tensor):
        moments = self.quant_conv(self.encoder(image))
        dist = DiagonalGaussianDistribution(moments)
        return dist.mean, dist.logvar


def feature_levels(decoder) -> tuple[list[int], int]:
    """Which condition-encoder feature each up block (and the final blend) reads.

    Returns ``(per_block, final)``: indices into ``decoder.condition_encoder.layers``.
    Each activation and feature is described by (channels, level), level = log2 of its
    downsampling against the pixel grid; for pixel sizes that are multiples of 8 this pair
    fixes the dict key ``str(tuple(shape))`` exactly (batch is shared).
    """
    feats: list[tuple[int, int]] = []
    level = 0
    for layer in decoder.condition_encoder.layers:
        level += int(layer.stride[0] == 2)
        feats.append((layer.out_channels, level))

    def lookup(channels: int, lvl: int, where: str) -> int:
        hits = [i for i, f in enumerate(feats) if f == (channels, lvl)]
        if not hits:
            raise ValueError(
                f"{where}: no condition feature with {channels} channels at 1/{2 ** lvl} "
                "resolution; diffusers' MaskConditionDecoder would raise KeyError for this config"
            )
        return hits[-1]  # a later dict entry with the same key overwrites an earlier one

    level = sum(1 for ub in decoder.up_blocks if ub.upsamplers is not None)
    channels = decoder.conv_in.out_channels
    per_block = []
    for i, ub in enumerate(decoder.up_blocks):
        per_block.append(lookup(channels, level, f"up block {i}"))
        channels = ub.resnets[-1].out_channels
        level -= int(ub.upsamplers is not None)
    final = lookup(channels, level, "final blend")
    return per_block, final


class DecoderWrapper(nn.Module):
    """``vae.decode(latent, image=image, mask=mask).sample`` with the feature dict replaced.

    ``conditional=False`` gives the plain decoder, ``vae.decode(latent).sample``.
    """

    def __init__(self, vae, conditional: bool = True):
        super().__init__()
        self.post_quant_conv = vae.post_quant_conv
        self.decoder = vae.decoder
        self.conditional = conditional
        if conditional:
            self.block_features, self.final_feature = feature_levels(vae.decoder)

    def _condition_features(self, masked_image: torch.Tensor) -> list[torch.Tensor]:
        # MaskConditionEncoder.forward, keeping a list instead of the shape-keyed dict: each conv
        # output is stored BEFORE its ReLU. (Its ``mask`` argument is unused in diffusers too.)
        out = []
        x = masked_image
        for layer in self.decoder.condition_encoder.layers:
            x = layer(x)
            out.append(x)
            x = torch.relu(x)
        return out

    def forward(self, latent: torch.Tensor, image: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        d = self.decoder
        sample = d.conv_in(self.post_quant_conv(latent))
        upscale_dtype = next(iter(d.up_blocks.parameters())).dtype
        sample = d.mid_block(sample, None).to(upscale_dtype)
        if self.conditional:
            feats = self._condition_features((1 - mask) * image)
            for up_block, level in zip(d.up_blocks, self.block_features):
                mask_ = F.interpolate(mask, size=sample.shape[-2:], mode="nearest")
                sample = sample * mask_ + feats[level] * (1 - mask_)
                sample = up_block(sample, None)
            sample = sample * mask + feats[self.final_feature] * (1 - mask)
        else:
            for up_block in d.up_blocks:
                sample = up_block(sample, None)
        sample = d.conv_norm_out(sample)
        sample = d.conv_act(sample)
        return d.conv_out(sample)


def wrapper_for(vae, graph_name: str) -> nn.Module:
    """The export wrapper for one graph of the contract (``runtime/specs.py``)."""
    if graph_name == "encoder":
        return EncoderWrapper(vae).eval()
    if graph_name == "decoder":
        return DecoderWrapper(vae, conditional=True).eval()
    if graph_name == "decoder_uncond":
        return DecoderWrapper(vae, conditional=False).eval()
    raise ValueError(f"no export wrapper for graph {graph_name!r}")
