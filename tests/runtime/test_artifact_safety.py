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


def test_a_generation_that_is_a_plain_file_is_refused(tiny_artifact, copy_artifact):
    folder = copy_artifact(tiny_artifact)
    gen = read_manifest(folder).folder
    shutil.rmtree(gen)
    gen.write_bytes(b"not a folder")
    with pytest.raises(ArtifactError, match=r"is not a folder \(a symbolic link or a file\)"):
        _decode(folder)


@pytest.mark.parametrize("what", ["link", "fifo", "folder"])
def test_check_file_refuses_links_fifos_and_folders_without_reading_them(tiny_artifact, copy_artifact, tmp_path,
                                                                       what):
    """check_file (the checks ahead of asym-serve's load and check_loadable): a link, a FIFO or
    a folder under a listed name is refused, as read_verified refuses it, and a FIFO without
    blocking."""
    folder = copy_artifact(tiny_artifact)
    m = read_manifest(folder)
    path = m.path("decoder_uncond.onnx.data")
    if what == "link":
        outside = tmp_path / "outside.data"
        shutil.move(path, outside)
        os.symlink(outside, path)
    else:
        path.unlink()
        os.mkfifo(path) if what == "fifo" else path.mkdir()
    errors = []
    t = threading.Thread(target=lambda: errors.append(pytest.raises(ArtifactError, m.check_file,
                                                                    "decoder_uncond.onnx.data")), daemon=True)
    t.start()
    t.join(60)
    assert not t.is_alive(), "check_file blocked"
    assert ("is a symbolic link" if what == "link" else "is not a regular file") in str(errors[0].value)
    with pytest.raises(ArtifactError):
        asym_runtime.check_loadable(folder, backend="onnxruntime-cpu")


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
    published = _overtake(folder, monkeypatch, times=1)
    with asym_runtime.load(folder, backend="onnxruntime-cpu") as rt:
        assert published and rt.manifest.generation == published[0]
        assert rt.decode(LATENT).shape == (1, 3, 64, 64)


def _overtake(folder, monkeypatch, times):
    """Make every load of ``folder`` overtaken by an export, ``times`` times in all: each time, between
    the load's manifest read and its first file, a new generation is published and the one the
    load read is removed. Returns the list of generations published."""
    published = []
    original = Manifest.read_verified

    def overtaken(self, name):
        if len(published) < times and self.generation == read_manifest(folder).generation:
            new_gen = f"gen-20990101T0000{len(published):02d}Z-0000abcd"
            shutil.copytree(self.folder, folder / new_gen)
            edit_manifest(folder, lambda d: d.update(generation=new_gen))
            shutil.rmtree(self.folder)
            published.append(new_gen)
        return original(self, name)

    monkeypatch.setattr(Manifest, "read_verified", overtaken)
    return published


def test_a_load_overtaken_twice_still_loads_the_newest(tiny_artifact, copy_artifact, monkeypatch):
    """The load starts over more than once (docs/contracts.md: 3 tries in all): two exports in a
    row overtaking it still give the complete newest artifact."""
    folder = copy_artifact(tiny_artifact)
    published = _overtake(folder, monkeypatch, times=2)
    with asym_runtime.load(folder, backend="onnxruntime-cpu", graphs=("decoder_uncond",)) as rt:
        assert len(published) == 2 and rt.manifest.generation == published[-1]
        assert rt.decode(LATENT).shape == (1, 3, 64, 64)


@pytest.mark.parametrize("exports", [3, 100])
def test_a_load_overtaken_every_time_gives_up_with_an_artifact_error(tiny_artifact, copy_artifact, monkeypatch,
                                                                     exports):
    """Exports that keep overtaking it: the load gives up after its 3 tries with the missing file's
    ArtifactError (not an internal error, and not forever); a third export during one load is one
    too many."""
    folder = copy_artifact(tiny_artifact)
    published = _overtake(folder, monkeypatch, times=exports)
    with pytest.raises(ArtifactError, match="is listed in manifest.json but missing"):
        _decode(folder)
    assert len(published) == 3, published  # one per try


def test_a_file_missing_without_a_new_export_is_not_retried(tiny_artifact, copy_artifact, monkeypatch, caplog):
    """A file gone while the manifest still names the same generation is a broken folder, not an
    export in progress: refused at once, without loading again or logging that it was replaced."""
    import logging

    import asym_runtime.api as api

    folder = copy_artifact(tiny_artifact)
    read_manifest(folder).path("decoder_uncond.onnx").unlink()
    reads = []
    monkeypatch.setattr(api, "read_manifest", lambda path: reads.append(path) or read_manifest(path))
    with caplog.at_level(logging.INFO, logger="asym_runtime"):
        with pytest.raises(ArtifactError, match="decoder_uncond.onnx is listed in manifest.json but missing"):
            _decode(folder)
    assert "replaced by a new export" not in caplog.text
    assert len(reads) == 2  # the load's read, and the one that found the same generation


def test_a_linked_folder_inside_the_generation_is_refused(tiny_artifact, copy_artifact, tmp_path):
    """Not only the file itself: a folder on the way to it that is a link (engines/ -> elsewhere)
    is refused too, or the link's target would be read as the artifact's."""
    from asym_runtime.files import refuse_links

    folder = copy_artifact(tiny_artifact)
    m = read_manifest(folder)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "decoder.plan").write_bytes(b"plan")
    os.symlink(elsewhere, m.folder / "engines")
    with pytest.raises(ArtifactError, match=r"engines is a symbolic link"):
        refuse_links(m.root, f"{m.generation}/engines/decoder.plan")
    assert refuse_links(m.root, f"{m.generation}/decoder_uncond.onnx") == m.path("decoder_uncond.onnx")


def _external(name: str, location: str | None):
    from onnx import TensorProto

    t = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=[1], data_location=TensorProto.EXTERNAL)
    if location is not None:
        t.external_data.add(key="location", value=location)
    t.external_data.add(key="offset", value="0")
    return t


def _model_with_external_tensors_everywhere():
    """A model whose tensors keep their data outside it in every place ONNX allows one: an
    initializer, a sparse initializer, a node attribute (t and tensors), a sparse attribute, a
    subgraph's initializer and node, and a function's node."""
    from onnx import AttributeProto, FunctionProto, GraphProto, ModelProto, NodeProto, SparseTensorProto, helper

    sub = GraphProto(name="body", initializer=[_external("sub_init", "sub_init.bin")])
    sub.node.append(helper.make_node("Constant", [], ["c"], value=_external("sub_attr", "sub_attr.bin")))
    node = NodeProto(op_type="If", input=["cond"], output=["y"])
    node.attribute.append(helper.make_attribute("then_branch", sub))
    const = helper.make_node("Constant", [], ["k"], value=_external("attr_t", "attr_t.bin"))
    listed = NodeProto(op_type="Custom", output=["z"])
    listed.attribute.append(AttributeProto(name="tensors", type=AttributeProto.TENSORS,
                                           tensors=[_external("attr_ts", "attr_ts.bin")]))
    sparse_attr = NodeProto(op_type="Constant", output=["s"])
    sparse_attr.attribute.append(AttributeProto(
        name="sparse_value", type=AttributeProto.SPARSE_TENSOR,
        sparse_tensor=SparseTensorProto(values=_external("sa_v", "sparse_attr_values.bin"),
                                        indices=_external("sa_i", "sparse_attr_indices.bin"), dims=[4])))
    graph = GraphProto(name="g", node=[const, node, listed, sparse_attr],
                       initializer=[_external("init", "init.bin")],
                       sparse_initializer=[SparseTensorProto(values=_external("si_v", "sparse_values.bin"),
                                                             indices=_external("si_i", "sparse_indices.bin"),
                                                             dims=[4])])
    fn = FunctionProto(name="f", domain="local",
                       node=[helper.make_node("Constant", [], ["f"], value=_external("fn_attr", "function.bin"))])
    return ModelProto(graph=graph, functions=[fn])


def test_external_data_is_found_wherever_a_graph_can_keep_a_tensor():
    """Every place a tensor may read external data is looked at; a location missed here would be
    opened by ONNX Runtime unchecked."""
    from asym_runtime.onnx_data import external_locations

    model = _model_with_external_tensors_everywhere()
    assert sorted(external_locations(model.SerializeToString(), "m.onnx")) == sorted([
        "init.bin", "sparse_values.bin", "sparse_indices.bin", "attr_t.bin", "attr_ts.bin",
        "sparse_attr_values.bin", "sparse_attr_indices.bin", "sub_init.bin", "sub_attr.bin", "function.bin"])


def test_external_data_without_a_location_or_a_model_that_is_not_onnx_is_refused():
    from onnx import GraphProto, ModelProto

    from asym_runtime.onnx_data import external_locations

    model = ModelProto(graph=GraphProto(initializer=[_external("w", None)]))
    with pytest.raises(ArtifactError, match=r"m.onnx: tensor 'w' is external but names no location"):
        external_locations(model.SerializeToString(), "m.onnx")
    with pytest.raises(ArtifactError, match=r"m.onnx is not an ONNX model"):
        external_locations(b"\xff\xff\xff not protobuf", "m.onnx")


def _open_on(path) -> list[str]:
    """This process's file descriptors open on ``path`` (Linux)."""
    fds = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == str(path):
                fds.append(fd)
        except OSError:  # closed meanwhile (the listing's own descriptor)
            pass
    return fds


@pytest.mark.parametrize("case", ["ok", "expect_size", "max_size", "fifo", "folder", "missing"])
def test_read_regular_checks_size_before_reading_and_closes_its_descriptor(tmp_path, case):
    from asym_runtime.errors import ArtifactMissing
    from asym_runtime.files import read_regular

    path = tmp_path / "f.bin"
    if case == "fifo":
        os.mkfifo(path)
    elif case == "folder":
        path.mkdir()
    elif case != "missing":
        path.write_bytes(b"0123456789")
    kwargs, error = {
        "ok": ({"expect_size": 10, "max_size": 10}, None),
        "expect_size": ({"expect_size": 11}, r"f.bin is 10 bytes, the manifest records 11"),
        "max_size": ({"max_size": 9}, r"f.bin is 10 bytes, more than the 9 a manifest may have"),
        "fifo": ({}, r"f.bin is not a regular file"),
        "folder": ({}, r"f.bin is not a regular file"),
        "missing": ({}, None),
    }[case]
    for _ in range(3):
        if case == "ok":
            assert read_regular(path, **kwargs) == b"0123456789"
        elif case == "missing":
            with pytest.raises(ArtifactMissing):
                read_regular(path)
        else:
            with pytest.raises(ArtifactError, match=error):
                read_regular(path, **kwargs)
    assert _open_on(path) == [], "read_regular left a file descriptor open"


def test_read_regular_reads_into_a_buffer_it_is_given(tmp_path):
    """allocate=: the bytes land in the caller's buffer (OpenVINO's own tensor for a cached
    compiled model, so import_model needs no copy), that very buffer is returned, and the file's
    checks come first: a wrong size allocates nothing."""
    import numpy as np

    from asym_runtime.files import read_regular

    path = tmp_path / "f.bin"
    path.write_bytes(b"0123456789")
    made = []

    def allocate(n):
        made.append(np.zeros(n, dtype=np.uint8))
        return made[-1]

    got = read_regular(path, allocate=allocate)
    assert got is made[0] and bytes(got) == b"0123456789"
    with pytest.raises(ArtifactError, match="the manifest records 11"):
        read_regular(path, expect_size=11, allocate=allocate)
    assert len(made) == 1
