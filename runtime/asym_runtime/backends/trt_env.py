"""What TensorRT on this machine can run, apart from running it (``tensorrt.py``): importing
tensorrt and cuda-python, the CUDA devices, version parsing, whether a folder's engines fit this
TensorRT and GPU (:func:`check_engine_compatibility`, plain Python), and the process's one
TensorRT logger. The export side's engine build uses these too: one TensorRT stack."""

from __future__ import annotations

import logging
import threading

from ..errors import BackendError, BackendUnavailableError, IncompatibleEngineError

log = logging.getLogger(__name__)

#: ``hardware_compatibility_level`` values the manifest may record (TensorRT's
#: HardwareCompatibilityLevel NONE / AMPERE_PLUS / SAME_COMPUTE_CAPABILITY).
HW_LEVELS = ("none", "ampere_plus", "same_compute_capability")
#: Major-version pairs (built, runtime) across which version-compatible engines run
#: (TensorRT support matrix: 8 -> 9/10 and 10 -> 11); within one major any later release.
_CROSS_MAJOR = {(8, 9), (8, 10), (10, 11)}

INSTALL_HINT = ("pip install -e '.[tensorrt]' in this project's folder (tensorrt and cuda-python) on a machine with an "
                "NVIDIA GPU")


# --------------------------------------------------------------------------- imports, devices

def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError:
        raise BackendUnavailableError(
            f"the TensorRT backend needs the tensorrt Python package, which is not installed: {INSTALL_HINT}"
        ) from None
    return trt


def import_cudart():
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python
        except ImportError:
            raise BackendUnavailableError(
                f"the TensorRT backend needs cuda-python for device memory and streams, which is "
                f"not installed: {INSTALL_HINT}"
            ) from None
    return cudart


def native_handle(obj) -> int:
    """The raw handle of a cuda-python object (stream, graph) as TensorRT's ``int`` wants it.
    cuda-python 13 deprecates ``int(obj)`` in favour of ``get_cuda_native_handle``."""
    try:
        from cuda.bindings.utils import get_cuda_native_handle
    except ImportError:  # older cuda-python
        return int(obj)
    try:
        return get_cuda_native_handle(obj)
    except TypeError:  # a release whose helper does not know this type yet
        return int(obj)


def cuda_call(result):
    """Unpack a cuda-python call's ``(err, *values)`` and raise on an error."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        cudart = import_cudart()
        _, name = cudart.cudaGetErrorName(err)
        raise BackendError(f"CUDA call failed: {name.decode() if isinstance(name, bytes) else name}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def device_info(device_id: int = 0) -> dict:
    """``{"name": ..., "compute_capability": "9.0"}`` of CUDA device ``device_id``."""
    cudart = import_cudart()
    props = cuda_call(cudart.cudaGetDeviceProperties(device_id))
    name = props.name
    if isinstance(name, (bytes, bytearray)):
        name = bytes(name).split(b"\0", 1)[0].decode(errors="replace")
    return {"name": str(name), "compute_capability": f"{props.major}.{props.minor}"}


def unavailable_reason(device_id: int = 0) -> str | None:
    """One sentence saying why the TensorRT backend cannot run here, or None if it can."""
    try:
        import_tensorrt()
        cudart = import_cudart()
    except BackendUnavailableError as e:
        return str(e)
    err, count = cudart.cudaGetDeviceCount()
    if int(err) != 0:  # e.g. a driver older than the CUDA major version of cuda-python
        _, name = cudart.cudaGetErrorName(err)
        name = name.decode() if isinstance(name, bytes) else name
        return (f"the TensorRT backend could not count CUDA GPUs ({name}); the NVIDIA driver must "
                "support the CUDA major version of the installed cuda-python and tensorrt")
    if count == 0:
        return "the TensorRT backend needs a CUDA GPU, and none is visible on this machine"
    if device_id >= count:
        return f"CUDA device {device_id} was asked for, but only {count} GPU(s) are visible"
    return None


# --------------------------------------------------------------------------- compatibility

def version_tuple(v: str) -> tuple[int, ...]:
    """``"10.12.0.36"`` -> ``(10, 12, 0, 36)``; non-digits inside a part are dropped."""
    out = []
    for part in str(v).split("."):
        digits = "".join(ch for ch in part if ch.isdigit())
        out.append(int(digits) if digits else 0)
    return tuple(out)


def _cc_tuple(cc: str) -> tuple[int, int]:
    major, _, minor = str(cc).partition(".")
    return int(major), int(minor or 0)


def check_engine_compatibility(meta: dict, *, variant: str, tensorrt_version: str,
                               compute_capability: str, device_name: str | None = None) -> None:
    """Refuse engines this machine cannot run, before any plan is deserialized.

    ``meta`` is the manifest's ``engines`` object. Rules: the engines' variant must be the
    folder's; the TensorRT release (major.minor.patch) must be the installed one, unless the
    engines are version compatible and the installed release is the same or later (same
    major, or 8->9/10, 10->11); the GPU's compute capability must be the one they were
    built for, unless built with hardware compatibility ``ampere_plus`` (any GPU of compute
    capability 8.0 or later). Raises :class:`IncompatibleEngineError` listing every problem.
    """
    problems = []
    built_variant = meta.get("variant")
    if built_variant is not None and built_variant != variant:
        problems.append(f"the engines were built for variant {built_variant}, the folder holds {variant}")

    built = meta.get("tensorrt_version")
    if not built:
        problems.append("the manifest does not record the TensorRT version the engines were built with")
    else:
        b, r = version_tuple(built), version_tuple(tensorrt_version)
        if b[:3] != r[:3]:
            if not meta.get("version_compatible"):
                problems.append(
                    f"the engines were built with TensorRT {built} and this machine has {tensorrt_version}; "
                    "rebuild them with this TensorRT (or build them version compatible)"
                )
            elif not (r[:3] >= b[:3] and (r[0] == b[0] or (b[0], r[0]) in _CROSS_MAJOR)):
                problems.append(
                    f"the engines are version compatible from TensorRT {built}, which does not extend "
                    f"to {tensorrt_version} (only to later releases of the same major, or 8->10, 10->11)"
                )

    level = meta.get("hardware_compatibility_level", "none") or "none"
    device = meta.get("device") or {}
    built_cc = device.get("compute_capability")
    if level not in HW_LEVELS:
        problems.append(f"unknown hardware_compatibility_level {level!r} (known: {', '.join(HW_LEVELS)})")
    elif level == "ampere_plus":
        if _cc_tuple(compute_capability) < (8, 0):
            problems.append(
                f"the engines are hardware compatible for Ampere and later (compute capability >= 8.0); "
                f"this GPU has compute capability {compute_capability}"
            )
    elif built_cc is None:
        problems.append("the manifest does not record the compute capability the engines were built for")
    elif _cc_tuple(built_cc) != _cc_tuple(compute_capability):
        problems.append(
            f"the engines were built for a GPU of compute capability {built_cc}"
            f"{' (' + device['name'] + ')' if device.get('name') else ''}, this GPU "
            f"{'(' + device_name + ') ' if device_name else ''}has {compute_capability}; rebuild them "
            "on this GPU (or build them with hardware compatibility ampere_plus)"
        )
    if problems:
        raise IncompatibleEngineError("incompatible TensorRT engines: " + "; ".join(problems))
    if device_name and device.get("name") and device["name"] != device_name and level == "none":
        log.info("engines were built on %s, running on %s (same compute capability)", device["name"], device_name)


class _TrtLogger:
    """The process's one TensorRT logger (building and running): routes TensorRT's log into
    ``logging`` and keeps its recent errors, which a failed build or load quotes (built
    lazily: it subclasses trt.ILogger)."""

    _instance = None
    _lock = threading.Lock()

    @classmethod
    def get(cls, trt):
        with cls._lock:
            if cls._instance is None:
                levels = {trt.ILogger.INTERNAL_ERROR: logging.CRITICAL, trt.ILogger.ERROR: logging.ERROR,
                          trt.ILogger.WARNING: logging.WARNING, trt.ILogger.INFO: logging.DEBUG,
                          trt.ILogger.VERBOSE: logging.DEBUG}
                errors = {trt.ILogger.INTERNAL_ERROR, trt.ILogger.ERROR}

                class Logger(trt.ILogger):
                    def __init__(self):
                        trt.ILogger.__init__(self)
                        #: the last 200 errors TensorRT logged; ``count`` counts them all
                        self.errors: list[str] = []
                        self.count = 0

                    def log(self, severity, msg):  # must not raise: TensorRT calls it from C++
                        log.log(levels.get(severity, logging.INFO), "TensorRT: %s", msg)
                        if severity in errors:
                            self.errors.append(str(msg))
                            self.count += 1
                            del self.errors[:-200]

                    def mark(self) -> int:
                        return self.count

                    def errors_since(self, mark: int) -> str:
                        """The errors logged after ``mark()`` (joined; "" if none)."""
                        new = min(self.count - mark, len(self.errors))
                        return "; ".join(self.errors[len(self.errors) - new:]) if new > 0 else ""

                cls._instance = Logger()
            return cls._instance


def trt_logger(trt):
    """The logger every TensorRT builder, parser and runtime of this process uses."""
    return _TrtLogger.get(trt)
