"""``asym-bench``: every backend side by side against the PyTorch reference, in one process.

This module is the command line; the work is done by ``bench_contenders`` (what is timed and how
it loads), ``bench_measure`` (the rounds and the result), ``bench_flops``, ``bench_machine``
(peak, memory, device) and ``bench_report`` (table, plot).

For each variant, graph (encode, conditional decode, plain decode), batch and resolution it
measures, per backend:

* **load** time (manifest + sha256 + session/engine creation for the runtime; building or
  loading the model for diffusers) and the **first call** at each shape, apart from
* the **steady state**: median and p90 over repeated calls after warm-up, throughput in
  images/s, and the **ratio** to the reference backend. Calls are **interleaved** (one call
  per backend per round, the order rotating every round), so drift of the machine (clock,
  other load) hits every backend alike and cancels in the ratio;
* achieved **TFLOP/s** from a FLOP count of what the backend computes at that shape (torch's
  flop counter on the meta device: 2 per multiply-add; convolutions and matmuls, not the
  elementwise ops; the exported graphs' sub-pixel upsamplers need fewer than diffusers'),
  and its share of the device's **peak**, measured on the spot as the best rate of a large
  matmul on the same device (and, for known GPUs, the datasheet's dense FP16 peak);
* **memory**: host RSS growth while loading and the process's peak RSS; on a GPU the device
  memory in use after loading.

Output: a table on the terminal, JSON (``--json``) and a PNG plot of latency against
resolution per backend (``--plot``).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import tempfile
from pathlib import Path

from .artifact import write_json_atomic
from .bench_contenders import (GPU_BACKENDS, OLD_NAMES, RUNTIME_CONTENDERS, TORCH_CONTENDERS, default_contenders,
                                offered_by)
from .bench_measure import run_benchmark
from .bench_report import plot, table
from asym_runtime.cliutil import EXIT_FAILED, EXIT_USAGE, OneLineParser, add_debug, exit_codes, guarded, parse
from .graphs import BENCH_GRAPHS


#: What --reference may name.
REFERENCES = ("diffusers/fp32", "diffusers/fp16")


def _contenders(text: str, what: str, allowed) -> list[str]:
    """Contender names from the command line; an earlier release's name is taken with a note."""
    out = []
    for t in _parse_list(text, what):
        if t in OLD_NAMES:
            print(f"note: {what} {t} is now written {OLD_NAMES[t]}", file=sys.stderr)
            t = OLD_NAMES[t]
        out.append(t)
    _parse_list(",".join(out), what, allowed)
    return list(dict.fromkeys(out))


def _output_problem(path: Path, flag: str) -> str | None:
    """Why ``path`` cannot be written (checked before minutes of measuring), or None."""
    if path.is_dir():
        return f"{flag} {path} is a folder; name a file"
    parent = path.parent
    while not parent.exists():  # the writer makes missing folders
        parent = parent.parent
    if not parent.is_dir():
        return f"{flag} {path}: {parent} is a file, not a folder"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"{flag} {path}: cannot write into {parent}"
    return None


def _parse_list(text: str, what: str, allowed=None) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise ValueError(f"{what}: empty list")
    if allowed is not None:
        bad = [t for t in items if t not in allowed]
        if bad:
            raise ValueError(f"{what}: unknown {', '.join(bad)}; choose from {', '.join(allowed)}")
    return items


DESCRIPTION = """\
Time every backend against the PyTorch reference in one process: for each graph, batch and
size, the load time, the first call (apart), and the steady state over interleaved rounds
(one call per backend per round, the order rotating, so drift of the machine hits every
backend alike): median and p90 latency, images/s, the ratio to the reference and, where
torch.compile ran, to it; TFLOP/s from a FLOP count of what each backend computes, and its
share of the device's peak (a large matmul measured on the spot; on known GPUs also the
datasheet's FP16 peak); host and GPU memory. A table on the terminal, JSON and a PNG plot.
"""

EPILOG = f"""\
backends, written BACKEND/PRECISION[/OPTION] as asym_runtime.load names them:
  {", ".join(RUNTIME_CONTENDERS)} (asym_runtime);
  {", ".join(TORCH_CONTENDERS)} (PyTorch).
  onnxruntime-cuda runs the folder's CUDA form, /portable the standard graphs, /cudagraph
  replays a CUDA graph; tensorrt alone runs the engines as built; openvino runs the FP32 graphs
  (bf16: BF16 compute where OpenVINO computes BF16: CPUs with BF16 units, emulated on AVX-512
  without them); every asym_runtime call is numpy in, numpy out.
  The names of earlier releases (ort-cpu-fp32, tensorrt-engine, diffusers-fp32, ...) are
  accepted with a note that gives the name above.
graphs: {", ".join(BENCH_GRAPHS)}.

examples:
  asym-bench --variant x2 --sizes 256                              # CPU: ONNX Runtime vs diffusers FP32
  asym-bench --variant x2 --artifact artifacts/x2 --sizes 512,1024 --json b.json --plot b.png
  asym-bench --variant x2 --artifact artifacts/x2 --backends torch-compile/fp16,onnxruntime-cuda/fp16 --sizes 512

{exit_codes("measured", "the implicit export failed or a backend could not run", "bad arguments or an unusable artifact folder")}
"""


def build_parser() -> argparse.ArgumentParser:
    from .variants import VARIANTS

    p = OneLineParser(prog="asym-bench", description=DESCRIPTION, epilog=EPILOG)
    add_debug(p)
    p.add_argument("--variant", default="x2", choices=list(VARIANTS), metavar="{" + ",".join(VARIANTS) + "}",
                   help="the model (default x2)")
    p.add_argument("--artifact", type=Path, metavar="DIR",
                   help="an artifact folder of that variant (default: export one with --random-weights "
                        "--seed 0 into a temporary folder first)")
    p.add_argument("--backends", metavar="LIST",
                   help="comma-separated backends to time against the reference (listed below; default: on a "
                        "CPU onnxruntime-cpu/fp32, onnxruntime-cpu/fp16, and where OpenVINO is installed "
                        "openvino/fp32 (plus openvino/bf16 and diffusers/bf16 where OpenVINO computes BF16); on a GPU "
                        "torch-compile/fp16, onnxruntime-cuda/fp32, onnxruntime-cuda/fp16, "
                        "onnxruntime-cuda/fp16/cudagraph, and tensorrt where it runs)")
    p.add_argument("--reference", default=None, metavar="{" + ",".join(REFERENCES) + "}",
                   help="the backend ratios are taken against (default: diffusers/fp32 on a CPU, "
                        "diffusers/fp16 on a GPU)")
    p.add_argument("--graphs", default=",".join(BENCH_GRAPHS), metavar="LIST",
                   help=f"comma-separated, of {', '.join(BENCH_GRAPHS)} (default: all)")
    p.add_argument("--sizes", default="256", metavar="LIST",
                   help="resolutions, N or HxW pixels, comma separated (default 256)")
    p.add_argument("--batches", default="1", metavar="LIST", help="batch sizes, comma separated (default 1)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls per backend after the first (default 1)")
    p.add_argument("--repeats", type=int, default=5, help="timed interleaved rounds (default 5)")
    p.add_argument("--json", type=Path, metavar="FILE", help="write the full result (every timing) as JSON")
    p.add_argument("--plot", type=Path, metavar="FILE", help="write a PNG of latency against resolution")
    p.add_argument("--allow-pickle", action="store_true",
                   help="build the diffusers contenders from pickle (.bin) weights, for a folder exported with "
                        "--allow-pickle; they can run code when loaded, use only if trusted")
    p.add_argument("--kernels", action="store_true",
                   help="GPU only: after the timings, record every row's CUDA kernels for 3 more calls (torch's "
                        "profiler) and print where the GPU time goes: busy time against the latency, kernels per "
                        "call, milliseconds per kind of work (convolution, norm, elementwise, layout ...), the "
                        "costliest kernels; also in --json")
    return p


def main(argv: list[str] | None = None) -> int:
    args, code = parse(build_parser(), argv)
    if args is None:
        return code
    logging.basicConfig(level=logging.WARNING, format="%(name)s %(levelname)s: %(message)s")
    return guarded("asym-bench", args.debug, lambda: _main(args, argv))


def _main(args, argv) -> int:
    from asym_runtime.specs import parse_size

    from .variants import VARIANTS

    try:
        if args.variant not in VARIANTS:
            raise ValueError(f"unknown variant {args.variant!r}; choose one of {', '.join(VARIANTS)}")
        graphs = _parse_list(args.graphs, "--graphs", list(BENCH_GRAPHS))
        sizes = [parse_size(s) for s in _parse_list(args.sizes, "--sizes")]
        try:
            batches = [int(b) for b in _parse_list(args.batches, "--batches")]
        except ValueError as e:
            raise ValueError(f"--batches {args.batches!r}: comma-separated integers ({e})") from None
        if any(b < 1 for b in batches) or args.repeats < 1 or args.warmup < 0:
            raise ValueError("--batches and --repeats must be >= 1, --warmup >= 0")
        if args.artifact is None:  # the implicit export's limits: refuse before minutes of exporting
            from asym_runtime.specs import Shape, ShapeLimits

            default = ShapeLimits()
            if not any(default.contains(Shape(b, h, w)) for b in batches for h, w in sizes):
                raise ValueError(f"no batch x size asked for lies inside the shape limits of the export "
                                 f"made without --artifact ({default}); choose --sizes and --batches inside them")
        for path, flag in ((args.json, "--json"), (args.plot, "--plot")):
            problem = path is not None and _output_problem(path, flag)
            if problem:
                raise ValueError(problem)
        import torch

        if args.reference:
            reference = _contenders(args.reference, "--reference", REFERENCES)[0]
        else:
            reference = "diffusers/fp16" if torch.cuda.is_available() else "diffusers/fp32"
        if reference == "diffusers/fp16" and not torch.cuda.is_available():
            raise ValueError("--reference diffusers/fp16 needs a GPU (PyTorch FP16 on a CPU is no reference)")
        allowed = list(RUNTIME_CONTENDERS) + list(TORCH_CONTENDERS)
        backends = _contenders(args.backends, "--backends", allowed) if args.backends else default_contenders()
        if not torch.cuda.is_available():
            gpu_only = [b for b in backends if b.split("/")[0] in GPU_BACKENDS or b.endswith("/cudagraph")]
            if gpu_only:
                raise ValueError(f"--backends {','.join(gpu_only)}: need a GPU")
            if args.kernels:
                raise ValueError("--kernels records CUDA kernels and needs a GPU; torch sees none here")
    except ValueError as e:
        print(f"asym-bench: error: {e}", file=sys.stderr)
        return 2

    from .verify import VerificationError

    try:
        with contextlib.ExitStack() as stack:
            folder = args.artifact
            if folder is None:
                from .export import ExportOptions, export_artifact
                from .progress import ConsoleProgress

                tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="asym-bench-")))
                folder = tmp / args.variant
                print(f"no --artifact: exporting {args.variant} with seeded random weights into {folder}")
                export_artifact(ExportOptions(variant=args.variant, out=folder, random_weights=True, seed=0),
                                ConsoleProgress())
            if not args.backends:  # the defaults the folder can run (an export --no-fp16 has no FP16 graphs)
                backends, lacks = offered_by(folder, backends)
                if lacks:
                    print(f"asym-bench: {folder} has no graphs or engines for {', '.join(lacks)}; "
                          "leaving them out")
            result = run_benchmark(args.variant, folder, backends=backends, graphs=graphs, sizes=sizes,
                                   batches=batches, warmup=args.warmup, repeats=args.repeats,
                                   reference=reference, kernels=args.kernels, allow_pickle=args.allow_pickle)
    except VerificationError as e:  # the implicit export did not verify: show what failed
        print(e.report.table(), file=sys.stderr)
        print(f"asym-bench: error: {e}", file=sys.stderr)
        return 1
    except ValueError as e:  # an unusable folder or bad input (ArtifactError, AsymInputError ...)
        print(f"asym-bench: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (RuntimeError, OSError) as e:  # a failed export, an unavailable backend
        print(f"asym-bench: error: {e}", file=sys.stderr)
        return EXIT_FAILED
    result["command"] = "asym-bench " + " ".join(argv if argv is not None else sys.argv[1:])
    print(table(result))
    if args.kernels:
        from .bench_kernels import kernel_table

        print("\nGPU kernels per call:\n" + kernel_table(result))
    for s in result["skipped"]:
        print(f"skipped {s['graph']} {s['shape']}: {s['reason']}")
    if not result["rows"]:
        print("asym-bench: error: nothing was measured", file=sys.stderr)
        return EXIT_FAILED
    try:
        if args.json:
            write_json_atomic(args.json, result)
            print(f"wrote {args.json}")
        if args.plot:
            plot(result, args.plot)
            print(f"wrote {args.plot}")
    except OSError as e:
        print(f"asym-bench: error: cannot write the results: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
