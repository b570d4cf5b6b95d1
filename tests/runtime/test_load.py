"""Loading refuses folders it cannot trust: missing or tampered files, other schemas, foreign engines."""

import logging

import pytest

import asym_runtime
from asym_runtime.backends.tensorrt import check_engine_compatibility, unavailable_reason
from asym_runtime.errors import ArtifactError, BackendUnavailableError, IncompatibleEngineError
from asym_runtime.manifest import read_manifest

from manifest_edits import ENGINES_META, edit_manifest


def _file(folder, name):
    """Where the folder's current generation keeps ``name``."""
    return read_manifest(folder).path(name)


def _flip_byte(path, offset=-100):
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x01
    path.write_bytes(bytes(raw))


def test_a_folder_without_manifest_is_refused(tmp_path):
    with pytest.raises(ArtifactError, match="has no manifest.json"):
        asym_runtime.load(tmp_path)
    with pytest.raises(ArtifactError, match="is not a folder"):
        asym_runtime.load(tmp_path / "nope")


@pytest.mark.parametrize("version, message", [
    (3, "schema_version 3; this asym_runtime reads only version 2"),
    (1, r"schema_version 1 \(version 1 folders keep their files beside the manifest\)"),
    (True, "schema_version True; this asym_runtime reads only version 2"),  # a bool is not an int
    ("2", "schema_version '2'"),
    (2.0, r"schema_version 2.0"),  # the JSON schema takes 2.0 for 2; the reader must not
])
def test_another_schema_version_is_refused(tiny_artifact, copy_artifact, version, message):
    folder = copy_artifact(tiny_artifact)
    edit_manifest(folder, lambda d: d.update(schema_version=version))
    with pytest.raises(ArtifactError, match=message):
        asym_runtime.load(folder)


def _set(path, value):
    def change(d):
        *parents, last = path
        for k in parents:
            d = d[k]
        d[last] = value
    return change


@pytest.mark.parametrize("change, message", [
    (lambda d: d.update(files=[]), r"at 'files': \[\] is not of type 'object'"),
    (lambda d: d.update(model_config="x"), r"at 'model_config': 'x' is not of type 'object'"),
    (lambda d: d.update(scaling_factor="abc"), r"at 'scaling_factor': 'abc' is not of type 'number'"),
    (lambda d: d.update(scaling_factor=0), r"at 'scaling_factor': 0 is less than or equal to the minimum of 0"),
    (lambda d: d["shape_limits"].update(min_height=65), "'shape_limits' is unusable: .*8"),
    (lambda d: d["shape_limits"].pop("max_batch"), r"at 'shape_limits': 'max_batch' is a required property"),
    (lambda d: d["shape_limits"].update(max_batch=True), r"at 'shape_limits/max_batch': True is not of type 'integer'"),
    (_set(["files", "decoder.onnx", "sha256"], 123), r"at 'files/decoder.onnx/sha256': 123 is not of type 'string'"),
    (_set(["files", "decoder.onnx", "size"], "12"), r"at 'files/decoder.onnx/size': '12' is not of type 'integer'"),
    (_set(["files", "decoder.onnx", "role"], "vocoder"), r"at 'files/decoder.onnx/role': 'vocoder' is not one of"),
    (lambda d: d["files"].update({"../x.onnx": d["files"]["decoder.onnx"]}), r"at 'files': '../x.onnx' does not match"),
    (lambda d: d["files"].update({"/etc/x.onnx": d["files"]["decoder.onnx"]}), r"at 'files': '/etc/x.onnx' does not match"),
    (lambda d: d["files"].update({"engines\\x.plan": d["files"]["decoder.onnx"]}),
     r"at 'files': 'engines\\\\x.plan' does not match"),
    (lambda d: d.update(generation="../elsewhere"), r"at 'generation': '../elsewhere' does not match"),
    (lambda d: d.update(generation="20260101T000000Z-deadbeef"), r"at 'generation': '20260101T000000Z-deadbeef' does "
                                                                 "not match"),
    (lambda d: d.pop("generation"), r"at the top level: 'generation' is a required property"),
], ids=["files", "model_config", "scaling_factor", "scaling_factor-0", "limits-not-8", "limits-missing",
        "limits-bool", "sha256-int", "size-str", "role", "name-dotdot", "name-absolute", "name-backslash",
        "generation-outside", "generation-without-prefix", "generation-missing"])
def test_a_malformed_manifest_is_an_artifact_error(tiny_artifact, copy_artifact, change, message):
    folder = copy_artifact(tiny_artifact)
    edit_manifest(folder, change)
    with pytest.raises(ArtifactError, match=message):
        asym_runtime.load(folder, backend="onnxruntime-cpu")


@pytest.mark.parametrize("text, message", [
    ('{"schema_version": 2, "scaling_factor": Infinity}', "Infinity is not JSON"),
    ('{"schema_version": 2, "scaling_factor": NaN}', "NaN is not JSON"),
    ('{"schema_version": 2, "scaling_factor": 1e400}', "1e400 is not a finite number"),
    ("[" * 200_000 + "]" * 200_000, "nested deeper than 32 levels"),
    ('{"a": ' * 40 + "1" + "}" * 40, "nested deeper than 32 levels"),
    ('{"a": ' * 33 + "1" + "}" * 33, "nested deeper than 32 levels"),  # one past the limit
    ("\xff\xfe", "is not valid JSON"),
    ("[1, 2]", "does not hold a JSON object"),
], ids=["infinity", "nan", "overflow", "deep-200k", "deep-40", "deep-33", "not-utf8", "list"])
def test_manifest_json_that_no_schema_can_hold_is_an_artifact_error(tiny_artifact, copy_artifact, text, message):
    folder = copy_artifact(tiny_artifact)
    (folder / "manifest.json").write_bytes(text.encode("latin-1"))
    with pytest.raises(ArtifactError, match=message):
        asym_runtime.load(folder)


def test_a_manifest_nested_as_deep_as_allowed_passes_the_depth_check(tiny_artifact, copy_artifact):
    folder = copy_artifact(tiny_artifact)
    (folder / "manifest.json").write_text('{"a": ' * 32 + "1" + "}" * 32)
    with pytest.raises(ArtifactError) as e:  # refused later, by the schema: not for its depth
        asym_runtime.load(folder)
    assert "nested deeper" not in str(e.value) and "schema" in str(e.value)


def test_a_manifest_larger_than_any_of_ours_is_refused_before_parsing(tiny_artifact, copy_artifact):
    folder = copy_artifact(tiny_artifact)
    path = folder / "manifest.json"
    path.write_text(path.read_text() + " " * (16 << 20))  # still valid JSON, and the same manifest
    with pytest.raises(ArtifactError, match="more than the 16777216"):
        asym_runtime.load(folder)


def test_a_sha256_that_differs_only_in_its_last_digit_is_refused(tiny_artifact, copy_artifact):
    """The whole digest is compared, not a prefix of it."""
    folder = copy_artifact(tiny_artifact)

    def last_digit(d):
        sha = d["files"]["decoder.onnx"]["sha256"]
        d["files"]["decoder.onnx"]["sha256"] = sha[:-1] + ("0" if sha[-1] != "0" else "1")

    edit_manifest(folder, last_digit)
    with pytest.raises(ArtifactError, match=r"sha256 of decoder.onnx"):
        asym_runtime.load(folder, backend="onnxruntime-cpu")


def test_a_wrong_sha256_for_decoder_onnx_in_the_manifest_is_refused(tiny_artifact, copy_artifact):
    folder = copy_artifact(tiny_artifact)
    edit_manifest(folder, lambda d: d["files"]["decoder.onnx"].update(sha256="0" * 64))
    with pytest.raises(ArtifactError, match=r"sha256 of decoder.onnx is .*the manifest records 0000"):
        asym_runtime.load(folder, backend="onnxruntime-cpu")
    # verify_onnx=False is the documented way to skip the hash (the file itself is intact)
    with asym_runtime.load(folder, backend="onnxruntime-cpu", verify_onnx=False) as rt:
        assert rt.backend == "onnxruntime-cpu"


@pytest.mark.parametrize("damage", ["removed", "cut short"])
def test_an_unverified_load_of_a_damaged_folder_says_it_is_the_folder(tiny_artifact, copy_artifact, damage):
    """verify_onnx=False lets ONNX Runtime open the files itself, which reports a missing or
    truncated data file as a generic FAIL; the load then checks the files and raises the
    folder's ArtifactError (a ValueError), not the backend's BackendError."""
    folder = copy_artifact(tiny_artifact)
    data = _file(folder, "decoder.onnx.data")
    if damage == "removed":
        data.unlink()
    else:
        data.write_bytes(data.read_bytes()[:1000])
    with pytest.raises(ArtifactError, match=r"decoder\.onnx\.data"):
        asym_runtime.load(folder, backend="onnxruntime-cpu", graphs="decoder", verify_onnx=False)


@pytest.mark.parametrize("name", ["decoder.onnx", "decoder.onnx.data", "encoder.onnx.data"])
def test_a_tampered_file_is_refused(tiny_artifact, copy_artifact, name):
    folder = copy_artifact(tiny_artifact)
    _flip_byte(_file(folder, name))
    with pytest.raises(ArtifactError, match=rf"sha256 of {name} .*changed after export"):
        asym_runtime.load(folder)


def test_a_missing_file_is_refused(tiny_artifact, copy_artifact):
    folder = copy_artifact(tiny_artifact)
    _file(folder, "encoder.onnx").unlink()
    with pytest.raises(ArtifactError, match="encoder.onnx is listed in manifest.json but missing"):
        asym_runtime.load(folder)


def test_a_truncated_file_is_refused(tiny_artifact, copy_artifact):
    folder = copy_artifact(tiny_artifact)
    _file(folder, "decoder.onnx.data").write_bytes(b"short")
    with pytest.raises(ArtifactError, match=r"decoder.onnx.data is 5 bytes, the manifest records \d+"):
        asym_runtime.load(folder)


# --------------------------------------------------------------------------- engines

@pytest.mark.skipif(unavailable_reason() is None, reason="TensorRT can run here")
def test_auto_falls_back_to_onnxruntime_when_engines_cannot_run_here(with_engines, caplog):
    with caplog.at_level(logging.INFO, logger="asym_runtime"):
        with asym_runtime.load(with_engines) as rt:
            assert rt.backend.startswith("onnxruntime")
    assert "has TensorRT engines, but" in caplog.text
    with pytest.raises(BackendUnavailableError):
        asym_runtime.load(with_engines, backend="tensorrt")


def test_engine_bytes_are_checked_against_the_manifest(with_engines):
    m = read_manifest(with_engines)
    assert m.read_verified("engines/decoder.plan") == b"not a TensorRT plan decoder"
    _flip_byte(m.path("engines/decoder.plan"), 0)
    with pytest.raises(ArtifactError, match="sha256 of engines/decoder.plan"):
        m.read_verified("engines/decoder.plan")


def _check(meta=None, **machine):
    kw = dict(variant="tiny", tensorrt_version="10.13.0.35", compute_capability="9.0",
              device_name="NVIDIA H100 80GB HBM3")
    kw.update(machine)
    check_engine_compatibility(dict(ENGINES_META, **(meta or {})), **kw)


def test_engines_built_here_are_accepted():
    _check()
    _check(device_name="NVIDIA H100 PCIe")  # another model of the same compute capability


@pytest.mark.parametrize("meta, machine, message", [
    ({}, dict(tensorrt_version="10.14.1.48"), r"built with TensorRT 10.13.0.35 and this machine has 10.14.1.48"),
    ({}, dict(tensorrt_version="10.12.0.36"), r"built with TensorRT 10.13.0.35"),
    ({"version_compatible": True}, dict(tensorrt_version="10.12.0.36"), r"does not extend to 10.12.0.36"),
    ({"version_compatible": True, "tensorrt_version": "9.3.0.1"}, dict(tensorrt_version="11.0.0.1"),
     r"does not extend to 11.0.0.1"),
    ({}, dict(compute_capability="8.9"), r"compute capability 9.0 \(NVIDIA H100 80GB HBM3\), this GPU .*has 8.9"),
    ({"hardware_compatibility_level": "same_compute_capability"}, dict(compute_capability="8.0"),
     r"compute capability 9.0"),
    ({"hardware_compatibility_level": "ampere_plus"}, dict(compute_capability="7.5"),
     r"Ampere and later .*this GPU has compute capability 7.5"),
    ({"hardware_compatibility_level": "turing_plus"}, {}, r"unknown hardware_compatibility_level"),
    ({}, dict(variant="x2"), r"built for variant tiny, the folder holds x2"),
    ({"tensorrt_version": None}, {}, r"does not record the TensorRT version"),
    ({"device": {}}, {}, r"does not record the compute capability"),
], ids=["newer-trt", "older-trt", "vc-older", "vc-9-to-11", "other-cc", "same-cc-level", "ampere-plus-on-turing",
        "unknown-level", "variant", "no-version", "no-cc"])
def test_foreign_engines_are_refused(meta, machine, message):
    with pytest.raises(IncompatibleEngineError, match=message) as e:
        _check(meta, **machine)
    assert isinstance(e.value, ValueError)


@pytest.mark.parametrize("meta, machine", [
    ({"version_compatible": True}, dict(tensorrt_version="10.14.1.48")),
    ({"version_compatible": True}, dict(tensorrt_version="11.2.0.5")),
    ({"hardware_compatibility_level": "ampere_plus"}, dict(compute_capability="8.6")),
    ({"hardware_compatibility_level": "ampere_plus"}, dict(compute_capability="12.0")),
    ({}, dict(tensorrt_version="10.13.0")),
], ids=["vc-later-minor", "vc-10-to-11", "ampere-plus-on-8.6", "ampere-plus-on-12.0", "no-build-number"])
def test_compatible_engines_are_accepted(meta, machine):
    _check(meta, **machine)


def test_every_problem_is_listed_at_once():
    with pytest.raises(IncompatibleEngineError) as e:
        _check({}, variant="x2", tensorrt_version="11.0.0.1", compute_capability="8.0")
    msg = str(e.value)
    assert "variant" in msg and "TensorRT 10.13.0.35" in msg and "compute capability 9.0" in msg


def test_engines_are_taken_only_when_every_required_graph_has_one_of_the_asked_precision(with_engines, tiny_artifact,
                                                                                         tmp_path):
    """Which engines "auto" and "tensorrt" consider (asym_runtime.api._engine_entries; TensorRT
    itself cannot run here, so the choice is checked directly): the folder's FP16 engines for
    precision None or "fp16", none for "fp32" (those run the FP32 ONNX graphs), none for a
    selection with no engine at all, and none when a required graph (encoder, decoder) has no
    engine although another has."""
    import shutil

    from asym_runtime.api import _engine_entries
    from manifest_edits import add_engine_entries

    every = ("encoder", "decoder", "decoder_uncond")
    both = {"encoder": "engines/encoder.plan", "decoder": "engines/decoder.plan"}
    m = read_manifest(with_engines)
    assert _engine_entries(m, None, every) == both
    assert _engine_entries(m, "fp16", every) == both
    assert _engine_entries(m, "fp32", every) is None
    assert _engine_entries(m, None, ("decoder_uncond",)) is None
    assert _engine_entries(m, None, ("decoder", "decoder_uncond")) == {"decoder": "engines/decoder.plan"}

    folder = tmp_path / "decoder-engine-only"
    shutil.copytree(tiny_artifact, folder)
    add_engine_entries(folder, graphs=("decoder",))
    m = read_manifest(folder)
    assert _engine_entries(m, None, every) is None  # the encoder would have no engine
    assert _engine_entries(m, None, ("decoder",)) == {"decoder": "engines/decoder.plan"}


def test_the_engines_profile_and_the_manifests_limits_intersect():
    """A TensorRT load serves only shapes both the engines' profile and the manifest allow
    (asym_runtime.api._intersect, a pure function: no GPU needed to check it)."""
    from asym_runtime.api import _intersect
    from asym_runtime.specs import ShapeLimits

    manifest = ShapeLimits()  # batch 1/1/4, sizes 64/512/1024
    assert _intersect(manifest, None) is manifest
    engines = ShapeLimits(max_batch=2, min_height=128, opt_height=256, max_height=512, opt_width=1024)
    got = _intersect(manifest, engines)
    assert (got.min_batch, got.opt_batch, got.max_batch) == (1, 1, 2)
    assert (got.min_height, got.opt_height, got.max_height) == (128, 256, 512)
    # the engines' opt at the top of the common range is kept, not replaced by the manifest's
    assert (got.min_width, got.opt_width, got.max_width) == (64, 1024, 1024)
    # ranges that only touch share that one size
    touching = _intersect(ShapeLimits(opt_height=512, max_height=512),
                          ShapeLimits(min_height=512, opt_height=768, max_height=1024))
    assert (touching.min_height, touching.opt_height, touching.max_height) == (512, 512, 512)
    with pytest.raises(ArtifactError, match=r"share no height"):
        _intersect(ShapeLimits(opt_height=256, max_height=256),
                   ShapeLimits(min_height=512, opt_height=512, max_height=1024))


def test_a_manifest_listing_no_onnx_graphs_says_none(with_engines):
    """The refusal lists the precisions the folder has, and says "none" rather than leave the
    list empty when it has no ONNX graph at all (a manifest listing engines only)."""
    edit_manifest(with_engines, lambda d: d.update(files={
        n: e for n, e in d["files"].items() if e["format"] == "tensorrt_plan"}))
    with pytest.raises(ArtifactError, match=r"has no fp32 ONNX graph for encoder, decoder \(its manifest.json "
                                            r"lists precisions: none\)$"):
        asym_runtime.load(with_engines, backend="onnxruntime-cpu")


def test_the_precisions_named_are_those_of_the_onnx_graphs_not_the_engines(with_engines):
    """A folder with FP16 engines but FP32 ONNX graphs only: asked for FP16 on ONNX Runtime, the
    refusal names the ONNX graphs' precisions (fp32, with the hint to pass it), not the engines'."""
    edit_manifest(with_engines, lambda d: d.update(files={
        n: e for n, e in d["files"].items() if e["format"] == "tensorrt_plan" or e.get("precision") != "fp16"}))
    with pytest.raises(ArtifactError, match=r"no fp16 ONNX graph for encoder, decoder \(its manifest.json lists "
                                            r"precisions: fp32\); pass precision='fp32'"):
        asym_runtime.load(with_engines, backend="onnxruntime-cpu", precision="fp16")


def test_a_load_that_fails_part_way_ends_the_sessions_it_started(tiny_artifact, copy_artifact, monkeypatch):
    """The encoder and decoder sessions are up when the plain decoder's graph turns out to break
    its contract: the load fails with that ArtifactError and deactivates what it had started
    (a service retrying loads must not keep the weights of failed ones)."""
    import shutil

    from asym_runtime.backends.onnxrt import OnnxRuntimeBackend
    from asym_runtime.manifest import sha256_file

    folder = copy_artifact(tiny_artifact)
    gen = read_manifest(folder).folder
    shutil.copyfile(gen / "encoder.onnx", gen / "decoder_uncond.onnx")  # reads encoder.onnx.data, listed
    edit_manifest(folder, lambda d: d["files"]["decoder_uncond.onnx"].update(
        sha256=sha256_file(gen / "decoder_uncond.onnx"), size=(gen / "decoder_uncond.onnx").stat().st_size))
    started = []
    activate = OnnxRuntimeBackend.activate
    monkeypatch.setattr(OnnxRuntimeBackend, "activate", lambda self: started.append(self) or activate(self))
    with pytest.raises(ArtifactError, match="decoder_uncond.onnx has inputs"):
        asym_runtime.load(folder, backend="onnxruntime-cpu")
    assert [b.graph.name for b in started] == ["encoder", "decoder", "decoder_uncond"]
    assert not [b for b in started if b.active or b.session is not None]
