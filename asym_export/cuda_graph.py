"""The CUDA form's building blocks (see :mod:`asym_export.cuda_form`): the fused ops' domain and
names, the layout permutations, and :class:`RewriteGraph`, a mutable view of an ONNX graph with
constants, known shapes and use maps that the fusion and layout passes edit."""

from __future__ import annotations

import logging
import re
from collections import defaultdict

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
ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Relu", "Sigmoid", "Clip"}


class CudaFormError(RuntimeError):
    """The graph does not have the structure the CUDA form needs."""


_DERIVED = re.compile(r"^(.*?)(?:__nhwc|__nchw)?__cf\d+$")


#: SkipGroupNorm's doc_string: ``SUM_DOC + <tensor>`` names the Add it fused, whose value the
#: kernel computes (and rounds, in FP16) without writing it when its S output is unused: the FP16
#: plan needs that tensor's calibrated range (:func:`asym_export.cuda_form.cuda_inner_ranges`).
SUM_DOC = "asym_export.sum="


def original_tensor(name: str) -> str:
    """The portable graph's tensor whose values ``name`` holds (``x__nhwc__cf3`` -> ``x``)."""
    m = _DERIVED.match(name)
    return m.group(1) if m else name


def node_attr(node, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def node_perm(node) -> list[int] | None:
    if node is None or node.op_type != "Transpose":
        return None
    p = node_attr(node, "perm")
    return list(p) if p is not None else None


class RewriteGraph:
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
        if node_perm(p) == TO_NCHW:
            return p.input[0]
        for c in self.consumers(src):
            if node_perm(c) == TO_NHWC:
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
