"""``asym-parity DIR``: the runtime against the PyTorch reference, on every backend this machine has.

The reference is diffusers' ``AsymmetricAutoencoderKL`` rebuilt from the manifest's weights
source (seeded random weights, a local folder or a hub commit), checked against the
manifest's ``state_dict_sha256`` so the comparison is against the weights the folder was
exported from. Each available backend (ONNX Runtime CPU and CUDA for every ONNX precision
in the folder, TensorRT for its engines) runs ``encode``, the conditional ``decode`` and the
plain ``decode`` through the public ``asym_runtime`` API at the manifest's verification
shapes, on the same seeded inputs the export verified with. FP32 is held to a max abs
error (the export's tolerance), FP16 graphs and engines to the PSNR floors of ``verify.py``.
Each comparison is named ``BACKEND/PRECISION[/portable]`` (``asym_runtime.names``), and
``--backends`` takes the same names, whole or cut after the backend or the precision.

Exit codes: 0 every backend passed; 1 a comparison failed; 2 bad arguments, an unusable
folder or reference weights that differ from the manifest's.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from asym_runtime.errors import (ArtifactError, AsymInputError, BackendError, BackendUnavailableError,
                                 IncompatibleEngineError)
from asym_runtime.manifest import FORMAT_ONNX, FORMAT_ONNX_CUDA, FORMAT_PLAN, Manifest, read_manifest
from asym_runtime.names import PRECISIONS, BackendName, parse_backend_name
from asym_runtime.specs import Shape, parse_shape

from asym_runtime.cliutil import parse, EXIT_FAILED, EXIT_OK, EXIT_USAGE, OneLineParser, add_debug, exit_codes, guarded

#: asym_runtime.load backends a comparison can force (its "auto" and "onnxruntime" pick one of these)
PARITY_BACKENDS = ("onnxruntime-cpu", "onnxruntime-cuda", "tensorrt", "openvino")

log = logging.getLogger(__name__)


class ParityError(ValueError):
    """The comparison cannot be set up (no shapes in the limits; reference weights that differ
    are :class:`asym_export.reference.ReferenceWeightsError`)."""


@dataclass
class Candidate:
    backend: str  # an asym_runtime.load backend name
    precision: str | None
    graph_form: str = "auto"  # asym_runtime.load graph_form: "portable" forces the standard graphs

    @property
    def name(self) -> BackendName:
        return BackendName(self.backend, self.precision, "portable" if self.graph_form == "portable" else None)

    @property
    def label(self) -> str:
        """``BACKEND/PRECISION[/portable]``, as asym_runtime.names writes it."""
        return str(self.name)

    def selected_by(self, name: BackendName) -> bool:
        """Whether a name the caller gave (``onnxruntime-cuda``, ``onnxruntime-cuda/fp16``, ...)
        selects this candidate: every part it names matches."""
        mine = self.name
        return (name.backend == mine.backend and name.precision in (None, mine.precision)
                and name.option in (None, mine.option))


@dataclass
class ParityResult:
    reports: list = field(default_factory=list)  # VerificationReport per candidate that ran
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (label, reason)
    skipped_shapes: list[tuple[Shape, str]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)  # label -> seconds of runtime calls
    errors: list[tuple[str, str]] = field(default_factory=list)  # (label, BackendError) for a run that failed

    def __bool__(self) -> bool:
        return bool(self.reports) and all(self.reports) and not self.errors


def candidates(manifest: Manifest, backends: list | None = None) -> list[Candidate]:
    """Every (backend, precision) the folder offers; the machine decides later which run.
    ``backends``: names (``BACKEND[/PRECISION[/OPTION]]``, str or BackendName) that select some."""
    order = {"fp32": 0, "fp16": 1}  # the exact graphs first
    onnx_precisions = sorted({e.precision for e in manifest.files.values()
                              if e.format == FORMAT_ONNX and e.role == "decoder" and e.precision},
                             key=lambda p: (order.get(p, 2), p))
    cuda_forms = {e.precision for e in manifest.files.values() if e.format == FORMAT_ONNX_CUDA}
    out = [Candidate("onnxruntime-cpu", p) for p in onnx_precisions]
    for p in onnx_precisions:  # the CUDA provider runs the CUDA form where the folder has one
        out.append(Candidate("onnxruntime-cuda", p))
        if p in cuda_forms:
            out.append(Candidate("onnxruntime-cuda", p, "portable"))
    engine_precisions = sorted({e.precision for e in manifest.files.values()
                                if e.format == FORMAT_PLAN and e.role == "decoder"})
    out += [Candidate("tensorrt", p) for p in engine_precisions]
    if "fp32" in onnx_precisions:  # OpenVINO runs the FP32 graphs, in FP32 or in BF16 compute
        out += [Candidate("openvino", "fp32"), Candidate("openvino", "bf16")]
    if backends:
        names = [b if isinstance(b, BackendName) else parse_backend_name(b, PARITY_BACKENDS) for b in backends]
        out = [c for c in out if any(c.selected_by(n) for n in names)]
    return out


def _why_not(name: BackendName) -> str:
    if name.backend == "tensorrt":
        return " (TensorRT runs engines, which asym-export --engines builds on a GPU)"
    if name.precision == "bf16" and name.backend != "openvino":
        return " (bf16 is OpenVINO's compute precision on the FP32 graphs)"
    if name.option == "portable" and name.backend != "onnxruntime-cuda":
        return " (/portable is onnxruntime-cuda's choice of the standard graphs over the CUDA form)"
    return ""


def default_shapes(manifest: Manifest) -> list[Shape]:
    shapes = manifest.data.get("verification", {}).get("shapes") or [manifest.data.get("export_shape", "2x64x64")]
    return [parse_shape(s) for s in shapes]


def run_parity(root: str | Path, *, backends: list[str] | None = None, shapes: list[Shape] | None = None,
               fp32_max_abs: float | None = None, seed: int | None = None, reference_device: str = "cpu",
               provider_options: dict | None = None, reference_cache: dict | None = None,
               allow_pickle: bool = False) -> ParityResult:
    """Compare every available backend with the reference; returns the reports (no printing).

    ``reference_device``: where diffusers computes the reference (``cuda`` for the large shapes
    of a GPU check; TF32 is switched off there, so it is a true FP32 reference).
    ``provider_options``: precision -> ONNX Runtime CUDA options replacing the defaults."""
    import numpy as np

    import asym_runtime

    from .feeds import VERIFY_SEED, make_feed
    from .graphs import EXPORT_GRAPHS
    from .reference import reference_from_manifest, reference_outputs, true_fp32
    from .verify import BF16_TOLERANCE, FP16_TOLERANCE, FP32_MAX_ABS, Tolerance, VerificationReport

    manifest = read_manifest(root)
    result = ParityResult()
    if fp32_max_abs is None:
        fp32_max_abs = (manifest.data.get("verification", {}).get("onnx_fp32", {})
                        .get("tolerance", {}).get("max_abs")) or FP32_MAX_ABS
    seed = VERIFY_SEED if seed is None else seed
    usable = []  # (index in the requested list, shape): a skipped shape does not reseed the rest
    for i, s in enumerate(shapes or default_shapes(manifest)):
        if manifest.limits.contains(s):
            usable.append((i, s))
        else:
            result.skipped_shapes.append((s, f"outside the folder's shape limits ({manifest.limits})"))
    if not usable:
        raise ParityError("no comparison shape lies inside the folder's shape limits; pass --shapes")
    chosen = candidates(manifest, backends)
    if backends:  # a name that selects nothing is the name's or the folder's doing, not the machine's
        offered = candidates(manifest)
        for b in backends:
            name = b if isinstance(b, BackendName) else parse_backend_name(b, PARITY_BACKENDS)
            if not any(c.selected_by(name) for c in offered):
                raise ParityError(f"--backends {name}: {root} offers nothing it names{_why_not(name)}; it offers "
                                  f"{', '.join(c.label for c in offered)}")

    vae = reference_from_manifest(manifest, reference_cache, allow_pickle).to(reference_device)
    sf = manifest.scaling_factor
    cases = []  # (shape, graph, feed, reference outputs), every graph at every shape
    with true_fp32():
        for i, s in usable:
            for g in EXPORT_GRAPHS.values():
                feed = make_feed(g.spec, s, seed + i, sf)
                cases.append((s, g, feed, reference_outputs(vae, g.spec, feed)))
    del vae
    if reference_device != "cpu":
        import torch

        torch.cuda.empty_cache()

    for cand in chosen:
        opts = (provider_options or {}).get(cand.precision) if cand.backend == "onnxruntime-cuda" else None
        try:
            rt = asym_runtime.load(root, backend=cand.backend, precision=cand.precision,
                                   graph_form=cand.graph_form, provider_options=opts)
        except (BackendUnavailableError, IncompatibleEngineError) as e:
            result.skipped.append((cand.label, str(e)))
            continue
        except BackendError as e:  # it could not start a session; the others are still compared
            result.errors.append((cand.label, f"did not load: {e}"))
            continue
        precision = rt.precision
        tol = {"fp32": Tolerance(max_abs=fp32_max_abs), "bf16": BF16_TOLERANCE}.get(precision, FP16_TOLERANCE)
        report = VerificationReport(cand.label, tol)
        t_total = 0.0
        try:
            for s, g, feed, ref in cases:
                t0 = time.perf_counter()
                out = g.runtime_call(rt, feed)  # through the public API, as a caller runs it
                t_total += time.perf_counter() - t0
                report.add(g.spec, s, ref, {k: np.asarray(v) for k, v in out.items()})
        except BackendError as e:  # this backend failed at a shape; the others are still compared
            result.errors.append((cand.label, f"{g.spec.name} at {s} did not run: {e}"))
            continue
        finally:
            rt.close()
        result.reports.append(report)
        result.timings[cand.label] = t_total
    return result


DESCRIPTION = """\
Compare an artifact folder, run through asym_runtime on every backend this machine offers
(ONNX Runtime CPU and CUDA for each ONNX precision, on the CUDA provider both the CUDA form
and the portable graphs; TensorRT engines; OpenVINO on the CPU in FP32 and, on CPUs with BF16
units, BF16), with the PyTorch reference rebuilt from the manifest's weights source: encode
(mean, logvar), conditional decode and plain decode at the manifest's verification shapes.
FP32 is held to a max abs error (default: the export's tolerance), FP16 and BF16 to PSNR
floors (FP16: 50 dB, logvar 40; BF16: 44 dB, logvar 35).
"""

EPILOG = f"""\
examples:
  asym-parity artifacts/x2                                        # every backend here, export's shapes
  asym-parity artifacts/x2 --backends onnxruntime-cuda --shapes limits --reference-device cuda

{exit_codes("every backend passed", "a comparison failed, or no backend could run",
            "bad arguments, an unusable folder, or reference weights that differ from the ones the folder was exported from")}
"""


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="asym-parity", description=DESCRIPTION, epilog=EPILOG)
    add_debug(p)
    p.add_argument("dir", type=Path, metavar="DIR", help="artifact folder written by asym-export")
    p.add_argument("--backends", metavar="NAME[,NAME...]",
                   help=f"only these, of {', '.join(PARITY_BACKENDS)}, each optionally narrowed to a precision "
                        "and form as the report names them (onnxruntime-cuda/fp16, onnxruntime-cuda/fp16/portable); "
                        "default: every one that runs here")
    p.add_argument("--shapes", metavar="BxHxW[,BxHxW...]|limits",
                   help="comparison shapes (default: the manifest's verification shapes inside its limits); "
                        "'limits': the shape limits' min, opt and max")
    p.add_argument("--reference-device", choices=("cpu", "cuda"), default="cpu",
                   help="where diffusers computes the FP32 reference (default cpu; cuda for large shapes, "
                        "with TF32 off)")
    p.add_argument("--atol", type=float, default=None, metavar="X",
                   help="max abs error allowed at FP32 (default: the export's tolerance, 1e-3)")
    p.add_argument("--seed", type=int, default=None, help="seed of the inputs (default: the export's)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="rebuild the reference from pickle (.bin) weights, for a folder exported with "
                        "--allow-pickle; they can run code when loaded, use only if trusted")
    p.add_argument("-v", "--verbose", action="store_true", help="log every step")
    return p


def main(argv: list[str] | None = None) -> int:
    args, code = parse(build_parser(), argv)
    if args is None:
        return code
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    return guarded("asym-parity", args.debug, lambda: _main(args))


def _main(args) -> int:
    from .reference import ReferenceWeightsError
    from .weights import WeightsError

    try:
        backends = None
        if args.backends is not None:
            backends = []
            if not args.backends.strip(", "):
                raise AsymInputError(f"--backends {args.backends!r} names no backend")
            for b in (b.strip() for b in args.backends.split(",") if b.strip()):
                try:
                    name = parse_backend_name(b, PARITY_BACKENDS)
                except AsymInputError:
                    name = None
                if name is None or name.option not in (None, "portable"):
                    raise AsymInputError(f"--backends {b}: choose from {', '.join(sorted(PARITY_BACKENDS))}, "
                                         f"optionally narrowed to /{'|'.join(PRECISIONS)}[/portable]")
                backends.append(name)
        if args.shapes and args.shapes.strip() == "limits":
            lim = read_manifest(args.dir).limits
            shapes = list(dict.fromkeys([lim.min, lim.opt, lim.max]))
        else:
            shapes = [parse_shape(s) for s in args.shapes.split(",") if s.strip()] if args.shapes is not None else None
            if shapes == []:
                raise AsymInputError(f"--shapes {args.shapes!r} names no shape; give BxHxW[,BxHxW...] or limits")
        if args.reference_device == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise AsymInputError("--reference-device cuda: torch sees no CUDA GPU here")
        if args.atol is not None and not 0 < args.atol < float("inf"):
            raise AsymInputError(f"--atol {args.atol} must be a positive finite number")
        if args.seed is not None and args.seed < 0:
            raise AsymInputError(f"--seed {args.seed} must be >= 0")
        result = run_parity(args.dir, backends=backends, shapes=shapes, fp32_max_abs=args.atol, seed=args.seed,
                            reference_device=args.reference_device, allow_pickle=args.allow_pickle)
    except (ArtifactError, AsymInputError, ParityError, ReferenceWeightsError, WeightsError) as e:
        print(f"asym-parity: error: {e}", file=sys.stderr)
        return EXIT_USAGE

    for report in result.reports:
        print(report.table())
        print(f"  {report.stage}: pass when {report.tolerance.describe()}; "
              f"{result.timings[report.stage]:.2f} s in runtime calls\n")
    for label, reason in result.skipped:
        print(f"skipped {label}: {reason}")
    for s, reason in result.skipped_shapes:
        print(f"skipped shape {s}: {reason}")
    for label, message in result.errors:
        print(f"FAILED {label}: {message}", file=sys.stderr)
    if not result.reports and not result.errors:
        print("asym-parity: no backend could run on this machine", file=sys.stderr)
        return EXIT_FAILED
    failed = [r for r in result.reports if not r]
    for r in failed:
        print(f"FAILED {r.stage}:\n  " + "\n  ".join(r.failure_lines()), file=sys.stderr)
    ran = ", ".join([r.stage for r in result.reports] + [f"{label} (failed to run)" for label, _ in result.errors])
    # a backend asked for but not run is said in the verdict itself, never only above it
    not_run = f"; not run: {', '.join(label for label, _ in result.skipped)}" if result.skipped else ""
    if result.skipped_shapes:  # so is a shape asked for and not compared
        not_run += f"; shapes not compared: {', '.join(str(s) for s, _ in result.skipped_shapes)}"
    bad = failed or result.errors
    print(f"asym-parity: {'FAILED' if bad else 'passed'} ({ran}){not_run}")
    return EXIT_FAILED if bad else EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
