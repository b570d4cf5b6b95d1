"""One naming scheme for what runs an artifact: ``load()``'s backend names and precisions, and
a configuration written ``BACKEND/PRECISION`` (``onnxruntime-cpu/fp32``, ``openvino/bf16``),
optionally followed by one option (``onnxruntime-cuda/fp16/portable``, ``.../cudagraph``).

``load()`` takes the parts as arguments; ``asym-bench`` and ``asym-parity`` read and print the
written form, parsed and formatted here only.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import AsymInputError

BACKENDS = ("auto", "tensorrt", "onnxruntime", "onnxruntime-cuda", "onnxruntime-cpu", "openvino")
#: bf16: OpenVINO only (the FP32 graphs computed in BF16: fast on CPUs with BF16 units, emulated on AVX-512)
PRECISIONS = ("fp32", "fp16", "bf16")
#: Which ONNX graphs the CUDA provider runs: "auto" (the CUDA form where the folder has one),
#: "cuda" (the CUDA form, or an error) or "portable" (the standard graphs every provider runs).
GRAPH_FORMS = ("auto", "cuda", "portable")
#: The option a written name may end with -> the ``load()`` arguments it stands for.
OPTIONS = {"portable": {"graph_form": "portable"}, "cudagraph": {"cuda_graph": True}}


@dataclass(frozen=True)
class BackendName:
    """A backend with its precision (None: ``load()``'s default, e.g. TensorRT engines as built)
    and at most one option of :data:`OPTIONS`; ``str()`` gives the written form."""

    backend: str
    precision: str | None = None
    option: str | None = None

    def __str__(self) -> str:
        return "/".join(p for p in (self.backend, self.precision, self.option) if p)

    def load_kwargs(self) -> dict:
        """The ``asym_runtime.load`` arguments this name stands for."""
        return {"backend": self.backend, "precision": self.precision, **OPTIONS.get(self.option, {})}


def parse_backend_name(text: str, backends=BACKENDS) -> BackendName:
    """``"onnxruntime-cuda/fp16/portable"`` -> BackendName("onnxruntime-cuda", "fp16", "portable").
    ``backends``: the backend names allowed (default: ``load()``'s). Raises AsymInputError
    naming what is allowed."""
    parts = str(text).strip().split("/")
    if not 1 <= len(parts) <= 3 or not all(parts):
        raise AsymInputError(f"{text!r} is not of the form BACKEND[/PRECISION[/OPTION]] "
                             "(e.g. onnxruntime-cpu/fp32)")
    backend, precision, option = parts + [None] * (3 - len(parts))
    if backend not in backends:
        raise AsymInputError(f"{text!r}: unknown backend {backend!r}; choose from {', '.join(backends)}")
    if precision is not None and precision not in PRECISIONS:
        raise AsymInputError(f"{text!r}: unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    if option is not None and option not in OPTIONS:
        raise AsymInputError(f"{text!r}: unknown option {option!r}; choose from {', '.join(OPTIONS)}")
    return BackendName(backend, precision, option)
