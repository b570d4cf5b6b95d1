"""Triton model configurations (``config.pbtxt``) from the graph contract, and their check.

Every model asym-export puts on Triton (python-backend models of ``asym-serve``, native
``onnxruntime`` and ``tensorrt`` models of ``asym-triton-repo``) gets its configuration here:

* one model per graph of ``specs.GRAPHS``, named like the graph (``encoder``, ``decoder``,
  ``decoder_uncond``; engines: ``encoder_trt``, ...);
* inputs and outputs as the contract names them, ``TYPE_FP32`` (the FP16 graphs keep float32
  at their boundary), dims without the batch axis, symbolic sizes as -1 (Triton checks the fixed
  channel counts and the rank itself, before a request reaches a model);
* ``max_batch_size`` from the folder's shape limits, dynamic batching with a bounded queue delay.
  Triton only batches requests whose other dims agree, so requests of different sizes never
  share a batch;
* instance groups (count, CPU or GPU, which GPUs).

The configuration is built as Triton's own protobuf (``model_config_pb2`` from tritonclient)
and written with protobuf's text format, so a field Triton does not know cannot be written;
:func:`parse_config` reads a file back with the same schema and :func:`config_problems`
checks it against the contract.
"""

from __future__ import annotations

from typing import Iterable, Mapping

from ..specs import GraphSpec

#: Triton backends these configurations are written for.
TRITON_BACKENDS = ("python", "onnxruntime", "tensorrt")
#: Instance kinds: where Triton places each model instance.
KINDS = ("cpu", "gpu")
#: Default dynamic-batching queue delay: long enough for concurrent requests to meet, short
#: against a decode (tens of milliseconds on a GPU, seconds on a CPU).
DEFAULT_QUEUE_DELAY_US = 2000


def _pb():
    try:
        from tritonclient.grpc import model_config_pb2
    except ImportError as e:  # pragma: no cover - the serve extra installs it
        raise ImportError(
            f"Triton model configurations need tritonclient ({e}); install the serving extra: "
            "pip install -e '.[serve]'"
        ) from None
    return model_config_pb2


def tensor_dims(spec_dims: tuple) -> list[int]:
    """Triton dims of a contract tensor: the batch axis dropped, symbolic sizes -1."""
    if not spec_dims or spec_dims[0] != "batch":
        raise ValueError(f"dims {spec_dims!r} do not start with the batch axis")
    return [d if isinstance(d, int) else -1 for d in spec_dims[1:]]


def model_name(graph: GraphSpec, suffix: str = "") -> str:
    return graph.name + suffix


def build_config(graph: GraphSpec, *, backend: str, max_batch: int, name: str | None = None,
                 queue_delay_us: int = DEFAULT_QUEUE_DELAY_US, instances: int = 1, kind: str = "cpu",
                 gpus: Iterable[int] | None = None, parameters: Mapping[str, str] | None = None,
                 gpu_accelerators: Iterable[tuple[str, Mapping[str, str]]] = (),
                 default_model_filename: str | None = None):
    """The ``ModelConfig`` protobuf of one graph's model (see the module docstring)."""
    pb = _pb()
    if backend not in TRITON_BACKENDS:
        raise ValueError(f"backend {backend!r}: choose one of {', '.join(TRITON_BACKENDS)}")
    if kind not in KINDS:
        raise ValueError(f"instance kind {kind!r}: choose cpu or gpu")
    if max_batch < 1 or instances < 1 or queue_delay_us < 0:
        raise ValueError(f"max_batch {max_batch}, instances {instances}, queue_delay_us {queue_delay_us}: "
                         "max_batch and instances must be >= 1, the delay >= 0")
    cfg = pb.ModelConfig(name=name or model_name(graph), backend=backend, max_batch_size=max_batch)
    for t in graph.inputs:
        cfg.input.add(name=t.name, data_type=pb.TYPE_FP32, dims=tensor_dims(t.dims))
    for t in graph.outputs:
        cfg.output.add(name=t.name, data_type=pb.TYPE_FP32, dims=tensor_dims(t.dims))
    cfg.dynamic_batching.max_queue_delay_microseconds = int(queue_delay_us)
    group = cfg.instance_group.add(count=int(instances),
                                   kind=pb.ModelInstanceGroup.KIND_GPU if kind == "gpu" else pb.ModelInstanceGroup.KIND_CPU)
    if gpus is not None and kind == "gpu":
        group.gpus.extend(int(g) for g in gpus)
    for key, value in (parameters or {}).items():
        cfg.parameters[key].string_value = str(value)
    for acc_name, acc_params in gpu_accelerators:
        acc = cfg.optimization.execution_accelerators.gpu_execution_accelerator.add(name=acc_name)
        for key, value in acc_params.items():
            acc.parameters[key] = str(value)
    if default_model_filename:
        cfg.default_model_filename = default_model_filename
    return cfg


def config_text(cfg) -> str:
    """``config.pbtxt`` text of a ``ModelConfig``."""
    from google.protobuf import text_format

    return text_format.MessageToString(cfg)


def parse_config(text: str, where: str = "config.pbtxt"):
    """Parse ``config.pbtxt`` text with Triton's schema; ``ValueError`` naming the file if it is not one."""
    from google.protobuf import text_format

    try:
        return text_format.Parse(text, _pb().ModelConfig())
    except text_format.ParseError as e:
        raise ValueError(f"{where} is not a valid Triton model configuration: {e}") from None


def config_problems(cfg, graph: GraphSpec, *, max_batch: int, name: str | None = None,
                    backend: str | None = None) -> list[str]:
    """What in ``cfg`` disagrees with the contract of ``graph`` (empty: nothing)."""
    pb = _pb()
    problems = []
    want_name = name or model_name(graph)
    if cfg.name != want_name:
        problems.append(f"name is {cfg.name!r}, expected {want_name!r}")
    if backend is not None and cfg.backend != backend:
        problems.append(f"backend is {cfg.backend!r}, expected {backend!r}")
    if not 1 <= cfg.max_batch_size <= max_batch:
        problems.append(f"max_batch_size {cfg.max_batch_size} is outside 1..{max_batch} (the shape limits)")
    for kind, want, got in (("input", graph.inputs, cfg.input), ("output", graph.outputs, cfg.output)):
        got_by_name = {t.name: t for t in got}
        if [t.name for t in got] != [t.name for t in want]:
            problems.append(f"{kind}s are {[t.name for t in got]}, the contract has {[t.name for t in want]}")
        for t in want:
            g = got_by_name.get(t.name)
            if g is None:
                continue
            if g.data_type != pb.TYPE_FP32:
                problems.append(f"{kind} {t.name} is {pb.DataType.Name(g.data_type)}, expected TYPE_FP32")
            if list(g.dims) != tensor_dims(t.dims):
                problems.append(f"{kind} {t.name} has dims {list(g.dims)}, expected {tensor_dims(t.dims)}")
    if not cfg.HasField("dynamic_batching"):
        problems.append("no dynamic_batching")
    return problems
