"""The CUDA form's standard-ONNX twin: every fused node expanded back into the ops it stands
for (FP16 nodes computing in FP32 and rounding their outputs, as ONNX Runtime's CUDA kernels do),
so ONNX Runtime's CPU provider can run it and the export can verify the rewrite without a GPU."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .cuda_graph import FUSED_OPS, MS_DOMAIN, TO_NCHW, TO_NHWC, node_attr

log = logging.getLogger(__name__)


def emulate(model: onnx.ModelProto, fp16: bool = False, fp32_nodes: set[str] | None = None,
            base_dir: str | Path | None = None) -> onnx.ModelProto:
    """Expand every fused node back into standard ONNX ops (in place), so a CPU can run the
    CUDA form: NhwcConv -> Transpose, Conv, Transpose; GroupNorm -> Transpose, Reshape to groups,
    one-pass statistics as the kernel takes them, Reshape/Mul/Add(/Sigmoid/Mul), Transpose;
    SkipGroupNorm -> Add then the same. ``fp16``: the graph is a mixed FP16 graph, in which every fused node but
    ``fp32_nodes`` computes on FP16 tensors; the norms then compute in FP32 and round their
    outputs to FP16, as ONNX Runtime's CUDA kernels do. ``base_dir``: where the external data
    of a model loaded without it lies (the norms' gamma and beta are read from it)."""
    g = model.graph
    fp32_nodes = fp32_nodes or set()
    inits = {i.name: i for i in g.initializer}
    new_nodes, new_inits = [], []
    count = [0]

    def nm(base):
        count[0] += 1
        return f"{base}__emu{count[0]}"

    def array(name):
        t = inits[name]
        if t.data_location == TensorProto.EXTERNAL:
            from onnx.external_data_helper import load_external_data_for_tensor

            t = TensorProto()
            t.CopyFrom(inits[name])
            load_external_data_for_tensor(t, str(base_dir or "."))
            del t.external_data[:]
            t.data_location = TensorProto.DEFAULT
        return numpy_helper.to_array(t).astype(np.float32)

    def node(op, ins, outs=None, **kw):
        outs = outs or [nm(op)]
        new_nodes.append(helper.make_node(op, ins, outs, name=nm(op), **kw))
        return outs[0]

    def const(base, arr):
        name = nm(base)
        new_inits.append(numpy_helper.from_array(arr, name))
        return name

    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 18)

    def reduce_mean(x):
        if opset >= 18:  # axes became an input in opset 18
            return node("ReduceMean", [x, const("axes", np.array([2], np.int64))], keepdims=1)
        return node("ReduceMean", [x], axes=[2], keepdims=1)

    def norm(x_nhwc, n, half, out):
        """GroupNorm of a channels-last tensor; FP32 inside. The statistics are taken as the
        kernel takes them, in one pass: var = mean(x^2) - mean(x)^2, then 1/sqrt(var + eps)
        (ONNX Runtime's NHWC GroupNorm kernel sums x and x^2 in FP32), so a group whose mean
        dwarfs its spread loses here the precision it loses on the GPU."""
        groups, eps, act = int(node_attr(n, "groups")), float(node_attr(n, "epsilon", 1e-5)), int(node_attr(n, "activation", 0))
        gamma, beta = array(n.input[1]), array(n.input[2])
        c = gamma.size
        xf = node("Cast", [x_nhwc], to=TensorProto.FLOAT) if half else x_nhwc
        x = node("Transpose", [xf], perm=TO_NCHW)
        r = node("Reshape", [x, const("groups_shape", np.array([0, groups, -1], np.int64))])
        mean = reduce_mean(r)
        var = node("Sub", [reduce_mean(node("Mul", [r, r])), node("Mul", [mean, mean])])
        inv = node("Reciprocal", [node("Sqrt", [node("Add", [var, const("eps", np.array(eps, np.float32))])])])
        i = node("Mul", [node("Sub", [r, mean]), inv])
        y = node("Reshape", [i, node("Shape", [x])])
        y = node("Mul", [y, const("gamma", gamma.reshape(c, 1, 1))])
        y = node("Add", [y, const("beta", beta.reshape(c, 1, 1))])
        if act:
            y = node("Mul", [y, node("Sigmoid", [y])])
        if half:
            y = node("Transpose", [y], perm=TO_NHWC)
            node("Cast", [y], [out], to=TensorProto.FLOAT16)
        else:
            node("Transpose", [y], [out], perm=TO_NHWC)

    for n in g.node:
        if n.domain != MS_DOMAIN or n.op_type not in FUSED_OPS:
            new_nodes.append(n)
            continue
        half = fp16 and n.name not in fp32_nodes
        if n.op_type == "NhwcConv":
            x = node("Transpose", [n.input[0]], perm=TO_NCHW)
            w = node("Transpose", [n.input[1]], perm=TO_NCHW)
            conv = helper.make_node("Conv", [x, w, *n.input[2:]], [nm("conv")], name=nm("Conv"))
            conv.attribute.extend(n.attribute)
            new_nodes.append(conv)
            node("Transpose", [conv.output[0]], [n.output[0]], perm=TO_NHWC)
        elif n.op_type == "GroupNorm":
            norm(n.input[0], n, half, n.output[0])
        else:  # SkipGroupNorm: X, gamma, beta, skip[, bias] -> Y[, S]
            # FP16: the kernel adds in half precision (each sum rounded, Inf past 65504) and takes
            # the statistics of that rounded sum, written as S or not; so does the twin
            s = node("Add", [n.input[0], n.input[3]])
            if len(n.input) > 4 and n.input[4]:
                s = node("Add", [s, n.input[4]])
            if len(n.output) > 1 and n.output[1]:
                node("Identity", [s], [n.output[1]])
            if half:
                y = nm("skip_norm_fp32")
                norm(node("Cast", [s], to=TensorProto.FLOAT), n, False, y)
                node("Cast", [y], [n.output[0]], to=TensorProto.FLOAT16)
            else:
                norm(s, n, False, n.output[0])
    del g.node[:]
    g.node.extend(new_nodes)
    used = {i for n in new_nodes for i in n.input}
    keep = [t for t in g.initializer if t.name in used]  # the norms' gamma/beta became constants
    del g.initializer[:]
    g.initializer.extend(keep + new_inits)
    # types of rewritten tensors change (FP32 inside the norms); ONNX Runtime infers them
    del g.value_info[:]
    return model


def write_emulation(cuda_path: str | Path, out_path: str | Path, fp16: bool = False,
                    fp32_nodes: set[str] | None = None) -> Path:
    """:func:`emulate` the CUDA form at ``cuda_path`` into ``out_path`` (external data shared
    with the CUDA form, which must stay beside it)."""
    cuda_path, out_path = Path(cuda_path), Path(out_path)
    if cuda_path.parent.resolve() != out_path.parent.resolve():
        raise ValueError("the emulation must sit beside the CUDA form (it reads its external data)")
    model = onnx.load(str(cuda_path), load_external_data=False)
    emulate(model, fp16=fp16, fp32_nodes=fp32_nodes, base_dir=cuda_path.parent)
    onnx.save_model(model, str(out_path))
    return out_path
