"""The CUDA form of a graph: the same computation in channels-last layout with ONNX Runtime's
fused CUDA kernels, written beside the portable graphs (``decoder.cuda.onnx``,
``decoder.fp16.cuda.onnx``) and run only on ONNX Runtime's CUDA provider.

Why: ONNX Runtime runs the portable graphs' GroupNorm as Reshape + InstanceNormalization +
Reshape + Mul + Add (+ Sigmoid + Mul for the SiLU after it), six to eight memory passes per
norm, and every NCHW convolution through cuDNN, which transposes to its tensor-core layout and
back. ``com.microsoft`` ships CUDA kernels for exactly this model family:

* ``GroupNorm`` (channels-last, SiLU folded in, statistics in FP32 also for FP16 inputs);
* ``SkipGroupNorm`` (the residual Add in front of a GroupNorm, the sum as a second output);
* ``NhwcConv`` (a Conv on channels-last data, weights stored OHWI).

The pass here rewrites the exported FP32 graph itself (ONNX Runtime's transformer optimizer
fuses the same kernels but leaves a Transpose pair around every residual Add and mask blend,
and renames nodes so that the FP16 islands could not be carried over):

1. every GroupNorm subgraph (also the 3-D one in front of the mid-block attention) becomes one
   ``GroupNorm`` node, every ``Conv`` an ``NhwcConv``, each wrapped in a layout Transpose on
   either side;
2. those Transposes are pushed through the layout-agnostic nodes between them (elementwise
   ops, Concat, Pad, the sub-pixel interleave, the attention's flatten/unflatten), with a
   cheap Transpose on 1-channel tensors (the inpainting mask) where needed, and cancelled in
   pairs, until channels-last runs from the first convolution to the last; the layout
   Transposes left sit at the graph's boundaries (inputs, the mask, outputs);
3. an Add feeding a GroupNorm becomes a ``SkipGroupNorm``.

Every tensor the pass creates is named after the original tensor whose values it holds
(``<name>__nhwc__cfN``; :func:`original_tensor` undoes that), so the activation ranges
calibrated on the portable graph choose the CUDA form's FP16 islands too.

The pass lives in four modules: this one (the entry points and the report), ``cuda_graph.py``
(the editable graph), ``cuda_fusion.py`` (steps 1 and 3), ``cuda_layout.py`` (step 2 and the
layout check), and ``cuda_emulation.py`` (below).

These kernels exist for CUDA only, so a CPU cannot run the CUDA form. ``cuda_emulation.emulate`` writes
its standard-ONNX twin (each fused node expanded back into the ops it stands for, FP16 nodes
computing in FP32 and rounding their output, SkipGroupNorm's sum rounded to FP16 before its
statistics, as the kernels do), which ONNX Runtime's CPU
provider runs: the export verifies the rewrite itself that way against the PyTorch reference,
and ``asym-parity`` verifies the real kernels on a GPU.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from .cuda_fusion import convert_convs, fuse_group_norms, fuse_skip_group_norms
from .cuda_graph import FUSED_OPS, MS_DOMAIN, SUM_DOC, CudaFormError, RewriteGraph, original_tensor
from .cuda_layout import cancel_and_prune, sink_transposes, is_layout_transpose, layout_violations

log = logging.getLogger(__name__)


@dataclass
class CudaFormReport:
    """What the pass fused, and what layout Transposes it left."""

    fused: dict[str, int] = field(default_factory=dict)  # op type -> count in the result
    unfused_group_norms: int = 0  # InstanceNormalization nodes left (GroupNorms not fused)
    convs_left: int = 0  # plain Conv nodes left
    layout_transposes: int = 0  # layout Transposes left (at the graph's boundaries)

    def to_dict(self) -> dict:
        return {"fused_nodes": dict(self.fused), "unfused_group_norms": self.unfused_group_norms,
                "convs_left": self.convs_left, "layout_transposes_at_boundaries": self.layout_transposes}


def cuda_ranges(model: onnx.ModelProto, ranges: dict[str, float]) -> dict[str, float]:
    """Activation ranges calibrated on the portable graph, keyed by the CUDA form's tensors."""
    out = {}
    for n in model.graph.node:
        for o in n.output:
            r = ranges.get(original_tensor(o))
            if o and r is not None:
                out[o] = r
    return out


def cuda_inner_ranges(model: onnx.ModelProto, ranges: dict[str, float]) -> dict[str, tuple[str, float]]:
    """Calibrated ranges of values a fused node computes but does not write: the sum inside a
    SkipGroupNorm whose S output is unused (the portable graph's Add). Node name ->
    (portable tensor, max |x|). Without them an overflowing residual sum would pass unseen."""
    out = {}
    for n in model.graph.node:
        if n.doc_string.startswith(SUM_DOC):
            tensor = original_tensor(n.doc_string[len(SUM_DOC):])
            r = ranges.get(tensor)
            if r is not None:
                out[n.name] = (tensor, r)
    return out


def cuda_form(model: onnx.ModelProto) -> tuple[onnx.ModelProto, CudaFormReport]:
    """Rewrite an exported FP32 graph (weights loaded) into its CUDA form, in place."""
    report = CudaFormReport()
    graph = RewriteGraph(model)
    fuse_group_norms(graph)
    convert_convs(graph)
    sink_transposes(graph)
    fuse_skip_group_norms(graph)
    cancel_and_prune(graph)
    graph.save()
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.add(domain=MS_DOMAIN, version=1)
    nodes = list(model.graph.node)
    report.fused = {op: sum(1 for n in nodes if n.op_type == op and n.domain == MS_DOMAIN) for op in FUSED_OPS}
    report.unfused_group_norms = sum(1 for n in nodes if n.op_type == "InstanceNormalization")
    report.convs_left = sum(1 for n in nodes if n.op_type == "Conv")
    report.layout_transposes = sum(1 for n in nodes if is_layout_transpose(n))
    bad = layout_violations(model)
    if bad:
        raise CudaFormError(f"layout Transposes left between fused nodes: {', '.join(bad[:5])}")
    return model, report


def write_cuda_form(fp32_path: str | Path, out_path: str | Path, graph_name: str) -> CudaFormReport:
    """Write the CUDA form of the FP32 graph ``fp32_path`` to ``out_path`` (+ ``.data``) and run
    the ONNX checker on it."""
    out_path = Path(out_path)
    model = onnx.load(str(fp32_path))
    model, report = cuda_form(model)
    meta = {p.key: p.value for p in model.metadata_props}
    meta["asym_export.form"] = "cuda"
    meta["asym_export.fused_nodes"] = ",".join(f"{k}={v}" for k, v in report.fused.items())
    del model.metadata_props[:]
    for k, v in meta.items():
        model.metadata_props.add(key=k, value=v)
    data = out_path.parent / (out_path.name + ".data")
    data.unlink(missing_ok=True)
    onnx.save_model(model, str(out_path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data.name, size_threshold=1024)
    del model
    onnx.checker.check_model(str(out_path), full_check=True)
    log.info("CUDA form of %s: %s", graph_name, report.to_dict())
    return report
