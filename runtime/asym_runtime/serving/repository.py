"""``asym-triton-repo DIR --out REPO``: a Triton model repository for the native backends (the
command line is in :mod:`.cli`).

For Triton's own container on a GPU machine (``tritonserver --model-repository REPO``), no
Python in the serving path:

* one ``onnxruntime`` model per graph (``encoder``, ``decoder``, ``decoder_uncond``): the
  folder's verified graph of the chosen precision (the CUDA form where the folder has one and
  ``--form`` allows it) as ``1/model.onnx``, its external data beside it under the name the
  graph itself records; the CUDA provider's convolution search as the runtime measured it
  (``cudnn_conv_algo_search``), optionally ONNX Runtime's TensorRT accelerator (portable graphs);
* one ``tensorrt`` model per engine when the folder has engines and the instances are GPU ones
  (``encoder_trt``, ...), with ``max_batch_size`` from the engines' profile;
* ``config.pbtxt`` from :mod:`.config` (contract dims, dynamic batching, instance groups);
* ``asym-export.json`` in each model folder: the source folder, generation and the sha256 of
  every file, which are the manifest's own (the bytes are copied unchanged after the
  runtime's check); ``--check REPO`` re-hashes them and checks every configuration against
  Triton's schema, the contract and the ONNX graph's own inputs and outputs.

The repository is written into a staging folder beside ``REPO`` and renamed into place, so a
Triton pointed at ``REPO`` never sees half of one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ..backends.onnxrt import CUDA_PROVIDER_OPTIONS
from ..errors import ArtifactError
from ..manifest import FORMAT_ONNX, FORMAT_ONNX_CUDA, FORMAT_PLAN, Manifest, read_manifest
from ..specs import GRAPHS, ShapeLimits
from . import config as tconfig
from .model import PARAM_BACKEND, PARAM_MANIFEST, PARAM_PRECISION

log = logging.getLogger(__name__)

TRAIL_NAME = "asym-export.json"
TRT_SUFFIX = "_trt"
FORMS = ("auto", "cuda", "portable")
#: ONNX Runtime's cudnn_conv_algo_search names -> the integers Triton's onnxruntime backend takes
#: (it refuses the names: "failed to convert HEURISTIC to integral number").
CONV_SEARCH = {"EXHAUSTIVE": "0", "HEURISTIC": "1", "DEFAULT": "2"}


@dataclass
class RepoOptions:
    precision: str = "fp16"
    form: str = "auto"
    engines: bool = True
    instances: int = 1
    kind: str = "gpu"
    gpus: list[int] | None = None
    queue_delay_us: int = tconfig.DEFAULT_QUEUE_DELAY_US
    tensorrt_accelerator: bool = False
    tensorrt_cache: str | None = None
    force: bool = False


@dataclass
class RepoModel:
    name: str
    graph: str
    backend: str
    source: str            # the manifest entry it came from
    files: dict[str, str]  # path inside the model folder -> sha256


@dataclass
class RepoResult:
    path: Path
    models: list[RepoModel] = field(default_factory=list)


def _write(path: Path, data: bytes, digest: str | None = None) -> str:
    """Write and fsync ``data``; return its sha256. ``digest``: the sha256 these bytes were
    already checked against (the manifest's), so they are not hashed a second time; the
    repository check re-reads what landed on disk either way."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return digest or hashlib.sha256(data).hexdigest()


def _onnx_entry(manifest: Manifest, role: str, opts: RepoOptions):
    if opts.form == "cuda" or (opts.form == "auto" and opts.kind == "gpu"):  # CUDA-only kernels: GPU instances
        e = manifest.find(role, FORMAT_ONNX_CUDA, opts.precision)
        if e is not None:
            return e, "cuda"
        if opts.form == "cuda":
            return None, "cuda"
    return manifest.find(role, FORMAT_ONNX, opts.precision), "portable"


def profile_text(limits: ShapeLimits, graph, corner: int) -> str:
    """One corner (0 min, 1 opt, 2 max) of the graph's optimization profile in ONNX Runtime's
    TensorRT-option syntax: ``name:1x4x8x8,name2:...``."""
    return ",".join(f"{name}:{'x'.join(str(d) for d in shapes[corner])}"
                    for name, shapes in limits.profile(graph).items())


def tensorrt_parameters(graph, limits: ShapeLimits, precision: str, digests, cache: str | None) -> dict[str, str]:
    """The TensorRT execution accelerator's parameters for one graph.

    The profile is the folder's shape limits, given explicitly: without it ONNX Runtime's TensorRT
    provider sizes the profile from the shapes it has seen and builds the engine again whenever a
    request falls outside them (minutes for x2, on the request's time); with it, one engine covering
    every allowed shape is built when the model loads. ``cache`` (an absolute path on the server):
    engines and timing caches are kept there across restarts. ONNX Runtime names cached engines by
    the graph's structure, not its weights, so each graph gets its own folder keyed by the sha256 of
    its files: a repository written again from another export never runs engines built for other
    weights.
    """
    params = {"precision_mode": precision.upper(), "max_workspace_size_bytes": str(4 << 30)}
    for corner, key in enumerate(("trt_profile_min_shapes", "trt_profile_opt_shapes", "trt_profile_max_shapes")):
        params[key] = profile_text(limits, graph, corner)
    if cache is not None:
        key = hashlib.sha256("\n".join([precision, *digests]).encode()).hexdigest()[:16]
        folder = f"{cache.rstrip('/')}/{graph.name}-{precision}-{key}"
        # the timing cache in the graph's own folder too: Triton loads models in parallel, and one
        # shared file would be written by several builds at once
        params.update({"trt_engine_cache_enable": "1", "trt_engine_cache_path": folder,
                       "trt_timing_cache_enable": "1", "trt_timing_cache_path": folder})
    return params


def _trail(manifest: Manifest, model: RepoModel, limits: ShapeLimits, form: str | None) -> bytes:
    return json.dumps({
        "artifact": str(Path(manifest.root).resolve()), "generation": manifest.generation,
        "variant": manifest.variant, "graph": model.graph, "backend": model.backend, "form": form,
        "source": model.source, "shape_limits": limits.to_dict(), "sha256": model.files,
    }, indent=2, sort_keys=True).encode() + b"\n"


def write_repository(artifact: str | os.PathLike, out: str | os.PathLike, opts: RepoOptions | None = None,
                     progress=None) -> RepoResult:
    """Write the model repository of ``artifact`` to ``out`` (see the module docstring)."""
    opts = opts or RepoOptions()
    say = progress or (lambda m: None)
    if opts.precision not in ("fp32", "fp16"):
        raise ValueError(f"precision {opts.precision!r}: fp32 or fp16")
    if opts.form not in FORMS:
        raise ValueError(f"form {opts.form!r}: choose one of {', '.join(FORMS)}")
    if opts.tensorrt_cache is not None:
        if not opts.tensorrt_accelerator:
            raise ValueError("--tensorrt-cache is where the TensorRT accelerator keeps its engines; it needs "
                             "--tensorrt-accelerator")
        if not opts.tensorrt_cache.startswith("/"):
            raise ValueError(f"--tensorrt-cache {opts.tensorrt_cache!r}: give an absolute path as the Triton server "
                             "sees it (a relative one would be taken from the server's working folder)")
    if opts.kind != "gpu" and (opts.gpus or opts.tensorrt_accelerator):
        # Triton ignores a GPU accelerator and GPU ids on CPU instances: refuse rather than write
        # a repository that silently does something else than asked
        raise ValueError(f"{'--gpus' if opts.gpus else '--tensorrt-accelerator'} needs --kind gpu "
                         f"(the instances are {opts.kind} ones)")
    manifest = read_manifest(artifact)
    out = Path(out)
    if out.exists() and not opts.force:
        raise FileExistsError(f"{out} exists; choose another --out or pass --force to replace a repository "
                              "this tool wrote")
    if out.exists() and not is_our_repository(out):
        raise FileExistsError(f"{out} exists and is not a repository asym-triton-repo wrote; not replacing it")
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(stage, 0o777 & ~umask)  # mkdtemp makes 0700; the server may run as another user
    result = RepoResult(out)
    manifest_json = json.dumps(manifest.data, sort_keys=True, separators=(",", ":"))
    if opts.tensorrt_accelerator and opts.tensorrt_cache is None:
        say("TensorRT accelerator without --tensorrt-cache: the server builds each graph's engine again "
            "at every model load (minutes for x2)")
    try:
        search = CONV_SEARCH[CUDA_PROVIDER_OPTIONS[opts.precision]["cudnn_conv_algo_search"]]
        for graph in GRAPHS.values():
            entry, form = _onnx_entry(manifest, graph.name, opts)
            if entry is None:
                if graph.name in ("encoder", "decoder"):
                    raise ArtifactError(f"{manifest.root} has no {opts.precision} "
                                        f"{'CUDA-form ' if opts.form == 'cuda' else ''}graph for {graph.name}")
                continue
            if form == "cuda" and opts.kind != "gpu":
                raise ValueError(f"{entry.name} is the CUDA form (fused CUDA-only kernels): it needs --kind gpu, "
                                 "or --form portable for CPU instances")
            if form == "cuda" and opts.tensorrt_accelerator:
                raise ValueError("the TensorRT accelerator runs the portable graphs; pass --form portable with it")
            say(f"{graph.name}: {entry.name} ({form} form)")
            source = manifest.graph_source(entry.name)  # the checked bytes, external data included
            # graph_source records the graph's digest, then each data file's in the order of `external`
            files = {"1/model.onnx": _write(stage / graph.name / "1" / "model.onnx", source.model,
                                            source.digests[0])}
            for (loc, data), digest in zip(source.external.items(), source.digests[1:], strict=True):
                files[f"1/{loc}"] = _write(stage / graph.name / "1" / loc, data, digest)
            accel = []
            if opts.tensorrt_accelerator:
                accel = [("tensorrt", tensorrt_parameters(graph, manifest.limits, opts.precision, source.digests,
                                                          opts.tensorrt_cache))]
            if opts.kind == "gpu":
                # the runtime's CUDA provider options for this precision: Triton's onnxruntime
                # backend hands a "cuda" accelerator's parameters to the provider as they are.
                # Without use_tf32=0, ONNX Runtime's default (TF32 on) would run FP32 graphs
                # outside the 1e-3 parity they were verified at. cudnn_conv_algo_search goes in the
                # model parameters instead: whenever a config has parameters (ours always do),
                # the backend sets the search from them, EXHAUSTIVE when absent, over the
                # accelerator's value.
                accel.append(("cuda", {k: v for k, v in CUDA_PROVIDER_OPTIONS[opts.precision].items()
                                       if k != "cudnn_conv_algo_search"}))
            params = {"cudnn_conv_algo_search": search} if opts.kind == "gpu" else {}
            # for asym_runtime.remote(): the folder's manifest, as asym-serve publishes it (backends
            # look up the parameters they know and ignore the rest)
            params.update({PARAM_MANIFEST: manifest_json, PARAM_BACKEND: "triton-onnxruntime",
                           PARAM_PRECISION: opts.precision})
            cfg = tconfig.build_config(graph, backend="onnxruntime", max_batch=manifest.limits.max_batch,
                                       queue_delay_us=opts.queue_delay_us, instances=opts.instances, kind=opts.kind,
                                       gpus=opts.gpus, parameters=params, gpu_accelerators=accel)
            model = RepoModel(graph.name, graph.name, "onnxruntime", entry.name, files)
            _write(stage / graph.name / "config.pbtxt", tconfig.config_text(cfg).encode())
            _write(stage / graph.name / TRAIL_NAME, _trail(manifest, model, manifest.limits, form))
            result.models.append(model)
        engines_meta = manifest.data.get("engines") if isinstance(manifest.data.get("engines"), dict) else {}
        plans = {g.name: e for g in GRAPHS.values() if (e := manifest.find(g.name, FORMAT_PLAN)) is not None}
        if plans and opts.engines and opts.kind != "gpu":
            # an engine runs on the GPU it was built for only: a tensorrt model in a repository of
            # CPU instances would make a CPU-only Triton refuse the repository
            say(f"TensorRT engines left out ({', '.join(e.name for e in plans.values())}): they run on a GPU, "
                "the instances are CPU ones (--kind gpu includes them)")
        for graph in GRAPHS.values():
            entry = plans.get(graph.name) if opts.engines and opts.kind == "gpu" else None
            if entry is None:
                continue
            limits = manifest.limits
            if isinstance(engines_meta.get("profile"), dict):
                limits = ShapeLimits.from_dict(engines_meta["profile"])
            name = graph.name + TRT_SUFFIX
            say(f"{name}: {entry.name} (TensorRT {engines_meta.get('tensorrt_version', '?')}, "
                f"{(engines_meta.get('device') or {}).get('name', '?')})")
            files = {"1/model.plan": _write(stage / name / "1" / "model.plan", manifest.read_verified(entry.name))}
            cfg = tconfig.build_config(graph, backend="tensorrt", name=name, max_batch=limits.max_batch,
                                       queue_delay_us=opts.queue_delay_us, instances=opts.instances, kind="gpu",
                                       gpus=opts.gpus)
            model = RepoModel(name, graph.name, "tensorrt", entry.name, files)
            _write(stage / name / "config.pbtxt", tconfig.config_text(cfg).encode())
            _write(stage / name / TRAIL_NAME, _trail(manifest, model, limits, None))
            result.models.append(model)
        problems = check_repository(stage)
        if problems:
            raise AssertionError("the written repository fails its own check: " + "; ".join(problems))
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.rename(out, old)
        os.rename(stage, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    log.info("wrote %s: %s", out, ", ".join(m.name for m in result.models))
    return result


def is_our_repository(path: Path) -> bool:
    path = Path(path)
    if path.is_symlink() or not path.is_dir():  # a file or a link is never a repository this tool wrote
        return False
    subdirs = [p for p in path.iterdir() if p.is_dir()]
    return bool(subdirs) and all((p / TRAIL_NAME).is_file() for p in subdirs)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(8 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_repository(repo: str | os.PathLike, manifest: Manifest | None = None) -> list[str]:
    """Every problem of a repository this tool wrote (empty: none): each ``config.pbtxt`` parsed
    with Triton's schema and checked against the contract, the ONNX graph's own inputs and
    outputs, each file's sha256 against the trail, and (with ``manifest``) the trail's sha256
    against the manifest's."""
    import onnx

    repo = Path(repo)
    problems: list[str] = []
    models = sorted(p for p in repo.iterdir() if p.is_dir())
    if not models:
        return [f"{repo} holds no model folders"]
    for model_dir in models:
        where = model_dir.name
        try:
            trail = json.loads((model_dir / TRAIL_NAME).read_text())
            cfg = tconfig.parse_config((model_dir / "config.pbtxt").read_text(), f"{where}/config.pbtxt")
        except (OSError, ValueError) as e:
            problems.append(f"{where}: {e}")
            continue
        graph = GRAPHS.get(trail.get("graph"))
        if graph is None:
            problems.append(f"{where}: {TRAIL_NAME} names no graph of the contract")
            continue
        limits = ShapeLimits.from_dict(trail["shape_limits"])
        backend = trail.get("backend")
        name = graph.name + (TRT_SUFFIX if backend == "tensorrt" else "")
        problems += [f"{where}/config.pbtxt: {p}" for p in
                     tconfig.config_problems(cfg, graph, max_batch=limits.max_batch, name=name, backend=backend)]
        if cfg.max_batch_size != limits.max_batch:
            problems.append(f"{where}/config.pbtxt: max_batch_size {cfg.max_batch_size}, the limits say {limits.max_batch}")
        for acc in cfg.optimization.execution_accelerators.gpu_execution_accelerator:
            if acc.name != "tensorrt":
                continue
            for corner, key in enumerate(("trt_profile_min_shapes", "trt_profile_opt_shapes", "trt_profile_max_shapes")):
                want = profile_text(limits, graph, corner)
                if acc.parameters.get(key) != want:
                    problems.append(f"{where}/config.pbtxt: the tensorrt accelerator's {key} is "
                                    f"{acc.parameters.get(key)!r}, the limits say {want!r} (a repository "
                                    "from before explicit profiles: write it again)")
        actual = {}
        for rel, digest in trail["sha256"].items():
            path = model_dir / rel
            if not path.is_file():
                problems.append(f"{where}: {rel} is missing")
                continue
            actual[rel] = _sha256(path)
            if actual[rel] != digest:
                problems.append(f"{where}: sha256 of {rel} differs from {TRAIL_NAME}")
        if manifest is not None:  # the files themselves against the folder's manifest, not the trail
            src = manifest.files.get(trail.get("source"))
            known = {e.sha256 for e in manifest.files.values()}
            main_file = "1/model.plan" if backend == "tensorrt" else "1/model.onnx"
            if src is None or actual.get(main_file) != src.sha256:
                problems.append(f"{where}: the model file is not {trail.get('source')} of {manifest.root}")
            problems += [f"{where}: {rel} is no file of {manifest.root}" for rel, d in actual.items()
                         if rel != main_file and d not in known]
        onnx_path = model_dir / "1" / "model.onnx"
        if backend == "onnxruntime" and onnx_path.is_file():
            try:
                m = onnx.load(str(onnx_path), load_external_data=False)
            except Exception as e:  # noqa: BLE001 - any unreadable graph is a finding, not a crash
                problems.append(f"{where}/1/model.onnx is not a readable ONNX graph ({type(e).__name__})")
                continue
            for kind, want, got in (("input", graph.inputs, m.graph.input), ("output", graph.outputs, m.graph.output)):
                got = [g for g in got if g.name not in {i.name for i in m.graph.initializer}]
                if [g.name for g in got] != [t.name for t in want]:
                    problems.append(f"{where}/1/model.onnx: {kind}s {[g.name for g in got]}, the contract has "
                                    f"{[t.name for t in want]}")
                    continue
                for g, t in zip(got, want):
                    tt = g.type.tensor_type
                    if tt.elem_type != onnx.TensorProto.FLOAT:
                        problems.append(f"{where}/1/model.onnx: {kind} {g.name} is not float32")
                    if len(tt.shape.dim) != len(t.dims):
                        problems.append(f"{where}/1/model.onnx: {kind} {g.name} has rank {len(tt.shape.dim)}, "
                                        f"the contract {len(t.dims)}")
                    for d, want_d in zip(tt.shape.dim[1:], t.dims[1:]):
                        if isinstance(want_d, int) and d.HasField("dim_value") and d.dim_value != want_d:
                            problems.append(f"{where}/1/model.onnx: {kind} {g.name} has {d.dim_value} channels, "
                                            f"the contract {want_d}")
    return problems
