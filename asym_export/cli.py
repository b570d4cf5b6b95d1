"""``asym-export``: export AsymmetricAutoencoderKL to verified ONNX graphs in one folder."""

from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path

from asym_runtime.errors import AsymInputError
from asym_runtime.specs import ShapeLimits, parse_shape

from asym_runtime.cliutil import parse, EXIT_FAILED, EXIT_OK, EXIT_USAGE, OneLineParser, add_debug, exit_codes, graph_lines, guarded
from .variants import PUBLISHED, VARIANTS

DESCRIPTION = f"""\
Export the asymmetric VAE of Stable Diffusion inpainting (diffusers AsymmetricAutoencoderKL)
into one self-describing folder, every file verified before it is published:

{graph_lines()}

each in FP32 (dynamic batch/height/width, checked with ONNX Runtime against the PyTorch
reference at several shapes) and as *.fp16.onnx (FP16 with FP32 islands chosen from
calibrated activation ranges, float32 inputs/outputs, checked with a faithful FP16 emulation);
the CUDA form of each (*.cuda.onnx, *.fp16.cuda.onnx: channels-last with ONNX Runtime's fused
GroupNorm/NhwcConv CUDA kernels, checked through their standard-ONNX emulation); with
--engines on a GPU, TensorRT engines; and manifest.json with hashes, shape limits, versions
and every verification result. The files go into a new generation folder (OUT/gen-*) and
manifest.json switches to it last, in one rename: a failed, interrupted or killed export
leaves OUT as it was, and a second export into a busy OUT fails at once.
"""

EPILOG = f"""\
examples:
  asym-export --variant x2 --out artifacts/x2                   # hub weights (through the cache)
  asym-export --variant x2 --weights ./my-vae --out artifacts/x2  # a save_pretrained folder
  asym-export --variant x2 --random-weights --seed 0 --out /tmp/x2  # offline, for tests/benchmarks
  asym-export --variant x2 --engines --out artifacts/x2          # + FP16 TensorRT engines (GPU + tensorrt)

{exit_codes("verified folder written", "export or verification failed, or --engines on a machine without a GPU and tensorrt (the verified ONNX folder is still written)", "bad arguments, unusable weights or output folder")}
"""


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="asym-export", description=DESCRIPTION, epilog=EPILOG)
    p.add_argument("--variant", required=True, metavar="{" + ",".join(PUBLISHED) + "}",
                   help=f"which published checkpoint: {' or '.join(PUBLISHED)} (also accepted: "
                        f"{', '.join(v for v in VARIANTS if v not in PUBLISHED)}, a test-only config)")
    p.add_argument("--out", required=True, type=Path, metavar="DIR",
                   help="output folder (created; an existing manifest there is replaced)")
    w = p.add_argument_group("weights (default: the variant's hub id, through the hub cache)")
    src = w.add_mutually_exclusive_group()
    src.add_argument("--weights", metavar="FOLDER_OR_HUB_ID",
                     help="a local diffusers folder (config.json + safetensors) or a hub id")
    src.add_argument("--random-weights", action="store_true",
                     help="exact variant config with seeded random weights (offline tests, benchmarks)")
    w.add_argument("--seed", type=int, default=None, help="seed for --random-weights (default 0)")
    w.add_argument("--revision", help="hub revision (branch, tag or commit) for a hub id")
    w.add_argument("--allow-pickle", action="store_true",
                   help="accept pickle (.bin) weights; they can run code when loaded, use only if trusted")
    v = p.add_argument_group("verification")
    v.add_argument("--verify-shapes", metavar="BxHxW[,BxHxW...]",
                   help="extra shapes (batch x height x width pixels, multiples of 8) to verify the "
                        "graphs at, besides the export shape 2x64x64, inside the shape limits (default: "
                        "1x64x96,3x64x72, or the smallest allowed shape and a non-square one when the "
                        "limits exclude those)")
    v.add_argument("--atol", type=float, default=None, metavar="X",
                   help="max abs error allowed for the FP32 graphs (default 1e-3)")
    f = p.add_argument_group("FP16 graphs (encoder.fp16.onnx, decoder.fp16.onnx, decoder_uncond.fp16.onnx; what "
                              "TensorRT engines are built from)")
    f.add_argument("--no-fp16", action="store_true", help="skip the mixed-precision FP16 graphs")
    f.add_argument("--fp16-headroom", type=float, default=None, metavar="X",
                   help="a tensor stays FP32 when X times its calibrated max |value| exceeds 65504 "
                        "(default 4)")
    c = p.add_argument_group("CUDA forms (*.cuda.onnx and *.fp16.cuda.onnx of every graph; ONNX Runtime CUDA only)")
    c.add_argument("--no-cuda-form", action="store_true",
                   help="skip the CUDA forms (ONNX Runtime on a GPU then runs the portable graphs)")
    s = p.add_argument_group("shape limits (recorded in the manifest; enforced by the runtime)")
    s.add_argument("--min-size", default="64", metavar="N|HxW", help="smallest image, pixels (default 64)")
    s.add_argument("--opt-size", default="512", metavar="N|HxW", help="typical image, pixels (default 512)")
    s.add_argument("--max-size", default="1024", metavar="N|HxW", help="largest image, pixels (default 1024)")
    s.add_argument("--max-batch", type=int, default=4, help="largest batch (default 4)")
    s.add_argument("--opt-batch", type=int, default=1, help="typical batch (default 1)")
    e = p.add_argument_group("TensorRT engines (need a CUDA GPU and the tensorrt package)")
    e.add_argument("--engines", action="store_true",
                   help="also build one engine per graph (engines/encoder.plan, decoder.plan, decoder_uncond.plan; "
                        "strongly typed, from the FP16 graphs), one optimization profile from the shape limits, verified on the GPU "
                        "at min/opt/max")
    e.add_argument("--opt-level", type=int, default=None, metavar="N",
                   help="builder optimization level 0-5 (default 3)")
    e.add_argument("--workspace-gib", type=float, default=None, metavar="X",
                   help="limit TensorRT's workspace memory to X GiB (default: TensorRT's own limit)")
    e.add_argument("--version-compatible", action="store_true",
                   help="engines that later TensorRT versions can run (may be slower)")
    e.add_argument("--hardware-compat", default=None, metavar="{none,ampere_plus,same_compute_capability}",
                   help="engines that run on other GPUs than the one that built them (default none; may be slower)")
    p.add_argument("-v", "--verbose", action="store_true", help="log every step")
    add_debug(p)
    return p


def _options(args):
    from .export import ExportOptions
    from .fp16 import DEFAULT_HEADROOM
    from .verify import FP32_MAX_ABS

    if args.variant not in VARIANTS:
        raise AsymInputError(f"unknown variant {args.variant!r}; choose one of {', '.join(PUBLISHED)}")
    limits = ShapeLimits.from_sizes(args.min_size, args.opt_size, args.max_size,
                                    min_batch=1, opt_batch=args.opt_batch, max_batch=args.max_batch)
    shapes = None  # the export's default for these limits
    if args.verify_shapes is not None:
        shapes = tuple(parse_shape(s) for s in args.verify_shapes.split(",") if s.strip())
        if not shapes:
            raise AsymInputError(f"--verify-shapes {args.verify_shapes!r} names no shape; give BxHxW[,BxHxW...]")
        for s in shapes:  # a verified shape the runtime would refuse proves nothing a user can run
            try:
                limits.check(s.batch, s.height, s.width)
            except AsymInputError as e:
                raise AsymInputError(f"--verify-shapes {s}: {e}") from None
    engine = _engine_options(args)
    atol = FP32_MAX_ABS if args.atol is None else args.atol
    if not 0 < atol < math.inf:
        raise AsymInputError(f"--atol {args.atol} must be a positive finite number")
    headroom = DEFAULT_HEADROOM if args.fp16_headroom is None else args.fp16_headroom
    if not 1 <= headroom < math.inf:
        raise AsymInputError(f"--fp16-headroom {args.fp16_headroom} must be a finite number of at least 1")
    # a flag the chosen source or output ignores is refused, as the engine flags are without
    # --engines: the run would not be the one asked for
    checks = (
        ("--seed", args.seed is not None and not args.random_weights, "applies to --random-weights only"),
        ("--revision", args.revision is not None and args.random_weights, "applies to hub weights, not --random-weights"),
        ("--allow-pickle", args.allow_pickle and args.random_weights, "applies to weight files, not --random-weights"),
        ("--fp16-headroom", args.fp16_headroom is not None and args.no_fp16, "applies to the FP16 graphs, not --no-fp16"),
    )
    ignored = [f"{flag} {where}" for flag, given, where in checks if given]
    if ignored:
        raise AsymInputError("; ".join(ignored))
    seed = 0 if args.seed is None else args.seed
    if not 0 <= seed < 2**64:  # torch's seeds are unsigned 64-bit
        raise AsymInputError(f"--seed {args.seed} must be >= 0 and < 2**64")
    return ExportOptions(
        variant=args.variant, out=args.out, weights=args.weights, random_weights=args.random_weights,
        seed=seed, allow_pickle=args.allow_pickle, revision=args.revision, limits=limits,
        verify_shapes=shapes, fp32_max_abs=atol, fp16=not args.no_fp16, fp16_headroom=headroom,
        cuda_form=not args.no_cuda_form, engine=engine,
    )


def _engine_options(args):
    from .engines import EngineOptions

    given = [flag for flag, v in (("--opt-level", args.opt_level), ("--workspace-gib", args.workspace_gib),
                                  ("--version-compatible", args.version_compatible or None),
                                  ("--hardware-compat", args.hardware_compat)) if v is not None]
    if not args.engines:
        if given:
            raise AsymInputError(f"{', '.join(given)} only applies to engine builds; add --engines")
        return None
    return EngineOptions(opt_level=3 if args.opt_level is None else args.opt_level,
                         workspace_gib=args.workspace_gib, version_compatible=args.version_compatible,
                         hardware_compat=args.hardware_compat or "none")


def _summary(result) -> str:
    lines = [f"artifact folder: {result.out}"]
    width = max(len(n) for n in result.files) + len(result.generation) + 1
    lines.append(f"  {'manifest.json'.ljust(width)}  (switched to the new files last)")
    for name, size in sorted(result.files.items()):
        lines.append(f"  {(result.generation + '/' + name).ljust(width)}  {size / 1e6:10.1f} MB")
    lines.append("")
    for report in result.reports:
        lines.append(report.table())
    lines.append("")
    lines.append(f"weights: {result.weights.describe()}; total {result.timings['total_s']:.1f} s")
    return "\n".join(lines)


#: What every failed export leaves: the folder's manifest is switched only after all checks passed.
UNCHANGED = "nothing was published: the folder is as it was (its previous artifact, if any, still loads)."


def main(argv: list[str] | None = None) -> int:
    args, code = parse(build_parser(), argv)
    if args is None:
        return code
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s: %(message)s",
    )
    return guarded("asym-export", args.debug, lambda: _run(args), interrupted=f"interrupted; {UNCHANGED}")


def _run(args) -> int:
    # imported here so `--help` and argument errors answer instantly (torch loads slowly)
    from .artifact import OutputDirError
    from .engine_verify import EnginesNotBuiltError
    from .engines import EngineBuildError
    from .onnx_export import ExportError
    from .progress import ConsoleProgress
    from .trt_readiness import TensorRTReadinessError
    from .verify import VerificationError
    from .weights import WeightsError, WeightsUnavailableError

    try:
        opts = _options(args)
        if opts.engine:
            from .engines import tensorrt_unavailable_reason

            reason = tensorrt_unavailable_reason()
            if reason:
                print(f"asym-export: warning: --engines: no TensorRT engines can be built on this machine: "
                      f"{reason}; exporting and verifying the ONNX graphs only", file=sys.stderr)
        from .export import export_artifact

        result = export_artifact(opts, ConsoleProgress())
    except (WeightsUnavailableError, WeightsError, OutputDirError, AsymInputError) as e:
        print(f"asym-export: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except VerificationError as e:
        print(e.report.table(), file=sys.stderr)
        print(f"asym-export: {e}\n{UNCHANGED}", file=sys.stderr)
        return EXIT_FAILED
    except EnginesNotBuiltError as e:
        print(_summary(e.result))
        print(f"asym-export: error: {e}; the ONNX graphs and manifest.json in {e.result.out} are complete "
              "and verified", file=sys.stderr)
        return EXIT_FAILED
    except TensorRTReadinessError as e:
        print(f"asym-export: {e}\n{UNCHANGED}", file=sys.stderr)
        return EXIT_FAILED
    except (ExportError, EngineBuildError) as e:
        print(f"asym-export: export failed: {e}", file=sys.stderr)
        if args.debug:
            raise
        return EXIT_FAILED
    print(_summary(result))
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
