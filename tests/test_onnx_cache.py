"""The test suite's reuse of exported graphs (tests/onnx_cache.py) must never hand a test a graph
other than the one its own export would have written: a cache that did would hide the bugs the
tests are there to find."""

from __future__ import annotations

import copy

import onnxruntime as ort
import pytest
import torch
from onnx_cache import OnnxExportCache, export_code_is_pristine

import asym_export.export as ex
import asym_export.onnx_export as oe
import asym_export.wrappers as w
from asym_runtime.manifest import generation_folder as gen
from asym_runtime.manifest import sha256_file
from asym_runtime.specs import DECODER, ENCODER, GRAPHS


class Recorder:
    """Stands in for the exporter in the cache's own bookkeeping tests: writes a graph and a data
    file whose bytes name the call, and counts calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, vae, graph, path, **kw):
        self.calls += 1
        path.write_bytes(f"graph {graph.name} call {self.calls} {kw}".encode())
        (path.parent / (path.name + ".data")).write_bytes(f"data call {self.calls}".encode())
        return path


def _export(cache, vae, graph, folder, name="g.onnx", scaling_factor=0.18215, **kw):
    folder.mkdir(parents=True, exist_ok=True)
    path = cache.export(vae, graph, folder / name, variant="tiny", scaling_factor=scaling_factor, **kw)
    return path.read_bytes(), (folder / (name + ".data")).read_bytes()


def test_the_same_export_is_copied_and_any_difference_is_exported_again(tiny_vae, tmp_path):
    real = Recorder()
    cache = OnnxExportCache(tmp_path / "cache", real=real)
    first = _export(cache, tiny_vae, DECODER, tmp_path / "a")
    assert _export(cache, tiny_vae, DECODER, tmp_path / "b") == first  # the first call's bytes
    assert (real.calls, cache.misses, cache.hits) == (1, 1, 1)

    other = copy.deepcopy(tiny_vae)
    with torch.no_grad():
        t = other.decoder.conv_out.bias
        t[0] = torch.nextafter(t[0], torch.tensor(float("inf")))  # one weight, one ulp
    differences = [
        lambda d: _export(cache, other, DECODER, d),
        lambda d: _export(cache, tiny_vae, ENCODER, d),
        lambda d: _export(cache, tiny_vae, DECODER, d, name="h.onnx"),
        lambda d: _export(cache, tiny_vae, DECODER, d, scaling_factor=0.5),
        lambda d: _export(cache, tiny_vae, DECODER, d, opset=17),
    ]
    for i, export in enumerate(differences):
        assert export(tmp_path / f"d{i}")[0] != first[0], i
        assert real.calls == 2 + i, i


def test_replaced_export_code_is_exported_for_real_and_not_kept(tiny_vae, tmp_path, monkeypatch):
    real = Recorder()
    cache = OnnxExportCache(tmp_path / "cache", real=real)
    _export(cache, tiny_vae, DECODER, tmp_path / "a")
    orig = w.DecoderWrapper.forward
    for target, name, value in [(w.DecoderWrapper, "forward", lambda self, *a: orig(self, *a)),  # a mutated wrapper
                                (oe, "wrapper_for", lambda vae, name: None),  # the negative controls' way
                                (oe.torch.onnx, "export", lambda *a, **k: None)]:
        with monkeypatch.context() as m:
            m.setattr(target, name, value)
            assert not export_code_is_pristine()
            calls = real.calls
            _export(cache, tiny_vae, DECODER, tmp_path / f"b-{name}")
            assert real.calls == calls + 1
        assert export_code_is_pristine()
    assert cache.bypassed == 3 and len([p for p in cache.folder.iterdir() if p.is_dir()]) == 1  # nothing kept


def test_a_failed_export_keeps_nothing(tiny_vae, tmp_path):
    def broken(vae, graph, path, **kw):
        path.write_bytes(b"half")
        raise RuntimeError("exporter failed")

    cache = OnnxExportCache(tmp_path / "cache", real=broken)
    with pytest.raises(RuntimeError, match="exporter failed"):
        _export(cache, tiny_vae, DECODER, tmp_path / "a")
    assert not [p for p in cache.folder.iterdir() if p.is_dir()]


def test_the_tiny_artifact_export_is_what_the_cache_gives_back(tiny_artifact, tiny_vae, reuse_onnx_exports, tmp_path):
    """The session's tiny artifact (random weights, seed 0, exported for real by whichever worker
    came first) seeded the cache: the same model's export is a copy of those exact bytes, and the
    copy loads its weights from beside it. The tests that opt in rely on this hit."""
    for graph in GRAPHS.values():
        name = graph.file_name("fp32")
        path = ex.onnx_from_model(tiny_vae, graph, tmp_path / name, variant="tiny", scaling_factor=0.18215)
        for suffix in ("", ".data"):
            assert sha256_file(tmp_path / (name + suffix)) == sha256_file(gen(tiny_artifact) / (name + suffix)), name
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert (reuse_onnx_exports.hits, reuse_onnx_exports.misses, reuse_onnx_exports.bypassed) == (len(GRAPHS), 0, 0)
