"""The CUDA form's fusions: every GroupNorm subgraph the exporter wrote becomes one
``com.microsoft`` ``GroupNorm`` (channels-last, SiLU folded), every ``Conv`` an ``NhwcConv``, each
wrapped in layout Transposes that :mod:`asym_export.cuda_layout` then removes, and an Add feeding a
GroupNorm a ``SkipGroupNorm``."""

from __future__ import annotations

import logging

import numpy as np
from onnx import helper, numpy_helper

from .cuda_graph import MS_DOMAIN, SUM_DOC, TO_NCHW, TO_NHWC, RewriteGraph, node_attr

log = logging.getLogger(__name__)


def _is_const_shape(graph: RewriteGraph, name: str, want: list[int]) -> bool:
    v = graph.const(name)
    return v is not None and v.ndim == 1 and [int(x) for x in v] == want


def _operand_and_const(graph: RewriteGraph, node, op_type: str):
    """For a binary ``node`` (either input order): the producer of one input if it is an
    ``op_type`` node and the other input is a constant, with that constant's name; else
    (None, None)."""
    for i in (0, 1):
        producer, other = graph.producer(node.input[i]), node.input[1 - i]
        if producer is not None and producer.op_type == op_type and graph.const(other) is not None:
            return producer, other
    return None, None


def _match_group_norm(graph: RewriteGraph, add) -> dict | None:
    """The exporter's GroupNorm ending in ``add`` (the beta Add), or None.

    Reshape(x, [0, G, -1]) -> InstanceNormalization(ones(G), zeros(G)) -> Reshape(., Shape(x))
    -> Mul(gamma [C,1(,1)]) -> Add(beta [C,1(,1)]) [-> Sigmoid, Mul: SiLU].
    """
    mul, beta = _operand_and_const(graph, add, "Mul")
    if mul is None:
        return None
    r4, gamma = _operand_and_const(graph, mul, "Reshape")
    if r4 is None:
        return None
    inorm = graph.producer(r4.input[0])
    if inorm is None or inorm.op_type != "InstanceNormalization":
        return None
    r3 = graph.producer(inorm.input[0])
    if r3 is None or r3.op_type != "Reshape":
        return None
    root = r3.input[0]
    scale, bias = graph.const(inorm.input[1]), graph.const(inorm.input[2])
    if scale is None or bias is None or scale.ndim != 1 or not np.all(scale == 1) or not np.all(bias == 0):
        return None
    groups = int(scale.shape[0])
    if not _is_const_shape(graph, r3.input[1], [0, groups, -1]):
        return None
    shp = graph.producer(r4.input[1])
    if (shp is None or shp.op_type != "Shape" or shp.input[0] != root
            or node_attr(shp, "start", 0) != 0 or node_attr(shp, "end") is not None):
        return None
    g, b = graph.const(gamma), graph.const(beta)
    channels = int(g.size)
    if b.size != channels or g.shape[0] != channels or b.shape[0] != channels or any(s != 1 for s in g.shape[1:]):
        return None
    nodes = [r3, inorm, shp, r4, mul, add]
    out, activation = add.output[0], 0
    users = graph.consumers(add.output[0])
    if len(users) == 2:
        sig = next((u for u in users if u.op_type == "Sigmoid"), None)
        silu = next((u for u in users if u.op_type == "Mul"), None)
        if sig is not None and silu is not None and sorted(silu.input) == sorted([add.output[0], sig.output[0]]) \
                and graph.consumers(sig.output[0]) == [silu]:
            nodes += [sig, silu]
            out, activation = silu.output[0], 1
    # every intermediate must be private to the pattern
    inner = {r3.output[0], inorm.output[0], r4.output[0], mul.output[0], shp.output[0]}
    if activation:
        inner |= {add.output[0], nodes[-2].output[0]}
    members = {id(n) for n in nodes}
    for t in inner:
        if t in graph.graph_outputs or any(id(c) not in members for c in graph.consumers(t)):
            return None
    return {"nodes": nodes, "root": root, "out": out, "groups": groups, "channels": channels,
            "gamma": g.reshape(-1).astype(np.float32), "beta": b.reshape(-1).astype(np.float32),
            "epsilon": float(node_attr(inorm, "epsilon", 1e-5)), "activation": activation}


def fuse_group_norms(graph: RewriteGraph) -> None:
    for add in [n for n in graph.nodes if n.op_type == "Add"]:
        if add not in graph.nodes:  # removed as part of an earlier match
            continue
        m = _match_group_norm(graph, add)
        if m is None:
            continue
        root, channels, groups = m["root"], m["channels"], m["groups"]
        if channels % groups or (channels // groups) % 2:
            # ONNX Runtime's CUDA GroupNorm needs an even number of channels per group
            log.warning("GroupNorm at %s: %d channels in %d groups is not fusable", add.name, channels, groups)
            continue
        rank = graph.rank(root)
        view = None
        if rank == 3:  # the attention's norm runs on x.view(B, C, H*W): norm the 4-D x instead
            view = graph.producer(root)
            if view is None or view.op_type != "Reshape" or graph.rank(view.input[0]) != 4:
                continue
            x4 = view.input[0]
            if graph.dims[x4][1] != channels:
                continue
        elif rank == 4:
            x4 = root
            if graph.dims[x4][1] != channels:
                continue
        else:
            continue
        name = f"GroupNorm/{add.name}"
        gamma = graph.add_init(graph.fresh(f"{name}.gamma"), m["gamma"])
        beta = graph.add_init(graph.fresh(f"{name}.beta"), m["beta"])
        x_nhwc = graph.to_nhwc(x4)
        y_nhwc = graph.fresh(m["out"] + "__nhwc")
        graph.add(helper.make_node("GroupNorm", [x_nhwc, gamma, beta], [y_nhwc], name=name, domain=MS_DOMAIN,
                                   epsilon=m["epsilon"], groups=groups, activation=m["activation"],
                                   channels_last=1))
        graph.set_dims(y_nhwc, graph.dims.get(x_nhwc))
        graph.remove(m["nodes"])
        if view is None:
            graph.transpose(y_nhwc, TO_NCHW, out=m["out"])
        else:
            y4 = graph.transpose(y_nhwc, TO_NCHW)
            graph.add(helper.make_node("Reshape", [y4, view.input[1]], [m["out"]], name=graph.fresh("GroupNormView")))


def convert_convs(graph: RewriteGraph) -> None:
    weights: dict[str, str] = {}
    for conv in [n for n in graph.nodes if n.op_type == "Conv"]:
        t = graph.inits.get(conv.input[1])
        if t is None or len(t.dims) != 4:
            continue
        if conv.input[1] not in weights:
            w = numpy_helper.to_array(t).transpose(0, 2, 3, 1)
            if len(graph.consumers(conv.input[1])) == 1:
                # the only reader: rewrite the tensor in place (x2 holds 1.5 GB of FP32 weights)
                new_name = conv.input[1] + ".ohwi"
                t.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(w), new_name))
                graph.inits[new_name] = graph.inits.pop(conv.input[1])
                graph.dims[new_name], graph.types[new_name] = list(w.shape), t.data_type
                weights[conv.input[1]] = new_name
            else:
                weights[conv.input[1]] = graph.add_init(conv.input[1] + ".ohwi", w)
            del w
        x_nhwc = graph.to_nhwc(conv.input[0])
        out = conv.output[0]
        y_nhwc = graph.fresh(out + "__nhwc")
        d = graph.dims.get(out)
        attrs = [a for a in conv.attribute]
        pads = node_attr(conv, "pads")
        if pads is not None and list(pads[:2]) != list(pads[2:]):
            # cuDNN pads symmetrically; an explicit channels-last Pad keeps the kernel simple
            # (the sub-pixel phases and the encoder's downsampling pad one side only)
            top, left, bottom, right = (int(v) for v in pads)
            padded = graph.fresh(conv.input[0] + "__nhwc")
            graph.add(helper.make_node("Pad", [x_nhwc, graph.add_init(graph.fresh("pads"), np.array(
                [0, top, left, 0, 0, bottom, right, 0], np.int64))], [padded], name=graph.fresh("ConvPad")))
            dx = graph.dims.get(x_nhwc)
            graph.set_dims(padded, None if not dx else [dx[0], None, None, dx[3]])
            x_nhwc = padded
            attrs = [a for a in conv.attribute if a.name != "pads"] + [helper.make_attribute("pads", [0, 0, 0, 0])]
        new = helper.make_node("NhwcConv", [x_nhwc, weights[conv.input[1]], *conv.input[2:]], [y_nhwc],
                               name=conv.name, domain=MS_DOMAIN)
        new.attribute.extend(attrs)
        graph.remove([conv])
        graph.add(new)
        graph.set_dims(y_nhwc, [d[p] for p in TO_NHWC] if d and len(d) == 4 else None)
        graph.transpose(y_nhwc, TO_NCHW, out=out)


def fuse_skip_group_norms(graph: RewriteGraph) -> None:
    """Add(a, b) -> GroupNorm  ==>  SkipGroupNorm(a, skip=b) with the sum as second output."""
    for gn in [n for n in graph.nodes if n.op_type == "GroupNorm" and n.domain == MS_DOMAIN]:
        add = graph.producer(gn.input[0])
        if add is None or add.op_type != "Add" or add.output[0] in graph.graph_outputs:
            continue
        a, b = add.input
        da, db = graph.dims.get(a), graph.dims.get(b)
        if not da or not db or len(da) != 4 or da != db or any(x is None for x in da):
            continue  # SkipGroupNorm's skip is a whole tensor here: no broadcasting
        if graph.const(a) is not None or graph.const(b) is not None:
            continue
        others = [c for c in graph.consumers(add.output[0]) if c is not gn]
        outputs = [gn.output[0]] + ([add.output[0]] if others else [])
        name = f"Skip{gn.name}"
        new = helper.make_node("SkipGroupNorm", [a, gn.input[1], gn.input[2], b], outputs, name=name,
                               domain=MS_DOMAIN, doc_string=SUM_DOC + add.output[0])
        new.attribute.extend(gn.attribute)
        graph.remove([add, gn])
        graph.add(new)
