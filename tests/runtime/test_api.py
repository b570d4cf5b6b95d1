"""asym_runtime.load / encode / decode on the tiny artifact: diffusers' numbers, diffusers' calls."""

import numpy as np
import pytest
import torch
from runtime_helpers import diffusers_decode, diffusers_encode, feed

import asym_runtime
from asym_runtime.backends.onnxrt import cuda_provider_available
from asym_runtime.errors import ArtifactError, BackendUnavailableError
from asym_runtime.specs import Shape

#: Tolerance of the tiny FP32 comparisons. The export holds the graphs to 1e-3 (the contract,
#: sized for real weights); on the tiny model ONNX Runtime and PyTorch measure at most ~1e-5
#: apart (float32 summation order), while a semantic slip (wrong branch, mask polarity, a
#: missing blend) moves outputs by 1e-1 or more. 1e-4 is ten times the measured error.
ATOL = 1e-4

#: Shapes other than the export shape (2x64x64): non-square, another batch, odd latent sizes.
SHAPES = [Shape(2, 64, 96), Shape(1, 72, 64)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_encode_matches_diffusers(tiny_rt, tiny_vae, shape):
    image = feed("encoder", shape, seed=1)["image"]
    dist = tiny_rt.encode(image)
    ref = diffusers_encode(tiny_vae, image)
    assert dist.mean.shape == (shape.batch, 4, shape.height // 8, shape.width // 8)
    for name in ("mean", "logvar", "std", "var"):
        np.testing.assert_allclose(getattr(dist, name), getattr(ref, name).numpy(), atol=ATOL, rtol=0,
                                   err_msg=name)
    assert dist.mode() is dist.mean


@pytest.mark.parametrize("mask", ["random", "zeros", "ones"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_conditional_decode_matches_diffusers(tiny_rt, tiny_vae, shape, mask):
    f = feed("decoder", shape, seed=2, mask=mask)
    out = tiny_rt.decode(f["latent"], image=f["image"], mask=f["mask"])
    assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == f["image"].shape
    np.testing.assert_allclose(out, diffusers_decode(tiny_vae, **f), atol=ATOL, rtol=0)


def test_plain_decode_matches_diffusers_decode_z(tiny_rt, tiny_vae):
    f = feed("decoder", Shape(2, 64, 96), seed=3)
    ref = diffusers_decode(tiny_vae, f["latent"])
    np.testing.assert_allclose(tiny_rt.decode(f["latent"]), ref, atol=ATOL, rtol=0)
    # ...and the plain decode really is another function than the conditional one
    cond = diffusers_decode(tiny_vae, **f)
    assert np.abs(cond - ref).max() > 1000 * ATOL


@pytest.fixture(scope="module")
def fallback_rt(tiny_artifact, tmp_path_factory):
    """The tiny folder without a decoder_uncond graph (as exports before that graph wrote)."""
    import json
    import shutil

    folder = tmp_path_factory.mktemp("no-uncond") / "artifact"
    shutil.copytree(tiny_artifact, folder)
    data = json.loads((folder / "manifest.json").read_text())
    data["files"] = {n: e for n, e in data["files"].items()
                     if e["role"] != "decoder_uncond" and not (e.get("data_of") or "").startswith("decoder_uncond")}
    (folder / "manifest.json").write_text(json.dumps(data))
    with asym_runtime.load(folder, backend="onnxruntime-cpu") as rt:
        yield rt


def test_without_a_plain_graph_the_conditional_one_decodes_plainly(fallback_rt, tiny_vae):
    """The conditional graph with mask = 1 and image = 0: there every blend is
    sample * 1 + feature * 0, so it IS the plain decoder."""
    assert "decoder_uncond" not in fallback_rt.backends
    calls = []
    infer = fallback_rt.backends["decoder"].infer
    fallback_rt.backends["decoder"].infer = lambda feed: calls.append(feed) or infer(feed)
    f = feed("decoder", Shape(2, 64, 96), seed=3)
    try:
        out = fallback_rt.decode(f["latent"])
    finally:
        del fallback_rt.backends["decoder"].infer
    (sent,) = calls
    assert sent["mask"].min() == 1 and sent["image"].max() == sent["image"].min() == 0
    np.testing.assert_allclose(out, diffusers_decode(tiny_vae, f["latent"]), atol=ATOL, rtol=0)


def test_sample_with_a_torch_generator_equals_diffusers(tiny_rt, tiny_vae):
    image = feed("encoder", Shape(2, 64, 96), seed=4)["image"]
    got = tiny_rt.encode(image).sample(torch.Generator().manual_seed(7))
    ref = diffusers_encode(tiny_vae, image).sample(torch.Generator().manual_seed(7)).numpy()
    assert isinstance(got, np.ndarray)
    np.testing.assert_allclose(got, ref, atol=ATOL, rtol=0)
    # one generator per batch item, as diffusers takes them
    gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
    ref_gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
    np.testing.assert_allclose(tiny_rt.encode(image).sample(gens),
                               diffusers_encode(tiny_vae, image).sample(ref_gens).numpy(), atol=ATOL, rtol=0)


def test_sample_with_a_numpy_generator(tiny_rt):
    dist = tiny_rt.encode(feed("encoder", Shape(2, 64, 96), seed=5)["image"])
    a = dist.sample(np.random.default_rng(3))
    np.testing.assert_array_equal(a, dist.sample(3))
    assert not np.array_equal(a, dist.sample(np.random.default_rng(4)))
    noise = np.random.default_rng(3).standard_normal(a.shape, dtype=np.float32)
    np.testing.assert_allclose(a, dist.mean + dist.std * noise, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="generator must be"):
        dist.sample("seed")
    with pytest.raises(asym_runtime.AsymInputError, match="sample: seed -1 must be >= 0"):
        dist.sample(-1)  # numpy's own 'expected non-negative integer' named no seed


def test_sample_takes_generator_lists_as_diffusers_does(tiny_rt, tiny_vae):
    """A one-generator list is that generator for the whole batch (diffusers' randn_tensor); a
    list of any other length must have one generator per batch item, and says so."""
    image = feed("encoder", Shape(2, 64, 96), seed=4)["image"]
    dist = tiny_rt.encode(image)
    got = dist.sample([torch.Generator().manual_seed(7)])
    ref = diffusers_encode(tiny_vae, image).sample([torch.Generator().manual_seed(7)]).numpy()
    np.testing.assert_allclose(got, ref, atol=ATOL, rtol=0)
    with pytest.raises(asym_runtime.AsymInputError, match="sample: 3 generators for a batch of 2"):
        dist.sample([torch.Generator().manual_seed(s) for s in range(3)])
    with pytest.raises(asym_runtime.AsymInputError, match="sample: generator must be .*; got list"):
        dist.sample([torch.Generator().manual_seed(1), np.random.default_rng(2)])  # not all torch generators


def test_sample_without_a_generator_uses_torchs_rng_for_torch_results(tiny_rt, tiny_vae):
    """For torch results, no generator means torch's global RNG, as in diffusers: after the same
    torch.manual_seed the sample is diffusers' sample."""
    image = feed("encoder", Shape(1, 64, 64), seed=8)["image"]
    dist = tiny_rt.encode(torch.from_numpy(image))
    ref_dist = diffusers_encode(tiny_vae, image)
    with torch.random.fork_rng():
        torch.manual_seed(11)
        got = dist.sample()
        torch.manual_seed(11)
        ref = ref_dist.sample()
    assert isinstance(got, torch.Tensor)
    np.testing.assert_allclose(got.numpy(), ref.numpy(), atol=ATOL, rtol=0)


def test_sample_takes_numpy_integer_seeds(tiny_rt):
    """Seeds computed with numpy (np.int64) are seeds like ints, and a negative one is named too."""
    dist = tiny_rt.encode(feed("encoder", Shape(2, 64, 96), seed=5)["image"])
    np.testing.assert_array_equal(dist.sample(np.int64(3)), dist.sample(3))
    with pytest.raises(asym_runtime.AsymInputError, match="sample: seed -1 must be >= 0"):
        dist.sample(np.int64(-1))


def test_torch_tensors_in_give_torch_tensors_out(tiny_rt):
    f = feed("decoder", Shape(1, 64, 64), seed=6)
    t = {k: torch.from_numpy(v) for k, v in f.items()}
    out = tiny_rt.decode(t["latent"], image=t["image"], mask=t["mask"])
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
    np.testing.assert_array_equal(out.numpy(), tiny_rt.decode(f["latent"], image=f["image"], mask=f["mask"]))
    dist = tiny_rt.encode(t["image"])
    assert isinstance(dist.mean, torch.Tensor) and isinstance(dist.std, torch.Tensor)
    assert isinstance(dist.sample(torch.Generator().manual_seed(0)), torch.Tensor)
    assert isinstance(tiny_rt.decode(t["latent"]), torch.Tensor)


def test_other_float_dtypes_and_strided_inputs_give_the_same_numbers(tiny_rt):
    f = feed("decoder", Shape(2, 64, 96), seed=7)
    base = tiny_rt.decode(f["latent"], image=f["image"], mask=f["mask"])
    f64 = {k: v.astype(np.float64) for k, v in f.items()}  # float32 -> float64 -> float32 is exact
    np.testing.assert_array_equal(tiny_rt.decode(f64["latent"], image=f64["image"], mask=f64["mask"]), base)
    channels_last = f["image"].transpose(0, 2, 3, 1).copy().transpose(0, 3, 1, 2)
    assert not channels_last.flags.c_contiguous
    out = tiny_rt.decode(np.asfortranarray(f["latent"]), image=channels_last, mask=f["mask"])
    np.testing.assert_array_equal(out, base)
    half = tiny_rt.decode(f["latent"].astype(np.float16), image=f["image"], mask=f["mask"])
    assert half.dtype == np.float32 and np.abs(half - base).max() < 0.05  # fp16 rounding of the latent


def test_config_mirrors_diffusers(tiny_rt, tiny_vae):
    assert tiny_rt.config.scaling_factor == tiny_vae.config.scaling_factor == 0.18215
    for key in ("latent_channels", "block_out_channels", "up_block_out_channels", "layers_per_up_block"):
        assert tiny_rt.config[key] == (list(v) if isinstance(v := tiny_vae.config[key], tuple) else v)
    with pytest.raises(AttributeError, match="no 'nope'"):
        _ = tiny_rt.config.nope
    assert tiny_rt.variant == "tiny" and tiny_rt.limits == tiny_rt.manifest.limits


def test_config_is_read_only_and_answers_like_a_dict(tiny_rt):
    """The config is the manifest's: changing the dict it was made from, or the one to_dict()
    returns, does not change it; ``in`` and get() answer as they do on a dict."""
    src = {"scaling_factor": 0.5}
    config = asym_runtime.VAEConfig(src)
    src["scaling_factor"] = 2.0
    assert config.scaling_factor == 0.5
    copy = tiny_rt.config.to_dict()
    copy["scaling_factor"] = 1.0
    assert tiny_rt.config.scaling_factor == 0.18215
    assert "scaling_factor" in tiny_rt.config and "nope" not in tiny_rt.config
    assert tiny_rt.config.get("nope", 7) == 7 and tiny_rt.config.get("scaling_factor") == 0.18215


@pytest.mark.skipif(cuda_provider_available(), reason="onnxruntime-gpu is installed: auto may pick CUDA")
def test_auto_picks_onnxruntime_on_the_cpu_here_and_close_ends_it(tiny_artifact):
    f = feed("decoder", Shape(1, 64, 64))
    with asym_runtime.load(tiny_artifact) as rt:
        assert (rt.backend, rt.device, rt.precision) == ("onnxruntime-cpu", "cpu", "fp32")
        rt.decode(f["latent"])
    with pytest.raises(RuntimeError, match="closed"):
        rt.decode(f["latent"])


def test_unknown_backend_or_precision_is_a_value_error(tiny_artifact):
    with pytest.raises(ValueError, match="choose one of auto, tensorrt, onnxruntime, .*, openvino"):
        asym_runtime.load(tiny_artifact, backend="directml")
    with pytest.raises(ValueError, match=r"choose fp32, fp16, bf16 \(OpenVINO\) or None"):
        asym_runtime.load(tiny_artifact, precision="int8")


def test_tensorrt_requested_where_it_cannot_run_says_what_is_missing(tiny_artifact):
    from asym_runtime.backends.tensorrt import unavailable_reason

    if unavailable_reason() is None:
        pytest.skip("tensorrt, cuda-python and a GPU are present here")
    with pytest.raises(BackendUnavailableError) as e:
        asym_runtime.load(tiny_artifact, backend="tensorrt")
    msg = str(e.value)
    assert "\n" not in msg and ("tensorrt" in msg or "GPU" in msg)
    # one sentence, not an ImportError traceback chained under it
    assert e.value.__cause__ is None and (e.value.__context__ is None or e.value.__suppress_context__)


@pytest.mark.skipif(cuda_provider_available(), reason="onnxruntime-gpu is installed")
def test_onnxruntime_cuda_requested_without_it_says_so(tiny_artifact):
    with pytest.raises(BackendUnavailableError, match="no CUDA provider; install onnxruntime-gpu"):
        asym_runtime.load(tiny_artifact, backend="onnxruntime-cuda")


def test_graph_form_cuda_insists_on_the_cuda_provider(tiny_artifact):
    """'cuda' insists on the CUDA form: it ran the portable graphs on the CPU without a word."""
    with pytest.raises(ValueError, match="graph_form 'cuda' runs on ONNX Runtime's CUDA provider only"):
        asym_runtime.load(tiny_artifact, backend="onnxruntime-cpu", graph_form="cuda")
    with pytest.raises(ValueError, match="graph_form 'cuda'"):
        asym_runtime.load(tiny_artifact, backend="openvino", graph_form="cuda")
    if not cuda_provider_available():
        with pytest.raises(BackendUnavailableError, match="graph_form 'cuda' needs ONNX Runtime's CUDA provider"):
            asym_runtime.load(tiny_artifact, graph_form="cuda")


@pytest.mark.parametrize("kwargs", [
    dict(backend="directml"), dict(precision="int8"), dict(backend="openvino", precision="fp16"),
    dict(backend="tensorrt"), dict(backend="onnxruntime-cuda"), dict(backend="onnxruntime-cpu", graph_form="cuda"),
    dict(graphs=("vae",)), dict(precision="fp16"), dict(), dict(backend="openvino"),
    # each of these found a check_loadable or load branch that nothing else compared (mutation run):
    dict(graph_form="cuda"), dict(backend="onnxruntime", graph_form="cuda"), dict(backend="openvino", precision="bf16"),
    dict(graphs="decoder_uncond"), dict(graphs=()),
])
@pytest.mark.parametrize("folder", ["tiny_artifact", "with_engines"])
def test_check_loadable_refuses_what_load_refuses(request, folder, kwargs):
    """asym-serve checks a folder with check_loadable before Triton starts and the models load
    it there: both must agree, without check_loadable starting a backend. The folder with
    engines takes the engine branches as far as this machine goes (tests/runtime/test_gpu.py
    has engines built for other TensorRT versions refused by both)."""
    path = request.getfixturevalue(folder)
    try:
        with asym_runtime.load(path, **kwargs):
            loaded = None
    except (ValueError, ArtifactError, BackendUnavailableError) as e:
        loaded = e
    if loaded is None:
        assert asym_runtime.check_loadable(path, **kwargs).variant == "tiny"
    else:
        with pytest.raises(type(loaded)) as checked:
            asym_runtime.check_loadable(path, **kwargs)
        assert str(checked.value) == str(loaded)


def test_check_loadable_reads_the_data_files_the_graph_names(tiny_artifact, copy_artifact):
    """A data file is found from the graph's own tensors, as load() finds it (not from the
    manifest's hint): a damaged one is refused by both."""
    folder = copy_artifact(tiny_artifact)
    m = asym_runtime.read_manifest(folder)
    (data,) = m.companions("encoder.onnx")
    path = m.path(data.name)
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 1
    path.write_bytes(bytes(raw))
    for check in (asym_runtime.check_loadable, asym_runtime.load):
        with pytest.raises(ArtifactError, match=f"sha256 of {data.name}"):
            check(folder, graphs=("encoder",))
    asym_runtime.check_loadable(folder, graphs=("decoder",))  # only what is loaded is read


def test_a_precision_the_folder_lacks_names_the_ones_it_has(tiny_artifact, copy_artifact):
    import json

    folder = copy_artifact(tiny_artifact)  # the same folder as if exported with --no-fp16
    data = json.loads((folder / "manifest.json").read_text())
    data["files"] = {k: v for k, v in data["files"].items() if v.get("precision") != "fp16"}
    (folder / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match=r"no fp16 ONNX graph for encoder, decoder \(its manifest.json "
                                            r"lists precisions: fp32\); pass precision='fp32'"):
        asym_runtime.load(folder, precision="fp16")


def test_fp16_graphs_run_when_the_folder_has_them(tiny_artifact, tiny_vae):
    """Plumbing, not precision: ONNX Runtime's CPU provider computes FP16 graphs in FP32, so this
    shows load(precision="fp16") runs the FP16 files end to end; FP16 precision itself is judged
    through the faithful emulation (tests/export/test_fp16.py) and on a GPU."""
    from asym_export.verify import FP16_MIN_PSNR_DB, psnr

    assert asym_runtime.read_manifest(tiny_artifact).find("decoder", "onnx", "fp16")
    f = feed("decoder", Shape(2, 64, 96), seed=8)
    with asym_runtime.load(tiny_artifact, backend="onnxruntime-cpu", precision="fp16") as rt:
        assert rt.precision == "fp16"
        out = rt.decode(f["latent"], image=f["image"], mask=f["mask"])
    assert psnr(diffusers_decode(tiny_vae, **f), out, 2.0) >= FP16_MIN_PSNR_DB["sample"]


# --------------------------------------------------------------------------- decoder_uncond

@pytest.fixture(scope="module")
def uncond_artifact(tiny_artifact):
    """The tiny folder, whose export writes the plain-decoder graph."""
    assert asym_runtime.read_manifest(tiny_artifact).find("decoder_uncond", "onnx", "fp32")
    return tiny_artifact


def test_a_decoder_uncond_graph_is_used_when_the_folder_has_one(uncond_artifact, tiny_vae):
    f = feed("decoder", Shape(2, 64, 96), seed=9)
    with asym_runtime.load(uncond_artifact, backend="onnxruntime-cpu") as rt:
        assert "decoder_uncond" in rt.backends
        calls = []
        infer = rt.backends["decoder_uncond"].infer
        rt.backends["decoder_uncond"].infer = lambda feed: calls.append(sorted(feed)) or infer(feed)
        out = rt.decode(f["latent"])
        cond = rt.decode(f["latent"], image=f["image"], mask=f["mask"])  # the conditional graph still runs
    assert calls == [["latent"]]
    np.testing.assert_allclose(out, diffusers_decode(tiny_vae, f["latent"]), atol=ATOL, rtol=0)
    np.testing.assert_allclose(cond, diffusers_decode(tiny_vae, **f), atol=ATOL, rtol=0)


def test_graphs_picks_what_is_loaded(tiny_artifact, tiny_vae):
    f = feed("decoder", Shape(1, 64, 64), seed=12)
    with asym_runtime.load(tiny_artifact, backend="onnxruntime-cpu", graphs=["decoder"]) as rt:
        assert sorted(rt.backends) == ["decoder"]
        np.testing.assert_allclose(rt.decode(f["latent"]), diffusers_decode(tiny_vae, f["latent"]), atol=ATOL, rtol=0)
        with pytest.raises(RuntimeError, match="has no encoder graph: load"):
            rt.encode(f["image"])
    with pytest.raises(ValueError, match="choose from encoder, decoder, decoder_uncond"):
        asym_runtime.load(tiny_artifact, graphs=["decoder", "vae"])


def test_one_graph_name_as_a_string(tiny_artifact):
    with asym_runtime.load(tiny_artifact, backend="onnxruntime-cpu", graphs="decoder_uncond") as rt:
        assert sorted(rt.backends) == ["decoder_uncond"]


@pytest.mark.parametrize("graphs", [(), []])
def test_no_graphs_at_all_is_refused(tiny_artifact, graphs):
    """An empty selection would load a VAE that can run nothing: refused with the names to choose
    from, before the folder is read."""
    for check in (asym_runtime.load, asym_runtime.check_loadable):
        with pytest.raises(ValueError, match="choose from encoder, decoder, decoder_uncond"):
            check(tiny_artifact, backend="onnxruntime-cpu", graphs=graphs)


def test_graph_names_from_an_iterator_are_named_in_the_refusal(tmp_path):
    """graphs= may be any iterable; the refusal shows what was given, not the emptied iterator
    (it said "graphs []" for a generator). Checked before any folder is read."""
    with pytest.raises(ValueError, match=r"^graphs \['decoder', 'vae'\]: choose from encoder, decoder, decoder_uncond$"):
        asym_runtime.load(tmp_path / "nothing-here", graphs=(g for g in ["decoder", "vae"]))
    with pytest.raises(ValueError, match=r"^graphs \[\]: choose from"):
        asym_runtime.check_loadable(tmp_path / "nothing-here", graphs=iter(()))


def test_auto_loads_the_plain_decoder_alone(tiny_artifact):
    """graphs=("decoder_uncond",) with the default backend: no engines are wanted for it, so
    "auto" goes on to ONNX Runtime (the engine lookup must not take "no engines" for "every
    required engine is there")."""
    with asym_runtime.load(tiny_artifact, graphs="decoder_uncond") as rt:
        assert rt.backend.startswith("onnxruntime") and sorted(rt.backends) == ["decoder_uncond"]


def test_a_graph_the_folder_lacks_is_refused_without_a_wrong_precision_hint(tiny_artifact, copy_artifact):
    """A folder without decoder_uncond (exported before it existed), asked for that graph alone:
    refused by name, not loaded as a VAE with no graphs; and since the folder does have FP32
    graphs, no "pass precision=" advice that would not help."""
    import json

    folder = copy_artifact(tiny_artifact)
    data = json.loads((folder / "manifest.json").read_text())
    data["files"] = {n: e for n, e in data["files"].items()
                     if e["role"] != "decoder_uncond" and not (e.get("data_of") or "").startswith("decoder_uncond")}
    (folder / "manifest.json").write_text(json.dumps(data))
    for check in (asym_runtime.load, asym_runtime.check_loadable):
        with pytest.raises(ArtifactError) as e:
            check(folder, backend="onnxruntime-cpu", graphs="decoder_uncond")
        assert "has no fp32 ONNX graph for decoder_uncond (its manifest.json lists precisions: fp16, fp32)" in str(e.value)
        assert "pass precision" not in str(e.value)


@pytest.mark.skipif(cuda_provider_available(), reason="onnxruntime-gpu is installed: auto may pick CUDA")
def test_cuda_graph_with_auto_runs_on_the_cpu_where_no_gpu_backend_can(tiny_artifact, caplog):
    """Only a forced onnxruntime-cpu refuses cuda_graph=True; "auto" on a machine without a GPU
    backend loads on the CPU (a service configured for GPUs still starts) and warns."""
    import logging

    with caplog.at_level(logging.WARNING, logger="asym_runtime"):
        with asym_runtime.load(tiny_artifact, cuda_graph=True, graphs="decoder_uncond") as rt:
            assert rt.backend == "onnxruntime-cpu"
            assert rt.decode(feed("decoder", Shape(1, 64, 64))["latent"]).shape == (1, 3, 64, 64)
    assert "cuda_graph: no GPU backend can run here" in caplog.text


def test_check_loadable_refuses_openvino_where_it_is_not_installed(tiny_artifact, monkeypatch):
    """OpenVINO is an extra: where it is missing, check_loadable(backend="openvino") refuses as
    load() does, for every precision (None included), before anything is read. The missing
    package is simulated by its own unavailable_reason(): this machine may have it installed."""
    ov_backend = pytest.importorskip("asym_runtime.backends.openvino")
    reason = "OpenVINO is not installed: pip install -e '.[openvino]'"
    monkeypatch.setattr(ov_backend, "unavailable_reason", lambda: reason)
    for precision in (None, "fp32", "bf16"):
        for check in (asym_runtime.load, asym_runtime.check_loadable):
            with pytest.raises(BackendUnavailableError, match=r"^OpenVINO is not installed"):
                check(tiny_artifact, backend="openvino", precision=precision)


def test_an_error_inside_the_with_block_propagates_and_the_vae_is_closed(tiny_artifact):
    """The context manager closes the VAE on the way out and never swallows the caller's
    exception (an __exit__ returning True would make a failed request look like a success)."""
    with pytest.raises(KeyError, match="the caller's"):
        with asym_runtime.load(tiny_artifact, backend="onnxruntime-cpu", graphs="decoder_uncond") as rt:
            raise KeyError("the caller's")
    with pytest.raises(RuntimeError, match="this AsymVAE is closed"):
        rt.decode(feed("decoder", Shape(1, 64, 64))["latent"])



def test_a_failure_inside_onnx_runtime_is_a_backend_error(tiny_artifact):
    """A run that fails inside ONNX Runtime (seen on an H200: a cuDNN kernel launch failing)
    reaches the caller as the runtime's BackendError, naming the graph, device, precision and
    shape and keeping ONNX Runtime's words; before, onnxruntime's own exception types escaped."""
    from failing_runs import make_runs_fail

    from asym_runtime.errors import BackendError

    f = feed("decoder", Shape(1, 64, 64))
    with asym_runtime.load(tiny_artifact, backend="onnxruntime-cpu", graphs="decoder") as rt:
        make_runs_fail(rt, "decoder")
        with pytest.raises(BackendError, match=r"^ONNX Runtime \(cpu, fp32\) failed running decoder at "
                                               r"1x64x64: .*terminate flag") as err:
            rt.decode(f["latent"], image=f["image"], mask=f["mask"])
        assert type(err.value.__cause__).__module__.startswith("onnxruntime")


def test_what_counts_as_a_failed_run():
    """The errors the ONNX Runtime backend turns into BackendError: onnxruntime's own types, the
    plain RuntimeError of its C++ layer, torch's RuntimeErrors of the torch-tensor paths (an
    output buffer that does not fit, a stream after a failed launch); never the caller's
    mistakes or a call on a VAE another thread closed (the CUDA-graph path checks that inside
    the run)."""
    import onnxruntime.capi.onnxruntime_pybind11_state as ort_errors

    from asym_runtime.backends.onnxrt import _Closed, _is_run_failure
    from asym_runtime.errors import AsymInputError, ShapeOutOfLimitsError

    assert _is_run_failure(ort_errors.Fail("x")) and _is_run_failure(RuntimeError("Error in execution"))
    assert _is_run_failure(torch.OutOfMemoryError("CUDA out of memory"))
    if hasattr(torch, "AcceleratorError"):
        assert _is_run_failure(torch.AcceleratorError("CUDA error: an illegal memory access"))
    for e in (_Closed("this AsymVAE is closed"), AsymInputError("x"), ShapeOutOfLimitsError("x"), ValueError("x"),
              KeyError("x"), TypeError("x")):
        assert not _is_run_failure(e), e


def test_a_session_onnx_runtime_cannot_create_is_a_backend_error(tiny_artifact, monkeypatch, tmp_path):
    """ONNX Runtime failing while it creates a session for a checked graph (on a GPU: cuDNN not
    starting, an allocation) is the backend's failure, not a broken folder: before, every such
    failure was reported as ArtifactError("onnxruntime cannot load ...")."""
    from failing_runs import make_sessions_fail

    from asym_runtime.errors import BackendError

    make_sessions_fail(monkeypatch, tmp_path)
    with pytest.raises(BackendError, match=r"^ONNX Runtime could not create a session for decoder\.onnx on the "
                                           r"CPU: SystemError") as err:
        asym_runtime.load(tiny_artifact, backend="onnxruntime-cpu", graphs="decoder")
    assert not isinstance(err.value, ValueError)


def test_session_failures_say_whose_they_are(tiny_artifact, tmp_path):
    """Bytes onnxruntime cannot parse are the artifact's (ArtifactError); a graph whose kernels
    this onnxruntime lacks (here the CUDA form on the CPU provider, which has no NhwcConv) is the
    machine's (BackendUnavailableError); INVALID_ARGUMENT with the caller's provider_options in
    play is the caller's (ValueError); any other failure is the backend's (BackendError)."""
    import onnxruntime.capi.onnxruntime_pybind11_state as ort_errors

    from asym_runtime.backends.onnxrt import OnnxRuntimeBackend, session_failure
    from asym_runtime.errors import BackendError
    from asym_runtime.manifest import read_manifest
    from asym_runtime.specs import DECODER

    garbage = tmp_path / "decoder.onnx"
    garbage.write_bytes(b"not a model")
    with pytest.raises(ArtifactError, match="onnxruntime cannot load decoder.onnx: .*INVALID_PROTOBUF"):
        OnnxRuntimeBackend(DECODER, garbage, "cpu").activate()
    cuda_form = read_manifest(tiny_artifact).path("decoder.cuda.onnx")
    with pytest.raises(BackendUnavailableError, match=r"the installed onnxruntime cannot run decoder\.cuda\.onnx "
                                                      r"on the CPU: .*NhwcConv"):
        OnnxRuntimeBackend(DECODER, cuda_form, "cpu").activate()

    bad_option = ort_errors.InvalidArgument("unknown value for cudnn_conv_algo_search")
    assert type(session_failure("g.onnx", "cuda", bad_option, overrides=True)) is ValueError
    assert type(session_failure("g.onnx", "cuda", bad_option, overrides=False)) is BackendError
    for e in (ort_errors.Fail("CUDNN failure 4"), ort_errors.RuntimeException("bad allocation"),
              ort_errors.EPFail("x"), RuntimeError("x")):
        assert type(session_failure("g.onnx", "cuda", e)) is BackendError, e
    assert type(session_failure("g.onnx", "cuda", ort_errors.InvalidGraph("x"))) is ArtifactError

