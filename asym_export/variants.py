"""The published checkpoints of AsymmetricAutoencoderKL and a tiny test config.

Configs are the exact diffusers configs (docs/contracts.md, "The model"): x2 from its
hub ``config.json``, x1.5 from diffusers ``scripts/convert_asymmetric_vqgan_to_diffusers.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

_SHARED = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "down_block_out_channels": [128, 256, 512, 512],
    "layers_per_down_block": 2,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 256,
    "scaling_factor": 0.18215,
}

#: Config keys that fix the architecture; a checkpoint that differs here is another model.
STRUCTURAL_KEYS = (
    "in_channels", "out_channels", "down_block_types", "down_block_out_channels",
    "layers_per_down_block", "up_block_types", "up_block_out_channels", "layers_per_up_block",
    "act_fn", "latent_channels", "norm_num_groups",
)


@dataclass(frozen=True)
class Variant:
    name: str
    hub_id: str | None
    config: dict = field(repr=False)
    description: str = ""

    @property
    def scaling_factor(self) -> float:
        return float(self.config["scaling_factor"])

    def mismatches(self, config: dict) -> list[str]:
        """Structural keys where ``config`` disagrees with this variant: 'key: got X, expected Y'."""
        out = []
        for k in STRUCTURAL_KEYS:
            got = config.get(k)
            want = self.config[k]
            if isinstance(got, tuple):
                got = list(got)
            if got != want:
                out.append(f"{k}: got {got!r}, {self.name} has {want!r}")
        return out


VARIANTS: dict[str, Variant] = {
    "x1.5": Variant(
        name="x1.5",
        hub_id="cross-attention/asymmetric-autoencoder-kl-x-1-5",
        config={**_SHARED, "up_block_out_channels": [192, 384, 768, 768], "layers_per_up_block": 3},
        description="decoder 160.1 M params, 8.1 TFLOP per conditional 512x512 decode",
    ),
    "x2": Variant(
        name="x2",
        hub_id="cross-attention/asymmetric-autoencoder-kl-x-2",
        config={**_SHARED, "up_block_out_channels": [256, 512, 1024, 1024], "layers_per_up_block": 5,
                "sample_size": 32},
        description="decoder 372.0 M params, 18.4 TFLOP per conditional 512x512 decode",
    ),
    # Not a checkpoint: the real structure (4 down and 4 up blocks, channels c, 2c, 4c, 4c so
    # the condition encoder's strides line up) at a size that runs in milliseconds. Tests only.
    "tiny": Variant(
        name="tiny",
        hub_id=None,
        config={
            **_SHARED,
            "down_block_out_channels": [8, 16, 32, 32],
            "layers_per_down_block": 1,
            "up_block_out_channels": [8, 16, 32, 32],
            "layers_per_up_block": 1,
            "norm_num_groups": 4,
            "sample_size": 32,
        },
        description="test config with the real block structure; random weights only",
    ),
}

PUBLISHED = ("x1.5", "x2")


def get_variant(name: str) -> Variant:
    try:
        return VARIANTS[name]
    except KeyError:
        raise ValueError(
            f"unknown variant {name!r}; choose one of {', '.join(VARIANTS)}"
        ) from None
