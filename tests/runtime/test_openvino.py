"""The OpenVINO backend: FP32 on any CPU against diffusers, BF16 where OpenVINO computes it
(BF16 units, or emulated on AVX-512 with a warning; refused in one sentence elsewhere),
compiled models cached per graph digest."""

from __future__ import annotations


import numpy as np
import pytest

from runtime_helpers import check_race, race

import asym_runtime
from asym_export.feeds import make_feed
from asym_export.reference import reference_outputs
from asym_export.verify import BF16_TOLERANCE, FP32_MAX_ABS, VerificationReport
from asym_runtime.errors import BackendUnavailableError
from asym_runtime.names import BACKENDS
from asym_runtime.specs import DECODER, DECODER_UNCOND, ENCODER, Shape

ov_backend = pytest.importorskip("asym_runtime.backends.openvino")
pytestmark = pytest.mark.skipif(ov_backend.unavailable_reason() is not None, reason="openvino is not installed")

UNSEEN = [Shape(1, 64, 64), Shape(2, 72, 88)]  # not the export's verification shapes


def _bf16_reason():
    return ov_backend.bf16_reason() if ov_backend.unavailable_reason() is None else "openvino is not installed"


def _bf16_support():
    return ov_backend.bf16_support() if ov_backend.unavailable_reason() is None else "none"


@pytest.fixture(scope="module")
def ov_fp32(tiny_artifact, tmp_path_factory):
    rt = asym_runtime.load(tiny_artifact, backend="openvino", cache_dir=tmp_path_factory.mktemp("ovcache"))
    yield rt
    rt.close()


def _run(rt, graph, feed):
    if graph is ENCODER:
        d = rt.encode(feed["image"])
        return {"latent_mean": d.mean, "latent_logvar": d.logvar}
    if graph is DECODER:
        return {"sample": rt.decode(feed["latent"], image=feed["image"], mask=feed["mask"])}
    return {"sample": rt.decode(feed["latent"])}


@pytest.mark.parametrize("shape", UNSEEN, ids=str)
@pytest.mark.parametrize("graph", [ENCODER, DECODER, DECODER_UNCOND], ids=lambda g: g.name)
def test_fp32_matches_diffusers_within_the_fp32_tolerance(ov_fp32, tiny_vae, graph, shape):
    # what it reports is what load() takes: load(d, backend=vae.backend, precision=vae.precision)
    assert (ov_fp32.backend, ov_fp32.precision, ov_fp32.device) == ("openvino", "fp32", "cpu")
    assert ov_fp32.backend in BACKENDS
    feed = make_feed(graph, shape, seed=77, scaling_factor=0.18215)
    got, want = _run(ov_fp32, graph, feed), reference_outputs(tiny_vae, graph, feed)
    for name, ref in want.items():
        assert got[name].shape == ref.shape and got[name].dtype == np.float32
        assert np.abs(got[name] - ref).max() <= FP32_MAX_ABS, name


@pytest.mark.parametrize("graph", ["encoder", "decoder", "decoder_uncond"])
def test_the_embedded_model_is_the_graph_with_its_checked_weights(tiny_artifact, graph):
    """OpenVINO reads the model bytes embedded_model() splices together (the weights appended in
    protobuf's wire format, one copy instead of protobuf's five): parsed by onnx, they are the
    graph the protobuf path builds, every initializer with the same header and bytes, only in
    another order, and the ONNX checker accepts them."""
    import onnx

    from asym_runtime import read_manifest

    m = read_manifest(tiny_artifact)
    name = m.find(graph, "onnx", "fp32").name
    spliced = onnx.load_from_string(ov_backend.embedded_model(m.graph_source(name)))
    proto = onnx.load_from_string(ov_backend._embedded_through_protobuf(
        onnx.ModelProto.FromString(bytes(m.graph_source(name).model)), m.graph_source(name)))
    assert not any(t.external_data or t.data_location for t in spliced.graph.initializer)
    for t in proto.graph.initializer:  # the protobuf path writes data_location = DEFAULT (0) out; same meaning
        t.ClearField("data_location")
    inits = {t.name: t.SerializeToString(deterministic=True) for t in proto.graph.initializer}
    assert {t.name: t.SerializeToString(deterministic=True) for t in spliced.graph.initializer} == inits
    assert len(spliced.graph.initializer) == len(inits) and sum(len(t.raw_data) for t in spliced.graph.initializer) > 10**5
    del spliced.graph.initializer[:]
    del proto.graph.initializer[:]
    assert spliced.SerializeToString(deterministic=True) == proto.SerializeToString(deterministic=True)
    onnx.checker.check_model(onnx.load_from_string(ov_backend.embedded_model(m.graph_source(name))))


def test_a_tensor_reading_past_its_data_is_refused_on_both_paths(tiny_artifact):
    import dataclasses

    import onnx

    from asym_runtime import read_manifest
    from asym_runtime.errors import ArtifactError
    from asym_runtime.onnx_data import external_tensors

    m = read_manifest(tiny_artifact)
    source = m.graph_source(m.find("decoder", "onnx", "fp32").name)
    model = onnx.ModelProto.FromString(bytes(source.model))
    t = next(t for t in external_tensors(model) if t.data_location == onnx.TensorProto.EXTERNAL)
    for e in t.external_data:
        if e.key == "offset":
            e.value = str(10**12)
    source = dataclasses.replace(source, model=model.SerializeToString())
    with pytest.raises(ArtifactError, match="reads past the end of"):
        ov_backend.embedded_model(source)
    with pytest.raises(ArtifactError, match="reads past the end of"):
        ov_backend._embedded_through_protobuf(model, source)


def test_inputs_are_checked_as_on_every_backend(ov_fp32):
    with pytest.raises(asym_runtime.AsymInputError, match="multiple of 8"):
        ov_fp32.decode(np.zeros((1, 4, 8, 8), np.float32), image=np.zeros((1, 3, 60, 64), np.float32),
                       mask=np.zeros((1, 1, 60, 64), np.float32))


def test_threads_give_the_serial_results(ov_fp32):
    """One infer request per call (per-call state): 4 threads released together for 10 rounds,
    two of them on the same call each round, give exactly the serial results. Sharing one
    request between calls fails this test (seen: RuntimeError "Infer Request is busy")."""
    rng = np.random.default_rng(5)
    latents = [rng.standard_normal(s).astype(np.float32) for s in [(1, 4, 8, 8), (2, 4, 8, 12), (1, 4, 12, 8)]]
    calls = [lambda z=z: ov_fp32.decode(z) for z in latents]
    serial = [c() for c in calls]
    check_race(race(calls, threads=4, rounds=10), serial)


def test_the_cache_is_keyed_by_the_graph_digest(tiny_artifact, copy_artifact, tmp_path):
    """A second load reuses the compiled blob; a graph with other weights (another export) gets
    its own key and computes with its own weights, never the stale blob."""
    import json

    from asym_runtime.manifest import read_manifest, sha256_file

    cache = tmp_path / "cache"
    z = np.random.default_rng(6).standard_normal((1, 4, 8, 8)).astype(np.float32)

    def decode(folder):
        with asym_runtime.load(folder, backend="openvino", graphs="decoder_uncond", cache_dir=cache) as rt:
            return rt.decode(z)

    first = decode(tiny_artifact)
    keys = sorted(p.name for p in cache.iterdir())
    assert len(keys) == 1 and any(cache.rglob("*.blob")), "OpenVINO wrote no compiled model into the cache"
    np.testing.assert_array_equal(decode(tiny_artifact), first)
    assert sorted(p.name for p in cache.iterdir()) == keys  # reused

    other = copy_artifact(tiny_artifact)
    data_file = read_manifest(other).path("decoder_uncond.onnx.data")
    raw = np.frombuffer(data_file.read_bytes(), dtype=np.float32).copy()
    raw *= 1.5  # other weights, same graph
    data_file.write_bytes(raw.tobytes())
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["files"]["decoder_uncond.onnx.data"]["sha256"] = sha256_file(data_file)
    (other / "manifest.json").write_text(json.dumps(manifest))
    second = decode(other)
    assert len(list(cache.iterdir())) == 2
    assert np.abs(second - first).max() > 1e-2


def test_a_model_from_the_cache_keeps_the_memory_its_weights_are_in(tiny_artifact, tmp_path):
    """A cached compiled model is imported from the tensor the blob was read into, and computes
    from that memory: it must stay with the model after the load returns (memory allocated and
    freed meanwhile must not change a decode)."""
    import gc

    cache = tmp_path / "cache"
    f = make_feed(DECODER, Shape(1, 64, 64), 5, 0.18215)
    with asym_runtime.load(tiny_artifact, backend="openvino", graphs="decoder", cache_dir=cache) as rt:
        compiled = rt.decode(f["latent"], image=f["image"], mask=f["mask"])
    assert list(cache.rglob("*.blob"))
    with asym_runtime.load(tiny_artifact, backend="openvino", graphs="decoder", cache_dir=cache) as rt:
        gc.collect()
        junk = [np.full(1 << 24, 7.0) for _ in range(4)]  # 512 MiB written over whatever was freed
        del junk
        gc.collect()
        for _ in range(2):
            np.testing.assert_array_equal(rt.decode(f["latent"], image=f["image"], mask=f["mask"]), compiled)


def _cached_decode(artifact, cache, seed):
    """A plain decode of one seeded latent by a fresh OpenVINO load on ``cache`` (each call loads)."""
    z = np.random.default_rng(seed).standard_normal((1, 4, 8, 8)).astype(np.float32)

    def decode():
        with asym_runtime.load(artifact, backend="openvino", graphs="decoder_uncond", cache_dir=cache) as rt:
            return rt.decode(z)

    return decode


def test_a_damaged_cached_blob_is_never_run(tiny_artifact, tmp_path, caplog):
    """The second load imports the cached blob (logged); a blob with 4 KiB flipped in the middle
    (OpenVINO itself imports such a blob and computes wrong numbers: up to 1.96 off on a [-1, 1]
    image) is found by its sha256, deleted and compiled again, and the decode is the clean one."""
    import logging

    cache = tmp_path / "cache"
    decode = _cached_decode(tiny_artifact, cache, seed=7)

    clean = decode()
    (blob,) = cache.rglob("compiled-*.blob")
    with caplog.at_level(logging.DEBUG, logger="asym_runtime.backends.openvino"):
        np.testing.assert_array_equal(decode(), clean)
    assert "compiled model from the cache" in caplog.text
    data = bytearray(blob.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 4096] = bytes(b ^ 0xFF for b in data[mid:mid + 4096])
    blob.write_bytes(data)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="asym_runtime.backends.openvino"):
        np.testing.assert_array_equal(decode(), clean)
    assert "is damaged (its sha256 does not match its name)" in caplog.text
    assert not blob.exists() and len(list(cache.rglob("compiled-*.blob"))) == 1  # replaced by a good one
    assert not list(cache.rglob(".tmp-*"))  # nothing half-written left


def test_a_cache_that_cannot_be_written_is_skipped(tiny_artifact, tmp_path, caplog):
    in_the_way = tmp_path / "a-file"
    in_the_way.write_text("not a folder")
    z = np.random.default_rng(8).standard_normal((1, 4, 8, 8)).astype(np.float32)
    with asym_runtime.load(tiny_artifact, backend="openvino", graphs="decoder_uncond", cache_dir=False) as rt:
        want = rt.decode(z)
    with asym_runtime.load(tiny_artifact, backend="openvino", graphs="decoder_uncond",
                           cache_dir=in_the_way / "cache") as rt:
        np.testing.assert_array_equal(rt.decode(z), want)
    assert "cannot be used (Not a directory); compiling without it" in caplog.text


def test_the_cache_keeps_within_its_size_limit(tiny_artifact, tmp_path, monkeypatch):
    """Each export adds a blob about its weights' size: after a blob is written, the least
    recently used blobs of the whole cache go until it fits the limit, never the blob just
    written; temporary files killed writers left (over an hour old) go too, a writer's fresh one
    stays; a blob imported from the cache counts as used now. The other keys' blobs here are
    bytes nobody imports: only what the cache deletes is checked."""
    import os
    import time

    cache = tmp_path / "cache"
    decode = _cached_decode(tiny_artifact, cache, seed=9)

    want = decode()
    (ours,) = cache.rglob("compiled-*.blob")
    size = ours.stat().st_size
    now = time.time()
    others = {}
    for name, age_days in (("oldest", 3), ("older", 2), ("recent", 1)):
        blob = cache / f"key-{name}" / "compiled-0.blob"
        blob.parent.mkdir()
        blob.write_bytes(b"x" * 100_000)
        os.utime(blob, (now - age_days * 86400,) * 2)
        others[name] = blob
    stale, fresh = cache / "key-oldest" / ".tmp-killed", cache / "key-recent" / ".tmp-writing"
    for tmp, age in ((stale, 7200), (fresh, 10)):
        tmp.write_bytes(b"half")
        os.utime(tmp, (now - age,) * 2)
    os.utime(ours, (now - 4 * 86400,) * 2)  # our key was used longest ago ...
    np.testing.assert_array_equal(decode(), want)
    assert ours.stat().st_mtime > now - 60  # ... until this import from the cache

    ours.unlink()  # the next load compiles and writes again; the cache is then over the limit
    monkeypatch.setenv("ASYM_OPENVINO_CACHE_MAX_GB", repr((size + 150_000) / 2**30))
    np.testing.assert_array_equal(decode(), want)
    (ours,) = cache.glob("*/compiled-[0-9a-f]*[0-9a-f].blob")
    assert not others["oldest"].exists() and not others["older"].exists() and others["recent"].exists()
    assert not (cache / "key-older").exists()  # a key's emptied folder goes with its blob
    assert not stale.exists() and fresh.exists()

    ours.unlink()
    monkeypatch.setenv("ASYM_OPENVINO_CACHE_MAX_GB", "0")  # nothing fits: only the new blob stays
    np.testing.assert_array_equal(decode(), want)
    (left,) = cache.rglob("compiled-*.blob")  # OpenVINO's export differs from compile to compile
    assert left.parent == ours.parent and not others["recent"].exists()


def test_pruning_skips_a_key_folder_another_process_removed_meanwhile(tmp_path, monkeypatch):
    """Another process evicting removes a key's emptied folder; when that happens between this
    process listing the cache and listing that folder, the pruning goes on (it raised
    FileNotFoundError out of load() before). The timing is forced: the folder is really removed
    right after the cache's root is listed."""
    import os
    import shutil

    root = tmp_path / "cache"
    for key in ("key-a", "key-gone", "key-b"):
        (root / key).mkdir(parents=True)
        (root / key / "compiled-0.blob").write_bytes(b"x" * 1000)
    real = os.scandir

    class Listed:
        def __init__(self, entries):
            self.entries = entries

        def __iter__(self):
            return iter(self.entries)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def close(self):
            pass

    def scandir(path="."):
        if not isinstance(path, (str, os.PathLike)) or os.fspath(path) != os.fspath(root):
            return real(path)
        with real(path) as it:
            entries = list(it)
        shutil.rmtree(root / "key-gone", ignore_errors=True)  # the other process, between the listings
        return Listed(entries)

    monkeypatch.setattr(os, "scandir", scandir)
    removed = ov_backend.prune_cache(root, limit=1000)
    assert [p.parent.name for p in removed] in (["key-a"], ["key-b"])  # 2000 bytes left, 1000 allowed
    assert len(list(root.glob("*/compiled-*.blob"))) == 1


@pytest.mark.parametrize("value, limit", [(None, 10 * 2**30), ("1.5", int(1.5 * 2**30)), ("0", 0),
                                          ("ten", 10 * 2**30), ("-1", 10 * 2**30), ("nan", 10 * 2**30)])
def test_the_cache_limit_comes_from_the_environment(monkeypatch, caplog, value, limit):
    if value is None:
        monkeypatch.delenv("ASYM_OPENVINO_CACHE_MAX_GB", raising=False)
    else:
        monkeypatch.setenv("ASYM_OPENVINO_CACHE_MAX_GB", value)
    assert ov_backend.cache_limit_bytes() == limit
    bad = value in ("ten", "-1", "nan")
    assert ("is not a size in GiB (a number >= 0); using 10" in caplog.text) == bad


def test_openvino_runs_the_portable_graphs_and_says_so(ov_fp32):
    """What the loaded VAE reports is what ran: OpenVINO runs the portable FP32 graphs on the CPU."""
    assert (ov_fp32.graph_form, ov_fp32.device) == ("portable", "cpu")
    assert {b.name for b in ov_fp32.backends.values()} == {"openvino"}


def test_cache_dir_true_is_the_default_cache(tiny_artifact, tmp_path, monkeypatch):
    """cache_dir=True (load's signature takes a bool) means the default cache under
    $XDG_CACHE_HOME, like None; only False turns the cache off."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    with asym_runtime.load(tiny_artifact, backend="openvino", graphs="decoder_uncond", cache_dir=True) as rt:
        rt.decode(np.zeros((1, 4, 8, 8), np.float32))
    assert list((tmp_path / "xdg" / "asym-export" / "openvino").rglob("compiled-*.blob"))


def test_check_loadable_reads_the_files_openvino_would_run(tiny_artifact, copy_artifact):
    """check_loadable(backend="openvino") checks every FP32 graph and data file as load() does: a
    damaged data file is refused by both, before OpenVINO starts."""
    from asym_runtime.errors import ArtifactError
    from asym_runtime.manifest import read_manifest

    folder = copy_artifact(tiny_artifact)
    path = read_manifest(folder).path("decoder.onnx.data")
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 1
    path.write_bytes(bytes(raw))
    with pytest.raises(ArtifactError, match="sha256 of decoder.onnx.data"):
        asym_runtime.check_loadable(folder, backend="openvino")
    with pytest.raises(ArtifactError, match="sha256 of decoder.onnx.data"):
        asym_runtime.load(folder, backend="openvino", cache_dir=False)


def test_bf16_needs_openvino_and_a_precision_it_runs():
    with pytest.raises(ValueError, match="precision 'bf16' runs on backend='openvino' only"):
        asym_runtime.load("unused", backend="onnxruntime-cpu", precision="bf16")
    with pytest.raises(ValueError, match="precision 'fp16': OpenVINO runs fp32 or bf16"):
        asym_runtime.load("unused", backend="openvino", precision="fp16")


@pytest.mark.skipif(_bf16_reason() is None, reason="OpenVINO computes BF16 on this CPU")
def test_bf16_on_a_cpu_without_bf16_is_refused_in_one_sentence(tiny_artifact):
    with pytest.raises(BackendUnavailableError, match=r"^this CPU has no BF16 units \(OpenVINO reports [A-Z0-9_, ]+; "
                                                      r"its BF16 needs Intel AMX, AVX512-BF16 or AVX-NE-CONVERT, or "
                                                      r"AVX-512 to emulate it\); use precision='fp32'$"):
        asym_runtime.load(tiny_artifact, backend="openvino", precision="bf16")


@pytest.mark.skipif(_bf16_support() != "emulated", reason="OpenVINO does not emulate BF16 on this CPU")
def test_emulated_bf16_loads_with_a_warning_and_computes_bf16(tiny_artifact, caplog):
    """AVX-512 without BF16 units: OpenVINO computes BF16 in software. The load says so (it is
    slower than FP32), and the numbers are BF16's: they differ from FP32's by more than FP32
    rounding and by no more than BF16's floors allow (the floors test below)."""
    z = np.random.default_rng(3).standard_normal((1, 4, 8, 8)).astype(np.float32)
    with caplog.at_level("WARNING", logger="asym_runtime.api"):
        bf16 = asym_runtime.load(tiny_artifact, backend="openvino", precision="bf16", cache_dir=False)
    with bf16, asym_runtime.load(tiny_artifact, backend="openvino", cache_dir=False) as fp32:
        assert bf16.precision == "bf16"
        diff = np.abs(bf16.decode(z) - fp32.decode(z)).max()
    assert diff > 1e-3, diff  # FP32 throughout would agree to ~1e-6
    emulated = [r.getMessage() for r in caplog.records if "no BF16 units" in r.getMessage()]
    assert len(emulated) == 1 and "the speed is below FP32's" in emulated[0], emulated  # once per load


@pytest.mark.skipif(_bf16_reason() is not None, reason=str(_bf16_reason()))
@pytest.mark.parametrize("graph", [ENCODER, DECODER, DECODER_UNCOND], ids=lambda g: g.name)
def test_bf16_meets_its_floors_at_unseen_shapes(tiny_artifact, tiny_vae, graph):
    report = VerificationReport("openvino_bf16", BF16_TOLERANCE)
    with asym_runtime.load(tiny_artifact, backend="openvino", precision="bf16", cache_dir=False) as rt:
        assert rt.precision == "bf16"
        for shape in UNSEEN:
            feed = make_feed(graph, shape, seed=78, scaling_factor=0.18215)
            report.add(graph, shape, reference_outputs(tiny_vae, graph, feed), _run(rt, graph, feed))
    assert report, report.failure_lines()


@pytest.mark.slow
@pytest.mark.skipif(_bf16_reason() is not None, reason=str(_bf16_reason()))
@pytest.mark.parametrize("graph", [ENCODER, DECODER, DECODER_UNCOND], ids=lambda g: g.name)
def test_x2_bf16_meets_its_floors_at_real_size(x2_artifact, x2_vae, graph):
    """The real-size x2 graphs in BF16 at 64-128 pixels (not the export's verification shapes):
    the floors hold where the error accumulates over the real depth, not only on the tiny model.
    Measured with OpenVINO's emulated BF16 on an AVX-512 Xeon (seeded weights): decoder 46.8 and
    47.6 dB, plain decoder 48.5 and 48.3, encoder latent mean 51.2 and 53.2 (floor 44 dB); an
    AMX Xeon gave 44.5 dB for the decoder at 256 with another feed: little margin."""
    report = VerificationReport("openvino_bf16_x2", BF16_TOLERANCE)
    with asym_runtime.load(x2_artifact, backend="openvino", precision="bf16", graphs=(graph.name,),
                           cache_dir=False) as rt:
        for shape in [Shape(1, 64, 128), Shape(1, 128, 96)]:
            feed = make_feed(graph, shape, seed=79, scaling_factor=x2_vae.config.scaling_factor)
            report.add(graph, shape, reference_outputs(x2_vae, graph, feed), _run(rt, graph, feed))
    assert report, report.failure_lines()


def test_load_memory_reports_a_loads_peak_and_the_weights(tiny_artifact, tmp_path):
    """scripts/load_memory.py (the README's load-memory numbers): one load in a process of its own,
    its peak and what stays, beside the size of the graph's weights."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from asym_runtime import read_manifest

    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "mem.json"
    p = subprocess.run([sys.executable, "scripts/load_memory.py", str(tiny_artifact), "--backend", "openvino",
                        "--graph", "decoder", "--cache-dir", str(tmp_path / "cache"), "--json", str(out)],
                       cwd=root, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    got = json.loads(out.read_text())
    m = read_manifest(tiny_artifact)
    data = m.path(m.find("decoder", "onnx", "fp32").name + ".data").stat().st_size
    assert got["weights_gib"] == round(data / 2**30, 3) > 0
    assert got["backend"] == "openvino" and got["precision"] == "fp32" and got["graph"] == "decoder"
    assert got["peak_gib"] >= got["after_gib"] and got["peak_gib"] > 0
    assert "x the weights" in p.stdout and list((tmp_path / "cache").rglob("*.blob"))
