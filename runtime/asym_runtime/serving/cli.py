"""The serving tools' command lines: ``asym-serve`` (:mod:`.server`) and ``asym-triton-repo``
(:mod:`.repository`). Arguments, messages and exit codes only (the conventions of
``asym_runtime.cliutil``); the work is in those modules."""

from __future__ import annotations

import logging
import signal
import socket
import sys
from pathlib import Path

from ..cliutil import EXIT_FAILED, EXIT_OK, EXIT_USAGE, OneLineParser, add_debug, exit_codes, guarded, parse
from ..errors import ArtifactError, BackendUnavailableError
from ..api import check_loadable
from ..manifest import MANIFEST_NAME, read_manifest
from ..names import BACKENDS, PRECISIONS
from ..specs import GRAPHS
from . import config as tconfig
from . import repository as _repository
from . import server as _server
from .repository import FORMS, RepoOptions
from .server import ServeOptions

def _gpu_ids(text: str) -> list[int]:
    """``--gpus 0,1`` -> [0, 1]; anything else is a ValueError saying what is allowed."""
    try:
        ids = [int(g) for g in text.split(",") if g.strip()]
    except ValueError:
        ids = []
    if not ids or any(i < 0 for i in ids):
        raise ValueError(f"--gpus {text!r}: comma-separated GPU ids (0, 1, ...), e.g. 0,1")
    return ids


# --------------------------------------------------------------------------- asym-serve


def build_serve_parser():
    p = OneLineParser(
        prog="asym-serve",
        description=(
            "Serve an artifact folder on NVIDIA Triton Inference Server: models encoder, decoder "
            "(conditional decode) and decoder_uncond (plain decode), each running asym_runtime, with "
            "dynamic batching up to the folder's max batch, HTTP and gRPC, /v2/health/ready and "
            "Prometheus metrics. Call it with asym_runtime.remote(URL) or any Triton client."
        ),
        epilog=exit_codes("the server stopped on Ctrl-C or SIGTERM", "the server failed to start or died",
                          "bad arguments or an unusable folder"),
    )
    p.add_argument("dir", type=Path, help="artifact folder written by asym-export")
    p.add_argument("--backend", default="auto", choices=BACKENDS,
                   help="runtime backend inside the server, as asym_runtime.load names it (default auto)")
    p.add_argument("--precision", default=None, choices=PRECISIONS,
                   help="graph precision, as asym_runtime.load takes it (default: the folder's default)")
    p.add_argument("--address", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1; 0.0.0.0 for a load balancer or container)")
    p.add_argument("--http-port", type=int, default=8000, help="Triton's HTTP/REST port (default 8000)")
    p.add_argument("--grpc-port", type=int, default=8001, help="Triton's gRPC port (default 8001)")
    p.add_argument("--metrics-port", type=int, default=8002, help="Triton's Prometheus metrics port (default 8002)")
    p.add_argument("--instances", type=int, default=1,
                   help="model instances per graph (each loads its graph once; default 1)")
    p.add_argument("--max-batch", type=int, default=None,
                   help="largest batch Triton may form from queued requests (default: the folder's max "
                        "batch; 1: no batching: on a CPU a batch costs about the sum of its items)")
    p.add_argument("--kind", default="cpu", choices=tconfig.KINDS, help="instance kind (default cpu)")
    p.add_argument("--gpus", default=None, help="with --kind gpu: comma-separated GPU ids")
    p.add_argument("--max-queue-delay-us", type=int, default=tconfig.DEFAULT_QUEUE_DELAY_US,
                   help=f"how long a request may wait for others to batch with (default {tconfig.DEFAULT_QUEUE_DELAY_US})")
    p.add_argument("--graphs", default=",".join(GRAPHS),
                   help=f"graphs to serve (default {','.join(GRAPHS)})")
    p.add_argument("--tritonserver", type=Path, default=None,
                   help="an installed tritonserver binary to use instead of nvidia-pytriton's")
    p.add_argument("--start-timeout", type=float, default=600.0, help="seconds to wait for readiness (default 600)")
    p.add_argument("--exit-timeout", type=int, default=10,
                   help="seconds Triton drains in-flight requests and open connections on stop (default 10)")
    p.add_argument("--log-verbose", type=int, default=0, help="Triton's --log-verbose level (default 0)")
    add_debug(p)
    return p


def serve_main(argv: list[str] | None = None) -> int:
    args, code = parse(build_serve_parser(), argv)
    if args is None:
        return code
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s: %(message)s")

    def body() -> int:
        try:
            opts = _serve_options(args)
            # what every model instance's load() would refuse, refused here, before Triton starts
            # (a bad folder or backend was a model that failed to load inside Triton: exit 1)
            manifest = read_manifest(opts.artifact)
            has_uncond = any(e.role == "decoder_uncond" for e in manifest.files.values())
            # the graphs the models load (model.py: a folder without the plain decoder decodes
            # plainly through the conditional one); the device checks on the first GPU
            graphs = {("decoder" if g == "decoder_uncond" and not has_uncond else g) for g in opts.graphs}
            check_loadable(opts.artifact, opts.backend, opts.precision, device_id=(opts.gpus or [0])[0],
                           graphs=[g for g in GRAPHS if g in graphs])
        except (ValueError, ArtifactError, BackendUnavailableError) as e:
            print(f"asym-serve: error: {e}", file=sys.stderr)
            return EXIT_USAGE
        server = _server.TritonServer(opts)
        stopping = []

        def on_term(signum, frame):  # SIGTERM as Ctrl-C: stop Triton cleanly
            stopping.append(signum)
            raise KeyboardInterrupt

        previous = signal.signal(signal.SIGTERM, on_term)
        try:
            print(f"asym-serve: starting Triton on {opts.artifact} ({manifest.variant}, {opts.backend} backend, "
                  f"{opts.instances} instance(s) per graph) ...", flush=True)
            try:
                server.start(progress=lambda m: print(f"asym-serve: {m}", flush=True))
            except BackendUnavailableError as e:
                print(f"asym-serve: error: {e}", file=sys.stderr)
                return EXIT_USAGE
            except RuntimeError as e:
                print(f"asym-serve: error: {e}", file=sys.stderr)
                return EXIT_FAILED
            print(f"asym-serve: serving {', '.join(server.models)} at {server.http_url} (gRPC port "
                  f"{opts.grpc_port}, metrics http://{opts.address}:{opts.metrics_port}/metrics); Ctrl-C stops",
                  flush=True)
            code = server.wait()
            print(f"asym-serve: error: tritonserver stopped by itself (exit code {code}):\n{server.log_tail()}",
                  file=sys.stderr)
            return EXIT_FAILED
        except KeyboardInterrupt:
            print("asym-serve: stopping (in-flight requests finish; Ctrl-C again kills tritonserver)", flush=True)
            return EXIT_OK
        finally:
            try:
                server.stop()  # a second Ctrl-C here kills Triton, then ends the run as interrupted (130)
            finally:
                signal.signal(signal.SIGTERM, previous)

    return guarded("asym-serve", args.debug, body)


def _serve_options(args) -> ServeOptions:
    graphs = tuple(g.strip() for g in args.graphs.split(",") if g.strip())
    bad = [g for g in graphs if g not in GRAPHS]
    if bad or not graphs:
        raise ValueError(f"--graphs {args.graphs!r}: choose from {', '.join(GRAPHS)}")
    for name in ("http_port", "grpc_port", "metrics_port"):
        v = getattr(args, name)
        if not 0 < v < 65536:
            raise ValueError(f"--{name.replace('_', '-')} {v}: a port is 1..65535")
    if len({args.http_port, args.grpc_port, args.metrics_port}) != 3:
        raise ValueError("--http-port, --grpc-port and --metrics-port must differ")
    if args.instances < 1:
        raise ValueError(f"--instances {args.instances}: at least 1")
    if args.max_batch is not None and args.max_batch < 1:
        raise ValueError(f"--max-batch {args.max_batch}: at least 1")
    if args.exit_timeout < 0:
        raise ValueError(f"--exit-timeout {args.exit_timeout}: seconds, >= 0")
    if not 0 < args.start_timeout < float("inf"):
        raise ValueError(f"--start-timeout {args.start_timeout}: seconds, > 0")
    try:
        socket.getaddrinfo(args.address, None)
    except (socket.gaierror, UnicodeError) as e:
        raise ValueError(f"--address {args.address!r} is no address this machine can listen on ({e}); "
                         "e.g. 127.0.0.1, 0.0.0.0 or a host name") from None
    if args.max_queue_delay_us < 0:
        raise ValueError(f"--max-queue-delay-us {args.max_queue_delay_us}: must be >= 0")
    if args.precision == "bf16" and args.backend != "openvino":
        raise ValueError("--precision bf16 runs on --backend openvino only")
    gpus = None
    if args.gpus:
        if args.kind != "gpu":
            raise ValueError("--gpus needs --kind gpu")
        gpus = _gpu_ids(args.gpus)
    artifact = args.dir
    if not (artifact / MANIFEST_NAME).is_file():
        raise ValueError(f"{artifact} is not an artifact folder (no {MANIFEST_NAME})")
    return ServeOptions(artifact=artifact, backend=args.backend, precision=args.precision, address=args.address,
                        http_port=args.http_port, grpc_port=args.grpc_port, metrics_port=args.metrics_port,
                        instances=args.instances, max_batch=args.max_batch, kind=args.kind, gpus=gpus, queue_delay_us=args.max_queue_delay_us,
                        graphs=graphs, tritonserver=args.tritonserver, start_timeout_s=args.start_timeout,
                        exit_timeout_s=args.exit_timeout, log_verbose=args.log_verbose)


# --------------------------------------------------------------------------- asym-triton-repo


def build_repo_parser():
    p = OneLineParser(
        prog="asym-triton-repo",
        description=(
            "Write a Triton model repository from an artifact folder: the verified ONNX graphs as "
            "onnxruntime models and the TensorRT engines as tensorrt models, with config.pbtxt from the "
            "graph contract and the folder's shape limits, for tritonserver in NVIDIA's container. "
            "--check REPO re-checks a written repository."
        ),
        epilog=exit_codes("written (or checked) and consistent", "the check found problems",
                          "bad arguments or an unusable folder"),
    )
    p.add_argument("dir", type=Path, nargs="?", help="artifact folder written by asym-export")
    p.add_argument("--out", type=Path, help="the repository folder to write")
    p.add_argument("--check", type=Path, metavar="REPO", help="check a repository instead of writing one")
    p.add_argument("--precision", default="fp16", choices=("fp16", "fp32"), help="graph precision (default fp16)")
    p.add_argument("--form", default="auto", choices=FORMS,
                   help="auto (default): the CUDA form where the folder has one and instances are GPU ones; "
                        "cuda: insist on the CUDA form (fused CUDA-only kernels; needs --kind gpu); "
                        "portable: the standard graphs")
    p.add_argument("--no-engines", action="store_true",
                   help="leave the folder's TensorRT engines out (--kind cpu always does)")
    p.add_argument("--instances", type=int, default=1, help="instances per model (default 1)")
    p.add_argument("--kind", default="gpu", choices=tconfig.KINDS, help="instance kind (default gpu)")
    p.add_argument("--gpus", default=None, help="with --kind gpu: comma-separated GPU ids for the instances")
    p.add_argument("--max-queue-delay-us", type=int, default=tconfig.DEFAULT_QUEUE_DELAY_US,
                   help=f"how long a request may wait for others to batch with (default {tconfig.DEFAULT_QUEUE_DELAY_US})")
    p.add_argument("--tensorrt-accelerator", action="store_true",
                   help="run the ONNX models through ONNX Runtime's TensorRT provider (portable graphs, --kind gpu); "
                        "its optimization profile is the folder's shape limits")
    p.add_argument("--tensorrt-cache", metavar="DIR",
                   help="with --tensorrt-accelerator: an absolute folder on the server where the provider keeps "
                        "its engines across restarts (one subfolder per graph, keyed by the graph's sha256)")
    p.add_argument("--force", action="store_true", help="replace an existing repository this tool wrote")
    add_debug(p)
    return p


def repo_main(argv: list[str] | None = None) -> int:
    args, code = parse(build_repo_parser(), argv)
    if args is None:
        return code

    def body() -> int:
        if args.check is not None:
            if args.dir is not None or args.out is not None:
                print("asym-triton-repo: error: --check REPO takes no artifact folder or --out", file=sys.stderr)
                return EXIT_USAGE
            if not args.check.is_dir():
                print(f"asym-triton-repo: error: {args.check} is not a folder", file=sys.stderr)
                return EXIT_USAGE
            problems = _repository.check_repository(args.check)
            for p in problems:
                print(f"asym-triton-repo: {p}", file=sys.stderr)
            print(f"asym-triton-repo: {args.check}: " + ("consistent" if not problems else f"{len(problems)} problem(s)"))
            return EXIT_FAILED if problems else EXIT_OK
        if args.dir is None or args.out is None:
            print("asym-triton-repo: error: give an artifact folder and --out REPO (or --check REPO)", file=sys.stderr)
            return EXIT_USAGE
        try:
            gpus = _gpu_ids(args.gpus) if args.gpus else None
            if args.instances < 1 or args.max_queue_delay_us < 0:
                raise ValueError("--instances must be >= 1 and --max-queue-delay-us >= 0")
            opts = RepoOptions(precision=args.precision, form=args.form, engines=not args.no_engines,
                               instances=args.instances, kind=args.kind, gpus=gpus,
                               queue_delay_us=args.max_queue_delay_us,
                               tensorrt_accelerator=args.tensorrt_accelerator,
                               tensorrt_cache=args.tensorrt_cache, force=args.force)
            result = _repository.write_repository(args.dir, args.out, opts,
                                      progress=lambda m: print(f"asym-triton-repo: {m}", flush=True))
        except (ValueError, ArtifactError, FileExistsError) as e:
            print(f"asym-triton-repo: error: {e}", file=sys.stderr)
            return EXIT_USAGE
        print(f"asym-triton-repo: wrote {result.path}: {', '.join(m.name for m in result.models)} (checked); "
              f"run it with: tritonserver --model-repository {result.path}")
        return EXIT_OK

    return guarded("asym-triton-repo", args.debug, body)
