"""What the runtime loads is what it checked (issue: artifacts that never lie).

Each case here was a way to get unchecked bytes into a session before generation folders,
in-memory loading and the graph-derived closure: a file swapped between hashing and use,
external data the manifest's ``data_of`` hint did not name, links leading outside the
folder, special files, and an export replacing the folder under a running load.
"""

from __future__ import annotations

import os
import shutil
import threading

import numpy as np
import pytest

import asym_runtime
from asym_runtime.errors import ArtifactError
from asym_runtime.manifest import Manifest, read_manifest, sha256_file

from manifest_edits import edit_manifest

LATENT = np.random.default_rng(3).standard_normal((1, 4, 8, 8)).astype(np.float32)


def _decode(folder, **kw):
    with asym_runtime.load(folder, backend="onnxruntime-cpu", graphs=("decoder_uncond",), **kw) as rt:
        return rt.decode(LATENT)


def test_a_file_swapped_after_its_check_is_not_used(tiny_artifact, copy_artifact, monkeypatch):
    """The data file is replaced (zeros: other weights) right after its hash matched; the decode
    must still be the checked artifact's. Reading once and handing ONNX Runtime those bytes
    closes the window that hash-then-open-by-path left."""
    folder = copy_artifact(tiny_artifact)
    want = _decode(folder)
    data = read_manifest(folder).path("decoder_uncond.onnx.data")
    original_check = Manifest._check
    swapped = []

    def check_then_swap(self, name, size, digest=None):
        original_check(self, name, size, digest)
        if name == "decoder_uncond.onnx.data" and not swapped:
            tmp = data.with_name("swap.tmp")
            tmp.write_bytes(bytes(data.stat().st_size))
            os.replace(tmp, data)  # what another writer publishing by rename would do
            swapped.append(name)

    monkeypatch.setattr(Manifest, "_check", check_then_swap)
    got = _decode(folder)
    assert swapped, "the swap point was never reached"
    np.testing.assert_array_equal(got, want)
    monkeypatch.undo()
    with pytest.raises(ArtifactError, match="sha256 of decoder_uncond.onnx.data"):
        _decode(folder)  # the swapped file is caught by the next load


def test_external_data_is_checked_without_the_data_of_hint(tiny_artifact, copy_artifact):
    folder = copy_artifact(tiny_artifact)
    edit_manifest(folder, lambda d: [e.pop("data_of", None) for e in d["files"].values()])
    _decode(folder)  # the hint is not needed to find the data
    path = read_manifest(folder).path("decoder_uncond.onnx.data")
    raw = bytearray(path.read_bytes())
    raw[-100] ^= 1
    path.write_bytes(bytes(raw))
    with pytest.raises(ArtifactError, match="sha256 of decoder_uncond.onnx.data"):
        _decode(folder)


def test_external_data_the_manifest_does_not_list_is_refused(tiny_artifact, copy_artifact):
    folder = copy_artifact(tiny_artifact)
    edit_manifest(folder, lambda d: d["files"].pop("decoder_uncond.onnx.data"))
    with pytest.raises(ArtifactError, match=r"decoder_uncond.onnx reads external data from 'decoder_uncond.onnx.data', "
                                            r"which manifest.json does not list"):
        _decode(folder)


def test_external_data_outside_the_folder_is_refused(tiny_artifact, copy_artifact):
    """A graph whose tensors point at ../ is refused before ONNX Runtime could open anything
    (a graph loaded from bytes resolves relative locations against the working directory)."""
    import onnx

    folder = copy_artifact(tiny_artifact)
    m = read_manifest(folder)
    graph = m.path("decoder_uncond.onnx")
    model = onnx.load(str(graph), load_external_data=False)
    for t in model.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "../outside.data"
    graph.write_bytes(model.SerializeToString())
    edit_manifest(folder, lambda d: d["files"]["decoder_uncond.onnx"].update(
        sha256=sha256_file(graph), size=graph.stat().st_size))
    with pytest.raises(ArtifactError, match=r"reads external data from '../outside.data', outside the artifact folder"):
        _decode(folder)


@pytest.mark.parametrize("what", ["graph", "data", "manifest", "generation"])
def test_symlinks_are_refused_before_anything_is_read(tiny_artifact, copy_artifact, tmp_path, what):
    folder = copy_artifact(tiny_artifact)
    m = read_manifest(folder)
    target = {"graph": m.path("decoder_uncond.onnx"), "data": m.path("decoder_uncond.onnx.data"),
              "manifest": folder / "manifest.json", "generation": m.folder}[what]
    outside = tmp_path / f"outside-{what}"
    shutil.move(target, outside)  # the same bytes, now outside the folder, reached by a link
    os.symlink(outside, target)
    message = {"manifest": r"manifest.json: cannot be opened as a regular file",
               "generation": r"is not a folder \(a symbolic link or a file\)"}.get(what, "is a symbolic link")
    with pytest.raises(ArtifactError, match=message):
        _decode(folder)


def test_a_fifo_is_refused_without_blocking(tiny_artifact, copy_artifact):
    folder = copy_artifact(tiny_artifact)
    path = read_manifest(folder).path("decoder_uncond.onnx.data")
    path.unlink()
    os.mkfifo(path)
    errors = []
    t = threading.Thread(target=lambda: errors.append(pytest.raises(ArtifactError, _decode, folder)), daemon=True)
    t.start()
    t.join(60)
    assert not t.is_alive(), "loading a folder with a FIFO in it blocked"
    assert "is not a regular file" in str(errors[0].value)


def test_a_load_that_an_export_overtakes_loads_the_new_artifact(tiny_artifact, copy_artifact, monkeypatch):
    """An export that switches the manifest and removes the old generation while a load is
    reading it: the load starts over on the new manifest (asym_runtime.load retries)."""
    folder = copy_artifact(tiny_artifact)
    old = read_manifest(folder)
    new_gen = "gen-20990101T000000Z-0000abcd"
    original = Manifest.read_verified
    done = []

    def overtaken(self, name):
        if not done:  # what a finishing export does, between this load's manifest read and its first file
            shutil.copytree(old.folder, folder / new_gen)
            edit_manifest(folder, lambda d: d.update(generation=new_gen))
            shutil.rmtree(old.folder)
            done.append(name)
        return original(self, name)

    monkeypatch.setattr(Manifest, "read_verified", overtaken)
    with asym_runtime.load(folder, backend="onnxruntime-cpu") as rt:
        assert rt.manifest.generation == new_gen
        assert rt.decode(LATENT).shape == (1, 3, 64, 64)
    assert done
