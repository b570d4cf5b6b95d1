"""Errors raised by asym_runtime (and reused by asym_export).

Everything a caller can cause with its input or its files is a ``ValueError`` subclass, so
``except ValueError`` in a service catches bad requests without catching bugs.
"""


class AsymInputError(ValueError):
    """An input tensor is wrong: rank, channels, dtype, size, batch, NaN/Inf or value range."""


class ShapeOutOfLimitsError(AsymInputError):
    """A request lies outside the shape limits the artifact was built and verified for."""


class ArtifactError(ValueError):
    """An artifact folder is missing, incomplete, tampered with or of another schema."""


class IncompatibleEngineError(ArtifactError):
    """A TensorRT engine was built for another variant, GPU or TensorRT version."""


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run on this machine (no GPU, no tensorrt, no CUDA provider).

    A ``RuntimeError``, not a ``ValueError``: the machine, not the caller's input, is missing
    something. The message says in one sentence what is missing.
    """


class BackendError(RuntimeError):
    """A backend failed while running a graph (e.g. ``execute_async_v3`` returned False), or
    while starting a session for a file that passed its checks (cuDNN failing to start, an
    allocation).

    Never raised for bad input: inputs are checked before any backend runs.
    """


class ArtifactMissing(ArtifactError):
    """A file the manifest lists is not there (another export may have just replaced the folder)."""

    def __init__(self, path):
        super().__init__(f"{path} is listed in manifest.json but missing")
        self.path = path
