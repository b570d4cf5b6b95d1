"""The CUDA form (``*.cuda.onnx``): structure checked here, numerics through its standard-ONNX
emulation on the CPU (ONNX Runtime's CPU provider has no kernels for the fused ops); the kernels
themselves are checked on a GPU (tests/runtime/test_ort_cuda_gpu.py, asym-parity)."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from asym_export.cuda_emulation import write_emulation
from asym_export.cuda_form import cuda_form
from asym_export.cuda_graph import FUSED_OPS, MS_DOMAIN, CudaFormError, original_tensor
from asym_export.cuda_layout import layout_violations
from asym_export.feeds import make_feed
from asym_export.trt_readiness import engine_source
from asym_runtime.manifest import FORMAT_ONNX, FORMAT_ONNX_CUDA, read_manifest
from asym_runtime.specs import GRAPHS, Shape
from asym_runtime.manifest import generation_folder as gen

#: emulation vs portable graph, FP32: the same ops in another memory order (measured <= 2e-5 on
#: tiny); 1e-4 still catches any wrong attribute (the negative control moves outputs by > 0.1)
EMULATION_ATOL = 1e-4


def _ops(model) -> Counter:
    return Counter(n.op_type for n in model.graph.node)


def _session(path):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(path if isinstance(path, bytes) else str(path), so, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("graph", list(GRAPHS))
def test_every_groupnorm_and_conv_is_fused_and_the_layout_is_clean(tiny_artifact, graph):
    spec = GRAPHS[graph]
    portable = onnx.load(str(gen(tiny_artifact) / spec.file_name("fp32")), load_external_data=False)
    for precision in ("fp32", "fp16"):
        path = gen(tiny_artifact) / spec.file_name(precision, form="cuda")
        onnx.checker.check_model(str(path), full_check=True)
        model = onnx.load(str(path), load_external_data=False)
        ops = _ops(model)
        assert ops["InstanceNormalization"] == 0 and ops["Conv"] == 0, ops
        # one fused norm per exported GroupNorm, one NhwcConv per Conv
        assert ops["GroupNorm"] + ops["SkipGroupNorm"] == _ops(portable)["InstanceNormalization"]
        assert ops["NhwcConv"] == _ops(portable)["Conv"] > 0
        assert ops["SkipGroupNorm"] > 0
        assert all(n.domain == MS_DOMAIN for n in model.graph.node if n.op_type in FUSED_OPS)
        assert layout_violations(model) == []
        assert any(o.domain == MS_DOMAIN for o in model.opset_import)
        inits = {i.name: i.data_type for i in model.graph.initializer}
        norms = [n for n in model.graph.node if n.op_type in ("GroupNorm", "SkipGroupNorm")]
        # ONNX Runtime's CUDA GroupNorm takes FP32 gamma/beta only, also in FP16 graphs
        assert all(inits[n.input[1]] == inits[n.input[2]] == TensorProto.FLOAT for n in norms)
        want = TensorProto.FLOAT16 if precision == "fp16" else TensorProto.FLOAT
        assert {inits[n.input[1]] for n in model.graph.node if n.op_type == "NhwcConv"} == {want}


def test_the_manifest_lists_the_cuda_forms_apart(tiny_artifact):
    m = read_manifest(tiny_artifact)
    data = json.loads((tiny_artifact / "manifest.json").read_text())
    for graph in GRAPHS.values():
        for precision in ("fp32", "fp16"):
            name = graph.file_name(precision, form="cuda")
            e = m.files[name]
            assert (e.role, e.format, e.precision) == (graph.name, FORMAT_ONNX_CUDA, precision)
            assert [c.name for c in m.companions(name)] == [name + ".data"]
            m.verify_file(name)
            # nothing that asks for portable ONNX gets a CUDA form
            assert m.find(graph.name, FORMAT_ONNX, precision).name == graph.file_name(precision)
        counts = data["cuda_form"]["graphs"][graph.name]["fused_nodes"]
        model = onnx.load(str(gen(tiny_artifact) / graph.file_name("fp32", form="cuda")), load_external_data=False)
        assert counts == {op: _ops(model)[op] for op in FUSED_OPS}
        # TensorRT engines are built from the portable graphs, CUDA forms beside them or not
        assert engine_source(graph, set(m.files)) == graph.file_name("fp16")
    v = data["verification"]
    assert v["onnx_fp32_cuda_emulated"]["passed"] and v["onnx_fp16_cuda_emulated"]["passed"]
    assert v["tensorrt_readiness"]["passed"]


@pytest.mark.parametrize("graph", list(GRAPHS))
def test_the_emulated_cuda_form_computes_the_portable_graph(tiny_artifact, tmp_path, graph):
    spec = GRAPHS[graph]
    emu = gen(tiny_artifact) / f".test-{graph}.emu.onnx"  # the emulation reads the CUDA form's data
    try:
        write_emulation(gen(tiny_artifact) / spec.file_name("fp32", form="cuda"), emu)
        feed = make_feed(spec, Shape(2, 72, 48), 5, 0.18215)
        want = _session(gen(tiny_artifact) / spec.file_name("fp32")).run(None, feed)
        got = _session(emu).run(None, feed)
    finally:
        emu.unlink(missing_ok=True)
    for w, g in zip(want, got):
        np.testing.assert_allclose(g, w, atol=EMULATION_ATOL, rtol=0)


def test_the_emulation_check_fails_a_wrong_rewrite(tiny_artifact, copy_artifact):
    """Negative control: a CUDA form with one norm's SiLU dropped no longer matches."""
    folder = gen(copy_artifact(tiny_artifact))
    path = folder / "decoder.cuda.onnx"
    model = onnx.load(str(path), load_external_data=False)
    norm = next(n for n in model.graph.node if n.op_type == "GroupNorm" and
                any(a.name == "activation" and a.i == 1 for a in n.attribute))
    next(a for a in norm.attribute if a.name == "activation").i = 0
    onnx.save_model(model, str(path))
    write_emulation(path, folder / "emu.onnx")
    feed = make_feed(GRAPHS["decoder"], Shape(1, 64, 64), 5, 0.18215)
    want = _session(folder / "decoder.onnx").run(None, feed)[0]
    got = _session(folder / "emu.onnx").run(None, feed)[0]
    assert np.abs(got - want).max() > 100 * EMULATION_ATOL


def test_layout_violations_finds_a_transpose_between_fused_nodes(tiny_artifact):
    model = onnx.load(str(gen(tiny_artifact) / "decoder_uncond.cuda.onnx"), load_external_data=False)
    conv = next(n for n in model.graph.node if n.op_type == "NhwcConv" and
                any(c.op_type in ("GroupNorm", "SkipGroupNorm") for c in model.graph.node if n.output[0] in c.input))
    out = conv.output[0]
    conv.output[0] = out + "__test"
    model.graph.node.extend([
        helper.make_node("Transpose", [out + "__test"], [out + "__nchw"], name="T1", perm=[0, 3, 1, 2]),
        helper.make_node("Transpose", [out + "__nchw"], [out], name="T2", perm=[0, 2, 3, 1]),
    ])
    assert sorted(layout_violations(model)) == ["T1", "T2"]


def test_a_graph_without_the_exporters_groupnorm_is_left_alone():
    """A Conv-only graph: every Conv converted, nothing fused that is not there."""
    rng = np.random.default_rng(0)
    w = helper.make_tensor("w", TensorProto.FLOAT, [8, 4, 3, 3], rng.standard_normal(288).astype(np.float32))
    g = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["c"], ["y"], name="relu")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 4, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 8, 8, 8])], [w],
        value_info=[helper.make_tensor_value_info("c", TensorProto.FLOAT, ["b", 8, 8, 8])])
    model, report = cuda_form(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]))
    assert report.fused == {"GroupNorm": 0, "SkipGroupNorm": 0, "NhwcConv": 1}
    # the Relu runs channels-last; the only layout Transposes are at the input and the output
    assert report.layout_transposes == 2 and layout_violations(model) == []
    x = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    want = _session(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]).SerializeToString()).run(
        None, {"x": x})[0]
    got = _session(emulated(model).SerializeToString()).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def emulated(model):
    from asym_export.cuda_emulation import emulate

    m = onnx.ModelProto()
    m.CopyFrom(model)
    return emulate(m)


def test_original_tensor_names():
    assert original_tensor("add_45__nhwc__cf12") == "add_45"
    assert original_tensor("conv2d_3__cf7") == "conv2d_3"
    assert original_tensor("add_45") == "add_45"


def test_cuda_form_refuses_a_layout_it_could_not_clean(monkeypatch):
    import asym_export.cuda_form as cf

    monkeypatch.setattr(cf, "layout_violations", lambda model: ["T"])
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 2, 2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 2, 2])])
    with pytest.raises(CudaFormError, match="layout Transposes left between fused nodes: T"):
        cf.cuda_form(helper.make_model(g))


@pytest.mark.slow
@pytest.mark.parametrize("graph, counts", [("encoder", (14, 8, 28)), ("decoder", (27, 27, 74))])
def test_x2_cuda_form_structure(x2_artifact, tmp_path, graph, counts):
    """x2 (real channel counts, attention at 512 channels): every norm and conv fused, layout
    Transposes only at the boundaries. The numerics of the same pass are checked on tiny."""
    from asym_export.cuda_form import write_cuda_form

    spec = GRAPHS[graph]
    report = write_cuda_form(gen(x2_artifact) / spec.file_name("fp32"), tmp_path / spec.file_name("fp32", form="cuda"),
                             graph)
    gn, sgn, conv = counts
    assert report.fused == {"GroupNorm": gn, "SkipGroupNorm": sgn, "NhwcConv": conv}
    assert report.unfused_group_norms == 0 and report.convs_left == 0
    portable = onnx.load(str(gen(x2_artifact) / spec.file_name("fp32")), load_external_data=False)
    assert gn + sgn == _ops(portable)["InstanceNormalization"] and conv == _ops(portable)["Conv"]
    model = onnx.load(str(tmp_path / spec.file_name("fp32", form="cuda")), load_external_data=False)
    assert layout_violations(model) == []


def test_a_skipgroupnorm_whose_inner_sum_would_overflow_stays_fp32(tiny_artifact):
    """The residual sum a SkipGroupNorm computes without writing it (no S output) keeps its
    calibrated range: the FP16 plan makes the node an FP32 island when that sum would overflow,
    as it would for the portable graph's Add. Without it, the sum's range is invisible."""
    from asym_export.cuda_form import cuda_inner_ranges
    from asym_export.fp16 import plan_islands

    model = onnx.load(str(gen(tiny_artifact) / "decoder.cuda.onnx"), load_external_data=False)
    portable = onnx.load(str(gen(tiny_artifact) / "decoder.onnx"), load_external_data=False)
    adds = {o for n in portable.graph.node if n.op_type == "Add" for o in n.output}
    silent = [n for n in model.graph.node if n.op_type == "SkipGroupNorm" and not (len(n.output) > 1 and n.output[1])]
    assert silent, "the tiny decoder has no SkipGroupNorm without S: the case is not exercised"
    inner = cuda_inner_ranges(model, {t: 1.0 for t in adds})
    assert set(inner) == {n.name for n in model.graph.node if n.op_type == "SkipGroupNorm"}
    assert all(tensor in adds for tensor, _ in inner.values())  # each names the portable graph's Add

    node = silent[0]
    tensor = inner[node.name][0]
    ranges = {o: 1.0 for n in model.graph.node for o in n.output if o}  # every written tensor small
    big = {tensor: 30000.0}  # x4 headroom: 120000 > 65504
    plan = plan_islands(model, ranges, {}, inner=cuda_inner_ranges(model, {**{t: 1.0 for t in adds}, **big}))
    assert node.name in plan.node_names
    assert f"its inner sum {tensor} reaches 3e+04" in next(i.reason for i in plan.islands if i.node == node.name)
    assert node.name not in plan_islands(model, ranges, {}).node_names  # what the plan saw before


def _exact_group_norm(x: np.ndarray, groups: int, eps: float) -> np.ndarray:
    """GroupNorm of a channels-last [N, H, W, C] array in float64, two-pass (gamma 1, beta 0)."""
    n, h, w, c = x.shape
    grp = x.astype(np.float64).reshape(n, h * w, groups, c // groups)
    mean, var = grp.mean(axis=(1, 3), keepdims=True), grp.var(axis=(1, 3), keepdims=True)
    return ((grp - mean) / np.sqrt(var + eps)).reshape(x.shape)


def _one_fp16_skip_group_norm():
    """float32 in and out, one FP16 SkipGroupNorm between casts, as a mixed graph has it."""
    f16 = TensorProto.FLOAT16
    nodes = [helper.make_node("Cast", ["x"], ["x16"], name="cx", to=f16),
             helper.make_node("Cast", ["skip"], ["skip16"], name="cs", to=f16),
             helper.make_node("SkipGroupNorm", ["x16", "gamma", "beta", "skip16"], ["y16"], name="sgn",
                              domain=MS_DOMAIN, groups=2, epsilon=1e-5, activation=0, channels_last=1),
             helper.make_node("Cast", ["y16"], ["y"], name="cy", to=TensorProto.FLOAT)]
    t = TensorProto.FLOAT
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", t, [1, 2, 2, 4]),
                                       helper.make_tensor_value_info("skip", t, [1, 2, 2, 4])],
                          [helper.make_tensor_value_info("y", t, [1, 2, 2, 4])],
                          [onnx.numpy_helper.from_array(np.ones(4, np.float32), "gamma"),
                           onnx.numpy_helper.from_array(np.zeros(4, np.float32), "beta")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(MS_DOMAIN, 1)])


def test_the_fp16_emulation_rounds_skipgroupnorms_sum_as_the_kernel_does(tmp_path):
    """ONNX Runtime's FP16 SkipGroupNorm adds in half precision and normalises the rounded sum:
    a sum past 65504 is Inf and the output NaN on the GPU. What the export checks (the emulation,
    then its FP16 twin, as export._check_emulated runs them) must show the same, or the export
    would pass a CUDA form that gives NaN; below the limit it normalises the rounded sum."""
    from asym_export.cuda_emulation import write_emulation
    from asym_export.fp16_emulation import write_emulation_twin

    onnx.save_model(_one_fp16_skip_group_norm(), str(tmp_path / "sgn.onnx"))
    write_emulation(tmp_path / "sgn.onnx", tmp_path / "emu.onnx", fp16=True)
    sess = _session(write_emulation_twin(tmp_path / "emu.onnx", tmp_path / "twin.onnx"))
    x = np.full((1, 2, 2, 4), 40000, np.float32)
    assert np.isnan(sess.run(None, {"x": x, "skip": x})[0]).all()

    rng = np.random.default_rng(0)
    x, skip = ((300 * rng.standard_normal((1, 2, 2, 4))).astype(np.float16).astype(np.float32) for _ in range(2))
    s = (x + skip).astype(np.float16)  # the half add's rounded sum
    want = _exact_group_norm(s, 2, 1e-5).astype(np.float16).astype(np.float32)
    got = sess.run(None, {"x": x, "skip": skip})[0]
    np.testing.assert_allclose(got, want, atol=2e-3, rtol=0)


def test_the_emulation_takes_groupnorm_statistics_in_one_pass_as_the_kernel_does():
    """ONNX Runtime's NHWC GroupNorm kernel sums x and x^2 in FP32 and takes var = E[x^2] - E[x]^2:
    a group whose mean dwarfs its spread (1000 +- 0.01 here) loses its variance to cancellation
    on the GPU. The twin computes the same way, so the export's CPU check sees that loss (an
    exact two-pass norm would hide it); centred data normalises as the exact formula does."""
    from asym_export.cuda_emulation import emulate

    n = helper.make_node("GroupNorm", ["x", "gamma", "beta"], ["y"], name="gn", domain=MS_DOMAIN,
                         groups=2, epsilon=1e-6, activation=0, channels_last=1)
    f = TensorProto.FLOAT
    g = helper.make_graph([n], "g", [helper.make_tensor_value_info("x", f, [1, 16, 16, 4])],
                          [helper.make_tensor_value_info("y", f, [1, 16, 16, 4])],
                          [onnx.numpy_helper.from_array(np.ones(4, np.float32), "gamma"),
                           onnx.numpy_helper.from_array(np.zeros(4, np.float32), "beta")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(MS_DOMAIN, 1)])
    sess = _session(emulate(model).SerializeToString())

    def exact(x):
        return _exact_group_norm(x, 2, 1e-6)

    rng = np.random.default_rng(0)
    centred = rng.standard_normal((1, 16, 16, 4)).astype(np.float32)
    np.testing.assert_allclose(sess.run(None, {"x": centred})[0], exact(centred), atol=1e-4, rtol=0)
    offset = (1000 + 0.01 * rng.standard_normal((1, 16, 16, 4))).astype(np.float32)
    got = sess.run(None, {"x": offset})[0]
    assert not np.allclose(got, exact(offset), atol=0.1)  # the variance is lost, as on the GPU
