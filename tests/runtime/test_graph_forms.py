"""Which ONNX graphs a provider runs: the CUDA form on ONNX Runtime's CUDA provider where the
folder has one, the portable graphs everywhere else; and the knobs that choose."""

from __future__ import annotations

import pytest

import asym_runtime
from asym_runtime.api import _cuda_entries
from asym_runtime.errors import ArtifactError
from asym_runtime.manifest import FORMAT_ONNX_CUDA, read_manifest


def test_the_cpu_runs_the_portable_graphs_beside_cuda_forms(tiny_artifact):
    with asym_runtime.load(tiny_artifact, backend="onnxruntime-cpu", precision="fp16") as rt:
        assert rt.graph_form == "portable"
        assert {b.path.name for b in rt.backends.values()} == {
            "encoder.fp16.onnx", "decoder.fp16.onnx", "decoder_uncond.fp16.onnx"}
        assert "portable graphs" in repr(rt)


def test_cuda_entries_pick_the_cuda_form_only_when_complete(tiny_artifact):
    m = read_manifest(tiny_artifact)
    wanted = ("encoder", "decoder", "decoder_uncond")
    assert _cuda_entries(m, "fp16", wanted, "auto") == {g: f"{g}.fp16.cuda.onnx" for g in wanted}
    assert _cuda_entries(m, "fp16", wanted, "portable") is None
    # a folder whose decoder has no CUDA form: "auto" falls back to portable, "cuda" says why
    del m.files["decoder.fp16.cuda.onnx"]
    assert _cuda_entries(m, "fp16", wanted, "auto") is None
    with pytest.raises(ArtifactError, match="no fp16 CUDA form for decoder .*graph_form='portable'"):
        _cuda_entries(m, "fp16", wanted, "cuda")
    assert all(e.format != FORMAT_ONNX_CUDA or e.name != "decoder.fp16.cuda.onnx" for e in m.files.values())


def test_bad_graph_form_and_cuda_graph_on_the_cpu_are_refused(tiny_artifact):
    with pytest.raises(ValueError, match="graph_form 'nhwc': choose one of auto, cuda, portable"):
        asym_runtime.load(tiny_artifact, graph_form="nhwc")
    with pytest.raises(ValueError, match="cuda_graph needs a GPU backend"):
        asym_runtime.load(tiny_artifact, backend="onnxruntime-cpu", cuda_graph=True)


def test_a_folder_without_cuda_forms_still_loads_everywhere(tiny_artifact, copy_artifact):
    import json

    folder = copy_artifact(tiny_artifact)
    data = json.loads((folder / "manifest.json").read_text())
    data["files"] = {k: v for k, v in data["files"].items() if ".cuda." not in k}
    (folder / "manifest.json").write_text(json.dumps(data))
    m = read_manifest(folder)
    assert _cuda_entries(m, "fp32", ("encoder", "decoder"), "auto") is None
    with asym_runtime.load(folder, backend="onnxruntime-cpu") as rt:
        assert rt.graph_form == "portable"
