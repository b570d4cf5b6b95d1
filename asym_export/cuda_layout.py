"""The CUDA form's layout pass: the Transposes around the fused nodes are pushed through the
layout-agnostic nodes between them (elementwise ops, Concat, Pad, the sub-pixel interleave, the
attention's flatten/unflatten) and cancelled in pairs until channels-last runs from the first
convolution to the last; :func:`layout_violations` finds a layout Transpose left between fused nodes."""

from __future__ import annotations

import logging
from collections import defaultdict

import numpy as np
import onnx
from onnx import TensorProto, helper

from .cuda_graph import (ELEMENTWISE, FUSED_OPS, MS_DOMAIN, TO_NCHW, TO_NHWC, CudaFormError, RewriteGraph,
                         node_attr, node_perm)

log = logging.getLogger(__name__)


def _permute_const(arr: np.ndarray) -> np.ndarray | None:
    """An NCHW-broadcast constant for use against NHWC tensors (None if it cannot be)."""
    if arr.size == 1:
        return arr
    if arr.ndim > 4:
        return None
    return arr.reshape((1,) * (4 - arr.ndim) + arr.shape).transpose(TO_NHWC)


def _push_through(graph: RewriteGraph, node) -> bool:
    """Move NCHW-restoring Transposes on ``node``'s inputs to its output (see module docstring)."""
    op = node.op_type
    if op not in ELEMENTWISE and op not in ("Concat", "Pad"):
        return False
    out = node.output[0]
    if len(node.output) != 1 or graph.rank(out) != 4:
        return False
    data_inputs = range(len(node.input)) if op in ELEMENTWISE - {"Clip"} or op == "Concat" else [0]
    new_inputs = list(node.input)
    moved = False
    for i in data_inputs:
        name = node.input[i]
        if not name:
            continue
        p = graph.producer(name)
        if node_perm(p) == TO_NCHW:
            new_inputs[i] = p.input[0]
            moved = True
            continue
        arr = graph.const(name)
        if arr is not None:
            if op == "Concat":
                return False
            permuted = _permute_const(arr)
            if permuted is None:
                return False
            if permuted is not arr:
                new_inputs[i] = graph.add_init(graph.fresh(name + ".nhwc"), permuted)
            continue
        d = graph.dims.get(name)
        if d is not None and len(d) == 0 and op != "Concat":
            continue  # a scalar broadcasts in any layout
        if d is not None and len(d) == 4 and d[1] == 1:
            continue  # a 1-channel tensor (the mask): a cheap Transpose, added below
        return False
    if not moved:
        return False
    attrs = {}
    if op == "Concat":
        axis = int(node_attr(node, "axis"))
        attrs["axis"] = TO_NHWC.index(axis % 4)
    if op == "Pad":
        pads = graph.const(node.input[1]) if len(node.input) > 1 else None
        if pads is None or pads.size != 8 or (len(node.input) > 3 and node.input[3]):
            return False
        begin, end = pads[:4], pads[4:]
        new_inputs[1] = graph.add_init(graph.fresh(node.input[1] + ".nhwc"),
                                       np.concatenate([begin[TO_NHWC], end[TO_NHWC]]).astype(pads.dtype))
    # cheap Transposes for the 1-channel inputs that were not NHWC yet
    for i in data_inputs:
        name = new_inputs[i]
        if name and name == node.input[i] and graph.const(name) is None:
            d = graph.dims.get(name)
            if d is not None and len(d) == 4:
                new_inputs[i] = graph.to_nhwc(name)
    for i, v in enumerate(new_inputs):
        node.input[i] = v
    if attrs:
        for a in node.attribute:
            if a.name == "axis":
                a.i = attrs["axis"]
    y = graph.fresh(out + "__nhwc")
    node.output[0] = y
    d = graph.dims.get(out)
    graph.set_dims(y, [d[p] for p in TO_NHWC] if d else None, graph.types.get(out, TensorProto.FLOAT))
    graph.changed()
    graph.transpose(y, TO_NCHW, out=out)
    return True


def _push_subpixel(graph: RewriteGraph, node) -> bool:
    """The sub-pixel interleave Reshape[b,2,2,c,h,w] -> Transpose(0,3,4,1,5,2) -> Reshape[b,c,2h,2w]
    on a channels-last input, done channels-last: Reshape[b,h,w,2,2,c] -> Transpose(0,1,3,2,4,5)
    -> Reshape[b,2h,2w,c]."""
    if node.op_type != "Reshape" or graph.rank(node.output[0]) != 6:
        return False
    d6 = graph.dims[node.output[0]]
    src = graph.producer(node.input[0])
    if node_perm(src) != TO_NCHW or d6[1] != 2 or d6[2] != 2:
        return False
    users = graph.consumers(node.output[0])
    if len(users) != 1 or node_perm(users[0]) != [0, 3, 4, 1, 5, 2]:
        return False
    tr = users[0]
    users = graph.consumers(tr.output[0])
    if len(users) != 1 or users[0].op_type != "Reshape" or graph.rank(users[0].output[0]) != 4:
        return False
    final = users[0]
    x = src.input[0]
    r1 = graph.fresh(node.output[0] + "__nhwc")
    graph.add(helper.make_node("Reshape", [x, graph.add_init(graph.fresh("subpixel_shape6"),
                                                             np.array([0, 0, 0, 2, 2, -1], np.int64))],
                               [r1], name=graph.fresh("SubpixelReshape")))
    t = graph.fresh(tr.output[0] + "__nhwc")
    graph.add(helper.make_node("Transpose", [r1], [t], name=graph.fresh("SubpixelTranspose"), perm=[0, 1, 3, 2, 4, 5]))
    s, s2, s3 = graph.fresh("subpixel_in_shape"), graph.fresh("subpixel_scaled"), graph.fresh("subpixel_out_shape")
    graph.add(helper.make_node("Shape", [x], [s], name=graph.fresh("SubpixelShape")))
    graph.add(helper.make_node("Mul", [s, graph.add_init(graph.fresh("subpixel_mul"), np.array([1, 2, 2, 1], np.int64))],
                               [s2], name=graph.fresh("SubpixelShapeMul")))
    graph.add(helper.make_node("Div", [s2, graph.add_init(graph.fresh("subpixel_div"), np.array([1, 1, 1, 4], np.int64))],
                               [s3], name=graph.fresh("SubpixelShapeDiv")))
    y = graph.fresh(final.output[0] + "__nhwc")
    last = helper.make_node("Reshape", [t, s3], [y], name=graph.fresh("SubpixelOut"))
    graph.add(last)
    dx, dout = graph.dims.get(x), graph.dims.get(final.output[0])
    graph.set_dims(r1, [dx[0], dx[1], dx[2], 2, 2, d6[3]] if dx else None)
    graph.set_dims(t, [dx[0], dx[1], 2, dx[2], 2, d6[3]] if dx else None)
    graph.set_dims(y, [dout[p] for p in TO_NHWC] if dout else None)
    for n in (s, s2, s3):
        graph.set_dims(n, [4], TensorProto.INT64)
    graph.remove([node, tr, final])
    graph.transpose(y, TO_NCHW, out=final.output[0])
    return True


def _push_attention_in(graph: RewriteGraph, node) -> bool:
    """Transpose(0,2,1)(Reshape(NCHW(y), [B, C, H*W])) == Reshape(y, [0, -1, C]) for channels-last y."""
    if node_perm(node) != [0, 2, 1]:
        return False
    r = graph.producer(node.input[0])
    if r is None or r.op_type != "Reshape" or graph.rank(r.output[0]) != 3:
        return False
    src = graph.producer(r.input[0])
    if node_perm(src) != TO_NCHW:
        return False
    y = src.input[0]
    dy, dr = graph.dims.get(y), graph.dims[r.output[0]]
    # NCHW [B, C, H, W] viewed as [B, C, H*W]: same batch and channels
    if not dy or not isinstance(dy[3], int) or dr[1] != dy[3] or dr[0] is None or dr[0] != dy[0]:
        return False
    if r.output[0] in graph.graph_outputs:
        return False
    new = helper.make_node("Reshape", [y, graph.add_init(graph.fresh("tokens_shape"),
                                                         np.array([0, -1, dy[3]], np.int64))],
                           [node.output[0]], name=graph.fresh("TokensFromNHWC"))
    graph.remove([node])
    graph.add(new)
    return True


def _push_attention_out(graph: RewriteGraph, node) -> bool:
    """Reshape(Transpose(0,2,1)(t), [B, C, H, W]) == NCHW(Reshape(t, [B, H, W, C])) for tokens t."""
    if node.op_type != "Reshape" or graph.rank(node.output[0]) != 4:
        return False
    tr = graph.producer(node.input[0])
    if node_perm(tr) != [0, 2, 1] or graph.rank(tr.input[0]) != 3 or len(graph.consumers(tr.output[0])) != 1:
        return False
    # tokens [B, H*W, C] -> [B, C, H*W] -> [B, C, H, W]: the token width must be the channels
    channels = graph.dims[tr.input[0]][2]
    if not isinstance(channels, int) or graph.dims[node.output[0]][1] != channels:
        return False
    idx = graph.add_init(graph.fresh("nhwc_dims"), np.array(TO_NHWC, np.int64))
    shape = graph.fresh("nhwc_shape")
    gather = helper.make_node("Gather", [node.input[1], idx], [shape], name=graph.fresh("NHWCShape"), axis=0)
    y = graph.fresh(node.output[0] + "__nhwc")
    new = helper.make_node("Reshape", [tr.input[0], shape], [y], name=graph.fresh("TokensToNHWC"))
    d = graph.dims.get(node.output[0])
    graph.set_dims(shape, [4], TensorProto.INT64)
    graph.set_dims(y, [d[p] for p in TO_NHWC] if d else None)
    graph.remove([node, tr])
    graph.add(gather)
    graph.add(new)
    graph.transpose(y, TO_NCHW, out=node.output[0])
    return True


def cancel_and_prune(graph: RewriteGraph) -> bool:
    """Cancel NCHW->NHWC Transposes of NHWC->NCHW Transposes, merge duplicates, drop dead nodes."""
    changed = False
    for n in list(graph.nodes):
        if node_perm(n) == TO_NHWC:
            p = graph.producer(n.input[0])
            if node_perm(p) == TO_NCHW and n.output[0] not in graph.graph_outputs:
                graph.rename_uses(n.output[0], p.input[0])
                graph.remove([n])
                changed = True
    seen: dict[tuple, str] = {}
    for n in list(graph.nodes):
        p = node_perm(n)
        if p in (TO_NHWC, TO_NCHW) and n.output[0] not in graph.graph_outputs:
            key = (n.input[0], tuple(p))
            if key in seen:
                graph.rename_uses(n.output[0], seen[key])
                graph.remove([n])
                changed = True
            else:
                seen[key] = n.output[0]
    while True:
        _, cons = graph.maps()
        dead = [n for n in graph.nodes
                if all(not o or (o not in cons and o not in graph.graph_outputs) for o in n.output)]
        if not dead:
            break
        graph.remove(dead)
        changed = True
    return changed


def sink_transposes(graph: RewriteGraph) -> None:
    cancel_and_prune(graph)
    for _ in range(100000):
        progress = False
        for node in list(graph.nodes):
            if (_push_subpixel(graph, node) or _push_attention_in(graph, node)
                    or _push_attention_out(graph, node) or _push_through(graph, node)):
                progress = True
                cancel_and_prune(graph)
                break
        if not progress:
            return
    raise CudaFormError("layout propagation did not settle")  # pragma: no cover - a bug guard


def is_layout_transpose(n) -> bool:
    return node_perm(n) in (TO_NHWC, TO_NCHW)


def layout_violations(model: onnx.ModelProto) -> list[str]:
    """Layout Transposes that lie between two fused nodes (data flows from a fused node through
    the Transpose into a fused node). The CUDA form has none: what is left sits at the graph's
    boundaries. Shape-only reads (``Shape``) do not count as data flow."""
    nodes = list(model.graph.node)
    prod = {o: n for n in nodes for o in n.output if o}
    cons = defaultdict(list)
    for n in nodes:
        if n.op_type == "Shape":
            continue
        for i in n.input:
            if i:
                cons[i].append(n)

    def reach(start, step) -> set:
        seen, stack = set(), list(start)
        while stack:
            n = stack.pop()
            for m in step(n):
                if id(m) not in seen:
                    seen.add(id(m))
                    stack.append(m)
        return seen

    fused = [n for n in nodes if n.domain == MS_DOMAIN and n.op_type in FUSED_OPS]
    after = reach(fused, lambda n: [c for o in n.output for c in cons.get(o, [])])
    before = reach(fused, lambda n: [prod[i] for i in n.input if i in prod and n.op_type != "Shape"])
    return [n.name for n in nodes if is_layout_transpose(n) and id(n) in after and id(n) in before]
