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

These kernels exist for CUDA only, so a CPU cannot run the CUDA form. :func:`emulate` writes
its standard-ONNX twin (each fused node expanded back into the ops it stands for, FP16 nodes
computing in FP32 and rounding their output, as the kernels do), which ONNX Runtime's CPU
provider runs: the export verifies the rewrite itself that way against the PyTorch reference,
and ``asym-parity`` verifies the real kernels on a GPU.
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

log = logging.getLogger(__name__)

MS_DOMAIN = "com.microsoft"
TO_NHWC = [0, 2, 3, 1]
TO_NCHW = [0, 3, 1, 2]
FUSED_OPS = ("GroupNorm", "SkipGroupNorm", "NhwcConv")
#: Ops a layout Transpose is pushed through (same result in either layout once constant
#: operands are permuted and axes remapped).
_ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Relu", "Sigmoid", "Clip"}


class CudaFormError(RuntimeError):
    """The graph does not have the structure the CUDA form needs."""


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


_DERIVED = re.compile(r"^(.*?)(?:__nhwc|__nchw)?__cf\d+$")


def original_tensor(name: str) -> str:
    """The portable graph's tensor whose values ``name`` holds (``x__nhwc__cf3`` -> ``x``)."""
    m = _DERIVED.match(name)
    return m.group(1) if m else name


def cuda_ranges(model: onnx.ModelProto, ranges: dict[str, float]) -> dict[str, float]:
    """Activation ranges calibrated on the portable graph, keyed by the CUDA form's tensors."""
    out = {}
    for n in model.graph.node:
        for o in n.output:
            r = ranges.get(original_tensor(o))
            if o and r is not None:
                out[o] = r
    return out


def _attr(node, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _perm(node) -> list[int] | None:
    if node is None or node.op_type != "Transpose":
        return None
    p = _attr(node, "perm")
    return list(p) if p is not None else None


class _Graph:
    """A mutable view of a graph: nodes, constants, known shapes, and use maps on demand."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        g = model.graph
        self.nodes: list = list(g.node)
        self.inits: dict[str, TensorProto] = {i.name: i for i in g.initializer}
        self.dims: dict[str, list] = {}
        self.types: dict[str, int] = {}
        for v in list(g.input) + list(g.output) + list(g.value_info):
            tt = v.type.tensor_type
            self.types[v.name] = tt.elem_type
            if tt.HasField("shape"):
                # the exporter writes 0 for dims it could not name: unknown, not empty
                self.dims[v.name] = [(d.dim_value or None) if d.HasField("dim_value") else (d.dim_param or None)
                                     for d in tt.shape.dim]
        for name, t in self.inits.items():
            self.dims[name] = list(t.dims)
            self.types[name] = t.data_type
        self.graph_inputs = {i.name for i in g.input}
        self.graph_outputs = {o.name for o in g.output}
        self._n = 0
        self._maps = None
        self._arrays: dict[str, np.ndarray] = {}

    # ----- names and maps
    def fresh(self, base: str) -> str:
        self._n += 1
        return f"{base}__cf{self._n}"

    def maps(self):
        if self._maps is None:
            prod, cons = {}, defaultdict(list)
            for n in self.nodes:
                for o in n.output:
                    if o:
                        prod[o] = n
                for i in n.input:
                    if i:
                        cons[i].append(n)
            self._maps = (prod, cons)
        return self._maps

    def changed(self) -> None:
        self._maps = None

    def producer(self, name: str):
        return self.maps()[0].get(name)

    def consumers(self, name: str) -> list:
        return self.maps()[1].get(name, [])

    def const(self, name: str) -> np.ndarray | None:
        if name not in self.inits:
            return None
        if name in self._arrays:
            return self._arrays[name]
        arr = numpy_helper.to_array(self.inits[name])
        if arr.size <= 4096:  # shapes, scalars, norm parameters; never keep a copy of the weights
            self._arrays[name] = arr
        return arr

    def add_init(self, name: str, arr: np.ndarray) -> str:
        t = numpy_helper.from_array(np.ascontiguousarray(arr), name)
        self.inits[name] = t
        if arr.size <= 4096:
            self._arrays[name] = arr
        self.dims[name] = list(arr.shape)
        self.types[name] = t.data_type
        return name

    def add(self, node) -> None:
        self.nodes.append(node)
        self.changed()

    def remove(self, nodes) -> None:
        ids = {id(n) for n in nodes}
        self.nodes = [n for n in self.nodes if id(n) not in ids]
        self.changed()

    def rename_uses(self, old: str, new: str) -> None:
        for n in self.consumers(old):
            for i, x in enumerate(n.input):
                if x == old:
                    n.input[i] = new
        self.changed()

    def rank(self, name: str) -> int | None:
        d = self.dims.get(name)
        return None if d is None else len(d)

    def set_dims(self, name: str, dims, elem=TensorProto.FLOAT) -> None:
        if dims is not None:
            self.dims[name] = list(dims)
        self.types.setdefault(name, elem)

    # ----- layout helpers
    def transpose(self, src: str, perm: list[int], out: str | None = None) -> str:
        out = out or self.fresh(src + ("__nhwc" if perm == TO_NHWC else "__nchw"))
        self.add(helper.make_node("Transpose", [src], [out], name=self.fresh("LayoutTranspose"), perm=perm))
        d = self.dims.get(src)
        self.set_dims(out, [d[p] for p in perm] if d is not None and len(d) == len(perm) else None,
                      self.types.get(src, TensorProto.FLOAT))
        return out

    def to_nhwc(self, src: str) -> str:
        """``src`` (NCHW) in channels-last: the producer's own input where ``src`` comes from a
        channels-last -> NCHW Transpose, an existing Transpose of it, or a new one."""
        p = self.producer(src)
        if _perm(p) == TO_NCHW:
            return p.input[0]
        for c in self.consumers(src):
            if _perm(c) == TO_NHWC:
                return c.output[0]
        return self.transpose(src, TO_NHWC)

    def save(self) -> onnx.ModelProto:
        """Write nodes, used initializers and value_info back into the model proto."""
        from .fp16 import toposort

        g = self.model.graph
        used = {i for n in self.nodes for i in n.input} | self.graph_outputs
        del g.node[:]
        g.node.extend(self.nodes)
        # drop unused tensors in place and append the new ones: no second copy of the weights
        for i in reversed(range(len(g.initializer))):
            if g.initializer[i].name not in used:
                del g.initializer[i]
        present = {t.name for t in g.initializer}
        g.initializer.extend(self.inits[k] for k in self.inits if k in used and k not in present)
        produced = {o for n in self.nodes for o in n.output if o}
        vi = []
        for name in sorted(produced - self.graph_outputs):
            d = self.dims.get(name)
            elem = self.types.get(name)
            if elem is None:
                continue
            vi.append(helper.make_tensor_value_info(name, elem, d))
        del g.value_info[:]
        g.value_info.extend(vi)
        toposort(self.model)
        return self.model


# --------------------------------------------------------------------------- fusion

def _is_const_shape(graph: _Graph, name: str, want: list[int]) -> bool:
    v = graph.const(name)
    return v is not None and v.ndim == 1 and [int(x) for x in v] == want


def _match_group_norm(graph: _Graph, add) -> dict | None:
    """The exporter's GroupNorm ending in ``add`` (the beta Add), or None.

    Reshape(x, [0, G, -1]) -> InstanceNormalization(ones(G), zeros(G)) -> Reshape(., Shape(x))
    -> Mul(gamma [C,1(,1)]) -> Add(beta [C,1(,1)]) [-> Sigmoid, Mul: SiLU].
    """
    for ai in (0, 1):
        mul, beta = graph.producer(add.input[ai]), add.input[1 - ai]
        if mul is not None and mul.op_type == "Mul" and graph.const(beta) is not None:
            break
    else:
        return None
    for mi in (0, 1):
        r4, gamma = graph.producer(mul.input[mi]), mul.input[1 - mi]
        if r4 is not None and r4.op_type == "Reshape" and graph.const(gamma) is not None:
            break
    else:
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
            or _attr(shp, "start", 0) != 0 or _attr(shp, "end") is not None):
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
            "epsilon": float(_attr(inorm, "epsilon", 1e-5)), "activation": activation}


def _fuse_group_norms(graph: _Graph) -> None:
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


def _convert_convs(graph: _Graph) -> None:
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
        pads = _attr(conv, "pads")
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


# --------------------------------------------------------------------------- layout

def _permute_const(arr: np.ndarray) -> np.ndarray | None:
    """An NCHW-broadcast constant for use against NHWC tensors (None if it cannot be)."""
    if arr.size == 1:
        return arr
    if arr.ndim > 4:
        return None
    return arr.reshape((1,) * (4 - arr.ndim) + arr.shape).transpose(TO_NHWC)


def _push_through(graph: _Graph, node) -> bool:
    """Move NCHW-restoring Transposes on ``node``'s inputs to its output (see module docstring)."""
    op = node.op_type
    if op not in _ELEMENTWISE and op not in ("Concat", "Pad"):
        return False
    out = node.output[0]
    if len(node.output) != 1 or graph.rank(out) != 4:
        return False
    data_inputs = range(len(node.input)) if op in _ELEMENTWISE - {"Clip"} or op == "Concat" else [0]
    new_inputs = list(node.input)
    moved = False
    for i in data_inputs:
        name = node.input[i]
        if not name:
            continue
        p = graph.producer(name)
        if _perm(p) == TO_NCHW:
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
        axis = int(_attr(node, "axis"))
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


def _push_subpixel(graph: _Graph, node) -> bool:
    """The sub-pixel interleave Reshape[b,2,2,c,h,w] -> Transpose(0,3,4,1,5,2) -> Reshape[b,c,2h,2w]
    on a channels-last input, done channels-last: Reshape[b,h,w,2,2,c] -> Transpose(0,1,3,2,4,5)
    -> Reshape[b,2h,2w,c]."""
    if node.op_type != "Reshape" or graph.rank(node.output[0]) != 6:
        return False
    d6 = graph.dims[node.output[0]]
    src = graph.producer(node.input[0])
    if _perm(src) != TO_NCHW or d6[1] != 2 or d6[2] != 2:
        return False
    users = graph.consumers(node.output[0])
    if len(users) != 1 or _perm(users[0]) != [0, 3, 4, 1, 5, 2]:
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


def _push_attention_in(graph: _Graph, node) -> bool:
    """Transpose(0,2,1)(Reshape(NCHW(y), [B, C, H*W])) == Reshape(y, [0, -1, C]) for channels-last y."""
    if _perm(node) != [0, 2, 1]:
        return False
    r = graph.producer(node.input[0])
    if r is None or r.op_type != "Reshape" or graph.rank(r.output[0]) != 3:
        return False
    src = graph.producer(r.input[0])
    if _perm(src) != TO_NCHW:
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


def _push_attention_out(graph: _Graph, node) -> bool:
    """Reshape(Transpose(0,2,1)(t), [B, C, H, W]) == NCHW(Reshape(t, [B, H, W, C])) for tokens t."""
    if node.op_type != "Reshape" or graph.rank(node.output[0]) != 4:
        return False
    tr = graph.producer(node.input[0])
    if _perm(tr) != [0, 2, 1] or graph.rank(tr.input[0]) != 3 or len(graph.consumers(tr.output[0])) != 1:
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


def _cancel_and_prune(graph: _Graph) -> bool:
    """Cancel NCHW->NHWC Transposes of NHWC->NCHW Transposes, merge duplicates, drop dead nodes."""
    changed = False
    for n in list(graph.nodes):
        if _perm(n) == TO_NHWC:
            p = graph.producer(n.input[0])
            if _perm(p) == TO_NCHW and n.output[0] not in graph.graph_outputs:
                graph.rename_uses(n.output[0], p.input[0])
                graph.remove([n])
                changed = True
    seen: dict[tuple, str] = {}
    for n in list(graph.nodes):
        p = _perm(n)
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


def _sink_transposes(graph: _Graph) -> None:
    _cancel_and_prune(graph)
    for _ in range(100000):
        progress = False
        for node in list(graph.nodes):
            if (_push_subpixel(graph, node) or _push_attention_in(graph, node)
                    or _push_attention_out(graph, node) or _push_through(graph, node)):
                progress = True
                _cancel_and_prune(graph)
                break
        if not progress:
            return
    raise CudaFormError("layout propagation did not settle")  # pragma: no cover - a bug guard


def _fuse_skip_group_norms(graph: _Graph) -> None:
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
                               domain=MS_DOMAIN)
        new.attribute.extend(gn.attribute)
        graph.remove([add, gn])
        graph.add(new)


def _is_layout_transpose(n) -> bool:
    return _perm(n) in (TO_NHWC, TO_NCHW)


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
    return [n.name for n in nodes if _is_layout_transpose(n) and id(n) in after and id(n) in before]


# --------------------------------------------------------------------------- public

def cuda_form(model: onnx.ModelProto) -> tuple[onnx.ModelProto, CudaFormReport]:
    """Rewrite an exported FP32 graph (weights loaded) into its CUDA form, in place."""
    report = CudaFormReport()
    graph = _Graph(model)
    _fuse_group_norms(graph)
    _convert_convs(graph)
    _sink_transposes(graph)
    _fuse_skip_group_norms(graph)
    _cancel_and_prune(graph)
    graph.save()
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.add(domain=MS_DOMAIN, version=1)
    nodes = list(model.graph.node)
    report.fused = {op: sum(1 for n in nodes if n.op_type == op and n.domain == MS_DOMAIN) for op in FUSED_OPS}
    report.unfused_group_norms = sum(1 for n in nodes if n.op_type == "InstanceNormalization")
    report.convs_left = sum(1 for n in nodes if n.op_type == "Conv")
    report.layout_transposes = sum(1 for n in nodes if _is_layout_transpose(n))
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


# --------------------------------------------------------------------------- emulation

def emulate(model: onnx.ModelProto, fp16: bool = False, fp32_nodes: set[str] | None = None,
            base_dir: str | Path | None = None) -> onnx.ModelProto:
    """Expand every fused node back into standard ONNX ops (in place), so a CPU can run the
    CUDA form: NhwcConv -> Transpose, Conv, Transpose; GroupNorm -> Transpose, the exporter's
    Reshape/InstanceNormalization/Reshape/Mul/Add(/Sigmoid/Mul), Transpose; SkipGroupNorm -> Add
    then the same. ``fp16``: the graph is a mixed FP16 graph, in which every fused node but
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

    def norm(x_nhwc, n, half, out):
        """GroupNorm of a channels-last tensor as the exporter writes it; FP32 inside."""
        groups, eps, act = int(_attr(n, "groups")), float(_attr(n, "epsilon", 1e-5)), int(_attr(n, "activation", 0))
        gamma, beta = array(n.input[1]), array(n.input[2])
        c = gamma.size
        xf = node("Cast", [x_nhwc], to=TensorProto.FLOAT) if half else x_nhwc
        x = node("Transpose", [xf], perm=TO_NCHW)
        r = node("Reshape", [x, const("groups_shape", np.array([0, groups, -1], np.int64))])
        i = node("InstanceNormalization", [r, const("ones", np.ones(groups, np.float32)),
                                           const("zeros", np.zeros(groups, np.float32))], epsilon=eps)
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
            ins = [n.input[0], n.input[3]] if not half else [node("Cast", [n.input[0]], to=TensorProto.FLOAT),
                                                              node("Cast", [n.input[3]], to=TensorProto.FLOAT)]
            s = node("Add", ins)
            if len(n.input) > 4 and n.input[4]:
                bias = n.input[4] if not half else node("Cast", [n.input[4]], to=TensorProto.FLOAT)
                s = node("Add", [s, bias])
            if len(n.output) > 1 and n.output[1]:
                if half:
                    node("Cast", [s], [n.output[1]], to=TensorProto.FLOAT16)
                else:
                    node("Identity", [s], [n.output[1]])
            if half:
                y = nm("skip_norm_fp32")
                norm(s, n, False, y)
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
