"""The exported graphs follow the contract and match diffusers at shapes never used in export."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from asym_export.feeds import make_feed
from asym_export.onnx_export import EXPORT_SHAPE, ExportError, onnx_from_model, rename_dims
from asym_export.reference import reference_outputs
from asym_runtime.specs import DECODER, ENCODER, GRAPHS, Shape
from asym_runtime.manifest import generation_folder as gen

UNSEEN = [Shape(2, 96, 160), Shape(1, 40, 24), Shape(4, 64, 64)]


def _assert_matches_diffusers(folder, vae, graph, shape, seed):
    """Run ``graph`` of ``folder`` with onnxruntime by the contract's names; max abs <= 1e-3
    against diffusers itself for every output."""
    sess = ort.InferenceSession(str(gen(folder) / graph.file_name()), providers=["CPUExecutionProvider"])
    feed = make_feed(graph, shape, seed=seed, scaling_factor=0.18215)
    out = dict(zip(graph.output_names, sess.run(graph.output_names, feed)))
    ref = reference_outputs(vae, graph, feed)
    for name in graph.output_names:
        assert out[name].shape == ref[name].shape
        assert np.abs(out[name] - ref[name]).max() <= 1e-3, name


def _dims(v):
    return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]


@pytest.mark.parametrize("graph", list(GRAPHS.values()), ids=lambda g: g.name)
def test_io_names_and_dims_are_the_contract(tiny_artifact, graph):
    m = onnx.load(str(gen(tiny_artifact) / graph.file_name()), load_external_data=False)
    assert [v.name for v in m.graph.input] == graph.input_names
    assert [v.name for v in m.graph.output] == graph.output_names
    for v in list(m.graph.input) + list(m.graph.output):
        assert _dims(v) == list(graph.tensor(v.name).dims)
        assert v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    meta = {p.key: p.value for p in m.metadata_props}
    assert meta["asym_export.graph"] == graph.name
    assert meta["asym_export.variant"] == "tiny"
    assert float(meta["asym_export.scaling_factor"]) == 0.18215
    assert m.opset_import[0].version == 18
    # weights live in external data beside the graph
    assert any(i.data_location == onnx.TensorProto.EXTERNAL for i in m.graph.initializer)
    assert (gen(tiny_artifact) / (graph.file_name() + ".data")).is_file()


@pytest.mark.parametrize("shape", UNSEEN, ids=str)
@pytest.mark.parametrize("graph", list(GRAPHS.values()), ids=lambda g: g.name)
def test_onnxruntime_matches_diffusers_at_unseen_shapes(tiny_artifact, tiny_vae, graph, shape):
    assert shape != EXPORT_SHAPE
    _assert_matches_diffusers(tiny_artifact, tiny_vae, graph, shape, seed=99)


def test_rename_dims_rejects_a_graph_that_breaks_the_contract(tiny_artifact):
    m = onnx.load(str(gen(tiny_artifact) / "decoder.onnx"), load_external_data=False)
    m.graph.input[2].type.tensor_type.shape.dim[1].dim_value = 3  # mask with 3 channels
    with pytest.raises(ExportError, match="mask dim 1 is 3, contract 1"):
        rename_dims(m, DECODER)
    m = onnx.load(str(gen(tiny_artifact) / "encoder.onnx"), load_external_data=False)
    m.graph.output[0].name = "mean"
    with pytest.raises(ExportError, match="contract says"):
        rename_dims(m, ENCODER)


def test_export_failure_is_an_export_error(tiny_vae, tmp_path, monkeypatch):
    import asym_export.onnx_export as oe

    def broken(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(oe.torch.onnx, "export", broken)
    with pytest.raises(ExportError, match="torch.onnx.export failed for decoder: RuntimeError: boom"):
        onnx_from_model(tiny_vae, DECODER, tmp_path / "decoder.onnx", variant="tiny", scaling_factor=0.18215)


@pytest.mark.slow
@pytest.mark.parametrize("graph", list(GRAPHS.values()), ids=lambda g: g.name)
def test_x2_graphs_match_diffusers_at_unseen_shape(x2_artifact, x2_vae, graph):
    """Done-when of issue 2: x2 graphs, run by contract names, at batch 2 96x160 (never exported)."""
    _assert_matches_diffusers(x2_artifact, x2_vae, graph, Shape(2, 96, 160), seed=42)


@pytest.mark.slow
def test_x15_graphs_match_diffusers_at_unseen_shape(x15_artifact):
    from asym_export.variants import get_variant
    from asym_export.weights import random_model

    vae = random_model(get_variant("x1.5"), seed=0)  # the fixture's weights
    for graph in GRAPHS.values():
        _assert_matches_diffusers(x15_artifact, vae, graph, Shape(2, 96, 128), seed=5)
