"""PyTorch -> ONNX with the current exporter (``torch.onnx.export(..., dynamo=True)``).

Input/output names and dynamic axes come from the graph contract (``asym_runtime.specs``);
after export the graph's I/O dims are renamed to the contract's names and checked against
it, so a graph that does not match the contract never leaves this module.
"""

from __future__ import annotations

import contextlib
import gc
import io
import logging
import warnings
from pathlib import Path

import onnx
import torch

from asym_runtime.specs import VAE_SCALE, GraphSpec, Shape

from . import __version__
from .feeds import make_feed
from .graphs import wrapper_for

log = logging.getLogger(__name__)

#: ONNX opset of every exported graph: the default of optimum-onnx and the torch exporter,
#: parsed by TensorRT 10/11 and run by every ONNX Runtime release since 1.14.
OPSET = 18
#: Shape of the example inputs the exporter traces with. torch.export specialises dims of
#: size 0/1, so every dynamic dim must be >= 2 here: batch 2, latent 8x8 (64x64 pixels).
EXPORT_SHAPE = Shape(2, 64, 64)


class ExportError(RuntimeError):
    """The exporter failed, or produced a graph that breaks the contract."""


def _dynamic_shapes(graph: GraphSpec) -> dict[str, dict[int, object]]:
    from torch.export import Dim

    batch = Dim("batch")
    lat_h, lat_w = Dim("latent_height"), Dim("latent_width")
    by_name = {
        "batch": batch,
        "latent_height": lat_h,
        "latent_width": lat_w,
        # pixel dims are derived, so the exporter knows height == 8 * latent_height
        "height": VAE_SCALE * lat_h,
        "width": VAE_SCALE * lat_w,
    }
    return {t.name: {i: by_name[d] for i, d in t.dynamic_axes().items()} for t in graph.inputs}


@contextlib.contextmanager
def _quiet_exporter():
    """Silence the exporter's internal chatter (torchvision op registration, axis-rename and
    pytree deprecation notices) unless asym_export is logging at DEBUG level."""
    if log.isEnabledFor(logging.DEBUG):
        yield
        return
    tlog = logging.getLogger("torch.onnx")
    level = tlog.level
    tlog.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)
            warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.onnx")
            warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.export")
            yield
    finally:
        tlog.setLevel(level)


def rename_dims(model: onnx.ModelProto, graph: GraphSpec) -> None:
    """Name every dynamic I/O dim as the contract does, and check every fixed dim.

    The exporter names derived dims ``8*latent_height`` and output dims after internal
    symbols (``s38``); one consistent rename map is applied to inputs, outputs and
    value_info. Raises :class:`ExportError` if the graph's I/O does not match the contract.
    """
    ios = {v.name: v for v in list(model.graph.input) + list(model.graph.output)}
    expected = set(graph.input_names) | set(graph.output_names)
    if set(ios) != expected or [v.name for v in model.graph.input] != graph.input_names:
        raise ExportError(
            f"{graph.name}: graph I/O is {[v.name for v in model.graph.input]} -> "
            f"{[v.name for v in model.graph.output]}, the contract says {graph.input_names} -> "
            f"{graph.output_names}"
        )
    rename: dict[str, str] = {}
    problems = []
    for spec in graph.inputs + graph.outputs:
        dims = ios[spec.name].type.tensor_type.shape.dim
        if len(dims) != len(spec.dims):
            problems.append(f"{spec.name} has rank {len(dims)}, contract rank {len(spec.dims)}")
            continue
        for i, (d, want) in enumerate(zip(dims, spec.dims)):
            if isinstance(want, int):
                if d.dim_value != want:
                    problems.append(f"{spec.name} dim {i} is {d.dim_param or d.dim_value}, contract {want}")
            elif not d.dim_param:
                problems.append(f"{spec.name} dim {i} is fixed to {d.dim_value}, contract: dynamic {want}")
            elif rename.setdefault(d.dim_param, want) != want:
                problems.append(f"{spec.name} dim {i} ({d.dim_param}) is both {rename[d.dim_param]} and {want}")
    if problems:
        raise ExportError(f"{graph.name}: exported graph breaks the contract: " + "; ".join(problems))
    for v in list(model.graph.input) + list(model.graph.output) + list(model.graph.value_info):
        for d in v.type.tensor_type.shape.dim:
            if d.dim_param in rename:
                d.dim_param = rename[d.dim_param]


def onnx_from_model(vae, graph: GraphSpec, path: str | Path, *, variant: str,
                    scaling_factor: float, opset: int = OPSET) -> Path:
    """Export one graph of ``vae`` to ``path`` (+ ``path.data``); returns ``path``.

    The graph is raw (no scaling factor, no clamping), exactly what diffusers computes.
    Weights go to external data beside the graph, which keeps peak memory down and is
    required above protobuf's 2 GiB limit; the file is named ``<graph file>.data``.
    """
    path = Path(path)
    module = wrapper_for(vae, graph.name)
    feed = make_feed(graph, EXPORT_SHAPE, seed=0, scaling_factor=scaling_factor)
    args = tuple(torch.from_numpy(feed[n]) for n in graph.input_names)
    log.info("exporting %s at example shape %s (opset %d)", graph.name, EXPORT_SHAPE, opset)
    sink = io.StringIO()
    try:
        # the exporter prints its own progress lines; the CLI shows ours instead
        with torch.no_grad(), contextlib.redirect_stdout(sink), _quiet_exporter():
            torch.onnx.export(
                module, args, str(path), dynamo=True, dynamic_shapes=_dynamic_shapes(graph),
                input_names=graph.input_names, output_names=graph.output_names,
                opset_version=opset, optimize=True, verbose=False, external_data=True,
            )
    except Exception as e:  # the exporter raises many types; all mean the same here
        log.debug("exporter output:\n%s", sink.getvalue())
        raise ExportError(f"torch.onnx.export failed for {graph.name}: {type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}") from e
    gc.collect()
    data = path.parent / (path.name + ".data")  # where the exporter puts the weights
    if not data.is_file():
        raise ExportError(f"{graph.name}: the exporter wrote no external data file {data.name}")
    # Edit only the small top-level proto; the weights stay where the exporter streamed them.
    model = onnx.load(str(path), load_external_data=False)
    rename_dims(model, graph)
    meta = {
        "asym_export.version": __version__,
        "asym_export.graph": graph.name,
        "asym_export.variant": variant,
        "asym_export.scaling_factor": repr(float(scaling_factor)),
        "asym_export.precision": "fp32",
    }
    del model.metadata_props[:]
    for k, v in meta.items():
        model.metadata_props.add(key=k, value=v)
    model.producer_name = "asym-export"
    model.producer_version = __version__
    onnx.save_model(model, str(path))
    del model
    onnx.checker.check_model(str(path), full_check=True)  # path-based: fine above 2 GiB
    log.info("wrote %s (%.1f MB incl. external data)", path.name,
             (path.stat().st_size + data.stat().st_size) / 1e6)
    return path

