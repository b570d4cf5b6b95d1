"""``AsymVAE``: a loaded artifact's ``encode`` and ``decode`` (built by :func:`asym_runtime.load`
or :func:`asym_runtime.remote`), over one backend per graph.

The calls mirror diffusers' ``AsymmetricAutoencoderKL``: ``encode`` gives the latent
distribution, ``decode`` the raw decoder output (not clamped; scaling by
``config.scaling_factor`` is the caller's, as in diffusers). Inputs are checked
(``checks.py``) before any backend runs.
"""

from __future__ import annotations

from typing import Any

from . import arrays
from .backends.base import Backend
from .checks import check_inputs
from .errors import AsymInputError
from .manifest import Manifest
from .results import LatentDistribution, VAEConfig
from .specs import DECODER, DECODER_UNCOND, ENCODER, ShapeLimits


class AsymVAE:
    """A loaded artifact: ``encode``, ``decode`` and the model config.

    Thread safety: one instance may be used from many threads at once and gives the same
    results as serial calls. ONNX Runtime sessions are safe for concurrent ``run`` (with
    ``cuda_graph=True`` calls are serialised: the captured graph's buffers are shared); OpenVINO makes
    one infer request per call; the TensorRT backend keeps one execution context per engine and serialises calls on it with
    a lock (a context is not thread-safe, and a second context would double the activation
    memory for little gain on one GPU).
    """

    def __init__(self, manifest: Manifest, backends: dict[str, Backend], *, backend: str,
                 precision: str, limits: ShapeLimits, device: str, graph_form: str | None = None):
        self.manifest = manifest
        self.backends = backends
        #: "tensorrt", "onnxruntime-cuda", "onnxruntime-cpu", "openvino" or, for remote(), "triton":
        #: a name load() takes (except "triton"), so load(d, backend=vae.backend) loads it again
        self.backend = backend
        #: precision of the graphs or engines that run: "fp32", "fp16" or (OpenVINO) "bf16"
        self.precision = precision
        #: the shapes this runtime accepts (manifest limits, narrowed by an engine's profile)
        self.limits = limits
        #: "cpu" or "cuda:N": where the backend computes ("remote" for asym_runtime.remote())
        self.device = device
        #: ONNX Runtime: "cuda" (the fused channels-last CUDA form) or "portable"; OpenVINO: "portable";
        #: None for TensorRT
        self.graph_form = graph_form
        cfg = dict(manifest.model_config)
        cfg["scaling_factor"] = manifest.scaling_factor
        self.config = VAEConfig(cfg)

    @property
    def variant(self) -> str:
        return self.manifest.variant

    def __repr__(self) -> str:
        form = f" ({self.graph_form} graphs)" if self.graph_form else ""
        return (f"<AsymVAE {self.variant} {self.backend} {self.precision}{form} on {self.device}, "
                f"{self.manifest.root}>")

    # ----- calls
    def encode(self, image: Any) -> LatentDistribution:
        """image [B, 3, H, W] in [-1, 1] -> the latent distribution (``.mean``, ``.logvar``,
        ``.std``, ``.sample(generator)``), as diffusers' ``encode(image).latent_dist``."""
        req = check_inputs("encode", ENCODER.inputs, {"image": image}, self.limits)
        out = self._run("encoder", req.feed)
        return LatentDistribution(out["latent_mean"], out["latent_logvar"])

    def decode(self, latent: Any, image: Any = None, mask: Any = None) -> Any:
        """Decode ``latent`` [B, 4, H/8, W/8] (already divided by ``scaling_factor``).

        With ``image`` [B, 3, H, W] in [-1, 1] (the unmasked image) and ``mask``
        [B, 1, H, W] in [0, 1] (1 = repaint): the conditional decode, diffusers'
        ``decode(latent, image=image, mask=mask).sample``. With neither: the plain decode,
        ``decode(latent).sample``. Returns [B, 3, H, W], float32, not clamped.
        """
        if (image is None) != (mask is None):
            given, missing = ("image", "mask") if mask is None else ("mask", "image")
            raise AsymInputError(
                f"decode: got {given} but no {missing}; pass both image and mask for the "
                "conditional (inpainting) decode, or neither for a plain decode"
            )
        if image is None:
            uncond = "decoder_uncond" in self.backends
            spec = DECODER_UNCOND if uncond else DECODER
            req = check_inputs("decode", (spec.tensor("latent"),), {"latent": latent}, self.limits)
            if uncond:
                return self._run("decoder_uncond", req.feed)["sample"]
            lat = req.feed["latent"]
            b, h, w = req.shape.batch, req.shape.height, req.shape.width
            feed = {"latent": lat, "image": arrays.full(lat, (b, 3, h, w), 0.0),
                    "mask": arrays.full(lat, (b, 1, h, w), 1.0)}
            return self._run("decoder", feed)["sample"]
        req = check_inputs("decode", DECODER.inputs, {"latent": latent, "image": image, "mask": mask},
                           self.limits)
        return self._run("decoder", req.feed)["sample"]

    def _run(self, graph: str, feed: dict[str, Any]) -> dict[str, Any]:
        backend = self.backends.get(graph)
        if backend is None:
            raise RuntimeError(f"this AsymVAE has no {graph} graph: load(..., graphs=) left it out, or the "
                               "Triton server behind remote() does not serve it (asym-serve --graphs)")
        if not backend.active:
            raise RuntimeError("this AsymVAE is closed")
        return backend.infer(feed)

    # ----- lifecycle
    def close(self) -> None:
        """Free sessions, engines and buffers. The instance cannot run afterwards."""
        for b in self.backends.values():
            b.deactivate()

    def __enter__(self) -> "AsymVAE":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()

    # ----- copies: none, the sessions and engines are live on their device
    def _cannot(self, what: str) -> TypeError:
        return TypeError(
            f"an AsymVAE cannot be {what}: it holds live {self.backend} sessions on {self.device}. Share this "
            f"one (it is thread-safe), or open another where it is needed: asym_runtime.load("
            f"{str(self.manifest.root)!r}, backend={self.backend!r}, precision={self.precision!r})"
            if self.backend != "triton" else
            f"an AsymVAE cannot be {what}: it holds a live connection to a Triton server. Share this one "
            "(it is thread-safe), or connect again where it is needed with asym_runtime.remote()")

    def __copy__(self):
        raise self._cannot("copied")

    def __deepcopy__(self, memo):
        raise self._cannot("copied")

    def __reduce_ex__(self, protocol):
        raise self._cannot("pickled")

    # ----- diffusers
    def as_diffusers(self):
        """An ``AsymmetricAutoencoderKL`` stand-in that runs on this runtime, to assign as
        ``pipe.vae`` (imports torch and diffusers)."""
        from .diffusers_adapter import RuntimeAsymmetricAutoencoderKL

        return RuntimeAsymmetricAutoencoderKL(self)
