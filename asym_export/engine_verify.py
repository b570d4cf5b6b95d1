"""The engine step of ``asym-export --engines``: build, verify on the GPU, publish, record.

Engines are checked against the FP32 PyTorch reference (run on the same GPU in true FP32: no
TF32) at the min, opt and max shapes of the optimization profile, run by the runtime's own
TensorRT backend (what is verified is what ``asym_runtime.load`` runs), with the same report as
the ONNX checks: FP16 engines against the PSNR floors (:data:`asym_export.verify.FP16_TOLERANCE`),
FP32 engines against the FP32 max abs error.

Without a GPU and tensorrt the step is known to be impossible before the export starts
(:meth:`EngineStep.start`); the export then still writes and verifies the ONNX graphs and
the manifest, creates no ``engines/`` folder, and raises :class:`EnginesNotBuiltError` at the
end so the caller (and the CLI's exit code) cannot miss it.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path


from asym_runtime.backends.tensorrt import TensorRTBackend, device_info
from asym_runtime.errors import BackendUnavailableError
from asym_runtime.manifest import FORMAT_PLAN, FORMAT_TIMING_CACHE, ROLE_TIMING_CACHE
from asym_runtime.specs import GRAPHS, Shape, ShapeLimits

from .engines import EngineOptions, engine_from_onnx, tensorrt_unavailable_reason
from .feeds import ENGINE_VERIFY_SEED, make_feed
from .progress import Progress
from .reference import reference_outputs, true_fp32
from .trt_readiness import engine_source
from .verify import FP16_TOLERANCE, FP32_MAX_ABS, Tolerance, VerificationError, VerificationReport

log = logging.getLogger(__name__)

TIMING_CACHE = "engines/timing.cache"


class EnginesNotBuiltError(BackendUnavailableError):
    """``--engines`` was asked for on a machine that cannot build them. The ONNX artifact was
    still written and verified: ``result`` is its :class:`~asym_export.export.ExportResult`."""

    def __init__(self, reason: str, result=None):
        self.reason = reason
        self.result = result
        super().__init__(f"no TensorRT engines were built because {reason}")


def profile_shapes(limits: ShapeLimits) -> list[Shape]:
    """The shapes engines are verified at: the profile's min, opt and max (without repeats)."""
    out: list[Shape] = []
    for s in (limits.min, limits.opt, limits.max):
        if s not in out:
            out.append(s)
    return out


# --------------------------------------------------------------------------- reference on the GPU

@contextlib.contextmanager
def _model_on_gpu(vae):
    import torch

    device = next(vae.parameters()).device
    vae.to("cuda")
    try:
        with true_fp32():
            yield
    finally:
        vae.to(device)
        torch.cuda.empty_cache()


def engine_tolerance(stage: str) -> Tolerance:
    """FP32 engines (``stage`` ending in ``fp32``) are held to the FP32 max abs error, FP16
    engines to the FP16 PSNR floors."""
    return Tolerance(max_abs=FP32_MAX_ABS) if stage.endswith("fp32") else FP16_TOLERANCE


def verify_engines(plans: dict[str, Path], vae, limits: ShapeLimits, scaling_factor: float, *,
                   stage: str = "engine_fp16", host_code_allowed: bool = False) -> VerificationReport:
    """Run each engine (graph name -> plan file) at the profile's min/opt/max against the FP32
    reference on the GPU; every output of every shape lands in one report. FP16 engines are held
    to the FP16 PSNR floors, FP32 engines (``stage`` ending in ``fp32``) to the FP32 max abs error:
    an FP32 engine that computed in TF32 or FP16 must fail."""
    report = VerificationReport(stage, engine_tolerance(stage))
    shapes = profile_shapes(limits)
    with _model_on_gpu(vae):
        for name, plan in plans.items():
            graph = GRAPHS[name]
            # the runtime's own backend: what is verified is what asym_runtime.load() runs
            with TensorRTBackend(graph, Path(plan).read_bytes(), version_compatible=host_code_allowed,
                                 label=Path(plan).name) as engine:
                for i, shape in enumerate(shapes):
                    feed = make_feed(graph, shape, ENGINE_VERIFY_SEED + i, scaling_factor)
                    report.add(graph, shape, reference_outputs(vae, graph, feed), engine.infer(feed))
    return report


# --------------------------------------------------------------------------- the export step

@dataclass
class EngineResult:
    section: dict  # the manifest's top-level "engines"
    report: VerificationReport
    files: dict[str, int] = field(default_factory=dict)


@dataclass
class EngineStep:
    """``--engines`` inside :func:`asym_export.export.export_artifact`."""

    options: EngineOptions
    reason: str | None  # why engines cannot be built here; None when they can

    @classmethod
    def start(cls, options: EngineOptions) -> "EngineStep":
        """Decide up front (before minutes of export) whether engines can be built here."""
        reason = tensorrt_unavailable_reason()
        if reason:
            log.info("--engines: no engines can be built here: %s; exporting the ONNX graphs only", reason)
        return cls(options, reason)

    def run(self, writer, vae, limits: ShapeLimits, variant: str, scaling_factor: float,
            progress: Progress) -> EngineResult | None:
        """Build every engine from the published graphs, verify, publish; ``None`` if impossible here."""
        if self.reason:
            return None
        o = self.options
        cache = writer.stage_path(TIMING_CACHE)
        previous = writer.previous_file(TIMING_CACHE)
        if previous is not None:  # reuse what earlier builds in this folder measured
            shutil.copyfile(previous, cache)
        infos, plans, precision = {}, {}, {}
        for graph in GRAPHS.values():
            src = engine_source(graph, writer.entries)
            precision[graph.name] = "fp16" if src == graph.file_name("fp16") else "fp32"
            plan = writer.stage_path(graph.engine_name())
            with progress.step(f"build {graph.engine_name()} from {src} (TensorRT, opt level {o.opt_level})"):
                infos[graph.name] = engine_from_onnx(
                    writer.stage_path(src), plan, graph, limits, opt_level=o.opt_level, workspace_gib=o.workspace_gib,
                    timing_cache=cache, version_compatible=o.version_compatible,
                    hardware_compatibility=o.hardware_compat)
            plans[graph.name] = plan
        stage = "engine_fp16" if "fp16" in precision.values() else "engine_fp32"
        shapes = ", ".join(map(str, profile_shapes(limits)))
        with progress.step(f"verify engines vs PyTorch FP32 on the GPU at {shapes} (min/opt/max)"):
            report = verify_engines(plans, vae, limits, scaling_factor, stage=stage,
                                    host_code_allowed=o.version_compatible)
        if not report:
            raise VerificationError(report)
        files = {}
        for graph in GRAPHS.values():
            e = writer.publish(graph.engine_name(), role=graph.name, fmt=FORMAT_PLAN,
                               precision=precision[graph.name])
            files[e.name] = e.size
        e = writer.publish(TIMING_CACHE, role=ROLE_TIMING_CACHE, fmt=FORMAT_TIMING_CACHE, precision=None)
        files[e.name] = e.size
        first = next(iter(infos.values()))
        section = {
            "tensorrt_version": first["tensorrt_version"],
            "device": device_info(),
            "version_compatible": o.version_compatible,
            "hardware_compatibility_level": o.hardware_compat,
            "builder_optimization_level": o.opt_level,
            "workspace_gib": o.workspace_gib,
            "variant": variant,
            "profile": limits.to_dict(),
            "build_s": {n: i["build_s"] for n, i in infos.items()},
            "source_onnx": {n: i["source_onnx"] for n, i in infos.items()},
            "flags": first["flags"],
            "timing_cache_loaded": {n: i["timing_cache_loaded"] for n, i in infos.items()},
        }
        return EngineResult(section, report, files)
