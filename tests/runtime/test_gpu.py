"""GPU backends for real: TensorRT engines and ONNX Runtime's CUDA provider.

Every test here skips itself on a machine without a CUDA GPU (and tensorrt + cuda-python, or
onnxruntime-gpu). Nothing is mocked: engines are built from the tiny artifact's FP32 graphs
with the TensorRT builder, written into a copy of the folder with their manifest record, and
loaded through ``asym_runtime.load`` like any export's engines.
"""

import json
import logging

import numpy as np
import pytest
from runtime_helpers import check_race, diffusers_decode, diffusers_encode, feed, race

import asym_runtime
from asym_runtime.errors import ArtifactError, IncompatibleEngineError, ShapeOutOfLimitsError
from asym_runtime.specs import DECODER, ENCODER, Shape, ShapeLimits

pytestmark = pytest.mark.gpu

#: FP32 engines and the CUDA provider against diffusers: the export's FP32 contract. TF32 is
#: off in both (builder flag cleared; ORT provider option use_tf32=0), so measured errors
#: should sit near the CPU's ~1e-5.
ATOL = 1e-3
#: The engines' profile: small, so the build takes seconds and the limit check is visible.
LIMITS = ShapeLimits(min_batch=1, opt_batch=1, max_batch=2, min_height=64, opt_height=64, max_height=128,
                     min_width=64, opt_width=96, max_width=128)


def _cuda_available() -> bool:
    torch = pytest.importorskip("torch")
    return torch.cuda.is_available()


@pytest.fixture(scope="module")
def trt_artifact(tiny_artifact, tmp_path_factory):
    """The tiny folder with FP32 engines for this GPU, recorded in its manifest."""
    trt = pytest.importorskip("tensorrt")
    from asym_export.engines import engine_from_onnx, tensorrt_unavailable_reason  # the toolkit's builder (TF32 off)
    from asym_runtime.backends.tensorrt import device_info, unavailable_reason

    reason = tensorrt_unavailable_reason() or unavailable_reason()  # the builder's needs, then the runtime's
    if reason:
        pytest.skip(reason)
    import shutil

    from asym_runtime.manifest import sha256_file

    folder = tmp_path_factory.mktemp("trt") / "artifact"
    shutil.copytree(tiny_artifact, folder)
    data = json.loads((folder / "manifest.json").read_text())
    gen = folder / data["generation"]
    (gen / "engines").mkdir()
    for graph in (ENCODER, DECODER):
        name = graph.engine_name()
        engine_from_onnx(gen / graph.file_name(), gen / name, graph, LIMITS)
        data["files"][name] = {"role": graph.name, "format": "tensorrt_plan", "precision": "fp32",
                               "sha256": sha256_file(gen / name), "size": (gen / name).stat().st_size}
    data["engines"] = {"tensorrt_version": trt.__version__, "device": device_info(0), "version_compatible": False,
                       "hardware_compatibility_level": "none", "variant": "tiny", "profile": LIMITS.to_dict()}
    (folder / "manifest.json").write_text(json.dumps(data))
    return folder


@pytest.fixture(scope="module")
def trt_rt(trt_artifact):
    rt = asym_runtime.load(trt_artifact, backend="tensorrt")
    yield rt
    rt.close()


def test_tensorrt_matches_diffusers(trt_rt, tiny_vae):
    assert trt_rt.backend == "tensorrt" and trt_rt.device == "cuda:0"
    for i, shape in enumerate([Shape(2, 64, 96), Shape(1, 128, 64)]):
        f = feed("decoder", shape, seed=50 + i)
        image = feed("encoder", shape, seed=60 + i)["image"]
        np.testing.assert_allclose(trt_rt.encode(image).mean, diffusers_encode(tiny_vae, image).mean.numpy(),
                                   atol=ATOL, rtol=0)
        np.testing.assert_allclose(trt_rt.decode(f["latent"], image=f["image"], mask=f["mask"]),
                                   diffusers_decode(tiny_vae, **f), atol=ATOL, rtol=0)
        np.testing.assert_allclose(trt_rt.decode(f["latent"]), diffusers_decode(tiny_vae, f["latent"]),
                                   atol=ATOL, rtol=0)


def test_auto_picks_tensorrt_when_engines_can_run(trt_artifact):
    with asym_runtime.load(trt_artifact) as rt:
        assert rt.backend == "tensorrt"


def test_tensorrt_takes_torch_cuda_tensors_without_leaving_the_gpu(trt_rt):
    import torch

    f = feed("decoder", Shape(2, 64, 96), seed=70)
    want = trt_rt.decode(f["latent"], image=f["image"], mask=f["mask"])
    t = {k: torch.from_numpy(v).cuda() for k, v in f.items()}
    out = trt_rt.decode(t["latent"], image=t["image"], mask=t["mask"])
    assert out.is_cuda and out.dtype == torch.float32
    np.testing.assert_allclose(out.cpu().numpy(), want, atol=1e-6, rtol=0)
    dist = trt_rt.encode(t["image"])
    assert dist.mean.is_cuda and dist.sample(torch.Generator("cuda").manual_seed(0)).is_cuda


def test_tensorrt_limits_come_from_the_engine_profile(trt_rt):
    assert trt_rt.limits.max_width == 128 and trt_rt.limits.max_batch == 2
    with pytest.raises(ShapeOutOfLimitsError, match="width 136 is above this artifact's max_width 128"):
        trt_rt.decode(np.zeros((1, 4, 8, 17), np.float32))


@pytest.mark.parametrize("cuda_graph", [False, True], ids=["plain", "cuda-graph"])
def test_tensorrt_threads_give_serial_results(trt_artifact, cuda_graph):
    """One execution context (shapes, tensor addresses, buffer slots, captured graphs) behind one
    lock: 4 threads released together for 25 rounds, two of them on the same call each round,
    up to the profile's largest shape, give the serial results. Without the lock, one thread's
    shapes or addresses end up in another's run."""
    feeds = [feed("decoder", s, seed=80 + i) for i, s in enumerate([Shape(2, 128, 128), Shape(1, 64, 128),
                                                                    Shape(2, 96, 64)])]
    with asym_runtime.load(trt_artifact, backend="tensorrt", cuda_graph=cuda_graph) as rt:
        calls = [lambda f=f: rt.decode(f["latent"], image=f["image"], mask=f["mask"]) for f in feeds]
        serial = [c() for c in calls]
        # the same engine and tactic per shape: identical up to float noise; a race gives O(0.1)
        check_race(race(calls, threads=4, rounds=25), serial, exact=False, atol=1e-6)


def test_cuda_graphs_replay_the_same_numbers(trt_artifact):
    f = feed("decoder", Shape(1, 64, 96), seed=90)
    g = feed("decoder", Shape(2, 64, 64), seed=91)
    with asym_runtime.load(trt_artifact, backend="tensorrt") as plain:
        want_f = plain.decode(f["latent"], image=f["image"], mask=f["mask"])
        want_g = plain.decode(g["latent"], image=g["image"], mask=g["mask"])

    def decode(x):
        return rt.decode(x["latent"], image=x["image"], mask=x["mask"])

    def graphs():
        return [s for s in rt.backends["decoder"]._slots.values() if s.graph_exec is not None]

    with asym_runtime.load(trt_artifact, backend="tensorrt", cuda_graph=True) as rt:
        for _ in range(4):  # run; run + capture; replay; replay
            np.testing.assert_allclose(decode(f), want_f, atol=1e-6, rtol=0)
        assert rt.backends["decoder"].cuda_graph, "capture fell back to plain execution"
        assert len(graphs()) == 1
        np.testing.assert_allclose(decode(g), want_g, atol=1e-6, rtol=0)  # another shape: graph dropped
        assert graphs() == []
        for _ in range(3):
            np.testing.assert_allclose(decode(f), want_f, atol=1e-6, rtol=0)
        assert len(graphs()) == 1


def test_foreign_or_tampered_engines_are_refused(trt_artifact, tmp_path, caplog):
    import shutil

    folder = tmp_path / "foreign"
    shutil.copytree(trt_artifact, folder)
    data = json.loads((folder / "manifest.json").read_text())
    data["engines"]["tensorrt_version"] = "1.0.0.0"
    (folder / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(IncompatibleEngineError, match="built with TensorRT 1.0.0.0"):
        asym_runtime.load(folder, backend="tensorrt")
    with pytest.raises(IncompatibleEngineError, match="built with TensorRT 1.0.0.0"):
        asym_runtime.check_loadable(folder, backend="tensorrt")  # as load() refuses it (asym-serve's check)
    asym_runtime.check_loadable(folder)  # "auto" goes on to ONNX Runtime, as load() does
    with caplog.at_level(logging.WARNING, logger="asym_runtime"):
        with asym_runtime.load(folder) as rt:
            assert rt.backend.startswith("onnxruntime")
    assert "using ONNX Runtime instead" in caplog.text

    plan = folder / data["generation"] / "engines" / "decoder.plan"
    raw = bytearray(plan.read_bytes())
    raw[len(raw) // 2] ^= 1
    plan.write_bytes(bytes(raw))
    data["engines"]["tensorrt_version"] = __import__("tensorrt").__version__
    (folder / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match="sha256 of engines/decoder.plan"):
        asym_runtime.load(folder, backend="tensorrt")


# --------------------------------------------------------------------------- ONNX Runtime CUDA

@pytest.fixture(scope="module")
def ort_cuda(tiny_artifact):
    from asym_runtime.backends.onnxrt import cuda_provider_available

    if not cuda_provider_available() or not _cuda_available():
        pytest.skip("needs onnxruntime-gpu and a CUDA GPU")
    rt = asym_runtime.load(tiny_artifact, backend="onnxruntime-cuda")
    yield rt
    rt.close()


def test_onnxruntime_cuda_matches_diffusers_with_numpy_and_torch_cuda(ort_cuda, tiny_vae):
    import torch

    assert ort_cuda.backend == "onnxruntime-cuda"
    f = feed("decoder", Shape(2, 64, 96), seed=100)
    want = diffusers_decode(tiny_vae, **f)
    np.testing.assert_allclose(ort_cuda.decode(f["latent"], image=f["image"], mask=f["mask"]), want, atol=ATOL, rtol=0)
    t = {k: torch.from_numpy(v).cuda() for k, v in f.items()}
    out = ort_cuda.decode(t["latent"], image=t["image"], mask=t["mask"])
    assert out.is_cuda
    np.testing.assert_allclose(out.cpu().numpy(), want, atol=ATOL, rtol=0)
    np.testing.assert_allclose(ort_cuda.decode(t["latent"]).cpu().numpy(), diffusers_decode(tiny_vae, f["latent"]),
                               atol=ATOL, rtol=0)
    image = feed("encoder", Shape(2, 64, 96), seed=101)["image"]
    np.testing.assert_allclose(ort_cuda.encode(torch.from_numpy(image).cuda()).mean.cpu().numpy(),
                               diffusers_encode(tiny_vae, image).mean.numpy(), atol=ATOL, rtol=0)
