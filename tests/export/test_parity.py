"""asym-parity: every available backend against the reference; non-zero exit on failure."""

import json

import pytest

from asym_export.parity import EXIT_FAILED, EXIT_OK, EXIT_USAGE, main


def test_parity_passes_on_a_fresh_export(tiny_artifact, capsys):
    assert main([str(tiny_artifact)]) == EXIT_OK
    out = capsys.readouterr().out
    for graph, output in (("encoder", "latent_mean"), ("encoder", "latent_logvar"), ("decoder", "sample"),
                          ("decoder_uncond", "sample")):
        for shape in ("2x64x64", "1x64x96"):
            assert any(graph in line and output in line and shape in line and line.rstrip().endswith("ok")
                       for line in out.splitlines()), (graph, output, shape)
    assert "onnxruntime-cpu/fp32" in out and "asym-parity: passed" in out
    assert "skipped shape" not in out  # the default verification shapes lie inside the default limits


def test_parity_reports_shapes_outside_the_limits(tiny_artifact, capsys):
    assert main([str(tiny_artifact), "--shapes", "1x64x64,1x32x64"]) == EXIT_OK
    out = capsys.readouterr().out
    assert "skipped shape 1x32x64: outside the folder's shape limits" in out
    verdict = out.strip().splitlines()[-1]  # said in the verdict itself, not only above it
    assert verdict.startswith("asym-parity: passed (") and verdict.endswith("; shapes not compared: 1x32x64"), verdict


def test_parity_fails_with_exit_1_when_a_backend_is_off(tiny_artifact, capsys):
    # 1e-9 is below float32 rounding: every output fails, as a real numeric drift would
    assert main([str(tiny_artifact), "--atol", "1e-9", "--shapes", "1x64x64"]) == EXIT_FAILED
    captured = capsys.readouterr()
    assert "FAIL" in captured.out and "FAILED onnxruntime-cpu/fp32" in captured.err
    assert "decoder @ 1x64x64: sample: max abs" in captured.err


def test_parity_refuses_a_reference_that_is_not_the_exported_one(tiny_artifact, copy_artifact, capsys):
    folder = copy_artifact(tiny_artifact)
    data = json.loads((folder / "manifest.json").read_text())
    data["weights"]["seed"] = 1
    (folder / "manifest.json").write_text(json.dumps(data))
    assert main([str(folder)]) == EXIT_USAGE
    assert "not the weights this folder was exported from" in capsys.readouterr().err


def test_parity_refuses_a_variant_it_cannot_rebuild(tiny_artifact, copy_artifact, capsys):
    """The schema takes any variant name (the runtime needs only the model config); the reference
    needs the model: an unknown one was an unexpected ValueError, exit 1."""
    folder = copy_artifact(tiny_artifact)
    data = json.loads((folder / "manifest.json").read_text())
    data["variant"] = "x9"
    (folder / "manifest.json").write_text(json.dumps(data))
    assert main([str(folder)]) == EXIT_USAGE
    assert "variant 'x9' is not one this asym-export can rebuild the reference of" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["{missing}"], "is not a folder"),
    (["{tiny}", "--backends", "openvino-gpu"], "--backends openvino-gpu: choose from"),
    (["{tiny}", "--shapes", "1x60x64"], "multiples of 8"),
    (["{tiny}", "--shapes", "8x64x64"], "no comparison shape lies inside"),
    # names that select nothing in the folder were "no backend could run on this machine" (exit 1)
    (["{tiny}", "--backends", "tensorrt"], "--backends tensorrt: {tiny} offers nothing it names (TensorRT runs engines"),
    (["{tiny}", "--backends", "onnxruntime-cpu/bf16"], "(bf16 is OpenVINO's compute precision"),
    (["{tiny}", "--backends", "onnxruntime-cpu/fp32/portable"], "it offers onnxruntime-cpu/fp32, onnxruntime-cpu/fp16"),
    # empty lists ran the defaults; a negative seed was an unexpected error
    (["{tiny}", "--backends", ","], "--backends ',' names no backend"),
    (["{tiny}", "--shapes", ","], "--shapes ',' names no shape"),
    (["{tiny}", "--seed", "-1"], "--seed -1 must be >= 0"),
    (["{tiny}", "--atol", "inf"], "--atol inf must be a positive finite number"),
])
def test_parity_usage_errors_exit_2(tiny_artifact, tmp_path, capsys, argv, message):
    argv = [a.format(missing=tmp_path / "nope", tiny=tiny_artifact) for a in argv]
    assert main(argv) == EXIT_USAGE
    assert message.format(tiny=tiny_artifact) in capsys.readouterr().err


def test_a_backend_that_could_not_run_is_named_in_the_verdict(tiny_artifact, capsys):
    """A pass on the backends that ran must not read as a pass on one that was asked for and could
    not run: the verdict line names it, and each report says what it was judged by."""
    from asym_runtime.backends.onnxrt import cuda_provider_available

    if cuda_provider_available():
        pytest.skip("onnxruntime-gpu is installed")
    assert main([str(tiny_artifact), "--backends", "onnxruntime-cpu/fp32,onnxruntime-cuda/fp32",
                 "--shapes", "1x64x64"]) == EXIT_OK
    out = capsys.readouterr().out
    assert "onnxruntime-cpu/fp32: pass when max abs <= 0.001;" in out
    verdict = out.strip().splitlines()[-1]
    assert verdict.startswith("asym-parity: passed (onnxruntime-cpu/fp32); not run: onnxruntime-cuda/fp32"), verdict


def test_a_backend_that_fails_while_running_is_a_failure_and_the_others_still_run(tiny_artifact, capsys,
                                                                                monkeypatch):
    """On an H200 a cuDNN launch failed inside ONNX Runtime and took the whole comparison with
    it. Now that backend is a failure named in the verdict (exit 1) with ONNX Runtime's words,
    and the backends after it are still compared."""
    from failing_runs import make_runs_fail

    import asym_runtime

    real_load = asym_runtime.load

    def load(root, **kw):
        vae = real_load(root, **kw)
        if kw.get("precision") == "fp32":  # the first candidate fails; fp16, after it, must still run
            make_runs_fail(vae, "decoder")
        return vae

    monkeypatch.setattr(asym_runtime, "load", load)
    assert main([str(tiny_artifact), "--backends", "onnxruntime-cpu", "--shapes", "1x64x64"]) == EXIT_FAILED
    captured = capsys.readouterr()
    assert "FAILED onnxruntime-cpu/fp32: decoder at 1x64x64 did not run: ONNX Runtime (cpu, fp32) failed " \
           "running decoder at 1x64x64: " in captured.err
    assert "terminate flag" in captured.err
    assert "onnxruntime-cpu/fp16: pass when" in captured.out  # compared after the failure
    verdict = captured.out.strip().splitlines()[-1]
    assert verdict == "asym-parity: FAILED (onnxruntime-cpu/fp16, onnxruntime-cpu/fp32 (failed to run))", verdict


def test_a_backend_that_cannot_start_a_session_is_a_failure_and_the_others_still_run(tiny_artifact, capsys,
                                                                                   monkeypatch, tmp_path):
    """ONNX Runtime failing to create a session (on a GPU: cuDNN not starting) used to end the
    comparison as ArtifactError("cannot load"); now that backend is a named failure and the
    backends after it are still compared."""
    from failing_runs import make_sessions_fail

    import asym_runtime

    real_load = asym_runtime.load

    def load(root, **kw):
        if kw.get("precision") != "fp32":
            return real_load(root, **kw)
        with pytest.MonkeyPatch.context() as mp:  # only the first candidate's sessions fail
            make_sessions_fail(mp, tmp_path)
            return real_load(root, **kw)

    monkeypatch.setattr(asym_runtime, "load", load)
    assert main([str(tiny_artifact), "--backends", "onnxruntime-cpu", "--shapes", "1x64x64"]) == EXIT_FAILED
    captured = capsys.readouterr()
    assert "FAILED onnxruntime-cpu/fp32: did not load: ONNX Runtime could not create a session for " in captured.err
    assert "onnxruntime-cpu/fp16: pass when" in captured.out  # compared after the failure
    verdict = captured.out.strip().splitlines()[-1]
    assert verdict == "asym-parity: FAILED (onnxruntime-cpu/fp16, onnxruntime-cpu/fp32 (failed to run))", verdict


def test_a_folder_exported_from_pickle_weights_is_checked_with_consent(tiny_artifact, copy_artifact, tmp_path,
                                                                         tiny_vae, capsys):
    """An export made with --allow-pickle rebuilds its reference from the same .bin file: without
    --allow-pickle asym-parity refuses (exit 2, saying which flag), with it the folder is compared
    (before, no flag existed and such a folder could never be checked again)."""
    from asym_export.weights import state_dict_digest

    weights = tmp_path / "pickled"
    tiny_vae.save_pretrained(weights, safe_serialization=False)  # the weights tiny_artifact was made from
    folder = copy_artifact(tiny_artifact)
    data = json.loads((folder / "manifest.json").read_text())
    data["weights"] = {"source": "local", "location": str(weights), "state_dict_sha256": state_dict_digest(tiny_vae)}
    (folder / "manifest.json").write_text(json.dumps(data))
    common = [str(folder), "--backends", "onnxruntime-cpu/fp32", "--shapes", "1x64x64"]
    assert main(common) == EXIT_USAGE
    assert "pass --allow-pickle if you trust the file" in capsys.readouterr().err
    assert main([*common, "--allow-pickle"]) == EXIT_OK
    assert capsys.readouterr().out.strip().splitlines()[-1] == "asym-parity: passed (onnxruntime-cpu/fp32)"


def test_parity_with_no_runnable_backend_is_a_failure(tiny_artifact, capsys):
    from asym_runtime.backends.onnxrt import cuda_provider_available

    if cuda_provider_available():
        pytest.skip("onnxruntime-gpu is installed")
    assert main([str(tiny_artifact), "--backends", "onnxruntime-cuda", "--shapes", "1x64x64"]) == EXIT_FAILED
    captured = capsys.readouterr()
    assert "skipped onnxruntime-cuda/fp32" in captured.out and "no backend could run" in captured.err


def test_parity_offers_the_cuda_form_and_the_portable_graphs_on_cuda(tiny_artifact):
    from asym_export.parity import candidates
    from asym_runtime import read_manifest

    labels = [c.label for c in candidates(read_manifest(tiny_artifact))]
    assert labels == ["onnxruntime-cpu/fp32", "onnxruntime-cpu/fp16",
                      "onnxruntime-cuda/fp32", "onnxruntime-cuda/fp32/portable",
                      "onnxruntime-cuda/fp16", "onnxruntime-cuda/fp16/portable",
                      "openvino/fp32", "openvino/bf16"]


def test_parity_shapes_limits_means_min_opt_max(tiny_artifact, monkeypatch, capsys):
    import asym_export.parity as parity
    from asym_runtime.specs import Shape

    seen = {}

    def fake(root, **kw):  # the comparison itself is tested above; here only what it is asked
        seen.update(kw)
        raise parity.ParityError("stop here")

    monkeypatch.setattr(parity, "run_parity", fake)
    assert main([str(tiny_artifact), "--shapes", "limits"]) == EXIT_USAGE
    assert seen["shapes"] == [Shape(1, 64, 64), Shape(1, 512, 512), Shape(4, 1024, 1024)]
    assert seen["reference_device"] == "cpu"


def test_parity_backends_take_the_names_the_report_prints(tiny_artifact):
    from asym_export.parity import candidates
    from asym_runtime import read_manifest

    m = read_manifest(tiny_artifact)
    assert [c.label for c in candidates(m, ["onnxruntime-cuda/fp16"])] == [
        "onnxruntime-cuda/fp16", "onnxruntime-cuda/fp16/portable"]
    assert [c.label for c in candidates(m, ["onnxruntime-cuda/fp32/portable", "openvino"])] == [
        "onnxruntime-cuda/fp32/portable", "openvino/fp32", "openvino/bf16"]


def test_parity_refuses_a_bench_only_option(tiny_artifact, capsys):
    assert main([str(tiny_artifact), "--backends", "onnxruntime-cuda/fp16/cudagraph"]) == EXIT_USAGE
    assert "--backends onnxruntime-cuda/fp16/cudagraph: choose from" in capsys.readouterr().err
