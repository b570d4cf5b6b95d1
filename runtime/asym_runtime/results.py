"""What a loaded VAE returns besides arrays: the model config (``vae.config``) and the latent
distribution of ``encode`` (diffusers' ``DiagonalGaussianDistribution``), including drawing its
noise exactly as diffusers' ``randn_tensor`` does for a ``torch.Generator``."""

from __future__ import annotations

from typing import Any

import numpy as np

from . import arrays
from .errors import AsymInputError


class VAEConfig:
    """Read-only model config from the manifest: ``config.scaling_factor`` or ``config["..."]``."""

    def __init__(self, data: dict):
        self._data = dict(data)

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["_data"][name]
        except KeyError:
            raise AttributeError(f"the model config has no {name!r}") from None

    def __getitem__(self, name: str) -> Any:
        return self._data[name]

    def __contains__(self, name: str) -> bool:
        return name in self._data

    def get(self, name: str, default: Any = None) -> Any:
        return self._data.get(name, default)

    def keys(self):
        return self._data.keys()

    def to_dict(self) -> dict:
        return dict(self._data)

    def __repr__(self) -> str:
        return f"VAEConfig({self._data!r})"


class LatentDistribution:
    """diffusers' ``latent_dist`` (``DiagonalGaussianDistribution``) from the encoder's outputs.

    ``mean`` and ``logvar`` (already clamped to [-30, 20] by the graph) are arrays of the
    input's kind: numpy, or torch tensors on the input's device.
    """

    def __init__(self, mean: Any, logvar: Any):
        self.mean = mean
        self.logvar = logvar

    @property
    def std(self) -> Any:
        return self._exp(0.5 * self.logvar)

    @property
    def var(self) -> Any:
        return self._exp(self.logvar)

    def _exp(self, x: Any) -> Any:
        return np.exp(x) if isinstance(x, np.ndarray) else x.exp()

    def mode(self) -> Any:
        return self.mean

    def sample(self, generator: Any = None) -> Any:
        """``mean + std * noise``.

        ``generator``: for numpy results a ``numpy.random.Generator``, an int seed or None; a
        ``torch.Generator`` (or a list, one per batch item) draws the noise exactly as
        diffusers' ``randn_tensor`` does, so the sample equals diffusers' for the same
        generator state.
        """
        noise = _noise(tuple(self.mean.shape), generator, self.mean)
        return self.mean + self.std * noise


def _is_torch_generator(g: Any) -> bool:
    torch = arrays.torch_module()
    if torch is None:
        return False
    if isinstance(g, (list, tuple)):
        return len(g) > 0 and all(isinstance(x, torch.Generator) for x in g)
    return isinstance(g, torch.Generator)


def _noise(shape: tuple[int, ...], generator: Any, ref: Any) -> Any:
    if _is_torch_generator(generator) or (arrays.is_torch(ref) and generator is None):
        torch = arrays.torch_module()
        device = ref.device if arrays.is_torch(ref) else torch.device("cpu")
        gens = list(generator) if isinstance(generator, (list, tuple)) else generator
        if isinstance(gens, list) and len(gens) == 1:
            gens = gens[0]
        # diffusers' randn_tensor: CPU generators draw on the CPU, then move
        if gens is None:
            rand_device = device
        else:
            g0 = gens[0] if isinstance(gens, list) else gens
            if not arrays.is_torch(ref):  # numpy result: draw where the generator lives
                rand_device = g0.device
            else:
                rand_device = torch.device("cpu") if g0.device.type == "cpu" else device
        if isinstance(gens, list):
            if len(gens) != shape[0]:
                raise AsymInputError(f"sample: {len(gens)} generators for a batch of {shape[0]}")
            parts = [torch.randn((1,) + shape[1:], generator=g, device=rand_device, dtype=torch.float32)
                     for g in gens]
            noise = torch.cat(parts, dim=0)
        else:
            noise = torch.randn(shape, generator=gens, device=rand_device, dtype=torch.float32)
        noise = noise.to(device)
        return noise if arrays.is_torch(ref) else noise.cpu().numpy()
    if isinstance(generator, (int, np.integer)) and not isinstance(generator, bool) and generator < 0:
        raise AsymInputError(f"sample: seed {generator} must be >= 0 (numpy seeds are non-negative integers)")
    if generator is None or isinstance(generator, (int, np.integer)):
        generator = np.random.default_rng(generator)
    if not isinstance(generator, np.random.Generator):
        raise AsymInputError(
            f"sample: generator must be a numpy.random.Generator, an int seed, None or a "
            f"torch.Generator; got {type(generator).__name__}"
        )
    noise = generator.standard_normal(shape, dtype=np.float32)
    return noise if isinstance(ref, np.ndarray) else arrays.like(noise, ref)
