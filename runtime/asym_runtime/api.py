"""``asym_runtime.load``: an artifact folder in, a loaded VAE out (numpy in, numpy out).

    vae = asym_runtime.load("artifacts/x2")                 # TensorRT > ONNX Runtime CUDA > CPU
    dist = vae.encode(image)                                # image [B, 3, H, W] in [-1, 1]
    z = dist.sample(np.random.default_rng(0)) * vae.config.scaling_factor
    out = vae.decode(z / vae.config.scaling_factor, image=image, mask=mask)   # conditional
    out = vae.decode(z / vae.config.scaling_factor)                          # plain decode

This module chooses and loads: which backend runs (TensorRT engines, ONNX Runtime CUDA or CPU,
OpenVINO), which files of the folder it needs, and each graph's backend session from the checked
bytes. What the loaded object does is :class:`~asym_runtime.vae.AsymVAE` (``vae.py``); what it
returns besides arrays, ``results.py``.
"""

from __future__ import annotations

import logging
import os
from typing import Iterable

from .backends import tensorrt as trt_backend
from .backends.base import Backend
from .backends.onnxrt import NO_CUDA_PROVIDER, OnnxRuntimeBackend, cuda_provider_available
from .errors import ArtifactError, BackendError, BackendUnavailableError, IncompatibleEngineError
from .manifest import FORMAT_ONNX, FORMAT_ONNX_CUDA, FORMAT_PLAN, MANIFEST_NAME, ArtifactMissing, Manifest, read_manifest
# load()'s backend, precision and graph-form names, with their written form BACKEND/PRECISION
from .names import BACKENDS, GRAPH_FORMS, PRECISIONS  # noqa: F401
from .results import LatentDistribution, VAEConfig  # noqa: F401  (asym_runtime.api's names before the split)
from .specs import GRAPHS, ShapeLimits
from .vae import AsymVAE

log = logging.getLogger(__name__)

#: Folders exported before ``decoder_uncond`` existed have no plain decoder graph; there the
#: runtime runs the conditional graph with mask = 1 and image = 0, where the blends are
#: ``sample * 1 + feature * 0``, exactly the plain decoder (tests/runtime/test_api.py proves it
#: against diffusers). Every graph a folder may hold is declared in ``specs.GRAPHS``.
_REQUIRED = ("encoder", "decoder")


def load(path: str | os.PathLike, backend: str = "auto", precision: str | None = None, *,
         verify_onnx: bool = True, device_id: int = 0, cuda_graph: bool = False,
         graphs: Iterable[str] | None = None, graph_form: str = "auto",
         provider_options: dict | None = None, cache_dir: str | os.PathLike | bool | None = None) -> AsymVAE:
    """Load the artifact folder ``path`` (written by ``asym-export``) and pick a backend.

    Args:
        path: the artifact folder (with ``manifest.json``).
        backend: ``"auto"`` (default): TensorRT engines if the folder has them and they can
            run here (tensorrt, cuda-python, a GPU, engines built for this variant, GPU and
            TensorRT version), else ONNX Runtime with the CUDA provider where it starts,
            else ONNX Runtime on the CPU. ``"tensorrt"``, ``"onnxruntime"`` (CUDA if it
            starts, else CPU), ``"onnxruntime-cuda"`` or ``"onnxruntime-cpu"`` force one.
            ``"openvino"`` (``pip install -e '.[openvino]'``) runs the FP32 graphs with
            OpenVINO on the CPU; ``"auto"`` never picks it (it is not measured faster here).
        precision: ``"fp32"`` or ``"fp16"`` picks the graph pair (ONNX graphs
            ``encoder.onnx`` or ``encoder.fp16.onnx``, ...) and, for TensorRT, the engines
            of that precision. None (default): the engines as built for TensorRT, the FP32
            graphs for ONNX Runtime. OpenVINO: ``"fp32"`` or ``"bf16"`` (BF16 compute: fast on a
            CPU with BF16 units, emulated and slower than FP32 with a warning on one with
            AVX-512 only, refused with BackendUnavailableError on others).
        verify_onnx: check the sha256 of every ONNX file against the manifest before
            loading it (default True). Engines are always checked.
        device_id: the CUDA device for GPU backends.
        cuda_graph: for services that decode at a few repeating shapes (GPU backends).
            TensorRT: the second consecutive call at a shape captures a CUDA graph and later
            calls at that shape replay it; a call at another shape drops it. ONNX Runtime
            CUDA: the first call's shape gets buffers bound once and a graph captured within
            that call, kept while the VAE is loaded; other shapes run on a second, ordinary
            session made on first need. Calls are serialised (one at a time per graph).
        graphs: which graphs to load, of ``encoder``, ``decoder``, ``decoder_uncond``
            (default: all the folder has). A decode-only service saves the encoder's memory
            with ``graphs=("decoder", "decoder_uncond")``; without ``decoder_uncond`` plain
            decodes run through ``decoder``.
        graph_form: ONNX Runtime CUDA only: ``"auto"`` (default) runs the folder's CUDA form
            (``decoder.fp16.cuda.onnx``: channels-last with fused GroupNorm/NhwcConv kernels)
            where it has one, ``"cuda"`` insists on it, ``"portable"`` runs the standard
            graphs. The CPU provider always runs the portable graphs.
        cache_dir: OpenVINO: where compiled models are cached (default
            ``~/.cache/asym-export/openvino``, under ``$XDG_CACHE_HOME`` if set; keyed by the
            graph's sha256, the precision, the OpenVINO version and the CPU; each blob is
            checked against its sha256 before use; ``False``: no cache).
        provider_options: ONNX Runtime CUDA provider options that replace the measured
            defaults (``asym_runtime.backends.onnxrt.CUDA_PROVIDER_OPTIONS``), e.g.
            ``{"cudnn_conv_algo_search": "EXHAUSTIVE"}``.

    Raises:
        ArtifactError: no manifest, another schema version, a file missing or changed
            (sha256), no graphs of the asked precision. ``IncompatibleEngineError`` (a
            subclass) for engines of another variant, GPU or TensorRT version when
            ``backend="tensorrt"`` (with ``"auto"`` they are skipped with a warning).
        BackendUnavailableError: the forced backend cannot run on this machine.
        BackendError: a backend could not start for files that passed their checks (cuDNN
            not starting, an allocation).
        ValueError: an unknown ``backend`` or ``precision``.
    """
    wanted = _check_arguments(backend, precision, graph_form, graphs)
    for attempt in range(1, _LOAD_ATTEMPTS + 1):
        manifest = None
        try:
            manifest = read_manifest(path)
            if backend == "openvino":
                return _load_openvino(manifest, precision or "fp32", wanted, cache_dir)
            return _load(manifest, backend, precision, verify_onnx, device_id, cuda_graph, wanted,
                         graph_form, provider_options)
        except ArtifactMissing:
            # a new export switched the folder to another generation and removed the one this
            # load was reading: load the new one (the manifest always names a complete one)
            if attempt == _LOAD_ATTEMPTS or (manifest is not None and _generation_of(path) == manifest.generation):
                raise
            log.info("%s was replaced by a new export while loading; loading the new artifact", path)
    raise AssertionError("unreachable")  # pragma: no cover


def _check_arguments(backend: str, precision: str | None, graph_form: str, graphs) -> tuple[str, ...]:
    """load()'s arguments checked (ValueError saying what is allowed); the wanted graphs."""
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if precision is not None and precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: choose fp32, fp16, bf16 (OpenVINO) or None (the folder's default)")
    if precision == "bf16" and backend != "openvino":
        raise ValueError("precision 'bf16' runs on backend='openvino' only (the FP32 graphs in BF16 on a CPU)")
    if backend == "openvino" and precision not in (None, "fp32", "bf16"):
        raise ValueError(f"precision {precision!r}: OpenVINO runs fp32 or bf16")
    if graph_form not in GRAPH_FORMS:
        raise ValueError(f"graph_form {graph_form!r}: choose one of {', '.join(GRAPH_FORMS)}")
    if graph_form == "cuda" and backend in ("onnxruntime-cpu", "openvino"):
        raise ValueError(f"graph_form 'cuda' runs on ONNX Runtime's CUDA provider only, not backend={backend!r} "
                         "(which runs the portable graphs)")
    if isinstance(graphs, str):  # load(dir, graphs="decoder"): one name, not its letters
        graphs = (graphs,)
    given = None if graphs is None else list(graphs)  # once: an iterator is read here only
    wanted = tuple(GRAPHS) if given is None else tuple(dict.fromkeys(given))
    unknown = [g for g in wanted if g not in GRAPHS]
    if unknown or not wanted:
        raise ValueError(f"graphs {given or []!r}: choose from {', '.join(GRAPHS)}")
    return wanted


def check_loadable(path: str | os.PathLike, backend: str = "auto", precision: str | None = None, *,
                   graphs: Iterable[str] | None = None, graph_form: str = "auto", device_id: int = 0) -> Manifest:
    """Refuse what :func:`load` with these arguments would refuse, without starting a backend,
    raising as it does: the arguments, the manifest, whether the backend can run here (TensorRT:
    the package, a GPU, and the engines' record against this GPU and TensorRT version), the graphs
    or engines of that precision, and every file the chosen backend reads (no link, a regular
    file, size and sha256, the hash streamed; an ONNX graph's data files as the graph names them).
    ``"auto"`` checks what load() would pick: compatible engines where TensorRT runs, else the ONNX
    graphs. What it cannot see without a session: whether ONNX Runtime's CUDA provider starts on
    the GPU. For launchers that hand the folder to another process (``asym-serve``): a bad
    folder or backend is refused before that process starts. Returns the manifest."""
    wanted = _check_arguments(backend, precision, graph_form, graphs)
    manifest = read_manifest(path)
    if backend == "openvino":
        _require_openvino(precision)
        for name in _onnx_entries(manifest, "fp32", wanted).values():
            manifest.check_graph(name)
        return manifest
    if backend in ("auto", "tensorrt"):
        engines, reason = _tensorrt_engines(manifest, backend, precision, wanted, device_id)
        if engines is not None and not reason:
            try:
                _engine_record(manifest, device_id)
            except (IncompatibleEngineError, BackendUnavailableError):
                if backend == "tensorrt":
                    raise
            else:  # TensorRT runs these: the ONNX graphs are not read
                for name in engines.values():
                    manifest.check_file(name)
                return manifest
    precision = precision or "fp32"
    portable = _onnx_entries(manifest, precision, wanted)
    cuda = backend == "onnxruntime-cuda" or (backend in ("auto", "onnxruntime") and cuda_provider_available())
    if backend == "onnxruntime-cuda" and not cuda_provider_available():
        raise BackendUnavailableError(NO_CUDA_PROVIDER)
    if graph_form == "cuda" and not cuda:
        raise BackendUnavailableError(_NO_CUDA_FORM)
    names = list(portable.values())
    if cuda:  # the CUDA form first, as load() tries the CUDA provider first
        names = list((_cuda_entries(manifest, precision, wanted, graph_form) or {}).values()) + names
    for name in dict.fromkeys(names):
        manifest.check_graph(name)
    return manifest


#: How many times load() tries in all when exports replace the folder under it: the first try
#: and up to two starts over on the new manifest.
_LOAD_ATTEMPTS = 3


def _generation_of(path) -> str | None:
    try:
        return read_manifest(path).generation
    except ArtifactError:
        return None


def _load(manifest: Manifest, backend: str, precision: str | None, verify_onnx: bool, device_id: int,
          cuda_graph: bool, wanted: tuple[str, ...], graph_form: str, provider_options: dict | None) -> AsymVAE:
    if backend in ("auto", "tensorrt"):
        engines, reason = _tensorrt_engines(manifest, backend, precision, wanted, device_id)
        if backend == "tensorrt":
            return _load_tensorrt(manifest, engines, device_id, cuda_graph)
        if engines is not None:
            if reason:
                log.info("%s has TensorRT engines, but %s; using ONNX Runtime", manifest.root, reason)
            else:
                try:
                    return _load_tensorrt(manifest, engines, device_id, cuda_graph)
                except (IncompatibleEngineError, BackendUnavailableError) as e:
                    log.warning("%s; using ONNX Runtime instead", e)

    return _load_onnxruntime(manifest, backend, precision or "fp32", verify_onnx, device_id, wanted,
                             cuda_graph=cuda_graph, graph_form=graph_form, provider_options=provider_options)


def _tensorrt_engines(manifest: Manifest, backend: str, precision: str | None, wanted: tuple[str, ...],
                      device_id: int) -> tuple[dict[str, str] | None, str | None]:
    """For backend "auto" or "tensorrt": the folder's engines of ``precision`` (None: none) and
    why TensorRT cannot run here (None: it can; only asked where it matters). A forced
    "tensorrt" raises instead: BackendUnavailableError, or ArtifactError without engines."""
    engines = _engine_entries(manifest, precision, wanted)
    reason = trt_backend.unavailable_reason(device_id) if backend == "tensorrt" or engines else None
    if backend == "tensorrt":
        if reason:
            raise BackendUnavailableError(reason)
        if engines is None:
            raise ArtifactError(
                f"{manifest.root} has no TensorRT engines" + (f" of precision {precision}" if precision else "")
                + " (engines/*.plan); build them with asym-export --engines on a machine with a GPU, or use "
                "backend='onnxruntime'")
    return engines, reason


def _require_openvino(precision: str | None) -> None:
    """BackendUnavailableError unless OpenVINO runs here (and, for bf16, computes BF16 on this CPU)."""
    from .backends import openvino as ov_backend

    reason = ov_backend.unavailable_reason() or (ov_backend.bf16_reason() if precision == "bf16" else None)
    if reason:
        raise BackendUnavailableError(reason)


_NO_CUDA_FORM = f"graph_form 'cuda' needs ONNX Runtime's CUDA provider: {NO_CUDA_PROVIDER}"


def _load_openvino(manifest: Manifest, precision: str, wanted: tuple[str, ...], cache_dir) -> AsymVAE:
    from .backends import openvino as ov_backend

    _require_openvino(precision)
    if precision == "bf16" and (warning := ov_backend.emulated_bf16_warning()):
        log.warning("%s: %s", manifest.root, warning)
    if cache_dir is None or cache_dir is True:
        cache_dir = ov_backend.default_cache_dir()
    backends: dict[str, Backend] = {}
    try:
        for role, name in _onnx_entries(manifest, "fp32", wanted).items():
            source = manifest.graph_source(name)  # the checked bytes, external data included
            b = ov_backend.OpenVinoBackend(GRAPHS[role], source, precision=precision, cache_dir=cache_dir or None)
            del source
            backends[role] = b.activate()
    except BaseException:
        for b in backends.values():
            b.deactivate()
        raise
    log.info("loaded %s with OpenVINO (CPU, %s)", manifest.root, precision)
    return AsymVAE(manifest, backends, backend="openvino", precision=precision, limits=manifest.limits,
                   device="cpu", graph_form="portable")


def _engine_entries(manifest: Manifest, precision: str | None, wanted: tuple[str, ...]) -> dict[str, str] | None:
    """role -> engine file name, if the folder has engines for every required wanted graph."""
    found = {}
    for role in wanted:
        e = manifest.find(role, FORMAT_PLAN, precision)
        if e is not None:
            found[role] = e.name
    if not found or not all(r in found for r in _REQUIRED if r in wanted):
        return None
    return found


def _onnx_entries(manifest: Manifest, precision: str, wanted: tuple[str, ...],
                  fmt: str = FORMAT_ONNX) -> dict[str, str]:
    found = {}
    for role in wanted:
        e = manifest.find(role, fmt, precision)
        if e is not None:
            found[role] = e.name
    missing = [r for r in _REQUIRED if r in wanted and r not in found]
    if not found and not missing:
        missing = list(wanted)
    if missing:
        have = sorted({e.precision for e in manifest.files.values() if e.format == FORMAT_ONNX and e.precision})
        hint = f"; pass precision={have[0]!r}" if have and precision not in have else ""
        raise ArtifactError(
            f"{manifest.root} has no {precision} ONNX graph for {', '.join(missing)} (its "
            f"{MANIFEST_NAME} lists precisions: {', '.join(have) or 'none'}){hint}"
        )
    return found


def _cuda_entries(manifest: Manifest, precision: str, wanted: tuple[str, ...],
                  graph_form: str) -> dict[str, str] | None:
    """role -> CUDA-form file for every wanted graph the folder has one for, or None (portable)."""
    if graph_form == "portable":
        return None
    found = {r: e.name for r in wanted if (e := manifest.find(r, FORMAT_ONNX_CUDA, precision)) is not None}
    portable = _onnx_entries(manifest, precision, wanted)
    if set(found) == set(portable):
        return found
    if graph_form == "cuda":
        raise ArtifactError(
            f"{manifest.root} has no {precision} CUDA form for "
            f"{', '.join(sorted(set(portable) - set(found)))} (re-export with a current asym-export, "
            "or load with graph_form='portable')"
        )
    return None


def _intersect(a: ShapeLimits, b: ShapeLimits | None) -> ShapeLimits:
    if b is None or a == b:
        return a
    kw = {}
    for axis in ("batch", "height", "width"):
        lo = max(getattr(a, f"min_{axis}"), getattr(b, f"min_{axis}"))
        hi = min(getattr(a, f"max_{axis}"), getattr(b, f"max_{axis}"))
        if lo > hi:
            raise ArtifactError(f"the engines' profile ({b}) and the manifest's shape limits ({a}) "
                                f"share no {axis}")
        opt = getattr(b, f"opt_{axis}")  # the narrower (engine) profile's opt, if it fits
        if not lo <= opt <= hi:
            opt = min(max(getattr(a, f"opt_{axis}"), lo), hi)
        kw.update({f"min_{axis}": lo, f"max_{axis}": hi, f"opt_{axis}": opt})
    return ShapeLimits(**kw)


def _engine_record(manifest: Manifest, device_id: int) -> tuple[dict, dict]:
    """The folder's ``engines`` record, checked against this GPU and TensorRT (IncompatibleEngineError
    if built for others), and the GPU's description. Needs TensorRT to be available."""
    import tensorrt as trt  # present: unavailable_reason() said so

    meta = manifest.data.get("engines")
    if not isinstance(meta, dict):
        raise IncompatibleEngineError(
            f"{manifest.root} lists engine files but its {MANIFEST_NAME} has no 'engines' record "
            "(TensorRT version, GPU) to check them against; re-export the engines"
        )
    dev = trt_backend.device_info(device_id)
    trt_backend.check_engine_compatibility(
        meta, variant=manifest.variant, tensorrt_version=trt.__version__,
        compute_capability=dev["compute_capability"], device_name=dev["name"],
    )
    return meta, dev


def _load_tensorrt(manifest: Manifest, engines: dict[str, str], device_id: int,
                   cuda_graph: bool) -> AsymVAE:
    import tensorrt as trt  # present: unavailable_reason() said so

    meta, dev = _engine_record(manifest, device_id)
    limits = manifest.limits
    if isinstance(meta.get("profile"), dict):
        limits = _intersect(limits, ShapeLimits.from_dict(meta["profile"]))
    plans = {role: manifest.read_verified(name) for role, name in engines.items()}
    backends: dict[str, Backend] = {}
    try:
        for role, plan in plans.items():
            b = trt_backend.TensorRTBackend(
                GRAPHS[role], plan, device_id=device_id, cuda_graph=cuda_graph,
                version_compatible=bool(meta.get("version_compatible")), label=engines[role],
            )
            backends[role] = b.activate()
            limits = _intersect(limits, b.limits)
        # any loaded engine says how they were built (the caller may have left the decoder out)
        precision = manifest.files[next(iter(engines.values()))].precision or "fp16"
        vae = AsymVAE(manifest, backends, backend="tensorrt", precision=precision, limits=limits,
                      device=f"cuda:{device_id}")
    except BaseException:
        for b in backends.values():
            b.deactivate()
        raise
    log.info("loaded %s with TensorRT %s on %s (%s)", manifest.root, trt.__version__, dev["name"], precision)
    return vae


def _load_onnxruntime(manifest: Manifest, backend: str, precision: str, verify: bool,
                      device_id: int, wanted: tuple[str, ...], *, cuda_graph: bool = False,
                      graph_form: str = "auto", provider_options: dict | None = None) -> AsymVAE:
    portable = _onnx_entries(manifest, precision, wanted)
    if backend == "onnxruntime-cpu":
        devices = ["cpu"]
    elif backend == "onnxruntime-cuda":
        devices = ["cuda"]
    else:
        devices = ["cuda", "cpu"] if cuda_provider_available() else ["cpu"]
    if graph_form == "cuda":  # insisting on the CUDA form: no fallback to the CPU's portable graphs
        devices = [d for d in devices if d == "cuda"]
        if not devices:
            raise BackendUnavailableError(_NO_CUDA_FORM)
    if cuda_graph and "cuda" not in devices:
        if backend == "onnxruntime-cpu":
            raise ValueError("cuda_graph needs a GPU backend (TensorRT or ONNX Runtime CUDA), not onnxruntime-cpu")
        log.warning("cuda_graph: no GPU backend can run here; running on the CPU without CUDA graphs")
    last: Exception | None = None
    for device in devices:
        cuda = _cuda_entries(manifest, precision, wanted, graph_form) if device == "cuda" else None
        graphs = cuda or portable
        backends: dict[str, Backend] = {}
        try:
            for role, name in graphs.items():
                # verify: the checked bytes of the graph and of every data file it reads go to
                # ONNX Runtime from memory (nothing is opened again after the check)
                source = manifest.graph_source(name) if verify else manifest.path(name)
                b = OnnxRuntimeBackend(GRAPHS[role], source, device=device, device_id=device_id,
                                       precision=precision, cuda_graph=cuda_graph and device == "cuda",
                                       provider_overrides=provider_options if device == "cuda" else None)
                del source  # the backend drops the bytes once its session holds the weights
                try:
                    backends[role] = b.activate()
                except BackendError:
                    if not verify:
                        # ONNX Runtime opened unchecked files: a damaged folder (a data file
                        # missing or cut short, one replaced by a new export) fails in it as a
                        # generic FAIL; checking the files now says it is the folder's
                        manifest.graph_source(name)
                    raise
        except BackendUnavailableError as e:
            for b in backends.values():
                b.deactivate()
            if backend == "onnxruntime-cuda":
                raise
            log.info("%s; trying the next ONNX Runtime provider", e)
            last = e
            continue
        except BaseException:
            for b in backends.values():
                b.deactivate()
            raise
        form = "cuda" if cuda else "portable"
        log.info("loaded %s with ONNX Runtime (%s, %s, %s graphs)", manifest.root, device, precision, form)
        return AsymVAE(manifest, backends, backend=f"onnxruntime-{device}", precision=precision,
                       limits=manifest.limits, device=f"cuda:{device_id}" if device == "cuda" else "cpu",
                       graph_form=form)
    raise BackendUnavailableError(f"no ONNX Runtime provider could start: {last}")  # pragma: no cover
