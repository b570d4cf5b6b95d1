"""asym_runtime: load an asym-export artifact folder and run it (numpy + onnxruntime/tensorrt).

    import asym_runtime
    vae = asym_runtime.load("artifacts/x2")          # picks TensorRT / ONNX Runtime CUDA / CPU
    sample = vae.decode(latent, image=image, mask=mask)

Never imports torch or diffusers at import time (``diffusers_adapter`` does, when imported).
"""

__version__ = "0.1.0"

from .errors import (  # noqa: F401
    ArtifactError,
    AsymInputError,
    BackendError,
    BackendUnavailableError,
    IncompatibleEngineError,
    ShapeOutOfLimitsError,
)
from .api import BACKENDS, AsymVAE, LatentDistribution, VAEConfig, check_loadable, load  # noqa: F401
from . import images  # noqa: F401
from .images import batch_to_images, images_to_batch, masks_to_batch  # noqa: F401
from .manifest import Manifest, generation_folder, read_manifest  # noqa: F401
from .specs import DECODER, DECODER_UNCOND, ENCODER, GRAPHS, Shape, ShapeLimits  # noqa: F401
from .serving.client import remote  # noqa: F401  (imports tritonclient only when called)
