"""Helpers shared by the runtime tests: seeded feeds and diffusers references."""

from __future__ import annotations

import numpy as np

from asym_runtime.specs import DECODER, ENCODER, Shape


def feed(graph_name: str, shape: Shape, seed: int = 0, mask: str = "random") -> dict[str, np.ndarray]:
    """The seeded inputs asym-export verifies with (images in [-1, 1], binary off-grid masks)."""
    from asym_export.feeds import make_feed

    graph = {"encoder": ENCODER, "decoder": DECODER}[graph_name]
    return make_feed(graph, shape, seed, 0.18215, mask=mask)


def diffusers_decode(vae, latent, image=None, mask=None) -> np.ndarray:
    import torch

    t = {k: (None if v is None else torch.from_numpy(v)) for k, v in
         {"latent": latent, "image": image, "mask": mask}.items()}
    with torch.no_grad():
        return vae.decode(t["latent"], image=t["image"], mask=t["mask"]).sample.numpy()


def diffusers_encode(vae, image):
    import torch

    with torch.no_grad():
        return vae.encode(torch.from_numpy(image)).latent_dist
