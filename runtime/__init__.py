"""asym_runtime: load an asym-export artifact folder and run it (numpy + onnxruntime/tensorrt).

Never imports torch or diffusers at import time.
"""

__version__ = "0.1.0"

from .errors import (  # noqa: F401
    ArtifactError,
    AsymInputError,
    BackendUnavailableError,
    IncompatibleEngineError,
    ShapeOutOfLimitsError,
)
from .manifest import Manifest, read_manifest  # noqa: F401
from .specs import DECODER, DECODER_UNCOND, ENCODER, GRAPHS, Shape, ShapeLimits  # noqa: F401
