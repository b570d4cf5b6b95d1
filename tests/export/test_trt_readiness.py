"""TensorRT readiness without a GPU: the real graphs pass; broken graphs fail with a clear message."""

import shutil

import onnx
import pytest
from export_stubs import tensorrt_without_instance_norm
from onnx import TensorProto, helper

from asym_export import trt_readiness as tr
from asym_export.export import ExportOptions, export_artifact
from asym_export.trt_readiness import TensorRTReadinessError, check_folder, check_graph, support_table
from asym_runtime.manifest import read_manifest
from asym_runtime.specs import DECODER, ENCODER, GRAPHS, ShapeLimits
from asym_runtime.manifest import generation_folder as gen

LIMITS = ShapeLimits()


def _load(folder, graph, precision="fp32"):
    return onnx.load(str(gen(folder) / graph.file_name(precision)), load_external_data=False)


def _save(model, tmp_path, name="g.onnx"):
    """The check reads the structure only, so a graph saved without its weights is enough."""
    path = tmp_path / name
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def tiny_fp16(tiny_artifact):
    """The FP16 graphs the export wrote (FP16 weights and compute, float32 I/O with Casts
    inside): what engines are built from."""
    return gen(tiny_artifact)


# --------------------------------------------------------------------------- graphs that pass

@pytest.mark.parametrize("graph", list(GRAPHS.values()), ids=lambda g: g.name)
def test_tiny_fp32_graphs_are_ready(tiny_artifact, graph):
    r = check_graph(gen(tiny_artifact) / graph.file_name(), graph, LIMITS)
    assert r, r.problems
    assert r.opset == 18 and r.nodes > 100
    assert {"Conv", "InstanceNormalization"} <= set(r.operators)
    assert r.element_types == ["FP32", "INT64"]
    assert sorted(r.dynamic_dims) == sorted(f"{t.name}.{d}" for t in graph.inputs
                                            for d in t.dims if isinstance(d, str))


@pytest.mark.parametrize("graph", list(GRAPHS.values()), ids=lambda g: g.name)
def test_tiny_fp16_graphs_are_ready(tiny_fp16, graph):
    r = check_graph(tiny_fp16 / graph.file_name("fp16"), graph, LIMITS)
    assert r, r.problems
    assert {"FP16", "FP32"} <= set(r.element_types)  # FP16 compute, FP32 I/O and islands
    assert r.operators["Cast"] >= len(graph.inputs) + len(graph.outputs)


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("graph", list(GRAPHS.values()), ids=lambda g: g.name)
def test_x2_graphs_are_ready(x2_artifact, graph, precision):
    r = check_graph(gen(x2_artifact) / graph.file_name(precision), graph, LIMITS)
    assert r, r.problems
    ready = read_manifest(x2_artifact).data["verification"]["tensorrt_readiness"]
    assert ready["passed"] and ready["graphs"][graph.name]["passed"]


@pytest.mark.slow
@pytest.mark.parametrize("graph", list(GRAPHS.values()), ids=lambda g: g.name)
def test_x15_graphs_are_ready(x15_artifact, graph):
    r = check_graph(gen(x15_artifact) / graph.file_name("fp16"), graph, LIMITS)
    assert r, r.problems
    assert read_manifest(x15_artifact).data["verification"]["tensorrt_readiness"]["passed"]


def test_engines_are_checked_from_the_fp16_graph_when_there_is_one(tiny_artifact, tiny_fp16, tmp_path):
    for g in GRAPHS.values():
        shutil.copy(gen(tiny_artifact) / g.file_name(), tmp_path)
    assert {r.file for r in check_folder(tmp_path, LIMITS)} == {g.file_name() for g in GRAPHS.values()}
    shutil.copy(tiny_fp16 / DECODER.file_name("fp16"), tmp_path)
    assert {r.file for r in check_folder(tmp_path, LIMITS)} == (
        {g.file_name() for g in GRAPHS.values()} - {"decoder.onnx"} | {"decoder.fp16.onnx"})


def test_default_export_checks_the_fp16_graphs(tiny_artifact):
    v = read_manifest(tiny_artifact).data["verification"]["tensorrt_readiness"]
    assert {g["file"] for g in v["graphs"].values()} == {g.file_name("fp16") for g in GRAPHS.values()}


def test_manifest_records_readiness_and_its_source(tiny_artifact):
    v = read_manifest(tiny_artifact).data["verification"]["tensorrt_readiness"]
    assert v["passed"] and set(v["graphs"]) == set(GRAPHS)
    assert v["support_table"]["tensorrt_version"] == support_table()["tensorrt_version"]
    assert all(u.startswith("https://github.com/onnx/onnx-tensorrt/") for u in v["support_table"]["urls"])


def test_support_table_says_where_it_comes_from():
    t = support_table()
    src = t["source"]
    assert src["read_on"] and "operators.md" in src["document"]
    assert [x["tensorrt"] for x in src["tables"]] == ["10.0", "10.15"]
    assert t["opset"] == {"min": 9, "max": 20}
    ops = t["operators"]
    assert ops["Conv"]["types"] == ["FP32", "FP16", "BF16"]
    assert ops["Reshape"]["supported"] and "INT64" in ops["Reshape"]["types"]
    assert ops["Col2Im"] == {"supported": False}
    assert "Attention" not in ops  # 10.15 has it, 10.0 not: not claimed for 10.12


# --------------------------------------------------------------------------- graphs that fail

def _encoder_like(op_type, domain="", dtype=TensorProto.FLOAT, opset=18, dims=("batch", 3, "height", "width"),
                  **attrs):
    """A tiny graph with the encoder's I/O contract around one node."""
    image = helper.make_tensor_value_info("image", dtype, list(dims))
    outs = [helper.make_tensor_value_info(n, dtype, ["batch", 4, "latent_height", "latent_width"])
            for n in ENCODER.output_names]
    nodes = [helper.make_node(op_type, ["image"], ["y"], domain=domain, name="n0", **attrs),
             helper.make_node("Identity", ["y"], ["latent_mean"], name="n1"),
             helper.make_node("Identity", ["y"], ["latent_logvar"], name="n2")]
    imports = [helper.make_opsetid("", opset)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    g = helper.make_graph(nodes, "g", [image], outs,
                          value_info=[helper.make_tensor_value_info("y", dtype, None)])
    return helper.make_model(g, opset_imports=imports)


def test_a_tiny_supported_graph_passes(tmp_path):
    assert check_graph(_save(_encoder_like("Relu"), tmp_path), ENCODER, LIMITS)


@pytest.mark.parametrize("model, needles", [
    (_encoder_like("Relu", domain="com.example"), ["domain 'com.example'", "plugin"]),
    (_encoder_like("Col2Im"), ["Col2Im", "marked unsupported", "plugin"]),
    (_encoder_like("MyOwnOp"), ["MyOwnOp", "not in TensorRT's ONNX support table"]),
    (_encoder_like("Relu", dtype=TensorProto.DOUBLE), ["input 0 'image' is DOUBLE", "Relu for FP32",
                                                       "graph input image is DOUBLE, which is not a TensorRT"]),
    (_encoder_like("Relu", opset=22), ["opset 22 is outside 9..20"]),
    (_encoder_like("Resize", mode="cubic"), ["mode='cubic' is not supported"]),
    (_encoder_like("DepthToSpace", blocksize=2, mode="XYZ"), ["mode='XYZ' is not supported (TensorRT allows DCR, CRD)"]),
    (_encoder_like("Reshape", allowzero=2), ["allowzero=2 is not supported"]),
    (_encoder_like("Conv", auto_pad="SAME_SIDEWAYS"), ["auto_pad='SAME_SIDEWAYS' is not supported"]),
    (_encoder_like("Relu", alpha=0.1), ["attribute 'alpha' has no rule", "rules exist for no attribute"]),
    (_encoder_like("Conv", groups=2), ["attribute 'groups' has no rule", "rules exist for auto_pad, dilations"]),
], ids=["custom-domain", "unsupported-op", "unknown-op", "unsupported-dtype", "opset", "resize-mode",
        "depth-to-space-mode", "reshape-allowzero", "conv-auto-pad", "attribute-without-rule", "misspelt-attribute"])
def test_unsupported_graph_fails_with_a_clear_message(tmp_path, model, needles):
    r = check_graph(_save(model, tmp_path), ENCODER, LIMITS)
    assert not r
    text = "\n".join(r.problems)
    for n in needles:
        assert n in text, text


@pytest.mark.parametrize("dims, needle", [
    (("batch", "channels", "height", "width"), "dim 1 is dynamic ('channels'), but the profile fixes it to 3"),
    ((2, 3, "height", "width"), "dim 0 is fixed to 2, but the contract and the profile make it dynamic"),
    (("batch", 3, "h", "width"), "dynamic dim 'h', which no profile declares"),
    (("batch", 3, "height"), "rank 3"),
], ids=["undeclared-channels", "fixed-batch", "unknown-name", "rank"])
def test_undeclared_dynamic_dim_fails(tmp_path, dims, needle):
    r = check_graph(_save(_encoder_like("Relu", dims=dims), tmp_path), ENCODER, LIMITS)
    assert not r and any(needle in p for p in r.problems), r.problems


def test_real_graph_with_a_custom_op_and_an_undeclared_dim_lists_both(tiny_artifact, tmp_path):
    m = _load(tiny_artifact, DECODER)
    m.graph.input[2].type.tensor_type.shape.dim[1].dim_param = "mask_channels"  # was the fixed 1
    node = next(n for n in m.graph.node if n.op_type == "InstanceNormalization")
    node.domain = "com.microsoft"
    r = check_graph(_save(m, tmp_path), DECODER, LIMITS)
    assert not r and len(r.problems) == 2
    assert "domain 'com.microsoft'" in r.problems[0]
    assert "input mask dim 1 is dynamic ('mask_channels')" in r.problems[1]
    with pytest.raises(TensorRTReadinessError, match="decoder: .*com.microsoft"):
        tr.check_graphs({"decoder": tmp_path / "g.onnx"}, LIMITS)


def test_an_export_whose_graph_tensorrt_cannot_take_fails_without_manifest(tiny_artifact, tmp_path, monkeypatch):
    tensorrt_without_instance_norm(monkeypatch, tiny_artifact)
    with pytest.raises(TensorRTReadinessError, match="InstanceNormalization is marked unsupported"):
        export_artifact(ExportOptions(variant="tiny", out=tmp_path / "o", random_weights=True, seed=0,
                                      verify_shapes=()))
    assert [p.name for p in (tmp_path / "o").iterdir()] == [".lock"]  # nothing published, no manifest
