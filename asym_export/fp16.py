"""Mixed-precision (FP16 with FP32 islands) graphs for strongly typed TensorRT, and a faithful
way to check them on a CPU.

TensorRT 11 builds only strongly typed networks, so the precision has to be in the ONNX graph
(TensorRT 11 removed the FP16 builder flag). The conversion here:

1. **Calibrate**: run the FP32 graph with ONNX Runtime on calibration inputs of several
   shapes and record the largest magnitude every float tensor reaches.
2. **Choose islands from data**: a tensor whose magnitude times ``headroom`` exceeds the
   FP16 maximum (65504) cannot be stored in FP16, so the node producing it and every node
   reading it stay FP32. Initializers too large for FP16 keep their consumers in FP32 too.
3. **Rewrite** with onnxruntime's converter (``onnxruntime.transformers.float16``, which
   ships with the CPU package; NVIDIA ModelOpt's AutoCast would pull onnxruntime-gpu and
   cupy as hard dependencies), keeping float32 graph inputs/outputs. Two fixes on top: Cast
   pairs the converter leaves *between* two FP32 nodes are folded (otherwise an island of
   several nodes would still round, and overflow, between its nodes), and the graph is
   topologically sorted again (the converter appends its Cast nodes at the end). The
   converter's weight rounding runs through :func:`float32_to_float16`: the same bits in
   fewer passes over each weight (half of the conversion's time on the x2 decoder).

ONNX Runtime's CPU provider does not compute FP16 graphs in FP16: it wraps FP16 nodes in
casts, computes in FP32 and drops the casts between consecutive upcast nodes, so whether an
intermediate tensor is ever rounded to FP16 depends on which kernels happen to exist (a
chain ``x * 1000 * 1000`` returns 1e6 instead of inf; in the VAE decoder some overflows do
surface). Running the mixed graph on a CPU is therefore no test of FP16 at all.
:func:`asym_export.fp16_emulation.write_emulation_twin` therefore builds an FP32 twin of the mixed graph in which every
tensor that is FP16 in the mixed graph passes through ``Cast(FLOAT16) -> Cast(FLOAT)``,
which ONNX Runtime keeps and rounds faithfully (1e6 becomes inf), and every FP16 weight is
stored as its exactly-representable FP16 value. The twin models FP16 *storage* of every
tensor, overflow included; it does not model the precision a kernel accumulates in
internally, nor fusions that skip a rounding between two ops, so it errs on the side of
rounding too often. Engine verification on the GPU is the final word.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

log = logging.getLogger(__name__)

FP16_MAX = 65504.0
#: Calibration inputs cover a few random images; real images can drive activations higher.
#: A tensor stays FP32 when ``headroom * observed max |x|`` would exceed FP16's range, i.e.
#: when it comes within a factor of 4 (2 bits of exponent) of overflowing.
DEFAULT_HEADROOM = 4.0

_FLOAT_TYPES = (TensorProto.FLOAT, TensorProto.FLOAT16)


class Fp16Error(RuntimeError):
    """The mixed-precision conversion produced a graph that is unusable."""


# --------------------------------------------------------------------------- calibration

def _float_tensors(model: onnx.ModelProto) -> dict[str, int]:
    """name -> elem type of every float tensor produced by a node (from value_info)."""
    types = {v.name: v.type.tensor_type.elem_type for v in
             list(model.graph.value_info) + list(model.graph.output)}
    produced = {o for n in model.graph.node for o in n.output if o}
    return {n: t for n, t in types.items() if n in produced and t in _FLOAT_TYPES}


def _with_value_info(model: onnx.ModelProto) -> onnx.ModelProto:
    """Type every intermediate tensor (the exporter writes value_info; infer it otherwise)."""
    produced = [o for n in model.graph.node for o in n.output if o]
    known = {v.name for v in list(model.graph.value_info) + list(model.graph.output)}
    if all(o in known for o in produced):
        return model
    return onnx.shape_inference.infer_shapes(model)


def activation_ranges(onnx_path: str | Path, feeds: list[dict[str, np.ndarray]]) -> dict[str, float]:
    """Largest ``|x|`` every float tensor of the graph reaches over ``feeds`` (ONNX Runtime, CPU).

    Every float intermediate is exposed as an extra graph output in a temporary copy of the
    graph's top-level proto, which shares the original external data file.
    """
    import onnxruntime as ort

    onnx_path = Path(onnx_path)
    model = _with_value_info(onnx.load(str(onnx_path), load_external_data=False))
    tensors = _float_tensors(model)
    existing = {o.name for o in model.graph.output}
    by_name = {v.name: v for v in model.graph.value_info}
    for name in tensors:
        if name not in existing:
            model.graph.output.append(by_name[name])
    fd, tmp = tempfile.mkstemp(prefix=".calib-", suffix=".onnx", dir=onnx_path.parent)
    os.close(fd)
    try:
        onnx.save_model(model, tmp)
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        # no fusion: every tensor the graph names must exist as such
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        sess = ort.InferenceSession(tmp, opts, providers=["CPUExecutionProvider"])
        names = [o.name for o in sess.get_outputs()]
        ranges: dict[str, float] = defaultdict(float)
        for feed in feeds:
            for name, value in zip(names, sess.run(names, feed)):
                if value.size:
                    ranges[name] = max(ranges[name], float(np.abs(value).max()))
        del sess
    finally:
        os.unlink(tmp)
    return dict(ranges)


# --------------------------------------------------------------------------- islands

@dataclass
class Island:
    """One node kept in FP32, and the data that decided it."""

    node: str
    op: str
    reason: str

    def to_dict(self) -> dict:
        return {"node": self.node, "op": self.op, "reason": self.reason}


@dataclass
class Fp16Plan:
    """Which nodes stay FP32 and why; recorded in the manifest."""

    islands: list[Island] = field(default_factory=list)
    headroom: float = DEFAULT_HEADROOM
    max_observed: float = 0.0  # largest activation seen in calibration
    weights: dict = field(default_factory=dict)  # fp16/fp32 initializer counts of the result
    #: the calibrated ranges the plan was made from (tensor -> max |x|); not in the manifest
    ranges: dict = field(default_factory=dict, repr=False)

    @property
    def node_names(self) -> list[str]:
        return [i.node for i in self.islands]

    def to_dict(self) -> dict:
        return {"headroom": self.headroom, "fp16_max": FP16_MAX,
                "max_activation_observed": self.max_observed, "weights": self.weights,
                "fp32_nodes": [i.to_dict() for i in self.islands]}


_SHAPE_ONLY = {"Shape", "Size"}  # read only the dims of a tensor, never its values


def external_info(t: TensorProto) -> dict[str, str]:
    """An external tensor's ``external_data`` entries (location, offset, length) as a dict."""
    return {e.key: e.value for e in t.external_data}


def weight_ranges(onnx_path: str | Path) -> dict[str, float]:
    """Largest ``|w|`` of every float initializer, read tensor by tensor (external data is
    memory-mapped, never loaded whole)."""
    onnx_path = Path(onnx_path)
    model = onnx.load(str(onnx_path), load_external_data=False)
    out = {}
    for init in model.graph.initializer:
        if init.data_type != TensorProto.FLOAT:
            continue
        if init.data_location == TensorProto.EXTERNAL:
            ext = external_info(init)
            arr = np.memmap(onnx_path.parent / ext["location"], dtype=np.float32, mode="r",
                            offset=int(ext.get("offset", 0)), shape=(int(ext["length"]) // 4,))
        else:
            arr = numpy_helper.to_array(init)
        out[init.name] = float(np.abs(arr).max()) if arr.size else 0.0
        del arr
    return out


def plan_islands(model: onnx.ModelProto, ranges: dict[str, float], weights: dict[str, float],
                 headroom: float = DEFAULT_HEADROOM, *, inner: dict[str, tuple[str, float]] | None = None) -> Fp16Plan:
    """FP32 islands from calibration ranges of activations and the magnitudes of weights
    (see module docstring). ``inner``: node name -> (tensor, range) of values a fused node
    computes without writing them (a CUDA form's SkipGroupNorm sum); such a node stays FP32
    when that value would overflow, under the same headroom."""
    limit = FP16_MAX / headroom
    producer = {o: n for n in model.graph.node for o in n.output}
    consumers: dict[str, list] = defaultdict(list)
    for n in model.graph.node:
        for i in n.input:
            consumers[i].append(n)
    keep: dict[str, Island] = {}

    def block(node, reason):
        if node.op_type in _SHAPE_ONLY or node.name in keep:
            return
        keep[node.name] = Island(node.name, node.op_type, reason)

    for name, r in sorted(ranges.items(), key=lambda kv: -kv[1]):
        if r <= limit:
            break
        why = f"{name} reaches {r:.3g} in calibration (x{headroom:g} headroom > {FP16_MAX:g})"
        if name in producer:
            block(producer[name], "output " + why)
        for c in consumers.get(name, []):
            block(c, "input " + why)
    by_name = {n.name: n for n in model.graph.node}
    for node_name, (tensor, r) in sorted((inner or {}).items()):
        if r > limit and node_name in by_name:
            block(by_name[node_name], f"its inner sum {tensor} reaches {r:.3g} in calibration "
                                      f"(x{headroom:g} headroom > {FP16_MAX:g})")
    for name, m in weights.items():
        if m > FP16_MAX:  # cannot be stored in FP16 at all (no headroom needed: weights are fixed)
            for c in consumers.get(name, []):
                block(c, f"weight {name} holds {m:.3g} > {FP16_MAX:g}")
    plan = Fp16Plan(list(keep.values()), headroom, max(ranges.values(), default=0.0), ranges=dict(ranges))
    log.info("FP16 plan: %d node(s) stay FP32 (max activation %.3g, limit %.3g)",
             len(plan.islands), plan.max_observed, limit)
    return plan


# --------------------------------------------------------------------------- rewrite

def fold_cast_pairs(model: onnx.ModelProto) -> int:
    """Remove ``Cast(FLOAT16) -> Cast(FLOAT)`` pairs whose FP16 tensor only feeds FP32 casts.

    The converter wraps every blocked node in casts, so two adjacent FP32 nodes still pass
    their tensor through FP16 between them. Folding the pair keeps an island in FP32 from end
    to end. ``Shape`` readers of the FP16 tensor are moved to the FP32 one (same dims).
    Returns the number of pairs folded.
    """
    g = model.graph
    consumers: dict[str, list] = defaultdict(list)
    for n in g.node:
        for i in n.input:
            consumers[i].append(n)
    outputs = {o.name for o in g.output}
    drop, rename, folded = set(), {}, 0
    reroute: list[tuple] = []  # (node, input index, new name) for shape-only readers
    for n in g.node:
        if n.op_type != "Cast" or cast_to(n) != TensorProto.FLOAT16 or n.output[0] in outputs:
            continue
        users = consumers.get(n.output[0], [])
        casts = [u for u in users if u.op_type == "Cast" and cast_to(u) == TensorProto.FLOAT]
        shape_only = [u for u in users if u.op_type in _SHAPE_ONLY]
        if not casts or len(casts) + len(shape_only) != len(users):
            continue
        src = n.input[0]
        if not _is_fp32_source(model, src):
            continue
        drop.add(id(n))
        for u in casts:
            if u.output[0] in outputs:  # keep the graph output's name: FP32 straight through
                u.op_type = "Identity"
                del u.attribute[:]
                u.input[0] = src
                continue
            drop.add(id(u))
            rename[u.output[0]] = src
        for u in shape_only:  # Shape reads only dims: the same from the FP32 tensor
            reroute.extend((u, i, src) for i, x in enumerate(u.input) if x == n.output[0])
        folded += 1
    if not folded:
        return 0
    for node, i, src in reroute:
        node.input[i] = src
    keep = [n for n in g.node if id(n) not in drop]
    for n in keep:
        for i, name in enumerate(n.input):
            while name in rename:
                name = rename[name]
            n.input[i] = name
    del g.node[:]
    g.node.extend(keep)
    names = {o for n in keep for o in n.output}
    kept_vi = [v for v in g.value_info if v.name in names or v.name in {i.name for i in g.input}]
    del g.value_info[:]
    g.value_info.extend(kept_vi)
    return folded


def _is_fp32_source(model, name: str) -> bool:
    for v in list(model.graph.value_info) + list(model.graph.input):
        if v.name == name:
            return v.type.tensor_type.elem_type == TensorProto.FLOAT
    return True  # the converter's *_cast_to_fp16 outputs are untyped; they are FP32


def cast_to(node) -> int | None:
    for a in node.attribute:
        if a.name == "to":
            return a.i
    return None


def toposort(model: onnx.ModelProto) -> None:
    """Order nodes so every input is produced before it is read (Kahn's algorithm, stable)."""
    g = model.graph
    available = {i.name for i in g.input} | {i.name for i in g.initializer} | {""}
    pending = list(g.node)
    ordered = []
    while pending:
        rest = []
        for n in pending:
            if all(i in available for i in n.input):
                ordered.append(n)
                available.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):
            raise Fp16Error(f"graph has a cycle or a dangling input near node {rest[0].name}")
        pending = rest
    del g.node[:]
    g.node.extend(ordered)


def float32_to_float16(np_array, min_positive_val=5.96e-08, max_finite_val=65504.0) -> np.ndarray:
    """What ``onnxruntime.transformers.float16.convert_np_to_float16`` computes, bit for bit, in a
    few whole-array passes: a value with ``0 < |x| < min_positive_val`` becomes
    ``±min_positive_val``, one with ``max_finite_val < |x| < inf`` becomes ``±max_finite_val``;
    zeros (either sign), infinities and NaN stay; then NumPy's rounding to float16. The
    converter's own version gathers the array's positive and negative parts four times and
    rewrites it four times (25 s of the x2 decoder's 372 M weights on a 2-core Xeon); this
    compares once per bound and rewrites only an array that has such values, which leaves
    NumPy's float16 cast as most of the time. The comparisons are written as the converter
    writes them, so NumPy types the thresholds the same way (float32 for float32 data)."""
    a = np.asarray(np_array)
    mag = np.abs(a)
    for low, high, bound in ((0, min_positive_val, min_positive_val), (max_finite_val, float("inf"), max_finite_val)):
        outside = np.logical_and(low < mag, mag < high)
        if outside.any():
            a = np.where(outside, np.copysign(bound, a), a).astype(a.dtype, copy=False)
    return np.float16(a)


@contextlib.contextmanager
def _fast_weight_rounding():
    """Run onnxruntime's FP16 converter with :func:`float32_to_float16` for its weight rounding
    (the converter looks the function up in its module on every tensor). Where a release no
    longer has that function, the converter runs as it is."""
    from onnxruntime.transformers import float16 as converter

    if not callable(getattr(converter, "convert_np_to_float16", None)):
        log.info("onnxruntime.transformers.float16 has no convert_np_to_float16: its own rounding is used")
        yield
        return
    original = converter.convert_np_to_float16
    converter.convert_np_to_float16 = float32_to_float16
    try:
        yield
    finally:
        converter.convert_np_to_float16 = original


def write_mixed(fp32_path: str | Path, out_path: str | Path, plan: Fp16Plan,
                graph_name: str) -> Path:
    """Write the FP16 graph with ``plan``'s FP32 islands (float32 inputs and outputs) to
    ``out_path`` + ``<file>.data`` and run the ONNX checker on it."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    out_path = Path(out_path)
    model = _with_value_info(onnx.load(str(fp32_path)))  # weights included: the converter rewrites them
    with _fast_weight_rounding():
        model = convert_float_to_float16(
            model, keep_io_types=True, disable_shape_infer=True,
            op_block_list=list(DEFAULT_OP_BLOCK_LIST), node_block_list=plan.node_names,
        )
    # The converter retypes every value_info to FP16, including entries that describe
    # initializers it kept FP32 (Resize scales); an initializer's own type is authoritative.
    inits = {i.name for i in model.graph.initializer}
    vi = [v for v in model.graph.value_info if v.name not in inits]
    del model.graph.value_info[:]
    model.graph.value_info.extend(vi)
    folded = fold_cast_pairs(model)
    toposort(model)
    log.info("mixed precision %s: %d FP32 node(s), %d cast pair(s) folded inside islands",
             graph_name, len(plan.islands), folded)
    meta = {p.key: p.value for p in model.metadata_props}
    meta["asym_export.precision"] = "fp16"
    meta["asym_export.fp32_nodes"] = str(len(plan.islands))
    del model.metadata_props[:]
    for k, v in meta.items():
        model.metadata_props.add(key=k, value=v)
    data = out_path.parent / (out_path.name + ".data")
    data.unlink(missing_ok=True)  # onnx refuses to overwrite external data
    onnx.save_model(model, str(out_path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data.name, size_threshold=1024)
    del model
    onnx.checker.check_model(str(out_path), full_check=True)
    return out_path
