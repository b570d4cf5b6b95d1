"""Run a diffusers pipeline's VAE on the runtime: ``pipe.vae = vae.as_diffusers()``.

``StableDiffusionInpaintPipeline`` passes ``image=`` and ``mask=`` to the VAE's ``decode``
only when ``isinstance(pipe.vae, AsymmetricAutoencoderKL)``, so the adapter is a subclass of
it that builds no layers: it registers the artifact's model config (the pipeline reads
``config.scaling_factor``, ``config.latent_channels`` and ``config.block_out_channels``) and
forwards ``encode`` / ``decode`` to the loaded runtime. Tensors stay torch tensors; with a
GPU backend CUDA tensors go to the backend without a host round trip.

Importing this module imports torch and diffusers; ``asym_runtime`` itself never does.
"""

from __future__ import annotations

import copy

import torch
from diffusers import AsymmetricAutoencoderKL
from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution
from diffusers.models.modeling_outputs import AutoencoderKLOutput
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils.accelerate_utils import apply_forward_hook

from .vae import AsymVAE


class RuntimeAsymmetricAutoencoderKL(AsymmetricAutoencoderKL):
    """An ``AsymmetricAutoencoderKL`` whose ``encode`` / ``decode`` run on an :class:`AsymVAE`.

    Its only parameter is an empty one (no weights): it gives it the ``device`` and ``dtype``
    that pipelines ask models for (``pipe.to(...)`` moves it), and accelerate's offload hook
    (``pipe.enable_model_cpu_offload()``), which reads a hooked module's device from its first
    parameter, something to read. Outputs come back in the dtype of the input (the graphs
    compute with float32 I/O).
    """

    def __init__(self, runtime: AsymVAE):
        # Deliberately not AsymmetricAutoencoderKL.__init__: it would build the whole network.
        ModelMixin.__init__(self)
        self.register_to_config(**runtime.config.to_dict())
        self.runtime = runtime
        self._device_anchor = torch.nn.Parameter(torch.zeros(0, dtype=torch.float32), requires_grad=False)

    # encode/decode trigger an accelerate offload hook as diffusers' own VAE does: with
    # pipe.enable_model_cpu_offload() the UNet goes back to the CPU before the VAE runs
    @apply_forward_hook
    def encode(self, x: torch.Tensor, return_dict: bool = True):
        dist = self.runtime.encode(x)
        moments = torch.cat([dist.mean, dist.logvar], dim=1).to(x.dtype)
        posterior = DiagonalGaussianDistribution(moments)
        if not return_dict:
            return (posterior,)
        return AutoencoderKLOutput(latent_dist=posterior)

    def _decode(self, z: torch.Tensor, image: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                return_dict: bool = True):
        # diffusers' MaskConditionDecoder conditions only when image AND mask are given; one of
        # them alone is a plain decode there (vae(x) passes the image without a mask), so here too
        if image is None or mask is None:
            image = mask = None
        else:
            # diffusers' blends broadcast an image or mask of batch 1 over the latents' batch (the
            # inpainting pipeline passes one mask for several images, or one image for several
            # masks); the runtime takes one batch for all three, so repeat it here
            image, mask = (_over_batch(t, z.shape[0]) for t in (image, mask))
        dec = self.runtime.decode(z, image=image, mask=mask).to(z.dtype)
        if not return_dict:
            return (dec,)
        return DecoderOutput(sample=dec)

    @apply_forward_hook
    def decode(self, z: torch.Tensor, generator: torch.Generator | None = None, image: torch.Tensor | None = None,
               mask: torch.Tensor | None = None, return_dict: bool = True):
        return self._decode(z, image, mask, return_dict=return_dict)

    def forward(self, sample: torch.Tensor, mask: torch.Tensor | None = None, sample_posterior: bool = False,
                return_dict: bool = True, generator: torch.Generator | None = None):
        posterior = self.encode(sample).latent_dist
        z = posterior.sample(generator=generator) if sample_posterior else posterior.mode()
        return self.decode(z, generator, sample, mask, return_dict=return_dict)

    def __repr__(self) -> str:
        return f"RuntimeAsymmetricAutoencoderKL({self.runtime!r})"

    def __deepcopy__(self, memo):
        """``copy.deepcopy(pipe)`` (a pipeline copied to change its scheduler, say): the copy
        gets an adapter of its own over the same runtime. The adapter holds no weights, and the
        runtime cannot be copied (its sessions are live on their device) but is thread-safe, so
        both pipelines share it; closing it ends both."""
        memo[id(self.runtime)] = self.runtime  # deepcopy hands back the runtime itself
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        for k, v in self.__dict__.items():
            new.__dict__[k] = copy.deepcopy(v, memo)
        return new

    # No weights to save or load: a pipeline saved with this VAE would come back with a VAE of
    # random weights (or not at all), so saving and loading say so instead.
    def save_pretrained(self, save_directory, *args, **kwargs):
        raise NotImplementedError(
            f"RuntimeAsymmetricAutoencoderKL holds no weights (it runs the exported graphs in "
            f"{self.runtime.manifest.root}), so it cannot be saved as a diffusers model; to save the "
            "pipeline, put its PyTorch VAE back first (pipe.vae = the original) and keep the artifact "
            "folder beside the saved pipeline")

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        raise NotImplementedError(
            "RuntimeAsymmetricAutoencoderKL is not loaded from diffusers weights: use "
            "asym_runtime.load(artifact_folder).as_diffusers()")

    @classmethod
    def from_config(cls, *args, **kwargs):
        raise NotImplementedError(
            "RuntimeAsymmetricAutoencoderKL is not built from a config: use "
            "asym_runtime.load(artifact_folder).as_diffusers()")


def _over_batch(t: torch.Tensor, batch: int) -> torch.Tensor:
    """``t`` with a batch of 1 repeated to ``batch`` (a view); any other batch as it is (the
    runtime names a mismatch)."""
    if t.ndim == 4 and t.shape[0] == 1 and batch > 1:
        return t.expand(batch, *t.shape[1:])
    return t
