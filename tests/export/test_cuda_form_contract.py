"""The CUDA form against the fused kernels' contract, checked without the emulation.

The emulation (``cuda_emulation.py``) reads the same attributes and weight layout the writer
writes, so a value both get wrong in the same way (an epsilon, ``channels_last``, the weight
order, an attribute the kernel requires) passes the emulated check and fails only on a GPU.
These tests pin each fused node to the portable graph it came from, and to the operator
contract of ONNX Runtime's ``com.microsoft`` kernels (GroupNorm/SkipGroupNorm: NHWC input,
required ``groups`` and ``activation``, FP32 gamma/beta; NhwcConv: weights OHWI), so the writer
and the emulation cannot drift together unseen."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from asym_export.cuda_emulation import emulate
from asym_export.cuda_form import cuda_form
from asym_export.cuda_graph import MS_DOMAIN
from asym_runtime.manifest import generation_folder as gen
from asym_runtime.specs import GRAPHS


def _attrs(node) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _arrays(model) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _portable_norms(model) -> dict[str, dict]:
    """The exporter's GroupNorms, traced by hand from their beta Add (named as the fused node
    after its '/'): Add(Mul(Reshape(InstanceNormalization(.)), gamma), beta) [-> x * Sigmoid(x)]."""
    prod = {o: n for n in model.graph.node for o in n.output}
    cons: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            cons.setdefault(i, []).append(n)
    arrays = _arrays(model)
    out = {}
    for add in model.graph.node:
        if add.op_type != "Add":
            continue
        mul = next((prod[i] for i in add.input if i in prod and prod[i].op_type == "Mul"), None)
        if mul is None:
            continue
        r4 = next((prod[i] for i in mul.input if i in prod and prod[i].op_type == "Reshape"), None)
        inorm = prod.get(r4.input[0]) if r4 is not None else None
        if inorm is None or inorm.op_type != "InstanceNormalization":
            continue
        users = cons.get(add.output[0], [])
        sig = [u for u in users if u.op_type == "Sigmoid"]
        silu = bool(sig) and any(u.op_type == "Mul" and set(u.input) == {add.output[0], sig[0].output[0]}
                                 for u in users)
        out[add.name] = {"epsilon": _attrs(inorm).get("epsilon", 1e-5),
                         "groups": int(arrays[inorm.input[1]].size), "activation": int(silu),
                         "gamma": arrays[next(i for i in mul.input if i in arrays)].reshape(-1),
                         "beta": arrays[next(i for i in add.input if i in arrays)].reshape(-1)}
    return out


@pytest.mark.parametrize("graph", list(GRAPHS))
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_each_fused_norm_has_its_portable_norms_attributes_in_the_kernels_contract(tiny_artifact, graph, precision):
    spec = GRAPHS[graph]
    folder = gen(tiny_artifact)
    portable = _portable_norms(onnx.load(str(folder / spec.file_name("fp32"))))
    model = onnx.load(str(folder / spec.file_name(precision, form="cuda")))
    arrays = _arrays(model)
    norms = [n for n in model.graph.node if n.op_type in ("GroupNorm", "SkipGroupNorm")]
    assert norms and len(norms) == len(portable)
    for n in norms:
        want = portable[n.name.split("/", 1)[1]]
        a = _attrs(n)
        # groups and activation have no default in the kernels' schema; the kernels run NHWC only
        assert {"groups", "activation", "epsilon", "channels_last"} <= set(a), (n.name, a)
        assert a["channels_last"] == 1, n.name
        assert (a["groups"], a["activation"], a["epsilon"]) == (want["groups"], want["activation"], want["epsilon"]), n.name
        assert arrays[n.input[1]].dtype == arrays[n.input[2]].dtype == np.float32, n.name  # FP16 graphs too
        np.testing.assert_array_equal(arrays[n.input[1]], want["gamma"].astype(np.float32))
        np.testing.assert_array_equal(arrays[n.input[2]], want["beta"].astype(np.float32))
        if n.op_type == "SkipGroupNorm":
            assert len(n.input) == 4  # X, gamma, beta, skip: no bias
            shapes = {i.name: i for i in model.graph.value_info}
            # the kernel's skip is a whole tensor here, never a broadcast one
            dims = [[d.dim_value or d.dim_param for d in shapes[t].type.tensor_type.shape.dim]
                    for t in (n.input[0], n.input[3]) if t in shapes]
            assert len(dims) == 2 and dims[0] == dims[1] and len(dims[0]) == 4, (n.name, dims)


@pytest.mark.parametrize("graph", list(GRAPHS))
def test_each_nhwc_conv_is_its_portable_conv_with_ohwi_weights_and_symmetric_pads(tiny_artifact, graph):
    spec = GRAPHS[graph]
    folder = gen(tiny_artifact)
    portable = onnx.load(str(folder / spec.file_name("fp32")))
    model = onnx.load(str(folder / spec.file_name("fp32", form="cuda")))
    pa, ca = _arrays(portable), _arrays(model)
    convs = {n.name: n for n in portable.graph.node if n.op_type == "Conv"}
    prod = {o: n for n in model.graph.node for o in n.output}
    nhwc = [n for n in model.graph.node if n.op_type == "NhwcConv"]
    assert sorted(n.name for n in nhwc) == sorted(convs)
    for n in nhwc:
        conv = convs[n.name]
        # NhwcConv's W is [M, kH, kW, C/group] (OHWI)
        np.testing.assert_array_equal(ca[n.input[1]], pa[conv.input[1]].transpose(0, 2, 3, 1))
        assert list(n.input[2:]) == list(conv.input[2:])
        a, want = _attrs(n), _attrs(conv)
        for k in ("strides", "dilations", "group", "kernel_shape"):
            assert a.get(k) == want.get(k), (n.name, k)
        pads, orig = list(a.get("pads", [0, 0, 0, 0])), list(want.get("pads", [0, 0, 0, 0]))
        assert pads[:2] == pads[2:], (n.name, pads)  # cuDNN pads symmetrically
        if orig[:2] != orig[2:]:  # one-sided: an explicit channels-last Pad in front
            pad = prod[n.input[0]]
            top, left, bottom, right = orig
            assert pad.op_type == "Pad" and pads == [0, 0, 0, 0]
            assert ca[pad.input[1]].tolist() == [0, top, left, 0, 0, bottom, right, 0], n.name
        else:
            assert pads == orig, n.name


def _session(model):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _emulated(model):
    m = onnx.ModelProto()
    m.CopyFrom(model)
    return emulate(m)


def test_the_emulation_applies_each_norms_own_epsilon():
    """A large epsilon on a small spread moves the output far: the emulation must use the
    node's epsilon (the writer copies the exporter's 1e-6, whose effect no end-to-end check sees)."""
    f = TensorProto.FLOAT
    n = helper.make_node("GroupNorm", ["x", "gamma", "beta"], ["y"], name="gn", domain=MS_DOMAIN,
                         groups=2, epsilon=0.25, activation=0, channels_last=1)
    g = helper.make_graph([n], "g", [helper.make_tensor_value_info("x", f, [1, 4, 4, 4])],
                          [helper.make_tensor_value_info("y", f, [1, 4, 4, 4])],
                          [numpy_helper.from_array(np.ones(4, np.float32), "gamma"),
                           numpy_helper.from_array(np.zeros(4, np.float32), "beta")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(MS_DOMAIN, 1)])
    x = (0.3 * np.random.default_rng(1).standard_normal((1, 4, 4, 4))).astype(np.float32)
    grp = x.astype(np.float64).reshape(1, 16, 2, 2)
    want = ((grp - grp.mean(axis=(1, 3), keepdims=True)) /
            np.sqrt(grp.var(axis=(1, 3), keepdims=True) + 0.25)).reshape(x.shape)
    np.testing.assert_allclose(_session(emulate(model)).run(None, {"x": x})[0], want, atol=1e-5, rtol=0)


def _exporters_group_norm(channels: int, groups: int, scale: float = 1.0):
    """The exporter's GroupNorm pattern (+ SiLU) on a 4-D input, as a standalone model."""
    rng = np.random.default_rng(0)
    f = TensorProto.FLOAT
    inits = [numpy_helper.from_array(np.array([0, groups, -1], np.int64), "shape3"),
             numpy_helper.from_array(np.full(groups, scale, np.float32), "ones"),
             numpy_helper.from_array(np.zeros(groups, np.float32), "zeros"),
             numpy_helper.from_array(rng.standard_normal((channels, 1, 1)).astype(np.float32), "gamma"),
             numpy_helper.from_array(rng.standard_normal((channels, 1, 1)).astype(np.float32), "beta")]
    nodes = [helper.make_node("Reshape", ["x", "shape3"], ["r3"], name="r3"),
             helper.make_node("InstanceNormalization", ["r3", "ones", "zeros"], ["in"], name="in", epsilon=1e-6),
             helper.make_node("Shape", ["x"], ["shp"], name="shp"),
             helper.make_node("Reshape", ["in", "shp"], ["r4"], name="r4"),
             helper.make_node("Mul", ["r4", "gamma"], ["mul"], name="mul"),
             helper.make_node("Add", ["mul", "beta"], ["add"], name="add"),
             helper.make_node("Sigmoid", ["add"], ["sig"], name="sig"),
             helper.make_node("Mul", ["add", "sig"], ["y"], name="silu")]
    shape = [2, channels, 6, 4]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", f, shape)],
                          [helper.make_tensor_value_info("y", f, shape)], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize("channels, groups, scale, fused", [
    (8, 2, 1.0, 1),   # 4 channels per group: fused
    (6, 2, 1.0, 0),   # 3 per group: ONNX Runtime's CUDA GroupNorm needs an even number
    (8, 2, 2.0, 0),   # an InstanceNormalization scaling by itself is not the exporter's GroupNorm
])
def test_only_the_exporters_group_norm_with_even_groups_is_fused(channels, groups, scale, fused):
    original = _exporters_group_norm(channels, groups, scale)
    model, report = cuda_form(_exporters_group_norm(channels, groups, scale))
    assert report.fused["GroupNorm"] == fused and report.unfused_group_norms == 1 - fused
    x = np.random.default_rng(1).standard_normal((2, channels, 6, 4)).astype(np.float32)
    want = _session(original).run(None, {"x": x})[0]
    np.testing.assert_allclose(_session(_emulated(model)).run(None, {"x": x})[0], want, atol=1e-5, rtol=0)


def test_the_fp16_emulation_keeps_an_fp32_island_in_fp32(tmp_path):
    """A fused node the FP16 plan keeps in FP32 runs the FP32 kernel on the GPU: its output is
    not rounded to FP16 (here it reaches 1e5, past FP16's 65504, and must stay finite)."""
    from asym_export.cuda_emulation import write_emulation
    from asym_export.fp16_emulation import write_emulation_twin

    f = TensorProto.FLOAT
    n = helper.make_node("GroupNorm", ["x", "gamma", "beta"], ["y"], name="gn", domain=MS_DOMAIN,
                         groups=2, epsilon=1e-5, activation=0, channels_last=1)
    g = helper.make_graph([n], "g", [helper.make_tensor_value_info("x", f, [1, 4, 4, 4])],
                          [helper.make_tensor_value_info("y", f, [1, 4, 4, 4])],
                          [numpy_helper.from_array(np.full(4, 1e5, np.float32), "gamma"),
                           numpy_helper.from_array(np.zeros(4, np.float32), "beta")])
    onnx.save_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(MS_DOMAIN, 1)]),
                    str(tmp_path / "gn.onnx"))
    write_emulation(tmp_path / "gn.onnx", tmp_path / "emu.onnx", fp16=True, fp32_nodes={"gn"})
    sess = ort.InferenceSession(str(write_emulation_twin(tmp_path / "emu.onnx", tmp_path / "twin.onnx")),
                                providers=["CPUExecutionProvider"])
    x = np.random.default_rng(2).standard_normal((1, 4, 4, 4)).astype(np.float32)
    grp = x.astype(np.float64).reshape(1, 16, 2, 2)
    want = 1e5 * ((grp - grp.mean(axis=(1, 3), keepdims=True)) /
                  np.sqrt(grp.var(axis=(1, 3), keepdims=True) + 1e-5)).reshape(x.shape)
    got = sess.run(None, {"x": x})[0]
    assert np.isfinite(got).all() and np.abs(want).max() > 65504
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-2)


@pytest.mark.parametrize("op", ["GroupNorm", "SkipGroupNorm"])
def test_the_fp16_emulation_rounds_a_fused_norms_output_to_fp16(tmp_path, op):
    """The other side of the island test above: a fused norm the plan leaves in FP16 writes an
    FP16 output on the GPU, so the emulation rounds it, and past 65504 it overflows as the
    kernel's does (an emulation that skipped the rounding hid it: a mutation run found no test
    that saw it)."""
    from asym_export.cuda_emulation import write_emulation
    from asym_export.fp16_emulation import write_emulation_twin

    f = TensorProto.FLOAT
    ins = ["x", "gamma", "beta"] + (["skip"] if op == "SkipGroupNorm" else [])
    n = helper.make_node(op, ins, ["y"], name="gn", domain=MS_DOMAIN, groups=2, epsilon=1e-5, activation=0,
                         channels_last=1)
    inputs = [helper.make_tensor_value_info(i, f, [1, 4, 4, 4]) for i in ins if i in ("x", "skip")]
    g = helper.make_graph([n], "g", inputs, [helper.make_tensor_value_info("y", f, [1, 4, 4, 4])],
                          [numpy_helper.from_array(np.full(4, 1e5, np.float32), "gamma"),
                           numpy_helper.from_array(np.zeros(4, np.float32), "beta")])
    onnx.save_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(MS_DOMAIN, 1)]),
                    str(tmp_path / "gn.onnx"))
    write_emulation(tmp_path / "gn.onnx", tmp_path / "emu.onnx", fp16=True, fp32_nodes=set())
    sess = ort.InferenceSession(str(write_emulation_twin(tmp_path / "emu.onnx", tmp_path / "twin.onnx")),
                                providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(2)
    feed = {"x": rng.standard_normal((1, 4, 4, 4)).astype(np.float32)}
    s = feed["x"].astype(np.float64)
    if op == "SkipGroupNorm":
        feed["skip"] = rng.standard_normal((1, 4, 4, 4)).astype(np.float32)
        s = s + feed["skip"]
    grp = s.reshape(1, 16, 2, 2)
    want = 1e5 * ((grp - grp.mean(axis=(1, 3), keepdims=True)) /
                  np.sqrt(grp.var(axis=(1, 3), keepdims=True) + 1e-5)).reshape(s.shape)
    got = sess.run(None, feed)[0]
    over = np.abs(want) > 65520  # rounds past FP16's largest finite value
    assert over.any() and (~over).any()
    assert np.isinf(got[over]).all() and np.array_equal(np.sign(got[over]), np.sign(want[over]))
    np.testing.assert_allclose(got[~over], want[~over].astype(np.float16).astype(np.float32), rtol=2e-3, atol=0)
