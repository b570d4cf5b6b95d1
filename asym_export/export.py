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

from asym_runtime.manifest import FORMAT_ONNX, FORMAT_ONNX_CUDA, FORMAT_ONNX_DATA, ROLE_EXTERNAL_DATA
from asym_runtime.specs import GRAPHS, GraphSpec, Shape, ShapeLimits

from . import __version__
from .artifact import ArtifactWriter
from .cuda_emulation import write_emulation
from .cuda_form import CudaFormReport, cuda_inner_ranges, cuda_ranges, write_cuda_form
from .engine_verify import EngineStep, EnginesNotBuiltError
from .engines import EngineOptions
from .feeds import CALIBRATION, CALIBRATION_SEED, VERIFY_SEED, make_feed
from .fp16 import (
    DEFAULT_HEADROOM,
    Fp16Plan,
    activation_ranges,
    plan_islands,
    weight_ranges,
    write_mixed,
)
from .fp16_emulation import fp16_counts, write_emulation_twin
from .onnx_export import EXPORT_SHAPE, OPSET, onnx_from_model
from .progress import Progress
from .trt_readiness import check_folder
from .trt_readiness import manifest_section as readiness_section
from .variants import get_variant
from .verify import FP16_TOLERANCE, FP32_MAX_ABS, Tolerance, VerificationError, VerificationReport
from .reference import reference_from_variant, reference_outputs
from .weights import WeightsSource

log = logging.getLogger(__name__)

#: Shapes the graphs are checked at besides the export shape: other batches and non-square
#: sizes, all inside the default shape limits (min 64 pixels) so the runtime and asym-parity
#: can replay them. Small on purpose: the graphs are fully dynamic, so these prove the
#: dynamic dims at CPU cost (an x2 decode at 512x512 takes about a minute on 2 cores).
DEFAULT_VERIFY_SHAPES = (EXPORT_SHAPE, Shape(1, 64, 96), Shape(3, 64, 72))


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
    #: None: default_verify_shapes(limits)
    verify_shapes: tuple[Shape, ...] | None = None
    fp32_max_abs: float = FP32_MAX_ABS
    fp16: bool = True
    fp16_headroom: float = DEFAULT_HEADROOM
    #: also write the CUDA form of every graph (``*.cuda.onnx``, ONNX Runtime CUDA only)
    cuda_form: bool = True
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
    generation: str = ""  # the folder inside ``out`` that holds the files



def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "asym_export": __version__}
    for dist in ("torch", "diffusers", "onnx", "onnxscript", "onnxruntime", "numpy",
                 "huggingface_hub", "safetensors"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def default_verify_shapes(limits: ShapeLimits) -> tuple[Shape, ...]:
    """DEFAULT_VERIFY_SHAPES when the shape limits hold them all; for limits that exclude them
    (e.g. ``--min-size 256``), shapes inside the limits instead: the smallest allowed shape and
    a non-square one at another batch where the limits allow, so the runtime and asym-parity
    can replay what the export verified."""
    if all(limits.contains(s) for s in DEFAULT_VERIFY_SHAPES):
        return DEFAULT_VERIFY_SHAPES
    lo = Shape(limits.min_batch, limits.min_height, limits.min_width)
    other = Shape(min(limits.min_batch + 1, limits.max_batch), limits.min_height,
                  min(limits.min_width + 32, limits.max_width))
    return tuple(dict.fromkeys((lo, other)))


def verification_shapes(requested: tuple[Shape, ...]) -> list[Shape]:
    """The export shape first, then the requested shapes, without duplicates."""
    shapes = [EXPORT_SHAPE]
    for s in requested:
        if s not in shapes:
            shapes.append(s)
    return shapes


def onnx_outputs(path: Path, graph: GraphSpec, feeds: list[dict[str, np.ndarray]]) -> list[dict]:
    """Run an ONNX graph with ONNX Runtime (CPU) on each feed; names from the contract. The
    session has the runtime's own CPU settings, so what is verified is what the runtime runs."""
    import onnxruntime as ort

    from asym_runtime.backends.onnxrt import session_options

    sess = ort.InferenceSession(str(path), session_options("cpu"), providers=["CPUExecutionProvider"])
    outs = []
    for feed in feeds:
        values = sess.run(graph.output_names, feed)
        outs.append(dict(zip(graph.output_names, values)))
    del sess
    return outs


@dataclass
class Reference:
    """Verification feeds of one graph and what diffusers computes for them (computed once,
    compared against every stage)."""

    graph: GraphSpec
    shapes: list[Shape]
    feeds: list[dict[str, np.ndarray]]
    outputs: list[dict[str, np.ndarray]]

    @classmethod
    def compute(cls, vae, graph: GraphSpec, shapes: list[Shape], scaling_factor: float) -> "Reference":
        feeds = [make_feed(graph, s, VERIFY_SEED + i, scaling_factor) for i, s in enumerate(shapes)]
        return cls(graph, shapes, feeds, [reference_outputs(vae, graph, f) for f in feeds])

    def check(self, path: Path, report: VerificationReport) -> None:
        """Run ``path`` with ONNX Runtime (CPU) on every feed; add one case per shape to ``report``."""
        for shape, ref, out in zip(self.shapes, self.outputs, onnx_outputs(path, self.graph, self.feeds)):
            report.add(self.graph, shape, ref, out)


def fp16_graph(fp32_path: Path, out_path: Path, ref: Reference, report: VerificationReport,
               scaling_factor: float, headroom: float) -> Fp16Plan:
    """Calibrate, choose FP32 islands, write the mixed graph, and verify its FP16 emulation."""
    graph = ref.graph
    feeds = [make_feed(graph, s, CALIBRATION_SEED + i, scaling_factor, mask=m)
             for i, (s, m) in enumerate(CALIBRATION)]
    import onnx

    plan = plan_islands(onnx.load(str(fp32_path), load_external_data=False),
                        activation_ranges(fp32_path, feeds), weight_ranges(fp32_path), headroom)
    write_mixed(fp32_path, out_path, plan, graph.name)
    plan.weights = fp16_counts(onnx.load(str(out_path), load_external_data=False))
    twin = out_path.parent / f".{graph.name}.emulation.onnx"
    try:
        write_emulation_twin(out_path, twin)
        ref.check(twin, report)
    finally:
        twin.unlink(missing_ok=True)
        (twin.parent / (twin.name + ".data")).unlink(missing_ok=True)
    return plan


def _check_emulated(path: Path, ref: Reference, report: VerificationReport, *, fp16: bool,
                    fp32_nodes: set[str]) -> None:
    """Verify a CUDA form on the CPU through its standard-ONNX emulation (FP16: rounded too)."""
    emu = path.parent / f".{ref.graph.name}.cuda-emulation.onnx"
    twin = path.parent / f".{ref.graph.name}.cuda-emulation.twin.onnx"
    try:
        write_emulation(path, emu, fp16=fp16, fp32_nodes=fp32_nodes)
        if fp16:
            write_emulation_twin(emu, twin)
            ref.check(twin, report)
        else:
            ref.check(emu, report)
    finally:
        for p in (emu, twin, twin.parent / (twin.name + ".data")):
            p.unlink(missing_ok=True)


def cuda_graphs(fp32_path: Path, writer: ArtifactWriter, ref: Reference, reports: dict[str, VerificationReport],
                plan: Fp16Plan | None) -> dict:
    """Write and verify the CUDA forms of one graph: FP32 from the verified FP32 graph, FP16 with
    islands chosen from the same calibration as the portable FP16 graph."""
    import onnx

    graph = ref.graph
    path32 = writer.stage_path(graph.file_name("fp32", form="cuda"))
    rep: CudaFormReport = write_cuda_form(fp32_path, path32, graph.name)
    _check_emulated(path32, ref, reports["fp32"], fp16=False, fp32_nodes=set())
    out = {**rep.to_dict()}
    if plan is not None:
        model = onnx.load(str(path32), load_external_data=False)
        plan16 = plan_islands(model, cuda_ranges(model, plan.ranges), weight_ranges(path32), plan.headroom,
                              inner=cuda_inner_ranges(model, plan.ranges))
        del model
        path16 = writer.stage_path(graph.file_name("fp16", form="cuda"))
        write_mixed(path32, path16, plan16, graph.name)
        _check_emulated(path16, ref, reports["fp16"], fp16=True, fp32_nodes=set(plan16.node_names))
        out["fp16_fp32_nodes"] = [i.to_dict() for i in plan16.islands]
    return out


def fp16_section(plans: dict[str, Fp16Plan], opts: ExportOptions) -> dict:
    return {
        "converter": f"onnxruntime.transformers.float16 (onnxruntime {_version('onnxruntime')})",
        "io_types": "float32 (Cast nodes inside)",
        "islands_from": "activation ranges of the FP32 graph on calibration inputs, and weight magnitudes",
        "calibration": {"seed": CALIBRATION_SEED, "shapes": [str(s) for s, _ in CALIBRATION],
                        "masks": [m for _, m in CALIBRATION]},
        "graphs": {g: p.to_dict() for g, p in plans.items()},
    }


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "?"


def model_config(vae) -> dict:
    cfg = {}
    for k, v in dict(vae.config).items():
        if isinstance(v, tuple):
            v = list(v)
        cfg[k] = v
    return cfg


def export_artifact(opts: ExportOptions, progress: Progress | None = None) -> ExportResult:
    """Export, verify and publish one artifact folder. Raises on any failure; the folder then
    holds what it held before (asym_export.artifact: the manifest switches last)."""
    progress = progress or Progress()
    variant = get_variant(opts.variant)
    timings: dict[str, float] = {}
    shapes = verification_shapes(default_verify_shapes(opts.limits) if opts.verify_shapes is None
                                 else opts.verify_shapes)
    t_all = time.perf_counter()
    engine_step = EngineStep.start(opts.engine) if opts.engine else None

    with ArtifactWriter(opts.out) as writer:
        with progress.step(f"load {variant.name} reference"):
            t0 = time.perf_counter()
            vae, source = reference_from_variant(
                variant, opts.weights, random_weights=opts.random_weights, seed=opts.seed,
                allow_pickle=opts.allow_pickle, revision=opts.revision,
            )
            timings["load_reference_s"] = time.perf_counter() - t0
            progress.note(source.describe())
        scaling_factor = float(vae.config.scaling_factor)

        fp32_report = VerificationReport("onnx_fp32", Tolerance(max_abs=opts.fp32_max_abs))
        fp16_report = VerificationReport("onnx_fp16_emulated", FP16_TOLERANCE)
        cuda_reports = {"fp32": VerificationReport("onnx_fp32_cuda_emulated", Tolerance(max_abs=opts.fp32_max_abs)),
                        "fp16": VerificationReport("onnx_fp16_cuda_emulated", FP16_TOLERANCE)}
        cuda_sections: dict[str, dict] = {}
        plans: dict[str, Fp16Plan] = {}
        for graph in GRAPHS.values():
            name = graph.file_name("fp32")
            path = writer.stage_path(name)
            with progress.step(f"export {name}"):
                t0 = time.perf_counter()
                onnx_from_model(vae, graph, path, variant=variant.name, scaling_factor=scaling_factor)
                timings[f"export_{graph.name}_s"] = time.perf_counter() - t0
            with progress.step(f"verify {name} vs PyTorch at {', '.join(map(str, shapes))}"):
                t0 = time.perf_counter()
                ref = Reference.compute(vae, graph, shapes, scaling_factor)
                ref.check(path, fp32_report)
                timings[f"verify_{graph.name}_s"] = time.perf_counter() - t0
            if opts.fp16 and fp32_report:  # no point converting a graph that is already wrong
                name16 = graph.file_name("fp16")
                with progress.step(f"FP16 {name16}: calibrate, choose FP32 islands, convert, verify (emulated)"):
                    t0 = time.perf_counter()
                    plans[graph.name] = fp16_graph(path, writer.stage_path(name16), ref, fp16_report,
                                                   scaling_factor, opts.fp16_headroom)
                    timings[f"fp16_{graph.name}_s"] = time.perf_counter() - t0
                progress.note(f"{len(plans[graph.name].islands)} node(s) kept in FP32")
            if opts.cuda_form and fp32_report:
                forms = graph.file_name("fp32", form="cuda") + (
                    f" and {graph.file_name('fp16', form='cuda')}" if graph.name in plans else "")
                with progress.step(f"CUDA form {forms}: fused channels-last kernels, verify (emulated)"):
                    t0 = time.perf_counter()
                    cuda_sections[graph.name] = cuda_graphs(path, writer, ref, cuda_reports, plans.get(graph.name))
                    timings[f"cuda_form_{graph.name}_s"] = time.perf_counter() - t0
                f = cuda_sections[graph.name]["fused_nodes"]
                progress.note(", ".join(f"{v} {k}" for k, v in f.items()))
            del ref
            gc.collect()
        if not fp32_report:
            raise VerificationError(fp32_report)
        if opts.fp16 and not fp16_report:
            raise VerificationError(fp16_report)
        cuda_used = [cuda_reports["fp32"]] + ([cuda_reports["fp16"]] if opts.fp16 else []) if opts.cuda_form else []
        for r in cuda_used:
            if not r:
                raise VerificationError(r)

        with progress.step("check TensorRT readiness of the graphs engines are built from"):
            readiness = check_folder(writer.staging, opts.limits)

        for graph in GRAPHS.values():
            for precision in ("fp32", "fp16") if opts.fp16 else ("fp32",):
                name = graph.file_name(precision)
                writer.publish(name + ".data", role=ROLE_EXTERNAL_DATA, fmt=FORMAT_ONNX_DATA,
                               precision=precision, data_of=name)
                writer.publish(name, role=graph.name, fmt=FORMAT_ONNX, precision=precision)
                if graph.name in cuda_sections and (precision == "fp32" or graph.name in plans):
                    name = graph.file_name(precision, form="cuda")
                    writer.publish(name + ".data", role=ROLE_EXTERNAL_DATA, fmt=FORMAT_ONNX_DATA,
                                   precision=precision, data_of=name)
                    writer.publish(name, role=graph.name, fmt=FORMAT_ONNX_CUDA, precision=precision)

        engines = engine_step.run(writer, vae, opts.limits, variant.name, scaling_factor, progress) \
            if engine_step else None

        timings["total_s"] = time.perf_counter() - t_all
        reports = [fp32_report] + ([fp16_report] if opts.fp16 else []) + cuda_used
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
            "fp16": fp16_section(plans, opts) if opts.fp16 else None,
            "cuda_form": {
                "what": "channels-last graphs with ONNX Runtime's com.microsoft CUDA kernels (GroupNorm, "
                        "SkipGroupNorm, NhwcConv); run only by ONNX Runtime's CUDA provider",
                "verified": "on the CPU through their standard-ONNX emulation (asym-parity checks the kernels on a GPU)",
                "graphs": cuda_sections,
            } if cuda_sections else None,
            "verification": {
                "seed": VERIFY_SEED,
                "shapes": [str(s) for s in shapes],
                **{r.stage: r.to_dict() for r in reports},
                "tensorrt_readiness": readiness_section(readiness),
                **({engines.report.stage: engines.report.to_dict()} if engines else {}),
            },
            **({"engines": engines.section} if engines else {}),
            "timings": {k: round(v, 2) for k, v in timings.items()},
        })
        files = {n: e.size for n, e in writer.entries.items()}
    result = ExportResult(opts.out, manifest, reports + ([engines.report] if engines else []),
                          timings, files, source, writer.generation or "")
    if engine_step and engine_step.reason:
        raise EnginesNotBuiltError(engine_step.reason, result)
    return result
