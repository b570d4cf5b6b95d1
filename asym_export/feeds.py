"""Seeded example inputs for export, verification and calibration (numpy, float32).

The same arrays feed PyTorch, ONNX Runtime and TensorRT, so every comparison sees identical
inputs. Values follow what StableDiffusionInpaintPipeline passes the VAE: images in
[-1, 1], binary masks (1 = repaint) with edges that are not aligned to the 8-pixel latent
grid, and latents ``z / scaling_factor`` where the diffusion latent ``z`` has unit variance.
"""

from __future__ import annotations

import numpy as np

from asym_runtime.specs import GraphSpec, Shape

#: Seed of the export's verification inputs (recorded in the manifest; asym-parity replays it):
#: the inputs of the i-th verification shape come from ``VERIFY_SEED + i``.
VERIFY_SEED = 1234
#: Calibration inputs for the FP16 islands: batch 1 (activation ranges are per sample), three
#: shapes, and masks that exercise the conditioned path (random), the pure condition
#: features (zeros) and the plain decoder path (ones). Seeds differ from verification's, so
#: the islands are judged on inputs they were not chosen from.
CALIBRATION = ((Shape(1, 64, 64), "random"), (Shape(1, 48, 80), "zeros"), (Shape(1, 80, 48), "ones"))
CALIBRATION_SEED = 4321
#: Seed of the engine verification inputs. Not CALIBRATION_SEED: the profile's min shape
#: (1x64x64 by default) is also the first calibration shape, and the engines must be judged on
#: inputs the islands were not chosen from.
ENGINE_VERIFY_SEED = 8765


def image_batch(rng: np.random.Generator, shape: Shape) -> np.ndarray:
    """Smooth random images in [-1, 1]: low-frequency colour fields plus mild noise."""
    b, h, w = shape.batch, shape.height, shape.width
    coarse = rng.uniform(-1, 1, size=(b, 3, max(h // 16, 1) + 1, max(w // 16, 1) + 1))
    ys = np.linspace(0, coarse.shape[2] - 1, h)
    xs = np.linspace(0, coarse.shape[3] - 1, w)
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    y1, x1 = np.minimum(y0 + 1, coarse.shape[2] - 1), np.minimum(x0 + 1, coarse.shape[3] - 1)
    fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
    img = (coarse[:, :, y0][:, :, :, x0] * (1 - fy) * (1 - fx) + coarse[:, :, y1][:, :, :, x0] * fy * (1 - fx)
           + coarse[:, :, y0][:, :, :, x1] * (1 - fy) * fx + coarse[:, :, y1][:, :, :, x1] * fy * fx)
    img = img + rng.normal(0, 0.1, size=img.shape)
    return np.clip(img, -1, 1).astype(np.float32)


def mask_batch(rng: np.random.Generator, shape: Shape, kind: str = "random") -> np.ndarray:
    """Binary masks [B, 1, H, W]: ``random`` (a rectangle with off-grid edges plus speckles),
    ``zeros`` (keep everything) or ``ones`` (repaint everything)."""
    b, h, w = shape.batch, shape.height, shape.width
    if kind == "zeros":
        return np.zeros((b, 1, h, w), np.float32)
    if kind == "ones":
        return np.ones((b, 1, h, w), np.float32)
    if kind != "random":
        raise ValueError(f"mask kind {kind!r}: use random, zeros or ones")
    m = np.zeros((b, 1, h, w), np.float32)
    for i in range(b):
        y0, x0 = rng.integers(0, h // 2), rng.integers(0, w // 2)
        y1, x1 = rng.integers(y0 + 1, h + 1), rng.integers(x0 + 1, w + 1)
        m[i, 0, y0:y1, x0:x1] = 1
        m[i, 0][rng.random((h, w)) < 0.02] = 1
    return m


def latent_batch(rng: np.random.Generator, shape: Shape, scaling_factor: float,
                 channels: int = 4) -> np.ndarray:
    """Decoder input as the pipeline gives it: unit-variance latents divided by scaling_factor."""
    z = rng.standard_normal((shape.batch, channels, shape.height // 8, shape.width // 8))
    return (z / scaling_factor).astype(np.float32)


#: input name -> ``(rng, shape, tensor, scaling_factor, mask kind) -> array``: one generator per
#: tensor of the contract, shared by every graph that takes it
FEEDERS = {
    "image": lambda rng, shape, t, sf, mask: image_batch(rng, shape),
    "mask": lambda rng, shape, t, sf, mask: mask_batch(rng, shape, mask),
    "latent": lambda rng, shape, t, sf, mask: latent_batch(rng, shape, sf, t.channels),
}


def make_feed(graph: GraphSpec, shape: Shape, seed: int, scaling_factor: float,
              mask: str = "random") -> dict[str, np.ndarray]:
    """One input per name of ``graph``, seeded so every backend gets the same arrays. Inputs are
    drawn in the graph's input order from one generator, so graphs whose inputs start alike
    (``decoder`` and ``decoder_uncond``: the latent) get the same arrays for the same seed."""
    rng = np.random.default_rng(seed)
    feed = {}
    for t in graph.inputs:
        feeder = FEEDERS.get(t.name)
        if feeder is None:  # pragma: no cover - every input of the contract has a feeder
            raise ValueError(f"no feed for input {t.name!r}; add one to asym_export.feeds.FEEDERS")
        feed[t.name] = feeder(rng, shape, t, scaling_factor, mask)
    return feed
