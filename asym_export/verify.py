"""Numerical verification of exported graphs against the PyTorch reference.

Results are objects that are truthy when they pass and keep their statistics for the
report and the manifest (Polygraphy's comparison results are the model). Every output of
every shape is compared before anything is raised, so one failure report lists them all.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np

from asym_runtime.specs import GraphSpec, Shape

log = logging.getLogger(__name__)

#: FP32 graph vs FP32 PyTorch: max abs error allowed on every output. ONNX Runtime and
#: PyTorch sum convolutions in different orders and ONNX GroupNorm is Reshape +
#: InstanceNormalization, so float32 rounding differs by ~1e-7 relative per op; through
#: ~100 layers on outputs of magnitude ~1-10 this measures 1e-5..5e-5 (x2, random weights).
#: 1e-3 leaves a 20x margin for real weights while catching any semantic error (a wrong
#: feature level or mask blend moves outputs by 1e-1 or more).
FP32_MAX_ABS = 1e-3

#: FP16 graphs and engines vs the FP32 PyTorch reference: minimum PSNR per output (dB).
#: The image output's peak is its [-1, 1] range (2.0). 8-bit output quantisation alone gives
#: 20*log10(2 / (2/255/sqrt(12))) = 58.9 dB, so 50 dB (RMS error 0.0063, 0.8 of an 8-bit
#: level) keeps FP16 error below what an 8-bit PNG shows; a plain all-FP16 x2 decoder reaches
#: about 62 dB with random weights, so 50 leaves room for real weights and still catches
#: overflow or a lost island (those fall to 20-30 dB or NaN). Latent outputs use their own
#: peak-to-peak range; logvar only sets the sampling noise (std = exp(logvar / 2)), so it is
#: held to 40 dB, the floor the FP16 issue sets for any output.
FP16_MIN_PSNR_DB = {"sample": 50.0, "latent_mean": 50.0, "latent_logvar": 40.0}
#: BF16 (OpenVINO on the CPU) keeps 8 bits of mantissa against FP16's 11, so its
#: floors are lower: 44 dB for images and latent means, the least a BF16 decode may give
#: (measured on an AMX Xeon for x2 through OpenVINO: 44.5 dB); 35 dB for the log-variance,
#: which nothing downstream reads at full precision.
BF16_MIN_PSNR_DB = {"sample": 44.0, "latent_mean": 44.0, "latent_logvar": 35.0}


@dataclass
class OutputStats:
    name: str
    max_abs: float
    mean_abs: float
    psnr_db: float
    finite: bool
    peak: float  # peak-to-peak range behind the PSNR

    def to_dict(self) -> dict:
        return {"max_abs": self.max_abs, "mean_abs": self.mean_abs,
                "psnr_db": None if math.isinf(self.psnr_db) else round(self.psnr_db, 2),
                "finite": self.finite, "peak": self.peak}


def psnr(ref: np.ndarray, out: np.ndarray, peak: float) -> float:
    mse = float(np.mean((ref.astype(np.float64) - out.astype(np.float64)) ** 2))
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(peak * peak / mse)


def output_stats(name: str, ref: np.ndarray, out: np.ndarray,
                 value_range: tuple[float, float] | None) -> OutputStats:
    """Max/mean abs error and PSNR of ``out`` against ``ref`` (same shape, ``ref`` finite:
    :meth:`VerificationReport.add` records those failures before it gets here).

    PSNR uses the contract's value range as the peak (2.0 for images in [-1, 1]); for
    unbounded outputs (latents) it uses the reference's own peak-to-peak range.
    """
    finite = bool(np.isfinite(out).all())
    if value_range is not None:
        peak = float(value_range[1] - value_range[0])
    else:
        peak = float(ref.max() - ref.min()) or 1.0
    if not finite:
        return OutputStats(name, math.inf, math.inf, -math.inf, False, peak)
    diff = np.abs(ref.astype(np.float64) - out.astype(np.float64))
    return OutputStats(name, float(diff.max()), float(diff.mean()), psnr(ref, out, peak), True, peak)


def output_summary(graph: GraphSpec, ref: dict[str, np.ndarray], out: dict[str, np.ndarray]) -> tuple[dict, str]:
    """PSNR and max abs error of every output of ``graph``, as a JSON-ready dict and one line of
    text; for images also the max error in 8-bit levels (x 127.5), which means something there."""
    stats = {s.name: output_stats(s.name, ref[s.name], out[s.name], s.value_range) for s in graph.outputs}
    images = {s.name for s in graph.outputs if s.value_range == (-1.0, 1.0)}
    data = {n: {"psnr_db": s.psnr_db, "max_abs": s.max_abs,
                **({"max_8bit_levels": s.max_abs * 127.5} if n in images else {})} for n, s in stats.items()}
    text = "  ".join(f"{n} {s.psnr_db:5.1f} dB max {s.max_abs:.3g}"
                     + (f" ({s.max_abs * 127.5:.1f} levels)" if n in images else "") for n, s in stats.items())
    return data, text


@dataclass
class Tolerance:
    """Pass criteria for one comparison. ``None`` disables a criterion."""

    max_abs: float | None = FP32_MAX_ABS
    #: one floor for every output, or a floor per output name (outputs not named: no floor)
    min_psnr_db: float | dict[str, float] | None = None

    def psnr_floor(self, output: str) -> float | None:
        if isinstance(self.min_psnr_db, dict):
            return self.min_psnr_db.get(output)
        return self.min_psnr_db

    def describe(self) -> str:
        """One line: ``max abs <= 0.001``, ``PSNR >= 50 dB (sample), 40 dB (latent_logvar)``."""
        parts = []
        if self.max_abs is not None:
            parts.append(f"max abs <= {self.max_abs:g}")
        if isinstance(self.min_psnr_db, dict):
            parts.append("PSNR >= " + ", ".join(f"{v:g} dB ({k})" for k, v in self.min_psnr_db.items()))
        elif self.min_psnr_db is not None:
            parts.append(f"PSNR >= {self.min_psnr_db:g} dB")
        return "; ".join(parts) or "no criterion"

    def failures(self, s: OutputStats) -> list[str]:
        out = []
        if not s.finite:
            out.append("NaN/Inf in output")
            return out
        # written as "not (within)" so that a NaN statistic fails instead of comparing False
        if self.max_abs is not None and not s.max_abs <= self.max_abs:
            out.append(f"max abs {s.max_abs:.3g} > {self.max_abs:g}")
        floor = self.psnr_floor(s.name)
        if floor is not None and not s.psnr_db >= floor:
            out.append(f"PSNR {s.psnr_db:.1f} dB < {floor:g} dB")
        return out

    def to_dict(self) -> dict:
        return {"max_abs": self.max_abs, "min_psnr_db": self.min_psnr_db}


#: The tolerance of every FP16 stage: emulated FP16 on the CPU and TensorRT engines alike.
FP16_TOLERANCE = Tolerance(max_abs=None, min_psnr_db=FP16_MIN_PSNR_DB)
#: The tolerance of BF16 compute (OpenVINO's BF16 inference of the FP32 graphs).
BF16_TOLERANCE = Tolerance(max_abs=None, min_psnr_db=BF16_MIN_PSNR_DB)


@dataclass
class CaseResult:
    """One graph at one shape: every output's statistics and what failed."""

    graph: str
    shape: Shape
    outputs: list[OutputStats]
    failures: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict:
        return {"graph": self.graph, "shape": str(self.shape), "passed": bool(self),
                "outputs": {s.name: s.to_dict() for s in self.outputs}, "failures": self.failures}


@dataclass
class VerificationReport:
    """All cases of one verification stage (e.g. ``onnx_fp32``); truthy when every case passed."""

    stage: str
    tolerance: Tolerance
    cases: list[CaseResult] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.cases) and all(self.cases)

    def add(self, graph: GraphSpec, shape: Shape, ref: dict[str, np.ndarray],
            out: dict[str, np.ndarray]) -> CaseResult:
        stats, failures = [], []
        for spec in graph.outputs:
            if spec.name not in out:
                failures.append(f"{spec.name}: missing from the graph's outputs")
                continue
            r, o = ref[spec.name], out[spec.name]
            if r.shape != o.shape:
                failures.append(f"{spec.name}: output shape {o.shape} differs from the reference {r.shape}")
                continue
            if not np.isfinite(r).all():  # nothing to compare against: never a pass
                failures.append(f"{spec.name}: NaN/Inf in the PyTorch reference")
                continue
            s = output_stats(spec.name, r, o, spec.value_range)
            stats.append(s)
            failures += [f"{spec.name}: {f}" for f in self.tolerance.failures(s)]
        case = CaseResult(graph.name, shape, stats, failures)
        self.cases.append(case)
        log.info("%s %s %s: %s", self.stage, graph.name, shape,
                 ", ".join(f"{s.name} max {s.max_abs:.2e} psnr {s.psnr_db:.1f} dB" for s in stats)
                 + (" FAILED: " + "; ".join(failures) if failures else ""))
        return case

    def failure_lines(self) -> list[str]:
        return [f"{c.graph} @ {c.shape}: {f}" for c in self.cases for f in c.failures]

    def to_dict(self) -> dict:
        return {"stage": self.stage, "passed": bool(self), "tolerance": self.tolerance.to_dict(),
                "cases": [c.to_dict() for c in self.cases]}

    def table(self) -> str:
        """Human-readable per-output table, one row per graph/shape/output."""
        rows = [("stage", "graph", "shape", "output", "max abs", "mean abs", "PSNR dB", "result")]
        for c in self.cases:
            for s in c.outputs:
                bad = [f for f in c.failures if f.startswith(s.name + ":")]
                rows.append((self.stage, c.graph, str(c.shape), s.name, f"{s.max_abs:.2e}",
                             f"{s.mean_abs:.2e}", "inf" if math.isinf(s.psnr_db) else f"{s.psnr_db:.1f}",
                             "FAIL" if bad else "ok"))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in rows)


class VerificationError(RuntimeError):
    """A verification stage failed; ``report`` holds every case and every failing output."""

    def __init__(self, report: VerificationReport):
        self.report = report
        lines = report.failure_lines() or ["no cases were run"]
        super().__init__(f"{report.stage} verification failed:\n  " + "\n  ".join(lines))
