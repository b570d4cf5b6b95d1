"""Will TensorRT's ONNX parser take this graph, with the profile we will give it? Answered
without tensorrt and without a GPU, so CI can check it on every export.

The check reads the graph structure only (no weights) and reports every problem at once:

(a) every node is in the default ONNX domain: a custom op would need a TensorRT plugin;
(b) every operator is one the parser supports natively, for the element types its inputs
    actually have (float32 / float16 activations, int64 shape tensors, ...), with the
    attribute values the support table allows (e.g. Resize modes);
(c) the graph's dynamic input dims are exactly the contract's dims, all covered by the
    optimization profile that :meth:`ShapeLimits.profile` derives, and fixed dims agree
    with that profile;
(d) the opset is within what the support table's TensorRT releases parse.

The support table is data: ``asym_export/data/tensorrt_onnx_support.json``, built by
``scripts/make_trt_support.py`` from the sources in ``asym_export/data/tensorrt_support/``
(each release's operator table as read from onnx-tensorrt's ``docs/operators.md``, and this
project's attribute rules; releases, addresses and date are inside the file). An operator with
attribute rules refuses any attribute without one.
"""

from __future__ import annotations

import functools
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import onnx

from asym_runtime.specs import GRAPHS, GraphSpec, ShapeLimits

log = logging.getLogger(__name__)

SUPPORT_FILE = "tensorrt_onnx_support.json"
DEFAULT_DOMAINS = ("", "ai.onnx")

#: ONNX element type -> the name onnx-tensorrt's tables use. Types missing here (INT16,
#: UINT32, STRING, COMPLEX64, ...) are not TensorRT types at all.
_TABLE_TYPE = {
    onnx.TensorProto.FLOAT: "FP32",
    onnx.TensorProto.FLOAT16: "FP16",
    onnx.TensorProto.BFLOAT16: "BF16",
    onnx.TensorProto.INT32: "INT32",
    onnx.TensorProto.INT64: "INT64",
    onnx.TensorProto.INT8: "INT8",
    onnx.TensorProto.UINT8: "UINT8",
    onnx.TensorProto.BOOL: "BOOL",
    onnx.TensorProto.FLOAT8E4M3FN: "FP8",
    onnx.TensorProto.INT4: "INT4",
}
#: DOUBLE is accepted by the parser with a documented cast down to FLOAT (values clamped to
#: +-FLT_MAX); a graph that needs real float64 would silently lose precision, so it fails.


class TensorRTReadinessError(RuntimeError):
    """A graph would not parse or build as TensorRT engine; ``reports`` lists every problem."""

    def __init__(self, reports: list["ReadinessReport"]):
        self.reports = reports
        lines = [f"{r.graph}: {p}" for r in reports for p in r.problems]
        super().__init__("TensorRT readiness check failed:\n  " + "\n  ".join(lines))


@functools.lru_cache(maxsize=1)
def support_table() -> dict:
    """The shipped support table (see module doc)."""
    text = resources.files("asym_export").joinpath("data", SUPPORT_FILE).read_text(encoding="utf-8")
    return json.loads(text)


@dataclass
class ReadinessReport:
    """Result of one graph's check: truthy when nothing stands in TensorRT's way."""

    graph: str
    file: str
    problems: list[str] = field(default_factory=list)
    opset: int | None = None
    nodes: int = 0
    operators: dict[str, int] = field(default_factory=dict)
    element_types: list[str] = field(default_factory=list)
    dynamic_dims: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        return {"graph": self.graph, "file": self.file, "passed": bool(self), "problems": self.problems,
                "opset": self.opset, "nodes": self.nodes, "operators": self.operators,
                "element_types": self.element_types, "dynamic_dims": self.dynamic_dims}


# --------------------------------------------------------------------------- type lookup

def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    """Tensor name -> ONNX element type, from I/O, value_info, initializers and Constants."""
    g = model.graph
    types: dict[str, int] = {}
    for v in list(g.input) + list(g.output) + list(g.value_info):
        if v.type.HasField("tensor_type") and v.type.tensor_type.elem_type:
            types[v.name] = v.type.tensor_type.elem_type
    for init in g.initializer:
        types[init.name] = init.data_type
    for node in g.node:
        if node.op_type == "Constant" and node.domain in DEFAULT_DOMAINS:
            for a in node.attribute:
                if a.name == "value":
                    types[node.output[0]] = a.t.data_type
                elif a.name in ("value_float", "value_floats"):
                    types[node.output[0]] = onnx.TensorProto.FLOAT
                elif a.name in ("value_int", "value_ints"):
                    types[node.output[0]] = onnx.TensorProto.INT64
    return types


def _with_inferred_types(model: onnx.ModelProto) -> dict[str, int]:
    types = _elem_types(model)
    missing = any(name and name not in types for n in model.graph.node for name in n.input)
    if missing:
        # the model was loaded without external data: inference needs only dims and dtypes
        log.debug("running ONNX shape inference to type every tensor")
        types = _elem_types(onnx.shape_inference.infer_shapes(model, strict_mode=False))
    return types


def _type_name(t: int) -> str:
    return onnx.TensorProto.DataType.Name(t)


# --------------------------------------------------------------------------- checks

def _typed_inputs(node: onnx.NodeProto, opset: int) -> list[int]:
    """Indices of the node's inputs bound to one of the op's type variables (T, T1, ...).

    The support table's "Supported Types" describe those; inputs of a fixed type such as
    Reshape's ``shape`` (always int64) are not part of the claim.
    """
    try:
        schema = onnx.defs.get_schema(node.op_type, opset, node.domain)
    except onnx.defs.SchemaError:
        return list(range(len(node.input)))
    variables = {c.type_param_str for c in schema.type_constraints}
    formals = list(schema.inputs)
    out = []
    for i in range(len(node.input)):
        formal = formals[min(i, len(formals) - 1)] if formals else None
        if formal is not None and formal.type_str in variables:
            out.append(i)
    return out


def _check_attributes(node: onnx.NodeProto, where: str, rules: dict, problems: list[str]) -> None:
    """Every attribute the node carries must have a rule (an operator with rules lists all the
    attributes anyone has checked against TensorRT's importer), and enumerated ones must hold an
    allowed value; an attribute left out takes its ONNX default, which must be allowed too."""
    carried = {a.name: a for a in node.attribute}
    for name in sorted(set(carried) - set(rules)):
        problems.append(f"{where}: attribute {name!r} has no rule in the support table (rules exist for "
                        f"{', '.join(sorted(rules)) or 'no attribute'}), so its TensorRT support is unchecked")
    for attr, rule in rules.items():
        if rule.get("any"):
            continue
        value = rule["default"]
        if attr in carried:
            value = onnx.helper.get_attribute_value(carried[attr])
            value = value.decode() if isinstance(value, bytes) else value
        if value not in rule["allowed"]:
            problems.append(f"{where}: {attr}={value!r} is not supported (TensorRT allows "
                            f"{', '.join(map(str, rule['allowed']))})")


def _check_nodes(nodes, types: dict[str, int], opset: int, table: dict, problems: list[str],
                 ops: Counter, seen_types: set[str]) -> None:
    supported = table["operators"]
    for node in nodes:
        where = f"node {node.name or '(unnamed)'} ({node.op_type})"
        ops[node.op_type] += 1
        if node.domain not in DEFAULT_DOMAINS:
            problems.append(f"{where} is in domain {node.domain!r}: a custom operator needs a TensorRT "
                            "plugin; only default-domain ONNX operators are allowed")
            continue
        entry = supported.get(node.op_type)
        if entry is None or not entry.get("supported"):
            state = "not in" if entry is None else "marked unsupported in"
            problems.append(f"{where}: operator {node.op_type} is {state} TensorRT's ONNX support table "
                            f"(TensorRT {table['tensorrt_version']}); it would need a plugin")
            continue
        allowed = set(entry["types"])
        checked = [(node.input[i], f"input {i}") for i in _typed_inputs(node, opset) if node.input[i]]
        if node.op_type in ("Cast", "CastLike"):  # the table's types cover the target type too
            checked.append((node.output[0], "output 0"))
        for name, role in checked:
            t = types.get(name)
            if t is None:
                problems.append(f"{where}: element type of {role} {name!r} is unknown (no value_info, "
                                "and shape inference could not type it)")
                continue
            tname = _TABLE_TYPE.get(t, _type_name(t))
            seen_types.add(tname)
            if tname not in allowed:
                problems.append(f"{where}: {role} {name!r} is {_type_name(t)}; TensorRT supports "
                                f"{node.op_type} for {', '.join(entry['types'])}")
        if "attributes" in entry:
            _check_attributes(node, where, entry["attributes"], problems)
        for a in node.attribute:  # If / Loop / Scan bodies
            for sub in [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs):
                _check_nodes(sub.node, types | _elem_types(onnx.helper.make_model(sub)), opset, table,
                             problems, ops, seen_types)


def _check_dims(model: onnx.ModelProto, graph: GraphSpec, limits: ShapeLimits,
                problems: list[str]) -> list[str]:
    """(c): dynamic input dims == the contract's, each covered by the profile. Returns dim names."""
    initializers = {i.name for i in model.graph.initializer}
    inputs = [v for v in model.graph.input if v.name not in initializers]
    names = [v.name for v in inputs]
    if sorted(names) != sorted(graph.input_names):
        problems.append(f"graph inputs are {names}, the contract says {graph.input_names}; an input "
                        "outside the contract has no optimization profile")
    profile = limits.profile(graph)
    dyn: list[str] = []
    per_name: dict[str, set] = {}
    for v in inputs:
        if v.name not in profile:
            continue
        spec = graph.tensor(v.name)
        dims = v.type.tensor_type.shape.dim
        shapes = profile[v.name]  # (min, opt, max)
        if len(dims) != len(spec.dims):
            problems.append(f"input {v.name} has rank {len(dims)}, the profile gives rank {len(spec.dims)}")
            continue
        for i, (d, want) in enumerate(zip(dims, spec.dims)):
            corner = tuple(s[i] for s in shapes)
            if d.HasField("dim_value"):
                if isinstance(want, str):
                    problems.append(f"input {v.name} dim {i} is fixed to {d.dim_value}, but the contract and "
                                    f"the profile make it dynamic ({want} {corner[0]}..{corner[2]})")
                elif d.dim_value != want:
                    problems.append(f"input {v.name} dim {i} is {d.dim_value}; the profile gives {want}")
            elif d.dim_param:
                if isinstance(want, int):
                    problems.append(f"input {v.name} dim {i} is dynamic ({d.dim_param!r}), but the profile "
                                    f"fixes it to {want}: it would be undeclared")
                elif d.dim_param != want:
                    problems.append(f"input {v.name} dim {i} is the dynamic dim {d.dim_param!r}, which no "
                                    f"profile declares (the contract names it {want!r})")
                else:
                    dyn.append(f"{v.name}.{want}")
                    per_name.setdefault(want, set()).add(corner)
            else:
                problems.append(f"input {v.name} dim {i} is dynamic without a name; the contract names it "
                                f"{want!r}" if isinstance(want, str) else
                                f"input {v.name} dim {i} is dynamic without a name; the profile fixes it to {want}")
    for name, corners in per_name.items():
        if len(corners) > 1:  # e.g. image.height and mask.height must get one range
            problems.append(f"dim {name!r} gets different profile ranges: {sorted(corners)}")
    return dyn


def check_graph(path: str | Path, graph: GraphSpec, limits: ShapeLimits) -> ReadinessReport:
    """Check one ONNX file (its external data is not read) against TensorRT's support table
    and the optimization profile ``limits`` gives ``graph``."""
    path = Path(path)
    table = support_table()
    report = ReadinessReport(graph.name, path.name)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - any parse failure means the same here
        report.problems.append(f"{path.name} is not a readable ONNX model ({type(e).__name__}: {e})")
        return report
    opset = next((o.version for o in model.opset_import if o.domain in DEFAULT_DOMAINS), None)
    report.opset = opset
    lo, hi = table["opset"]["min"], table["opset"]["max"]
    if opset is None:
        report.problems.append("the model imports no default-domain opset")
        opset = hi
    elif not lo <= opset <= hi:
        report.problems.append(f"opset {opset} is outside {lo}..{hi}, the range TensorRT "
                               f"{table['tensorrt_version']} parses")
    for o in model.opset_import:
        if o.domain not in DEFAULT_DOMAINS:
            report.problems.append(f"the model imports opset domain {o.domain!r}: custom operators need plugins")
    for f in model.functions:
        report.problems.append(f"the model defines local function {f.domain}.{f.name}; TensorRT may map it "
                               "to a plugin, so it is not allowed")
    for v in list(model.graph.input) + list(model.graph.output):
        t = v.type.tensor_type.elem_type
        if t not in _TABLE_TYPE:
            report.problems.append(f"graph {'input' if v in model.graph.input else 'output'} {v.name} is "
                                   f"{_type_name(t)}, which is not a TensorRT I/O type")
    ops: Counter = Counter()
    seen: set[str] = set()
    _check_nodes(model.graph.node, _with_inferred_types(model), opset, table, report.problems, ops, seen)
    report.nodes = sum(ops.values())
    report.operators = dict(sorted(ops.items()))
    report.element_types = sorted(seen)
    report.dynamic_dims = _check_dims(model, graph, limits, report.problems)
    log.info("TensorRT readiness of %s: %s", path.name,
             "ok" if report else f"{len(report.problems)} problem(s)")
    return report


def check_graphs(paths: dict[str, Path], limits: ShapeLimits) -> list[ReadinessReport]:
    """Check each graph file (graph name -> path); raise :class:`TensorRTReadinessError` listing
    every problem of every graph if any fails."""
    reports = [check_graph(p, GRAPHS[name], limits) for name, p in paths.items()]
    if not all(reports):
        raise TensorRTReadinessError(reports)
    return reports


def manifest_section(reports: list[ReadinessReport]) -> dict:
    """What the manifest records under ``verification["tensorrt_readiness"]``."""
    table = support_table()
    return {
        "passed": all(reports),
        "support_table": {"tensorrt_version": table["tensorrt_version"], "opset": table["opset"],
                          "read_on": table["source"]["read_on"],
                          "urls": [t["url"] for t in table["source"]["tables"]]},
        "graphs": {r.graph: r.to_dict() for r in reports},
    }


def engine_source(graph: GraphSpec, available) -> str:
    """The file engines are built from: the FP16 graph when the export wrote one, else FP32.
    ``available`` is any container of file names (a staging listing, ``writer.entries``)."""
    fp16 = graph.file_name("fp16")
    return fp16 if fp16 in available else graph.file_name("fp32")


def check_folder(folder: str | Path, limits: ShapeLimits) -> list[ReadinessReport]:
    """Check, in ``folder``, the file each engine would be built from (see :func:`engine_source`)."""
    folder = Path(folder)
    names = {p.name for p in folder.iterdir()}
    return check_graphs({g.name: folder / engine_source(g, names) for g in GRAPHS.values()}, limits)
