"""The FP16 graph's faithful CPU twin (see :mod:`asym_export.fp16`): an FP32 graph in which every
FP16 tensor is rounded to FP16 where the mixed graph would store it, so ONNX Runtime's CPU
provider (which computes FP16 nodes in FP32) measures what FP16 storage costs; and the counts
of FP16 weights and nodes a mixed graph has."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .fp16 import Fp16Error, cast_to, external_info


def write_emulation_twin(mixed_path: str | Path, out_path: str | Path) -> Path:
    """Write an FP32 graph that rounds every tensor that is FP16 in the mixed graph to FP16.

    Weights stored as FP16 become FP32 initializers holding the same (exactly representable)
    values, streamed from the mixed graph's external data so memory stays at one tensor;
    every node output typed FP16 in the mixed graph is computed in FP32 and then passed
    through ``Cast(FLOAT16) -> Cast(FLOAT)``, which ONNX Runtime's CPU provider executes
    faithfully (overflow to inf included).
    """
    mixed_path, out_path = Path(mixed_path), Path(out_path)
    m = onnx.load(str(mixed_path), load_external_data=False)
    typed = onnx.shape_inference.infer_shapes(m)  # external tensors keep dims and types
    types = {v.name: v.type.tensor_type.elem_type for v in
             list(typed.graph.value_info) + list(typed.graph.output) + list(typed.graph.input)}
    del typed
    g = m.graph
    data_path = out_path.parent / (out_path.name + ".data")
    with open(data_path, "wb") as dst:
        for init in g.initializer:
            if init.data_location == TensorProto.EXTERNAL:
                ext = external_info(init)
                src = np.memmap(mixed_path.parent / ext["location"], dtype=np.uint8, mode="r",
                                offset=int(ext.get("offset", 0)), shape=(int(ext["length"]),))
                arr = np.frombuffer(src, dtype=helper.tensor_dtype_to_np_dtype(init.data_type))
                if init.data_type == TensorProto.FLOAT16:
                    arr = arr.astype(np.float32)
                    init.data_type = TensorProto.FLOAT
                offset = dst.tell()
                dst.write(arr.tobytes())
                del src, arr
                del init.external_data[:]
                for k, v in (("location", data_path.name), ("offset", str(offset)),
                             ("length", str(dst.tell() - offset))):
                    init.external_data.add(key=k, value=v)
            elif init.data_type == TensorProto.FLOAT16:
                init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float32), init.name))
    new_nodes = []
    for n in g.node:
        if n.op_type in ("Constant", "ConstantOfShape"):
            for a in n.attribute:
                if a.name == "value" and a.t.data_type == TensorProto.FLOAT16:
                    a.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(a.t).astype(np.float32), a.t.name))
        if n.op_type == "CastLike" or any(a.name == "dtype" and a.i == TensorProto.FLOAT16 for a in n.attribute):
            raise Fp16Error(f"cannot emulate {n.op_type} node {n.name}: its output type is an attribute")
        if n.op_type == "Cast" and cast_to(n) == TensorProto.FLOAT16:
            # an explicit cast to FP16 is exactly one rounding: Cast(FP16) -> Cast(FP32)
            out = n.output[0]
            n.output[0] = out + "__fp16"
            new_nodes.append(n)
            new_nodes.append(helper.make_node("Cast", [out + "__fp16"], [out], to=TensorProto.FLOAT,
                                              name=(n.name or out) + "__up"))
            continue
        new_nodes.append(n)
        for i, out in enumerate(n.output):
            if out and types.get(out) == TensorProto.FLOAT16:
                n.output[i] = out + "__fp32"
                new_nodes.extend(_round_pair(out + "__fp32", out, "r"))
    del g.node[:]
    g.node.extend(new_nodes)
    del g.value_info[:]  # types changed everywhere; ONNX Runtime infers them
    for v in list(g.input) + list(g.output):
        if v.type.tensor_type.elem_type != TensorProto.FLOAT:
            raise Fp16Error(f"graph I/O {v.name} is not float32; the mixed graph must keep I/O types")
    onnx.save_model(m, str(out_path))
    return out_path


def _round_pair(src: str, dst: str, tag: str) -> list[onnx.NodeProto]:
    mid = f"{dst}__fp16_{tag}"
    return [helper.make_node("Cast", [src], [mid], to=TensorProto.FLOAT16, name=f"{mid}_down"),
            helper.make_node("Cast", [mid], [dst], to=TensorProto.FLOAT, name=f"{mid}_up")]


def fp16_counts(model: onnx.ModelProto) -> dict[str, int]:
    """How many initializers are FP16 vs FP32 (for the report)."""
    c = {"fp16_weights": 0, "fp32_weights": 0}
    for init in model.graph.initializer:
        if init.data_type == TensorProto.FLOAT16:
            c["fp16_weights"] += 1
        elif init.data_type == TensorProto.FLOAT:
            c["fp32_weights"] += 1
    return c
