"""The export pipeline behind ``asym-export``: reference -> ONNX -> verified artifact folder."""

from __future__ import annotations

import datetime as _dt
import gc
import logging
import platform
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import numpy as np

from asym_runtime.manifest import FORMAT_ONNX, FORMAT_ONNX_DATA, ROLE_EXTERNAL_DATA
from asym_runtime.specs import GRAPHS, GraphSpec, Shape, ShapeLimits

from . import __version__
from .artifact import ArtifactWriter
from .engine_verify import EngineStep, EnginesNotBuiltError
from .engines import EngineOptions
from .feeds import make_feed
from .onnx_export import EXPORT_SHAPE, OPSET, onnx_from_model, reference_outputs
from .progress import Progress
from .trt_readiness import check_folder
from .trt_readiness import manifest_section as readiness_section
from .variants import get_variant
from .verify import FP32_MAX_ABS, Tolerance, VerificationError, VerificationReport
from .weights import WeightsSource, load_reference

log = logging.getLogger(__name__)

#: Shapes the FP32 graphs are checked at besides the export shape: another batch and
#: non-square sizes. Small on purpose: the graphs are fully dynamic, so these prove the
#: dynamic dims at CPU cost (an x2 decode at 512x512 takes about a minute on 2 cores).
DEFAULT_VERIFY_SHAPES = (EXPORT_SHAPE, Shape(1, 64, 96), Shape(3, 48, 80))
#: Seed of the verification inputs (recorded in the manifest).
VERIFY_SEED = 1234


@dataclass
class ExportOptions:
    variant: str
    out: Path
    weights: str | None = None
    random_weights: bool = False
    seed: int = 0
    allow_pickle: bool = False
    revision: str | None = None
    limits: ShapeLimits = field(default_factory=ShapeLimits)
    verify_shapes: tuple[Shape, ...] = DEFAULT_VERIFY_SHAPES
    fp32_max_abs: float = FP32_MAX_ABS
    #: ``--engines``: build and verify TensorRT engines (None: ONNX only)
    engine: EngineOptions | None = None


@dataclass
class ExportResult:
    out: Path
    manifest: Path
    reports: list[VerificationReport]
    timings: dict[str, float]
    files: dict[str, int]  # name -> size
    weights: WeightsSource


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "asym_export": __version__}
    for dist in ("torch", "diffusers", "onnx", "onnxscript", "onnxruntime", "numpy",
                 "huggingface_hub", "safetensors"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def verification_shapes(requested: tuple[Shape, ...]) -> list[Shape]:
    """The export shape first, then the requested shapes, without duplicates."""
    shapes = [EXPORT_SHAPE]
    for s in requested:
        if s not in shapes:
            shapes.append(s)
    return shapes


def onnx_outputs(path: Path, graph: GraphSpec, feeds: list[dict[str, np.ndarray]]) -> list[dict]:
    """Run an ONNX graph with ONNX Runtime (CPU) on each feed; names from the contract."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    outs = []
    for feed in feeds:
        values = sess.run(graph.output_names, feed)
        outs.append(dict(zip(graph.output_names, values)))
    del sess
    return outs


def verify_graph(vae, graph: GraphSpec, path: Path, shapes: list[Shape], report: VerificationReport,
                 scaling_factor: float) -> None:
    """Compare ``path`` (ONNX Runtime, CPU) with diffusers at every shape; add cases to ``report``."""
    feeds = [make_feed(graph, s, VERIFY_SEED + i, scaling_factor) for i, s in enumerate(shapes)]
    outs = onnx_outputs(path, graph, feeds)
    for shape, feed, out in zip(shapes, feeds, outs):
        report.add(graph, shape, reference_outputs(vae, graph, feed), out)


def model_config(vae) -> dict:
    cfg = {}
    for k, v in dict(vae.config).items():
        if isinstance(v, tuple):
            v = list(v)
        cfg[k] = v
    return cfg


def export_artifact(opts: ExportOptions, progress: Progress | None = None) -> ExportResult:
    """Export, verify and publish one artifact folder. Raises on any failure; the folder then
    has no manifest, so nothing can load it."""
    progress = progress or Progress()
    variant = get_variant(opts.variant)
    timings: dict[str, float] = {}
    shapes = verification_shapes(opts.verify_shapes)
    t_all = time.perf_counter()
    engine_step = EngineStep.start(opts.engine) if opts.engine else None

    with ArtifactWriter(opts.out) as writer:
        with progress.step(f"load {variant.name} reference"):
            t0 = time.perf_counter()
            vae, source = load_reference(
                variant, opts.weights, random_weights=opts.random_weights, seed=opts.seed,
                allow_pickle=opts.allow_pickle, revision=opts.revision,
            )
            timings["load_reference_s"] = time.perf_counter() - t0
            progress.note(source.describe())
        scaling_factor = float(vae.config.scaling_factor)

        fp32_report = VerificationReport("onnx_fp32", Tolerance(max_abs=opts.fp32_max_abs))
        for graph in GRAPHS.values():
            name = graph.file_name("fp32")
            path = writer.stage_path(name)
            with progress.step(f"export {name}"):
                t0 = time.perf_counter()
                onnx_from_model(vae, graph, path, variant=variant.name, scaling_factor=scaling_factor)
                timings[f"export_{graph.name}_s"] = time.perf_counter() - t0
            with progress.step(f"verify {name} vs PyTorch at {', '.join(map(str, shapes))}"):
                t0 = time.perf_counter()
                verify_graph(vae, graph, path, shapes, fp32_report, scaling_factor)
                timings[f"verify_{graph.name}_s"] = time.perf_counter() - t0
            gc.collect()
        if not fp32_report:
            raise VerificationError(fp32_report)

        with progress.step("check TensorRT readiness of the graphs engines are built from"):
            readiness = check_folder(writer.staging, opts.limits)

        for graph in GRAPHS.values():
            name = graph.file_name("fp32")
            writer.publish(name + ".data", role=ROLE_EXTERNAL_DATA, fmt=FORMAT_ONNX_DATA,
                           precision="fp32", data_of=name)
            writer.publish(name, role=graph.name, fmt=FORMAT_ONNX, precision="fp32")

        engines = engine_step.run(writer, vae, opts.limits, variant.name, scaling_factor, progress) \
            if engine_step else None

        timings["total_s"] = time.perf_counter() - t_all
        manifest = writer.write_manifest({
            "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "variant": variant.name,
            "model_config": model_config(vae),
            "scaling_factor": scaling_factor,
            "weights": source.to_dict(),
            "opset": OPSET,
            "export_shape": str(EXPORT_SHAPE),
            "shape_limits": opts.limits.to_dict(),
            "graphs": {
                g.name: {
                    "doc": g.doc,
                    "inputs": {t.name: list(t.dims) for t in g.inputs},
                    "outputs": {t.name: list(t.dims) for t in g.outputs},
                }
                for g in GRAPHS.values()
            },
            "versions": library_versions(),
            "verification": {
                "seed": VERIFY_SEED,
                "shapes": [str(s) for s in shapes],
                fp32_report.stage: fp32_report.to_dict(),
                "tensorrt_readiness": readiness_section(readiness),
                **({engines.report.stage: engines.report.to_dict()} if engines else {}),
            },
            **({"engines": engines.section} if engines else {}),
            "timings": {k: round(v, 2) for k, v in timings.items()},
        })
        files = {n: e.size for n, e in writer.entries.items()}
    result = ExportResult(opts.out, manifest, [fp32_report] + ([engines.report] if engines else []),
                          timings, files, source)
    if engine_step and engine_step.reason:
        raise EnginesNotBuiltError(engine_step.reason, result)
    return result
