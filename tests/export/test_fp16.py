"""FP16 graphs: faithful emulation on the CPU, data-driven FP32 islands, the overflow proof."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from onnx_cache import OnnxExportCache

from asym_export import fp16, fp16_emulation
from asym_export.export import ExportOptions, export_artifact
from asym_export.feeds import CALIBRATION, CALIBRATION_SEED, make_feed
from asym_export.reference import reference_outputs
from asym_export.variants import get_variant
from asym_export.verify import FP16_TOLERANCE, VerificationError, VerificationReport
from asym_export.weights import load_reference, random_model
from asym_runtime.backends.onnxrt import cuda_provider_available
from asym_runtime.specs import DECODER, GRAPHS, Shape
from asym_runtime.manifest import generation_folder as gen

CPU = ["CPUExecutionProvider"]


def _run(path, feed):
    return ort.InferenceSession(str(path), providers=CPU).run(None, feed)


def _save(model, path):
    onnx.save_model(model, str(path), save_as_external_data=True, location=path.name + ".data",
                    size_threshold=0)
    return path


def _mul_graph(path, k=1000.0):
    """y = (x * k) * k: an FP32 graph whose middle tensor overflows FP16 for |x| > 0.0655."""
    kk = helper.make_tensor("k", TensorProto.FLOAT, [], [k])
    g = helper.make_graph(
        [helper.make_node("Mul", ["x", "k"], ["mid"], name="m1"),
         helper.make_node("Mul", ["mid", "k"], ["y"], name="m2")],
        "mul", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n"])], [kk],
        value_info=[helper.make_tensor_value_info("mid", TensorProto.FLOAT, ["n"])])
    return _save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]), path)


def test_onnxruntime_cpu_hides_fp16_overflow_but_the_twin_does_not(tmp_path):
    """The trap the emulation exists for (see asym_export/fp16.py), checked on this machine's onnxruntime."""
    src = _mul_graph(tmp_path / "mul.onnx")
    fp16.write_mixed(src, tmp_path / "mul.fp16.onnx", fp16.Fp16Plan(), "mul")
    x = {"x": np.array([1.0, 0.01, -2.0], np.float32)}
    (direct,) = _run(tmp_path / "mul.fp16.onnx", x)
    assert np.isfinite(direct).all()  # the CPU provider upcasts: 1e6 stays 1e6
    fp16_emulation.write_emulation_twin(tmp_path / "mul.fp16.onnx", tmp_path / "mul.emu.onnx")
    (emu,) = _run(tmp_path / "mul.emu.onnx", x)
    assert np.isinf(emu[0]) and np.isinf(emu[2])  # 1e3 * 1e3 = 1e6 overflows FP16
    assert emu[1] == np.float32(np.float16(np.float16(np.float16(0.01) * np.float16(1000)) * np.float16(1000)))


def test_twin_rounds_every_fp16_tensor_like_numpy(tmp_path):
    src = _mul_graph(tmp_path / "mul.onnx", k=1.1)
    fp16.write_mixed(src, tmp_path / "m.fp16.onnx", fp16.Fp16Plan(), "mul")
    fp16_emulation.write_emulation_twin(tmp_path / "m.fp16.onnx", tmp_path / "m.emu.onnx")
    x = np.random.default_rng(0).normal(size=1000).astype(np.float32)
    (emu,) = _run(tmp_path / "m.emu.onnx", {"x": x})
    h, k = np.float16, np.float16(1.1)
    want = (h(h(x) * k) * k).astype(np.float32)  # numpy float16 arithmetic rounds each product
    np.testing.assert_array_equal(emu, want)


def test_islands_stay_fp32_end_to_end(tmp_path):
    src = _mul_graph(tmp_path / "mul.onnx")
    x = {"x": np.array([20.0, -40.0], np.float32)}
    ranges = fp16.activation_ranges(src, [x])
    # mid (4e4) still fits FP16 but not with x4 headroom; y (4e7) does not fit at all
    assert ranges["mid"] == 4e4 and ranges["y"] == 4e7
    plan = fp16.plan_islands(onnx.load(str(src), load_external_data=False), ranges, fp16.weight_ranges(src))
    assert sorted(plan.node_names) == ["m1", "m2"]
    reasons = {i.node: i.reason for i in plan.islands}
    assert "mid reaches 4e+04" in reasons["m1"] and "y reaches 4e+07" in reasons["m2"]
    fp16.write_mixed(src, tmp_path / "mul.fp16.onnx", plan, "mul")
    mixed = onnx.load(str(tmp_path / "mul.fp16.onnx"))
    # no FP16 round trip left between the two FP32 nodes: m1's output feeds m2 directly
    producer = {o: n.name for n in mixed.graph.node for o in n.output}
    m2 = next(n for n in mixed.graph.node if n.name == "m2")
    assert producer[m2.input[0]] == "m1"
    assert not [n for n in mixed.graph.node if n.op_type == "Cast"]  # all FP32 but the I/O
    fp16_emulation.write_emulation_twin(tmp_path / "mul.fp16.onnx", tmp_path / "mul.emu.onnx")
    (emu,) = _run(tmp_path / "mul.emu.onnx", x)
    np.testing.assert_array_equal(emu, [2e7, -4e7])


def test_weights_too_large_for_fp16_keep_their_consumer_fp32(tmp_path):
    src = _mul_graph(tmp_path / "mul.onnx", k=1e5)
    plan = fp16.plan_islands(onnx.load(str(src), load_external_data=False), {}, fp16.weight_ranges(src))
    assert sorted(plan.node_names) == ["m1", "m2"]
    assert all("weight k holds 1e+05" in i.reason for i in plan.islands)


def test_toposort_orders_appended_casts():
    g = helper.make_graph(
        [helper.make_node("Relu", ["b"], ["c"], name="late"), helper.make_node("Relu", ["a"], ["b"], name="early")],
        "g", [helper.make_tensor_value_info("a", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [1])])
    m = helper.make_model(g)
    fp16.toposort(m)
    assert [n.name for n in m.graph.node] == ["early", "late"]
    m.graph.node[0].input[0] = "missing"
    with pytest.raises(fp16.Fp16Error, match="dangling input"):
        fp16.toposort(m)


# ----------------------------------------------------------------------- the weights' rounding

def _rounding_cases() -> np.ndarray:
    """Every value the converter treats apart (zeros of both signs, infinities, NaN, magnitudes
    around its two thresholds and FP16's own limits), and values spread over 20 decades."""
    f32 = np.float32
    edges = [0.0, -0.0, np.inf, -np.inf, np.nan, 1e-45, 1e-8, 2.98e-8, 2.99e-8, 5.96e-08, 6.0e-8, 6.1e-5,
             65504.0, 65519.0, 65520.0, 1e6, 3.4e38]
    edges += [np.nextafter(f32(v), f32(d)) for v in (5.96e-08, 65504.0) for d in (0.0, np.inf)]
    rng = np.random.default_rng(0)
    spread = rng.standard_normal(200_000) * 10.0 ** rng.integers(-12, 8, 200_000)
    edges = np.array(edges, np.float32)
    return np.concatenate([edges, -edges, spread.astype(np.float32)])


def test_the_fast_weight_rounding_is_the_converters_bit_for_bit():
    from onnxruntime.transformers.float16 import convert_np_to_float16

    a = _rounding_cases()
    calm = a[(np.abs(a) > 1e-3) & (np.abs(a) < 1e3)]  # nothing to clamp: the cast alone
    for x in (a, a.astype(np.float64), calm, a[:0]):  # raw_data is float32; float_data is read as float64
        want, got = convert_np_to_float16(x), fp16.float32_to_float16(x)
        assert got.dtype == want.dtype == np.float16 and got.shape == want.shape
        assert np.array_equal(got.view(np.uint16), want.view(np.uint16))


def test_write_mixed_writes_what_the_converter_alone_writes(tiny_artifact, tmp_path, monkeypatch):
    """The converter with its own rounding and with the fast one: the same graph and the same
    weight bytes, for the tiny decoder with two islands and for a weight holding every value the
    rounding treats apart."""
    import contextlib

    cases = _rounding_cases()
    n = len(cases)
    raw = numpy_helper.from_array(cases, "raw")  # raw_data: saved as external data
    listed = helper.make_tensor("listed", TensorProto.FLOAT, [n], cases.tolist())  # float_data
    g = helper.make_graph([helper.make_node("Add", ["x", "raw"], ["s"], name="add1"),
                           helper.make_node("Add", ["s", "listed"], ["y"], name="add2")], "add",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [n])], [raw, listed])
    edges = _save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]), tmp_path / "edges.onnx")
    decoder = gen(tiny_artifact) / "decoder.onnx"
    nodes = onnx.load(str(decoder), load_external_data=False).graph.node
    islands = fp16.Fp16Plan([fp16.Island(n.name, n.op_type, "test") for n in (nodes[3], nodes[10])])
    (tmp_path / "fast").mkdir()
    (tmp_path / "own").mkdir()  # same file names in both: each graph names its data file alike
    for src, plan in ((edges, fp16.Fp16Plan()), (decoder, islands)):
        fast = fp16.write_mixed(src, tmp_path / "fast" / src.name, plan, "g")
        with monkeypatch.context() as m:
            m.setattr(fp16, "_fast_weight_rounding", contextlib.nullcontext)
            own = fp16.write_mixed(src, tmp_path / "own" / src.name, plan, "g")
        assert fast.read_bytes() == own.read_bytes()
        assert Path(str(fast) + ".data").read_bytes() == Path(str(own) + ".data").read_bytes()
        assert fp16_emulation.fp16_counts(onnx.load(str(fast), load_external_data=False))["fp16_weights"] > 0


def test_the_rounding_is_swapped_back_and_a_converter_without_it_is_left_alone(monkeypatch, caplog):
    from onnxruntime.transformers import float16 as converter

    own = converter.convert_np_to_float16
    with pytest.raises(RuntimeError, match="inside"):
        with fp16._fast_weight_rounding():
            assert converter.convert_np_to_float16 is fp16.float32_to_float16
            raise RuntimeError("inside")
    assert converter.convert_np_to_float16 is own
    monkeypatch.delattr(converter, "convert_np_to_float16")
    with caplog.at_level("INFO", logger="asym_export.fp16"), fp16._fast_weight_rounding():
        assert not hasattr(converter, "convert_np_to_float16")
    assert "its own rounding is used" in caplog.text


# ----------------------------------------------------------------------- the overflow proof

@pytest.fixture(scope="module")
def overflow_weights(tmp_path_factory):
    """Tiny VAE whose decoder activations reach ~2e5 (conv_in scaled by 3e4): FP16 overflows."""
    vae = random_model(get_variant("tiny"), seed=0)
    with torch.no_grad():
        vae.decoder.conv_in.weight.mul_(3e4)
        vae.decoder.conv_in.bias.mul_(3e4)
    folder = tmp_path_factory.mktemp("overflow") / "vae"
    vae.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def overflow_decoder(overflow_weights, tmp_path_factory, onnx_cache_folder):
    vae, _ = load_reference(get_variant("tiny"), str(overflow_weights))
    path = tmp_path_factory.mktemp("ovdec") / "decoder.onnx"
    # the export tests below export this decoder too: whichever comes first exports it for real
    OnnxExportCache(onnx_cache_folder).export(vae, DECODER, path, variant="tiny", scaling_factor=0.18215)
    feeds = [make_feed(DECODER, s, CALIBRATION_SEED + i, 0.18215, mask=m) for i, (s, m) in enumerate(CALIBRATION)]
    ranges = fp16.activation_ranges(path, feeds)
    assert max(ranges.values()) > 65504  # the premise: FP32 activations beyond FP16's range
    return vae, path, ranges


def _emulated(vae, mixed, tmp_path):
    twin = fp16_emulation.write_emulation_twin(mixed, tmp_path / (mixed.stem + ".emu.onnx"))
    report = VerificationReport("emu", FP16_TOLERANCE)
    for i, shape in enumerate([Shape(1, 64, 64), Shape(2, 48, 80)]):
        feed = make_feed(DECODER, shape, 50 + i, 0.18215)
        out = dict(zip(DECODER.output_names, _run(twin, feed)))
        report.add(DECODER, shape, reference_outputs(vae, DECODER, feed), out)
    return report


def test_plain_fp16_overflows_and_islands_fix_it(overflow_decoder, tmp_path):
    vae, path, ranges = overflow_decoder
    plain = fp16.write_mixed(path, tmp_path / "plain.fp16.onnx", fp16.Fp16Plan(), "decoder")
    report = _emulated(vae, plain, tmp_path)
    assert not report and all("NaN/Inf" in f for c in report.cases for f in c.failures)

    plan = fp16.plan_islands(onnx.load(str(path), load_external_data=False), ranges, fp16.weight_ranges(path))
    assert plan.islands and plan.max_observed > 65504
    fixed = fp16.write_mixed(path, tmp_path / "islands.fp16.onnx", plan, "decoder")
    report = _emulated(vae, fixed, tmp_path)
    assert report, report.failure_lines()  # finite, and PSNR above the FP16 floor (50 dB)
    # most of the graph is still FP16: islands are the exception
    counts = fp16_emulation.fp16_counts(onnx.load(str(fixed), load_external_data=False))
    assert counts["fp16_weights"] > counts["fp32_weights"]


def _gpu_runner(kind, tmp_path):
    """A function running an FP16 decoder graph with real FP16 kernels: ONNX Runtime's CUDA
    provider with the runtime's FP16 settings, or a TensorRT engine built by the toolkit's
    builder and run by the runtime's TensorRTBackend. The test's marks skip where neither is
    installed; TensorRT's finer requirements (version, cuda-python, a CUDA torch) skip here."""
    if kind == "onnxruntime-cuda":
        from asym_runtime.backends.onnxrt import OnnxRuntimeBackend

        def run(path, feed):
            with OnnxRuntimeBackend(DECODER, path, "cuda", precision="fp16") as b:
                return b.infer(feed)
        return run
    from asym_export.engines import engine_from_onnx, tensorrt_unavailable_reason
    from asym_runtime.backends.tensorrt import TensorRTBackend, unavailable_reason
    from asym_runtime.specs import ShapeLimits

    reason = tensorrt_unavailable_reason() or unavailable_reason()  # the builder's needs, then the runtime's
    if reason:
        pytest.skip(reason)
    limits = ShapeLimits(min_batch=1, opt_batch=1, max_batch=2, min_height=64, opt_height=64, max_height=96,
                         min_width=64, opt_width=64, max_width=96)

    def run(path, feed):
        plan = tmp_path / (Path(path).stem + ".plan")
        engine_from_onnx(path, plan, DECODER, limits)  # strongly typed: the graph's FP16/FP32 types rule
        with TensorRTBackend(DECODER, plan.read_bytes()) as b:
            return b.infer(feed)
    return run


_NO_ORT_GPU = not (cuda_provider_available() and torch.cuda.is_available())
_NO_TRT = importlib.util.find_spec("tensorrt") is None or not torch.cuda.is_available()


@pytest.mark.gpu
@pytest.mark.parametrize("kind", [  # skipped before the overflow model is built where they cannot run
    pytest.param("onnxruntime-cuda", marks=pytest.mark.skipif(_NO_ORT_GPU, reason="needs onnxruntime-gpu and a GPU")),
    pytest.param("tensorrt", marks=pytest.mark.skipif(_NO_TRT, reason="needs tensorrt and a GPU"))])
def test_real_fp16_kernels_overflow_without_islands_and_not_with_them(overflow_decoder, tmp_path, kind):
    """The island mechanism on the GPU runtimes themselves (the CPU provider computes FP16 in
    FP32 and cannot show it): the plain FP16 graph gives Inf/NaN, the graph with islands is
    finite and above the FP16 floors at a shape the calibration did not see."""
    run = _gpu_runner(kind, tmp_path)
    vae, path, ranges = overflow_decoder
    plain = fp16.write_mixed(path, tmp_path / "plain.fp16.onnx", fp16.Fp16Plan(), "decoder")
    plan = fp16.plan_islands(onnx.load(str(path), load_external_data=False), ranges, fp16.weight_ranges(path))
    fixed = fp16.write_mixed(path, tmp_path / "islands.fp16.onnx", plan, "decoder")
    shape = Shape(2, 64, 96)
    feed = make_feed(DECODER, shape, 61, 0.18215)
    ref = reference_outputs(vae, DECODER, feed)
    broken = run(plain, feed)
    assert not all(np.isfinite(v).all() for v in broken.values()), "FP16 without islands stayed finite"
    report = VerificationReport(kind, FP16_TOLERANCE)
    report.add(DECODER, shape, ref, run(fixed, feed))
    assert report, report.failure_lines()


def test_export_records_islands_and_reasons(overflow_weights, tmp_path, reuse_onnx_exports):
    res = export_artifact(ExportOptions(variant="tiny", out=tmp_path / "a", weights=str(overflow_weights)))
    m = json.loads((tmp_path / "a" / "manifest.json").read_text())
    dec = m["fp16"]["graphs"]["decoder"]
    assert dec["fp32_nodes"] and all("reaches" in n["reason"] or "weight" in n["reason"] for n in dec["fp32_nodes"])
    assert m["fp16"]["graphs"]["encoder"]["fp32_nodes"] == []  # the encoder was not scaled
    assert m["verification"]["onnx_fp16_emulated"]["passed"]
    assert any(r.stage == "onnx_fp16_emulated" and r for r in res.reports)
    # the CUDA form keeps the overflowing tensors' nodes in FP32 too (same calibration, mapped by
    # tensor name), and its emulated FP16 check passed
    cuda = m["cuda_form"]["graphs"]["decoder"]["fp16_fp32_nodes"]
    assert cuda and all("reaches" in n["reason"] or "weight" in n["reason"] for n in cuda)
    assert m["verification"]["onnx_fp16_cuda_emulated"]["passed"]


def test_the_cuda_form_without_its_islands_fails_the_export(overflow_weights, tmp_path, monkeypatch,
                                                            reuse_onnx_exports):
    """Negative control of the island mapping: no calibrated ranges for the CUDA form, no islands,
    and its emulated FP16 check sees the overflow."""
    import asym_export.export as ex

    monkeypatch.setattr(ex, "cuda_ranges", lambda model, ranges: {})
    with pytest.raises(VerificationError, match=r"(?s)onnx_fp16_cuda_emulated.*decoder @ 2x64x64: sample: NaN/Inf"):
        export_artifact(ExportOptions(variant="tiny", out=tmp_path / "a", weights=str(overflow_weights)))


def test_export_fails_when_fp16_overflows(overflow_weights, tmp_path, monkeypatch, reuse_onnx_exports):
    """Without islands the emulated check sees Inf/NaN and the export fails: no manifest."""
    import asym_export.export as ex

    monkeypatch.setattr(ex, "plan_islands", lambda *a, **k: fp16.Fp16Plan())
    out = tmp_path / "a"
    with pytest.raises(VerificationError, match=r"(?s)onnx_fp16_emulated.*decoder @ 2x64x64: sample: NaN/Inf"):
        export_artifact(ExportOptions(variant="tiny", out=out, weights=str(overflow_weights), cuda_form=False))
    assert not (out / "manifest.json").exists() and [p.name for p in out.iterdir()] == [".lock"]  # nothing published


# ----------------------------------------------------------------------- the default export

@pytest.mark.parametrize("graph", list(GRAPHS.values()), ids=lambda g: g.name)
def test_fp16_graphs_keep_the_contract_and_float32_io(tiny_artifact, graph):
    m = onnx.load(str(gen(tiny_artifact) / graph.file_name("fp16")), load_external_data=False)
    assert [v.name for v in m.graph.input] == graph.input_names
    assert [v.name for v in m.graph.output] == graph.output_names
    for v in list(m.graph.input) + list(m.graph.output):
        assert v.type.tensor_type.elem_type == TensorProto.FLOAT
        assert [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] == list(graph.tensor(v.name).dims)
    assert {p.key: p.value for p in m.metadata_props}["asym_export.precision"] == "fp16"
    assert fp16_emulation.fp16_counts(m)["fp16_weights"] > 0


def test_manifest_lists_fp16_files_and_their_check(tiny_artifact):
    m = json.loads((tiny_artifact / "manifest.json").read_text())
    for g in GRAPHS:
        assert m["files"][f"{g}.fp16.onnx"]["precision"] == "fp16"
        assert m["files"][f"{g}.fp16.onnx.data"]["data_of"] == f"{g}.fp16.onnx"
    v = m["verification"]["onnx_fp16_emulated"]
    assert v["passed"] and v["tolerance"]["min_psnr_db"]["sample"] == 50.0
    assert "onnxruntime.transformers.float16" in m["fp16"]["converter"]


def test_no_fp16(tmp_path, reuse_onnx_exports):
    export_artifact(ExportOptions(variant="tiny", out=tmp_path / "a", random_weights=True, fp16=False))
    m = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert not any(".fp16." in n for n in m["files"]) and m["fp16"] is None
    assert "onnx_fp16_emulated" not in m["verification"]
    # the FP32 CUDA forms are still written and checked
    assert m["files"]["decoder.cuda.onnx"]["precision"] == "fp32"
    assert m["verification"]["onnx_fp32_cuda_emulated"]["passed"]
    assert "onnx_fp16_cuda_emulated" not in m["verification"]


@pytest.mark.slow
def test_x2_fp16_graphs_at_unseen_shapes(x2_artifact, x2_vae, tmp_path):
    """Done-when of the FP16 issue: x2 FP16 graphs at a shape never used in export stay finite and
    above the floors; decoder PSNR >= 60 dB against diffusers FP32 (random weights). Judged through
    the faithful FP16 emulation: the CPU provider would compute the FP16 graph in FP32 and hide
    any overflow."""
    files = json.loads((x2_artifact / "manifest.json").read_text())["files"]
    for g in GRAPHS.values():
        fp32 = files[g.file_name("fp32") + ".data"]["size"]
        half = files[g.file_name("fp16") + ".data"]["size"]
        assert 0.45 < half / fp32 < 0.55  # about half the size of the FP32 twin
    for g in GRAPHS.values():
        feed = make_feed(g, Shape(2, 96, 160), seed=77, scaling_factor=0.18215)
        twin = fp16_emulation.write_emulation_twin(gen(x2_artifact) / g.file_name("fp16"), tmp_path / f"{g.name}.twin.onnx")
        out = dict(zip(g.output_names, _run(twin, feed)))
        ref = reference_outputs(x2_vae, g, feed)
        report = VerificationReport("direct", FP16_TOLERANCE)
        report.add(g, Shape(2, 96, 160), ref, out)
        assert report, report.failure_lines()
        if g.name == "decoder":
            assert report.cases[0].outputs[0].psnr_db >= 60.0
