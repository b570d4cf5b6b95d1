"""Export wrappers around diffusers' AsymmetricAutoencoderKL submodules.

They reuse every diffusers submodule (and so every weight) as is, and replace two things.

**The nearest-x2 upsample followed by a 3x3 convolution** at the end of each of the first
three up blocks is exported in its sub-pixel form (:class:`SubpixelUpsample2D`): four 2x2
convolutions on the low-resolution input, one per output phase, interleaved by a
reshape/transpose. It is the same linear map (every output pixel sums the same weights times
the same inputs; only the order of float32 additions differs), with 16 instead of 36
multiply-adds per output pixel and channel pair. Those convolutions are 15 % of an x2
decode's FLOPs, so a decode needs about 8 % fewer, on every backend; where convolutions already
run at the hardware's FMA peak (ONNX Runtime on a CPU, measured in the README) nothing else
can buy that time back. ``subpixel=False`` keeps diffusers' own upsamplers.

**The feature lookup:**
``MaskConditionDecoder`` stores the condition features in a dict keyed by
``str(tuple(x.shape))`` and looks them up by the current activation's shape. With symbolic
shapes that key is not a concrete string, so ``torch.export`` fails (docs/contracts.md, "The model"). Here the
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


#: For output phase ``a`` (0: even row, 1: odd row) of a nearest-x2 upsample followed by a 3x3
#: convolution with padding 1: which of the kernel's rows land on each of the two input rows
#: the output reads (rows i-1, i for a = 0; rows i, i+1 for a = 1). Same for columns.
_PHASE_TAPS = {0: ((0,), (1, 2)), 1: ((0, 1), (2,))}


class SubpixelUpsample2D(nn.Module):
    """diffusers ``Upsample2D`` (nearest x2, then a 3x3 convolution) in sub-pixel form.

    ``conv(upsample(x))[2i + a, 2j + b]`` only reads ``x`` rows ``i - 1 + a .. i + a`` and
    columns ``j - 1 + b .. j + b``, so each output phase (a, b) is a 2x2 convolution of ``x``
    whose taps are sums of the 3x3 kernel's taps (``_PHASE_TAPS``), padded so that it yields
    exactly H x W outputs; the four phases are then interleaved (depth-to-space).
    """

    def __init__(self, upsampler):
        super().__init__()
        conv = getattr(upsampler, "conv", None)
        ok = (getattr(upsampler, "interpolate", False) and getattr(upsampler, "use_conv", False)
              and not getattr(upsampler, "use_conv_transpose", True) and upsampler.norm is None
              and upsampler.name == "conv" and isinstance(conv, nn.Conv2d)
              and conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.padding == (1, 1)
              and conv.dilation == (1, 1) and conv.groups == 1 and conv.bias is not None)
        if not ok:
            raise ValueError(f"SubpixelUpsample2D covers nearest-x2 + 3x3/pad-1 convolutions only, not {upsampler!r}")
        w, bias = conv.weight.detach(), conv.bias.detach()
        self.channels = conv.out_channels
        for a in (0, 1):
            for b in (0, 1):
                k = torch.stack([torch.stack([sum(w[:, :, u, v] for u in _PHASE_TAPS[a][r] for v in _PHASE_TAPS[b][c])
                                              for c in (0, 1)], dim=-1) for r in (0, 1)], dim=-2)
                self.register_buffer(f"weight_{a}{b}", k.contiguous())
        self.register_buffer("bias", bias.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b_, c = x.shape[0], self.channels
        h, w = x.shape[-2], x.shape[-1]
        phases = []
        for a in (0, 1):
            for b in (0, 1):
                # rows i-1+a .. i+a: pad 1-a above and a below (likewise for columns)
                xp = F.pad(x, (1 - b, b, 1 - a, a))
                phases.append(F.conv2d(xp, getattr(self, f"weight_{a}{b}"), self.bias))
        y = torch.cat(phases, dim=1)  # channel = (2a + b) * C + c
        return y.reshape(b_, 2, 2, c, h, w).permute(0, 3, 4, 1, 5, 2).reshape(b_, c, 2 * h, 2 * w)


class DecoderWrapper(nn.Module):
    """``vae.decode(latent, image=image, mask=mask).sample`` with the feature dict replaced.

    ``conditional=False`` gives the plain decoder, ``vae.decode(latent).sample``.
    ``subpixel=True`` (the export default) runs the up blocks' upsamplers in sub-pixel form.
    """

    def __init__(self, vae, conditional: bool = True, subpixel: bool = True):
        super().__init__()
        self.post_quant_conv = vae.post_quant_conv
        self.decoder = vae.decoder
        self.conditional = conditional
        if conditional:
            self.block_features, self.final_feature = feature_levels(vae.decoder)
        self.upsamplers = nn.ModuleList(
            [SubpixelUpsample2D(ub.upsamplers[0]) if subpixel and ub.upsamplers is not None else nn.Identity()
             for ub in vae.decoder.up_blocks]) if subpixel else None
        if subpixel and any(ub.upsamplers is not None and len(ub.upsamplers) != 1 for ub in vae.decoder.up_blocks):
            raise ValueError("an up block with several upsamplers is not a MaskConditionDecoder layout")

    def _up_block(self, i: int, sample: torch.Tensor) -> torch.Tensor:
        """``UpDecoderBlock2D.forward`` (resnets, then the upsampler), with ours if subpixel."""
        ub = self.decoder.up_blocks[i]
        if self.upsamplers is None:
            return ub(sample, None)
        for resnet in ub.resnets:
            sample = resnet(sample, temb=None)
        return self.upsamplers[i](sample)

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
            for i, level in enumerate(self.block_features):
                mask_ = F.interpolate(mask, size=sample.shape[-2:], mode="nearest")
                sample = sample * mask_ + feats[level] * (1 - mask_)
                sample = self._up_block(i, sample)
            sample = sample * mask + feats[self.final_feature] * (1 - mask)
        else:
            for i in range(len(d.up_blocks)):
                sample = self._up_block(i, sample)
        sample = d.conv_norm_out(sample)
        sample = d.conv_act(sample)
        return d.conv_out(sample)

